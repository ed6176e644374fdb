"""The ``s3`` backend: blobs as objects in an S3 (or S3-compatible) bucket (upstream ``s3.rs``).

URLs are path-style, as upstream: ``<scheme>://<endpoint>/<bucket>/<object_prefix><blob id>``;
the size comes from ``HEAD`` (``Content-Length``), data from ``GET`` with ``Range``. Requests
are signed with AWS Signature V4 (``signing.sigv4_sign``, payload hash of the empty body)
when ``access_key_id`` and ``access_key_secret`` are set, and sent anonymously when both are
empty (a public bucket; upstream signs with empty keys, which no server accepts).

Differences from upstream, on purpose:

- An empty ``endpoint`` means ``s3.<region>.amazonaws.com``. Upstream uses the global
  ``s3.amazonaws.com``, which answers path-style requests for buckets outside us-east-1 with a
  301 that upstream cannot follow.
- An ``endpoint`` given as a URL (``http://host:port``, as upstream's own test config does)
  supplies the scheme; upstream would build ``https://http://...``.
- Object keys are percent-encoded once in the URL and signed as sent; the Host header signed is
  the one sent (with a non-default port), where upstream signs the host without the port.

Thread-safety: the backend holds only immutable settings and a thread-safe ``HttpClient``.
"""

from __future__ import annotations

import logging

import requests

from nydusfs.config import S3Config
from nydusfs.errors import BackendError, ConfigError
from nydusfs.storage.backends.base import BlobBackend, BlobReader
from nydusfs.storage.backends.http import HttpClient, ranged_body
from nydusfs.storage.backends.localfs import check_blob_id
from nydusfs.storage.backends.signing import s3_quote, sigv4_sign

log = logging.getLogger(__name__)


def split_endpoint(endpoint: str, scheme: str) -> tuple[str, str]:
    """(scheme, host[:port]) from an endpoint that may carry its own scheme."""
    for prefix in ("https://", "http://"):
        if endpoint.startswith(prefix):
            return prefix[:-3], endpoint[len(prefix) :].rstrip("/")
    return scheme or "https", endpoint.rstrip("/")


def content_length(resp: requests.Response, what: str) -> int:
    """The size a HEAD answer gives; a non-retryable ``BackendError`` if it gives none."""
    try:
        return int(resp.headers["Content-Length"])
    except (KeyError, ValueError) as e:
        raise BackendError(f"{what}: no valid Content-Length in the answer", retryable=False) from e


class S3Reader(BlobReader):
    backend: S3Backend

    def try_blob_size(self) -> int:
        b = self.backend
        url = b.object_url(self.blob_id)
        what = f"size of s3 object {b.object_key(self.blob_id)} in bucket {b.bucket}"
        resp = b.client.request("HEAD", url, headers=b.sign("HEAD", url, {}))
        b.client.check_status(resp, what)
        return content_length(resp, what)

    def try_read(self, offset: int, size: int) -> bytes:
        b = self.backend
        url = b.object_url(self.blob_id)
        headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
        resp = b.client.request("GET", url, headers=b.sign("GET", url, headers))
        return ranged_body(
            b.client,
            resp,
            offset,
            size,
            f"read of s3 object {b.object_key(self.blob_id)} at {offset}+{size}",
        )


class S3Backend(BlobBackend):
    type = "s3"

    def __init__(self, config: S3Config, id: str = "") -> None:
        super().__init__(id=id, retry_limit=config.retry_limit)
        if not config.bucket_name:
            raise ConfigError("backend.s3.bucket_name: required")
        if not config.region:
            raise ConfigError("backend.s3.region: required (it is part of the signature)")
        if bool(config.access_key_id) != bool(config.access_key_secret):
            raise ConfigError(
                "backend.s3: set both access_key_id and access_key_secret, or neither "
                "(anonymous access)"
            )
        endpoint = config.endpoint or f"s3.{config.region}.amazonaws.com"
        scheme, host = split_endpoint(endpoint, config.scheme)
        self.bucket = config.bucket_name
        self.region = config.region
        self.object_prefix = config.object_prefix
        self._access_key = config.access_key_id
        self._secret_key = config.access_key_secret
        self._base = f"{scheme}://{host}/{s3_quote(config.bucket_name)}/"
        self.client = HttpClient(config, name=f"s3 {config.bucket_name}")

    def object_key(self, blob_id: str) -> str:
        return self.object_prefix + blob_id

    def object_url(self, blob_id: str) -> str:
        return self._base + s3_quote(self.object_key(blob_id))

    def sign(self, method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        if not self._access_key:
            return headers
        return sigv4_sign(
            method,
            url,
            headers,
            access_key=self._access_key,
            secret_key=self._secret_key,
            region=self.region,
        )

    def new_reader(self, blob_id: str) -> BlobReader:
        # A "/" could walk out of object_prefix once the URL path is normalised.
        check_blob_id(blob_id, f"s3 {self.bucket}")
        return S3Reader(self, blob_id)

    def close(self) -> None:
        super().close()
        self.client.close()
