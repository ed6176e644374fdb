"""The OSS backend: URL shapes as upstream's oss.rs tests, and reads from a loopback OSS
look-alike that recomputes every signature (``tests.helpers.registry_servers.OssServer``)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from nydusfs.config import OssConfig, ProxyConfig
from nydusfs.errors import BackendError, ConfigError
from nydusfs.storage.backends.oss import OssBackend
from tests.helpers.registry_servers import OssServer

BUCKET = "nydus-images"
DATA = random.Random(3).randbytes(200_000)
BLOB = "ab" * 32


def make(request: pytest.FixtureRequest, **kw: object) -> OssBackend:
    backend = OssBackend(OssConfig(**kw))  # type: ignore[arg-type]
    request.addfinalizer(backend.close)
    return backend


# --- URL shapes (no server) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "bucket", "prefix", "key", "url", "resource"),
    [
        # upstream test_oss_state / test_oss_url_empty_query / ..._preserves_path_separators
        ("oss", "images", "nydus", "obj_key", "https://images.oss/nydusobj_key",
         "/images/nydusobj_key"),
        ("oss-cn-hangzhou.aliyuncs.com", "mybucket", "prefix/", "myobj",
         "https://mybucket.oss-cn-hangzhou.aliyuncs.com/prefix/myobj", "/mybucket/prefix/myobj"),
        ("oss.example.com", "mybucket", "prefix/", "subdir/file.tar.gz",
         "https://mybucket.oss.example.com/prefix/subdir/file.tar.gz",
         "/mybucket/prefix/subdir/file.tar.gz"),
        # ours: IP and localhost endpoints are path-style; a URL endpoint brings its scheme
        ("127.0.0.1:9000", "b", "p/", "k", "https://127.0.0.1:9000/b/p/k", "/b/p/k"),
        ("http://localhost:9000", "b", "", "k", "http://localhost:9000/b/k", "/b/k"),
        ("[::1]:9000", "b", "", "k", "https://[::1]:9000/b/k", "/b/k"),
    ],
)  # fmt: skip
def test_url_shape(
    request: pytest.FixtureRequest,
    endpoint: str,
    bucket: str,
    prefix: str,
    key: str,
    url: str,
    resource: str,
) -> None:
    backend = make(
        request, endpoint=endpoint, bucket_name=bucket, object_prefix=prefix, scheme="https"
    )
    assert backend.object_url(key) == url
    assert backend.resource(key) == resource


def test_config_errors(request: pytest.FixtureRequest) -> None:
    with pytest.raises(ConfigError, match="endpoint and bucket_name"):
        make(request, endpoint="oss.example.com")
    with pytest.raises(ConfigError, match="or neither"):
        make(request, endpoint="e", bucket_name="b", access_key_id="id")


# --- against the OSS look-alike ----------------------------------------------------------------


@pytest.fixture(scope="module")
def oss() -> Iterator[OssServer]:
    server = OssServer()
    server.objects[(BUCKET, "blobs/" + BLOB)] = DATA
    server.objects[(BUCKET, BLOB)] = DATA[:1000]
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _reset(oss: OssServer) -> None:
    oss.hits.clear()
    oss.allow_anonymous = False


def signed(request: pytest.FixtureRequest, oss: OssServer, **kw: object) -> OssBackend:
    settings: dict[str, object] = {
        "scheme": "http",
        "endpoint": oss.endpoint,
        "bucket_name": BUCKET,
        "object_prefix": "blobs/",
        "access_key_id": oss.key_id,
        "access_key_secret": oss.key_secret,
        **kw,
    }
    return make(request, **settings)


@pytest.mark.timeout(60)
def test_signed_reads(request: pytest.FixtureRequest, oss: OssServer) -> None:
    reader = signed(request, oss).get_reader(BLOB)
    assert reader.blob_size() == len(DATA)
    assert reader.read(0, 100) == DATA[:100]
    assert reader.read(54_321, 65_536) == DATA[54_321 : 54_321 + 65_536]
    assert reader.read(len(DATA) - 5, 100) == DATA[-5:]
    assert reader.read(len(DATA), 1) == b""
    assert oss.hits["ok"] == 5 and oss.hits["bad-signature"] == 0


@pytest.mark.timeout(60)
def test_object_prefix(request: pytest.FixtureRequest, oss: OssServer) -> None:
    reader = signed(request, oss, object_prefix="").get_reader(BLOB)
    assert reader.blob_size() == 1000
    assert reader.read(990, 100) == DATA[990:1000]


@pytest.mark.timeout(60)
def test_virtual_host_style_through_a_proxy(request: pytest.FixtureRequest, oss: OssServer) -> None:
    # bucket.oss.test:<port> resolves nowhere; the OSS server doubles as the HTTP proxy, so
    # the request arrives in upstream's shape (Host: <bucket>.<endpoint>) without DNS.
    proxy = ProxyConfig(url=f"http://{oss.endpoint}", fallback=False)
    backend = signed(request, oss, endpoint=f"{oss.domain}:{oss.port}", proxy=proxy)
    assert backend.object_url(BLOB) == f"http://{BUCKET}.{oss.domain}:{oss.port}/blobs/{BLOB}"
    reader = backend.get_reader(BLOB)
    assert reader.blob_size() == len(DATA)
    assert reader.read(7, 7) == DATA[7:14]
    assert oss.hits["ok"] == 2


@pytest.mark.timeout(60)
def test_wrong_secret_is_refused_and_not_retried(
    request: pytest.FixtureRequest, oss: OssServer
) -> None:
    backend = signed(request, oss, access_key_secret="wrong", retry_limit=3)
    with pytest.raises(BackendError) as e:
        backend.get_reader(BLOB).read(0, 10)
    assert not e.value.retryable
    assert "403" in str(e.value) and "SignatureDoesNotMatch" in str(e.value)
    assert oss.hits["bad-signature"] == 1


@pytest.mark.timeout(60)
def test_missing_object(request: pytest.FixtureRequest, oss: OssServer) -> None:
    with pytest.raises(BackendError) as e:
        signed(request, oss).get_reader("cd" * 32).blob_size()
    assert not e.value.retryable and "404" in str(e.value)


@pytest.mark.timeout(60)
def test_anonymous(request: pytest.FixtureRequest, oss: OssServer) -> None:
    backend = signed(request, oss, access_key_id="", access_key_secret="")
    with pytest.raises(BackendError, match="403"):
        backend.get_reader(BLOB).read(0, 10)
    oss.allow_anonymous = True
    assert backend.get_reader(BLOB).read(0, 10) == DATA[:10]
    assert oss.hits["anonymous"] == 1 and oss.hits["ok"] == 1
