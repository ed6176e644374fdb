"""The S3 backend: URL shapes (upstream's s3.rs test), and reads from moto on loopback, signed
and anonymous. moto does not verify signatures; ``test_signers.py`` holds our signer to
botocore's, byte for byte."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from nydusfs.config import S3Config
from nydusfs.errors import BackendError, ConfigError
from nydusfs.storage.backends.s3 import S3Backend
from tests.helpers.registry_servers import MotoS3, have_moto

BUCKET = "nydus-blobs"
DATA = random.Random(5).randbytes(250_000)
BLOB = "ef" * 32


def make(request: pytest.FixtureRequest, **kw: object) -> S3Backend:
    backend = S3Backend(S3Config(**kw))  # type: ignore[arg-type]
    request.addfinalizer(backend.close)
    return backend


# --- URL shapes (no server) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "url"),
    [
        # upstream test_s3_state_url (without its query string)
        ({"scheme": "http", "endpoint": "localhost:9000", "bucket_name": "test-bucket",
          "object_prefix": "test-prefix-"},
         "http://localhost:9000/test-bucket/test-prefix-test-object"),
        # upstream test_s3_new's config: the endpoint is a URL
        ({"endpoint": "https://test.com", "bucket_name": "antsys-nydus",
          "object_prefix": "nydus_v2/"},
         "https://test.com/antsys-nydus/nydus_v2/test-object"),
        # empty endpoint: the regional AWS endpoint (upstream: s3.amazonaws.com)
        ({"region": "eu-west-1", "bucket_name": "b"},
         "https://s3.eu-west-1.amazonaws.com/b/test-object"),
        ({"scheme": "", "endpoint": "minio:9000", "bucket_name": "b", "object_prefix": "a b/"},
         "https://minio:9000/b/a%20b/test-object"),
    ],
)  # fmt: skip
def test_url_shape(request: pytest.FixtureRequest, settings: dict[str, str], url: str) -> None:
    backend = make(request, **{"region": "us-east-1", **settings})
    assert backend.object_url("test-object") == url


def test_config_errors(request: pytest.FixtureRequest) -> None:
    with pytest.raises(ConfigError, match="bucket_name"):
        make(request, region="us-east-1")
    with pytest.raises(ConfigError, match="region"):
        make(request, bucket_name="b")
    with pytest.raises(ConfigError, match="or neither"):
        make(request, bucket_name="b", region="r", access_key_secret="s")


def test_anonymous_requests_are_unsigned(request: pytest.FixtureRequest) -> None:
    backend = make(request, bucket_name="b", region="us-east-1")
    assert backend.sign("GET", "https://e/b/k", {"Range": "bytes=0-1"}) == {"Range": "bytes=0-1"}
    signed = make(
        request, bucket_name="b", region="us-east-1", access_key_id="a", access_key_secret="s"
    ).sign("GET", "https://e/b/k", {"Range": "bytes=0-1"})
    assert signed["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=a/")
    assert "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date," in signed["Authorization"]


# --- against moto ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    if not have_moto():
        pytest.skip("needs moto[server] (test extras)")
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    try:
        server.create_bucket(BUCKET)
        server.put_object(BUCKET, "blobs/" + BLOB, DATA)
        server.put_object(BUCKET, BLOB, DATA[:4096])
        server.put_object(BUCKET, "public/" + BLOB, DATA[:5000], public=True)
        yield server
    finally:
        server.close()


def signed(request: pytest.FixtureRequest, moto: MotoS3, **kw: object) -> S3Backend:
    settings: dict[str, object] = {
        "scheme": "http",
        "endpoint": moto.endpoint,
        "region": moto.region,
        "bucket_name": BUCKET,
        "object_prefix": "blobs/",
        "access_key_id": moto.access_key,
        "access_key_secret": moto.secret_key,
        **kw,
    }
    return make(request, **settings)


@pytest.mark.timeout(60)
def test_signed_reads(request: pytest.FixtureRequest, moto: MotoS3) -> None:
    reader = signed(request, moto).get_reader(BLOB)
    assert reader.blob_size() == len(DATA)
    assert reader.read(0, 100) == DATA[:100]
    assert reader.read(99_999, 100_001) == DATA[99_999:200_000]
    assert reader.read(len(DATA) - 3, 10) == DATA[-3:]
    assert reader.read(len(DATA), 10) == b""


@pytest.mark.timeout(60)
def test_object_prefix(request: pytest.FixtureRequest, moto: MotoS3) -> None:
    reader = signed(request, moto, object_prefix="").get_reader(BLOB)
    assert reader.blob_size() == 4096
    assert reader.read(4000, 200) == DATA[4000:4096]


@pytest.mark.timeout(60)
def test_endpoint_as_url(request: pytest.FixtureRequest, moto: MotoS3) -> None:
    reader = signed(request, moto, scheme="https", endpoint=moto.url).get_reader(BLOB)
    assert reader.read(1, 2) == DATA[1:3]


@pytest.mark.timeout(60)
def test_missing_object(request: pytest.FixtureRequest, moto: MotoS3) -> None:
    reader = signed(request, moto, retry_limit=3).get_reader("00" * 32)
    with pytest.raises(BackendError) as e:
        reader.blob_size()
    assert not e.value.retryable and "404" in str(e.value)
    with pytest.raises(BackendError) as e:
        reader.read(0, 10)
    assert not e.value.retryable and "404" in str(e.value)


@pytest.mark.timeout(60)
def test_missing_bucket(request: pytest.FixtureRequest, moto: MotoS3) -> None:
    with pytest.raises(BackendError, match=r"404|NoSuchBucket"):
        signed(request, moto, bucket_name="no-such-bucket").get_reader(BLOB).read(0, 1)


@pytest.mark.timeout(60)
def test_anonymous(request: pytest.FixtureRequest, moto: MotoS3) -> None:
    backend = signed(request, moto, object_prefix="public/", access_key_id="", access_key_secret="")
    reader = backend.get_reader(BLOB)
    assert reader.blob_size() == 5000
    assert reader.read(4990, 100) == DATA[4990:5000]
    private = signed(request, moto, access_key_id="", access_key_secret="").get_reader(BLOB)
    with pytest.raises(BackendError, match="403") as e:
        private.read(0, 1)
    assert not e.value.retryable
