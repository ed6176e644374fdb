"""The ``http-proxy`` backend: blobs served by a plain HTTP server (upstream ``http_proxy.rs``).

``addr`` is ``http(s)://host[:port]`` or the absolute path of a unix socket. A blob is the
resource ``<path>/<blob_id>`` (``path`` like ``/namespace/<repo>/blobs``); ``HEAD`` gives its
size (``Content-Length``) and ``GET`` with ``Range: bytes=<first>-<last>`` reads it.

Upstream facts, and where we differ:

- Size: upstream takes ``Content-Length`` of the ``HEAD`` answer (over TCP only if the status
  is below 400). We require a status below 400 on both transports.
- Reads: upstream accepts any status below 400, 200 and 206 alike, and copies the body as the
  requested range: a server that answers ``200`` with just the requested bytes (as upstream's
  own test server does) works. A body longer than the range is an error upstream ("failed to
  transport remote response body"). We accept 200 and 206 the same way; for a 200 whose body
  is longer than the range the server ignored ``Range`` and sent the whole blob, so we cut the
  range out of it instead of failing. A 206 must not be longer than asked, and its
  ``Content-Range`` (when present) must start at the offset asked. ``416`` (range not
  satisfiable, i.e. a read at or past the end) is an empty read, not an error.
- Unix socket: upstream sends every request to ``/`` and ignores ``path`` and the blob id
  (documented: "this field will be ignored"), so such a server can only serve one blob. We do
  the same when ``path`` is empty, and use ``<path>/<blob_id>`` when ``path`` is set.
- Over TCP upstream builds ``addr + path/blob_id`` without a separator check, so an empty
  ``path`` gives ``http://hostBLOB``; we always join with exactly one ``/``.
- Proxy settings apply over TCP (through ``HttpClient``), not over a unix socket.

Thread safety: readers share the backend's ``HttpClient`` (a session per thread).
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import quote

from nydusfs.config import HttpProxyConfig
from nydusfs.errors import BackendError, ConfigError
from nydusfs.storage.backends.base import BlobBackend, BlobReader
from nydusfs.storage.backends.http import HttpClient, check_status, redact
from nydusfs.storage.backends.localfs import check_blob_id

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def range_header(offset: int, size: int) -> str:
    """Upstream's ``Range`` value for ``size`` bytes at ``offset`` (``size`` > 0)."""
    return f"bytes={offset}-{offset + size - 1}"


class HttpProxyReader(BlobReader):
    """One blob on the server."""

    def __init__(self, backend: HttpProxyBackend, blob_id: str, url: str) -> None:
        super().__init__(backend, blob_id)
        self.client = backend.client
        self.url = url

    def try_blob_size(self) -> int:
        resp = self.client.request("HEAD", self.url)
        what = f"http-proxy: size of blob {self.blob_id}"
        check_status(resp, what)
        length = resp.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise BackendError(
                f"{what}: HEAD {redact(self.url)} answered without a valid Content-Length "
                f"({length!r})",
                retryable=False,
            )
        return int(length)

    def try_read(self, offset: int, size: int) -> bytes:
        resp = self.client.request("GET", self.url, headers={"Range": range_header(offset, size)})
        what = f"http-proxy: read of blob {self.blob_id} at offset {offset} size {size}"
        if resp.status_code == 416:
            return b""  # the range starts at or past the end: a short (empty) read
        check_status(resp, what)
        body = resp.content
        if resp.status_code == 206:
            match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if match and int(match.group(1)) != offset:
                raise BackendError(
                    f"{what}: server sent the range starting at {match.group(1)}",
                    retryable=False,
                )
            if len(body) > size:
                raise BackendError(f"{what}: server sent {len(body)} bytes", retryable=False)
            return body
        if resp.status_code == 200:
            # Upstream's protocol allows a 200 carrying just the range. A longer body, or one
            # exactly as long as the blob (known from an earlier HEAD) where the range would
            # be shorter, is the whole blob: the server ignored Range.
            known = self._size
            whole = len(body) > size or (
                offset > 0
                and known is not None
                and len(body) == known
                and len(body) != min(size, max(0, known - offset))
            )
            return body[offset : offset + size] if whole else body
        raise BackendError(
            f"{what}: unexpected HTTP {resp.status_code} from {redact(self.url)}",
            retryable=False,
        )


class HttpProxyBackend(BlobBackend):
    """Blobs behind an HTTP server reached over TCP or a unix socket."""

    type = "http-proxy"

    def __init__(self, config: HttpProxyConfig, id: str = "") -> None:
        if not isinstance(config, HttpProxyConfig):
            raise ConfigError(f"backend.http_proxy: expected http-proxy settings, got {config!r}")
        addr = config.addr
        super().__init__(id, retry_limit=config.retry_limit)
        self.config = config
        name = f"http-proxy {id}".rstrip()
        if addr.startswith(("http://", "https://")):
            self.base = addr.rstrip("/")
            self.client = HttpClient(config, name=name)
        elif os.path.isabs(addr):
            # The host part is never used to connect; it only fills the Host header.
            self.base = "http://localhost"
            self.client = HttpClient(config, name=name, unix_socket=addr)
        else:
            raise ConfigError(
                "backend.http_proxy.addr: expected http://, https:// or an absolute unix "
                f"socket path, got {addr!r}"
            )
        self.unix_socket = self.client.unix_socket

    def blob_url(self, blob_id: str) -> str:
        check_blob_id(blob_id, "http-proxy")
        path = self.config.path.strip("/")
        if self.unix_socket is not None and not path:
            return self.base + "/"  # upstream: one blob per unix socket server, at "/"
        prefix = f"/{path}" if path else ""
        return f"{self.base}{prefix}/{quote(blob_id, safe='')}"

    def new_reader(self, blob_id: str) -> HttpProxyReader:
        return HttpProxyReader(self, blob_id, self.blob_url(blob_id))

    def close(self) -> None:
        super().close()
        self.client.close()
