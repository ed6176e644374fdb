"""A small synchronous client of the nydusd API over its unix socket (nydusctl, tests, scripts).

``NydusdClient(sock).get("/api/v1/daemon")`` returns the decoded JSON (None for 204); a status
of 400 or more raises ``ApiClientError`` with the status and the server's ``code`` and
``message``. Helpers cover the routes nydusctl uses (``mount``, ``umount``, ``set_log_level``,
``exit``...). Paths may be given with or without the ``/api`` prefix (``v1/daemon``), as
upstream's nydusctl does.

One connection, kept alive between requests and reopened when the daemon closed it while idle
(only then is a request retried, and only if nothing of its reply had arrived). Not thread-safe:
use one client per thread.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlencode

from nydusfs.errors import NydusError

DEFAULT_TIMEOUT = 30.0


class ApiClientError(NydusError):
    """The daemon answered with an error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over an ``AF_UNIX`` stream socket."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class NydusdClient:
    def __init__(self, sock: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self._conn: UnixHTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> NydusdClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- raw requests -------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: bytes | str | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, http.client.HTTPResponse]:
        """Send one request; return ``(status, body, response)`` whatever the status."""
        url = _path(path) + (f"?{urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        if isinstance(data, str):
            data = data.encode()
        hdrs = {"User-Agent": "nydusctl", **(headers or {})}
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = UnixHTTPConnection(self.sock, self.timeout)
            try:
                self._conn.request(method, url, body=data, headers=hdrs)
                response = self._conn.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if reused and attempt == 0:
                    continue  # the daemon closed our idle keep-alive connection: reconnect
                raise
            except BaseException:
                self.close()
                raise
            if response.will_close:
                self.close()
            return response.status, payload, response
        raise AssertionError("unreachable")

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: bytes | str | dict[str, Any] | None = None,
    ) -> Any:
        """JSON of a successful reply (None for 204); ``ApiClientError`` for a status >= 400."""
        status, payload, response = self.request(method, path, query=query, body=body)
        if status >= 400:
            try:
                err = json.loads(payload)
                code, message = str(err.get("code", "")), str(err.get("message", ""))
            except (ValueError, AttributeError):
                code, message = "", payload.decode(errors="replace")
            raise ApiClientError(status, code, message)
        if status == 204 or not payload:
            return None
        if response.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(payload)
        return payload.decode()

    def get(self, path: str, query: dict[str, str] | None = None) -> Any:
        return self.call("GET", path, query=query)

    def put(self, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        return self.call("PUT", path, query=query, body=body)

    def post(self, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        return self.call("POST", path, query=query, body=body)

    def delete(self, path: str, query: dict[str, str] | None = None) -> Any:
        return self.call("DELETE", path, query=query)

    # --- helpers ------------------------------------------------------------------------------
    def daemon_info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.get("/api/v1/daemon")
        return info

    def set_log_level(self, level: str) -> None:
        self.put("/api/v1/daemon", {"log_level": level})

    def mount(
        self,
        mountpoint: str,
        source: str,
        config: str,
        *,
        fs_type: str = "rafs",
        prefetch_files: list[str] | None = None,
        remount: bool = False,
    ) -> None:
        """Mount (or, with ``remount``, replace) ``source`` with the config *text* ``config``."""
        body: dict[str, Any] = {"source": source, "fs_type": fs_type, "config": config}
        if prefetch_files is not None:
            body["prefetch_files"] = prefetch_files
        method = "PUT" if remount else "POST"
        self.call(method, "/api/v1/mount", query={"mountpoint": mountpoint}, body=body)

    def umount(self, mountpoint: str) -> None:
        self.delete("/api/v1/mount", {"mountpoint": mountpoint})

    def exit(self) -> None:
        self.put("/api/v1/daemon/exit")


def _path(path: str) -> str:
    path = path if path.startswith("/") else "/" + path
    return path if path.startswith("/api/") else "/api" + path
