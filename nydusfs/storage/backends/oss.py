"""The ``oss`` backend: blobs as objects in an Aliyun OSS bucket (upstream ``oss.rs``).

URLs are virtual-host style, as upstream: ``<scheme>://<bucket>.<endpoint>/<object_prefix><blob
id>``. The signed resource is ``/<bucket>/<object_prefix><blob id>`` and the signature is OSS's
header signature (``Authorization: OSS <id>:base64(HMAC-SHA1(secret, VERB\\nContent-MD5\\n
Content-Type\\nDate\\n<x-oss-* headers><resource>))``, ``signing.oss_sign``); GETs carry
``Range``, which is not signed. HEAD gives the size (``Content-Length``).

Differences from upstream, on purpose:

- An endpoint that is an IP address or ``localhost`` cannot take a bucket subdomain, so such
  endpoints get path-style URLs (``<scheme>://<endpoint>/<bucket>/<key>``, as OSS-compatible
  servers accept); the signature is the same either way.
- Empty ``access_key_id`` and ``access_key_secret`` mean anonymous requests (a public-read
  bucket); upstream signs with the empty secret, which OSS rejects.
- An ``endpoint`` given as a URL supplies the scheme; an empty ``scheme`` means https.

Thread-safety: the backend holds only immutable settings and a thread-safe ``HttpClient``.
"""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import quote, urlsplit

from nydusfs.config import OssConfig
from nydusfs.errors import ConfigError
from nydusfs.storage.backends.base import BlobBackend, BlobReader
from nydusfs.storage.backends.http import HttpClient, ranged_body
from nydusfs.storage.backends.localfs import check_blob_id
from nydusfs.storage.backends.s3 import content_length, split_endpoint
from nydusfs.storage.backends.signing import oss_sign

log = logging.getLogger(__name__)


def _takes_subdomain(host: str) -> bool:
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:  # an unbracketed IPv6 address
        return False
    if name == "localhost":
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


class OssReader(BlobReader):
    backend: OssBackend

    def try_blob_size(self) -> int:
        b = self.backend
        what = f"size of oss object {b.object_key(self.blob_id)} in bucket {b.bucket}"
        resp = b.client.request(
            "HEAD", b.object_url(self.blob_id), headers=b.sign("HEAD", self.blob_id, {})
        )
        b.client.check_status(resp, what)
        return content_length(resp, what)

    def try_read(self, offset: int, size: int) -> bytes:
        b = self.backend
        headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
        resp = b.client.request(
            "GET", b.object_url(self.blob_id), headers=b.sign("GET", self.blob_id, headers)
        )
        return ranged_body(
            b.client,
            resp,
            offset,
            size,
            f"read of oss object {b.object_key(self.blob_id)} at {offset}+{size}",
        )


class OssBackend(BlobBackend):
    type = "oss"

    def __init__(self, config: OssConfig, id: str = "") -> None:
        super().__init__(id=id, retry_limit=config.retry_limit)
        if not config.endpoint or not config.bucket_name:
            raise ConfigError("backend.oss: endpoint and bucket_name are required")
        if bool(config.access_key_id) != bool(config.access_key_secret):
            raise ConfigError(
                "backend.oss: set both access_key_id and access_key_secret, or neither "
                "(anonymous access)"
            )
        scheme, host = split_endpoint(config.endpoint, config.scheme)
        self.bucket = config.bucket_name
        self.object_prefix = config.object_prefix
        self._access_key_id = config.access_key_id
        self._access_key_secret = config.access_key_secret
        if _takes_subdomain(host):
            self._base = f"{scheme}://{config.bucket_name}.{host}/"
        else:
            self._base = f"{scheme}://{host}/{quote(config.bucket_name, safe='')}/"
        self.client = HttpClient(config, name=f"oss {config.bucket_name}")

    def object_key(self, blob_id: str) -> str:
        return self.object_prefix + blob_id

    def object_url(self, blob_id: str) -> str:
        return self._base + quote(self.object_key(blob_id), safe="/~")

    def resource(self, blob_id: str) -> str:
        """The signed ``CanonicalizedResource``: bucket and key, not percent-encoded."""
        return f"/{self.bucket}/{self.object_key(blob_id)}"

    def sign(self, method: str, blob_id: str, headers: dict[str, str]) -> dict[str, str]:
        if not self._access_key_id:
            return headers
        return oss_sign(
            method,
            self.resource(blob_id),
            headers,
            access_key_id=self._access_key_id,
            access_key_secret=self._access_key_secret,
        )

    def new_reader(self, blob_id: str) -> BlobReader:
        check_blob_id(blob_id, f"oss {self.bucket}")
        return OssReader(self, blob_id)

    def close(self) -> None:
        super().close()
        self.client.close()
