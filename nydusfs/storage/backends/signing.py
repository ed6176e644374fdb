"""Request signers for the object-storage backends: AWS Signature V4 (S3) and Aliyun OSS (v1).

Pure functions over (method, URL, headers, credentials, time): no I/O, no state, so they are
thread-safe and testable against published vectors and reference implementations
(``tests/contract/test_signers.py`` compares ``sigv4_sign`` with botocore's ``S3SigV4Auth`` byte
for byte, and ``oss_signature`` with Aliyun's documented example).

SigV4 follows the S3 flavour (what upstream's ``s3.rs`` and botocore's ``S3SigV4Auth`` do): the
canonical URI is the request path exactly as sent (S3 does not normalise it, so callers
percent-encode object keys once with ``s3_quote``), every header handed in is signed, plus
``host``, ``x-amz-date`` and ``x-amz-content-sha256``. Upstream signs ``host`` without the
port (and then sends that Host header); we sign the Host that requests actually sends,
``host[:port]`` with the port only when it is not the scheme's default, as botocore does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from urllib.parse import quote, urlsplit

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
_SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"
# Headers a proxy or the HTTP stack may add, drop or rewrite; signing them would make the
# signature fragile (botocore's SIGNED_HEADERS_BLACKLIST, plus upstream's user-agent).
_UNSIGNED_HEADERS = frozenset(
    {
        "authorization", "user-agent", "connection", "expect", "keep-alive",
        "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
        "upgrade", "x-amzn-trace-id",
    }
)  # fmt: skip


def s3_quote(key: str) -> str:
    """An object key as it goes into an S3 URL path: every byte but unreserved and ``/`` encoded."""
    return quote(key, safe="/~")


def _host_header(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets in the Host header
        host = f"[{host}]"
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is not None and parts.port != default_port:
        return f"{host}:{parts.port}"
    return host


def _canonical_query(query: str) -> str:
    # The query is taken as already encoded (we build our URLs ourselves), sorted by key then
    # value; a bare key signs as "key=".
    pairs = []
    for item in query.split("&") if query else []:
        key, _, value = item.partition("=")
        pairs.append((key, value))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """The derived key for one day, region and service (``AWS4`` + secret, four HMACs)."""
    key = _hmac(f"AWS4{secret_key}".encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def sigv4_sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    *,
    access_key: str,
    secret_key: str,
    region: str,
    service: str = "s3",
    payload_sha256: str = EMPTY_SHA256,
    now: datetime | None = None,
) -> dict[str, str]:
    """``headers`` plus ``X-Amz-Date``, ``X-Amz-Content-SHA256`` and ``Authorization``.

    ``url`` must be the URL that will be sent, already percent-encoded. ``now`` (UTC) is for
    tests; by default the current time.
    """
    when = (now or datetime.now(UTC)).astimezone(UTC)
    timestamp = when.strftime(_SIGV4_TIMESTAMP)
    date = timestamp[:8]
    out = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-amz-date")}
    for name in [k for k in out if k.lower() == "x-amz-content-sha256"]:
        del out[name]
    out["X-Amz-Date"] = timestamp
    out["X-Amz-Content-SHA256"] = payload_sha256

    signed: dict[str, list[str]] = {}
    for name, value in out.items():
        lname = name.lower()
        if lname not in _UNSIGNED_HEADERS:
            signed.setdefault(lname, []).append(" ".join(value.split()))
    if "host" not in signed:
        signed["host"] = [_host_header(url)]
    names = sorted(signed)
    canonical_headers = "".join(f"{n}:{','.join(signed[n])}\n" for n in names)
    signed_headers = ";".join(names)

    parts = urlsplit(url)
    canonical_request = "\n".join(
        (
            method.upper(),
            parts.path or "/",
            _canonical_query(parts.query),
            canonical_headers,
            signed_headers,
            payload_sha256,
        )
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        (
            SIGV4_ALGORITHM,
            timestamp,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        )
    )
    key = sigv4_signing_key(secret_key, date, region, service)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"{SIGV4_ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return out


# --- Aliyun OSS (header signature, "OSS <id>:<sig>") -------------------------------------------


def http_date(now: datetime | None = None) -> str:
    """An RFC 7231 date (``Thu, 17 Nov 2005 18:49:58 GMT``), as OSS wants in ``Date``."""
    return format_datetime((now or datetime.now(UTC)).astimezone(UTC), usegmt=True)


def oss_string_to_sign(
    verb: str,
    resource: str,
    headers: Mapping[str, str],
    date: str,
) -> str:
    """``VERB\\nContent-MD5\\nContent-Type\\nDate\\n`` + canonical ``x-oss-*`` headers + resource.

    The ``x-oss-*`` headers are lower-cased, sorted and written ``name:value\\n`` (Aliyun's
    rule; upstream keeps insertion order, which only differs when there are several, and it
    sends none).
    """
    lower = {k.lower(): v.strip() for k, v in headers.items()}
    oss_headers = "".join(
        f"{name}:{lower[name]}\n" for name in sorted(n for n in lower if n.startswith("x-oss-"))
    )
    return (
        "\n".join(
            (verb.upper(), lower.get("content-md5", ""), lower.get("content-type", ""), date, "")
        )
        + oss_headers
        + resource
    )


def oss_signature(secret: str, string_to_sign: str) -> str:
    """base64(HMAC-SHA1(secret, string_to_sign))."""
    digest = hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def oss_sign(
    verb: str,
    resource: str,
    headers: Mapping[str, str],
    *,
    access_key_id: str,
    access_key_secret: str,
    now: datetime | None = None,
) -> dict[str, str]:
    """``headers`` plus ``Date`` and ``Authorization: OSS <id>:<signature>``.

    ``resource`` is ``/<bucket>/<object key>`` (upstream's ``CanonicalizedResource``).
    """
    out = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "date")}
    date = http_date(now)
    out["Date"] = date
    signature = oss_signature(access_key_secret, oss_string_to_sign(verb, resource, out, date))
    out["Authorization"] = f"OSS {access_key_id}:{signature}"
    return out
