"""The request signers against published vectors and a reference implementation.

moto checks no signature, so SigV4 is compared with botocore's own signer (``S3SigV4Auth``,
what boto3 uses for S3) on identical requests at a fixed time, byte for byte, and with AWS's
documented GET-object example. OSS is checked with Aliyun's documented example (the same vector
every OSS SDK tests with); upstream's oss.rs tests only assert the ``OSS <id>:`` prefix.
"""

from __future__ import annotations

from datetime import UTC, datetime
from unittest import mock

import pytest

from nydusfs.storage.backends.signing import (
    EMPTY_SHA256,
    http_date,
    oss_sign,
    oss_signature,
    oss_string_to_sign,
    s3_quote,
    sigv4_sign,
)

botocore_auth = pytest.importorskip("botocore.auth")
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]  # noqa: E402
from botocore.credentials import Credentials  # type: ignore[import-untyped]  # noqa: E402

NOW = datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC)
AK, SK = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def botocore_authorization(
    cls: type, method: str, url: str, headers: dict[str, str], region: str = "us-east-1"
) -> tuple[str, dict[str, str]]:
    request = AWSRequest(method=method, url=url, headers=dict(headers))
    request.headers["X-Amz-Content-SHA256"] = EMPTY_SHA256
    with mock.patch.object(
        botocore_auth, "get_current_datetime", return_value=NOW.replace(tzinfo=None)
    ):
        cls(Credentials(AK, SK), "s3", region).add_auth(request)
    return request.headers["Authorization"], dict(request.headers.items())


CASES = [
    ("GET", "http://127.0.0.1:5001/bucket/prefix/abc", {"Range": "bytes=0-9"}),
    ("HEAD", "http://127.0.0.1:5001/bucket/prefix/abc", {}),
    ("GET", "https://s3.eu-west-1.amazonaws.com/bkt/blobs/" + "ab" * 32, {"Range": "bytes=5-"}),
    ("GET", "https://s3.amazonaws.com:8443/bkt/k", {"Range": "bytes=1-2"}),
    ("GET", "http://localhost/b/" + s3_quote("dir/with space+plus~tilde&amp"), {}),
    ("GET", "http://127.0.0.1:9000/b/k?versionId=3&acl", {"x-amz-meta-a": "  two   spaces "}),
]


@pytest.mark.parametrize(("method", "url", "headers"), CASES)
def test_sigv4_matches_botocore_s3_signer(method: str, url: str, headers: dict[str, str]) -> None:
    ours = sigv4_sign(
        method, url, headers, access_key=AK, secret_key=SK, region="us-east-1", now=NOW
    )
    theirs, their_headers = botocore_authorization(botocore_auth.S3SigV4Auth, method, url, headers)
    assert ours["Authorization"] == theirs
    assert ours["X-Amz-Date"] == their_headers["X-Amz-Date"] == "20240301T123456Z"
    assert ours["X-Amz-Content-SHA256"] == EMPTY_SHA256


def test_sigv4_matches_plain_sigv4_on_simple_paths() -> None:
    url = "http://127.0.0.1:5001/bucket/abc"
    ours = sigv4_sign("GET", url, {"Range": "bytes=0-1"}, access_key=AK, secret_key=SK,
                      region="eu-central-1", now=NOW)  # fmt: skip
    theirs, _ = botocore_authorization(
        botocore_auth.SigV4Auth, "GET", url, {"Range": "bytes=0-1"}, region="eu-central-1"
    )
    assert ours["Authorization"] == theirs


def test_sigv4_aws_documented_get_object_example() -> None:
    # "Example: GET Object" in AWS's "Signature Calculations for the Authorization Header".
    headers = sigv4_sign(
        "GET",
        "https://examplebucket.s3.amazonaws.com/test.txt",
        {"Range": "bytes=0-9"},
        access_key="AKIAIOSFODNN7EXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        now=datetime(2013, 5, 24, tzinfo=UTC),
    )
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_sigv4_shape_as_upstream_test() -> None:
    # upstream s3.rs test_s3_state_sign: the signed header set for a ranged GET.
    headers = sigv4_sign(
        "GET",
        "http://localhost:9000/test-bucket/test-prefix-test-object",
        {"Range": "bytes=5242900-"},
        access_key="test-key",
        secret_key="test-key-secret",
        region="us-east-1",
    )
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=test-key/")
    assert "/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;" \
        "x-amz-date, Signature=" in headers["Authorization"]  # fmt: skip


# --- OSS ---------------------------------------------------------------------------------------

OSS_ID, OSS_SECRET = "44CF9590006BF252F707", "OtxrzxIsfpFjA7SwPzILwy8Bw21TLhquhboDYROV"


def test_oss_documented_example() -> None:
    # Aliyun "Include a signature in the Authorization header", PUT /nelson to oss-example.
    text = oss_string_to_sign(
        "PUT",
        "/oss-example/nelson",
        {
            "Content-MD5": "ODBGOERFMDMzQTczRUY3NUE3NzA5QzdFNUYzMDQxNEM=",
            "Content-Type": "text/html",
            "X-OSS-Meta-Author": "foo@bar.com",
            "X-OSS-Magic": "abracadabra",
            "Host": "oss-example.oss-cn-hangzhou.aliyuncs.com",
        },
        "Thu, 17 Nov 2005 18:49:58 GMT",
    )
    assert text == (
        "PUT\nODBGOERFMDMzQTczRUY3NUE3NzA5QzdFNUYzMDQxNEM=\ntext/html\n"
        "Thu, 17 Nov 2005 18:49:58 GMT\nx-oss-magic:abracadabra\nx-oss-meta-author:foo@bar.com\n"
        "/oss-example/nelson"
    )
    assert oss_signature(OSS_SECRET, text) == "26NBxoKdsyly4EDv6inkoDft/yA="


def test_oss_documented_url_signature_vector() -> None:
    # The same documentation's presigned-URL example: the string to sign has Expires in the
    # Date position, so the header signer's primitive reproduces it.
    text = oss_string_to_sign("GET", "/oss-example/oss-api.pdf", {}, "1141889120")
    assert oss_signature(OSS_SECRET, text) == "EwaNTn1erJGkimiJ9WmXgwnANLc="


def test_oss_sign_headers() -> None:
    when = datetime(2005, 11, 17, 18, 49, 58, tzinfo=UTC)
    out = oss_sign(
        "PUT",
        "/oss-example/nelson",
        {
            "Content-MD5": "ODBGOERFMDMzQTczRUY3NUE3NzA5QzdFNUYzMDQxNEM=",
            "Content-Type": "text/html",
            "X-OSS-Meta-Author": "foo@bar.com",
            "X-OSS-Magic": "abracadabra",
            "Authorization": "stale",
        },
        access_key_id=OSS_ID,
        access_key_secret=OSS_SECRET,
        now=when,
    )
    assert out["Date"] == http_date(when) == "Thu, 17 Nov 2005 18:49:58 GMT"
    assert out["Authorization"] == f"OSS {OSS_ID}:26NBxoKdsyly4EDv6inkoDft/yA="


def test_oss_range_is_not_signed() -> None:
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    plain = oss_sign("GET", "/b/k", {}, access_key_id="a", access_key_secret="s", now=when)
    ranged = oss_sign(
        "GET", "/b/k", {"Range": "bytes=0-1"}, access_key_id="a", access_key_secret="s", now=when
    )
    assert plain["Authorization"] == ranged["Authorization"]
    assert ranged["Range"] == "bytes=0-1"
