"""Local servers for backend tests: processes, nginx, and a fault-injecting HTTP server.

Everything listens on 127.0.0.1 (or a unix socket in a test's temporary directory), never on
another address.

``free_port() -> int``
    A TCP port on 127.0.0.1 that was free a moment ago.

``running(argv, *, port=None, unix_socket=None, timeout=10.0, cwd=None, env=None)``
    Context manager: start ``argv`` (stdout/stderr to a temporary file), wait until
    ``127.0.0.1:port`` or ``unix_socket`` accepts connections, yield the ``Popen``; on exit
    terminate it (kill after 5 s). If the process exits early or does not listen within
    ``timeout`` seconds, it is killed and ``RuntimeError`` carries the tail of its output.

``nginx(conf_body, workdir, *, port=None, unix_socket=None, timeout=10.0) -> Nginx``
    Context manager: write a private config under ``workdir`` (pid, logs and temp paths there,
    ``daemon off; master_process off;``) whose ``http {}`` block contains ``conf_body`` (your
    ``server`` blocks; they must ``listen 127.0.0.1:<port>`` or ``unix:<path>``), run
    ``/usr/sbin/nginx -c ... -p ...`` and wait for ``port``/``unix_socket``. Yields ``Nginx``
    (``url``, ``port``, ``unix_socket``, ``workdir``, ``error_log``, ``access_log``).
    ``require_nginx()`` skips the calling test when nginx is not installed (``make deps``
    installs nginx-light).

``FaultServer(blobs=None, *, unix_socket=None)``
    A threaded HTTP/1.1 server (keep-alive) on 127.0.0.1 (or ``unix_socket``), usable as a
    context manager or with ``start()``/``stop()``. ``url`` is ``http://127.0.0.1:<port>``
    (``http://localhost`` for a unix socket); ``port``.

    Content: ``blobs`` maps a path (``"/blobs/abc"``) to bytes; the dict is live, edit it any
    time. ``GET`` honours ``Range: bytes=a-b``, ``a-`` and ``-n`` with ``206`` and
    ``Content-Range`` (``416`` past the end, ``200`` for multiple ranges); ``HEAD`` gives
    ``Content-Length``. Unknown paths get 404. ``range_mode``: ``"honour"`` (default),
    ``"ignore"`` (``200`` with the whole blob) or ``"200"`` (``200`` with just the range, as
    upstream's test server does). ``add_route(method, path, handler)`` serves other things:
    ``handler(record) -> (status, headers, body)``.

    Faults, each applied to the next ``n`` requests (optionally only those whose path starts
    with ``path``) in the order they were added:
    ``fail_next(n, status=500, body=b"injected failure", path=None)``,
    ``reset_next(n, after_bytes=None, path=None)`` (reset the connection with RST before
    answering, or after the headers and ``after_bytes`` bytes of the body),
    ``stall_next(n, seconds, path=None)`` (sleep before answering; wakes early when the server
    stops), ``corrupt_next(n, path=None)`` (flip every byte of the body),
    ``truncate_next(n, path=None)`` (promise the full ``Content-Length``, send half, close).
    ``clear_faults()``.

    Observation: ``requests`` (list of ``RequestRecord(method, path, headers, fault)``, in
    arrival order), ``count(method=None, path=None)``, ``reset_counts()``.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import socketserver
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

NGINX = "/usr/sbin/nginx"
LOCALHOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def _accepts(port: int | None, unix_socket: str | os.PathLike[str] | None) -> bool:
    try:
        if unix_socket is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(os.fspath(unix_socket))
        else:
            assert port is not None
            with socket.create_connection((LOCALHOST, port), timeout=0.5):
                pass
        return True
    except OSError:
        return False


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-limit:].decode("utf-8", "replace")
    except OSError:
        return ""


def stop_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 5
) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


@contextlib.contextmanager
def running(
    argv: list[str],
    *,
    port: int | None = None,
    unix_socket: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` until the block ends, once it accepts connections (see module doc)."""
    if port is None and unix_socket is None:
        raise ValueError("running(): give port or unix_socket to wait for")
    fd, out_path = tempfile.mkstemp(prefix="server-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
            env=dict(env) if env is not None else None,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not _accepts(port, unix_socket):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{argv[0]} exited with {proc.returncode} before listening:\n{_tail(out_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{argv[0]} did not listen on {unix_socket or port} within {timeout} s:\n"
                    f"{_tail(out_path)}"
                )
            time.sleep(0.02)
        yield proc
    finally:
        stop_process(proc)
        os.unlink(out_path)


# --- nginx -------------------------------------------------------------------------------------


def require_nginx() -> None:
    if not os.access(NGINX, os.X_OK):
        pytest.skip(f"{NGINX} not installed (make deps installs nginx-light)")


@dataclass(frozen=True)
class Nginx:
    workdir: Path
    port: int | None
    unix_socket: Path | None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}" if self.port else "http://localhost"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"


_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    types {{ }}
    keepalive_timeout 30;
{body}
}}
"""


@contextlib.contextmanager
def nginx(
    conf_body: str,
    workdir: str | os.PathLike[str],
    *,
    port: int | None = None,
    unix_socket: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
) -> Iterator[Nginx]:
    """Run a private nginx whose ``http {}`` holds ``conf_body`` (see module doc)."""
    require_nginx()
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(d=d, body=conf_body))
    argv = [NGINX, "-c", str(conf), "-p", str(d), "-e", str(d / "error.log")]
    with running(argv, port=port, unix_socket=unix_socket, timeout=timeout):
        yield Nginx(d, port, Path(unix_socket) if unix_socket is not None else None)


# --- the fault-injecting server ----------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    headers: dict[str, str]
    fault: str | None = None


@dataclass
class _Fault:
    kind: str
    remaining: int
    path: str | None
    params: dict[str, Any] = field(default_factory=dict)


Route = Callable[[RequestRecord], tuple[int, Mapping[str, str], bytes]]


def _parse_range(value: str, length: int) -> tuple[int, int] | str | None:
    """``(first, last)``, None for "serve everything", or "unsatisfiable"."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, _, last_s = spec.strip().partition("-")
    try:
        if not first_s:
            n = int(last_s)
            return (max(0, length - n), length - 1) if n > 0 and length else "unsatisfiable"
        first = int(first_s)
        last = int(last_s) if last_s else length - 1
    except ValueError:
        return None
    if first >= length or last < first:
        return "unsatisfiable"
    return first, min(last, length - 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        fault = owner._take_fault(path)
        record = RequestRecord(
            self.command, self.path, dict(self.headers.items()), fault.kind if fault else None
        )
        owner._record(record)
        if fault and fault.kind == "stall":
            owner._stopping.wait(fault.params["seconds"])
        if fault and fault.kind == "fail":
            body = fault.params["body"]
            self._respond(fault.params["status"], {"Content-Type": "text/plain"}, body, fault)
            return
        status, headers, body = owner._answer(record)
        self._respond(status, headers, body, fault)

    def _respond(
        self, status: int, headers: Mapping[str, str], body: bytes, fault: _Fault | None
    ) -> None:
        if fault and fault.kind == "corrupt":
            body = bytes(b ^ 0xFF for b in body)
        head = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if "Content-Length" not in headers:
            head.append(f"Content-Length: {len(body)}")
        head_raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        payload = body if self.command != "HEAD" else b""
        if fault and fault.kind == "reset":
            after = fault.params["after_bytes"]
            if after is not None:
                self.wfile.write(head_raw + payload[:after])
                self.wfile.flush()
            self._reset()
            return
        if fault and fault.kind == "truncate":
            self.wfile.write(head_raw + payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(head_raw + payload)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.close()
        self.close_connection = True

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    owner: FaultServer


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    owner: FaultServer

    def get_request(self) -> tuple[Any, Any]:
        sock, _ = self.socket.accept()
        return sock, ("unix", 0)  # BaseHTTPRequestHandler wants an (address, port) pair


class FaultServer:
    """A blob server with switchable faults (see the module docstring for the API)."""

    def __init__(
        self,
        blobs: Mapping[str, bytes] | None = None,
        *,
        unix_socket: str | os.PathLike[str] | None = None,
        range_mode: str = "honour",
    ) -> None:
        self.blobs: dict[str, bytes] = dict(blobs or {})
        self.range_mode = range_mode
        self.unix_socket = os.fspath(unix_socket) if unix_socket is not None else None
        self.requests: list[RequestRecord] = []
        self._routes: dict[tuple[str, str], Route] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifetime ------------------------------------------------------------------------------

    def start(self) -> FaultServer:
        server: _Server | _UnixServer
        if self.unix_socket is not None:
            server = _UnixServer(self.unix_socket, _Handler)
        else:
            server = _Server((LOCALHOST, 0), _Handler)
            self.port = server.server_address[1]
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_socket)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return "http://localhost" if self.unix_socket else f"http://{LOCALHOST}:{self.port}"

    # --- content -------------------------------------------------------------------------------

    def add_route(self, method: str, path: str, handler: Route) -> None:
        self._routes[(method.upper(), path)] = handler

    def _answer(self, record: RequestRecord) -> tuple[int, Mapping[str, str], bytes]:
        path = record.path.split("?", 1)[0]
        route = self._routes.get((record.method, path))
        if route is not None:
            return route(record)
        blob = self.blobs.get(path)
        if blob is None or record.method not in ("GET", "HEAD"):
            return 404, {"Content-Type": "text/plain"}, b"no such blob: " + path.encode()
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        value = record.headers.get("Range")
        if value is None or self.range_mode == "ignore":
            return 200, headers, blob
        rng = _parse_range(value, len(blob))
        if rng is None:
            return 200, headers, blob
        if rng == "unsatisfiable":
            return 416, {"Content-Range": f"bytes */{len(blob)}"}, b""
        assert isinstance(rng, tuple)
        first, last = rng
        if self.range_mode == "200":
            return 200, headers, blob[first : last + 1]
        headers["Content-Range"] = f"bytes {first}-{last}/{len(blob)}"
        return 206, headers, blob[first : last + 1]

    # --- faults --------------------------------------------------------------------------------

    def _add(self, kind: str, n: int, path: str | None, **params: Any) -> None:
        with self._lock:
            self._faults.append(_Fault(kind, n, path, params))

    def fail_next(
        self, n: int, status: int = 500, body: bytes = b"injected failure", path: str | None = None
    ) -> None:
        self._add("fail", n, path, status=status, body=body)

    def reset_next(self, n: int, after_bytes: int | None = None, path: str | None = None) -> None:
        self._add("reset", n, path, after_bytes=after_bytes)

    def stall_next(self, n: int, seconds: float, path: str | None = None) -> None:
        self._add("stall", n, path, seconds=seconds)

    def corrupt_next(self, n: int, path: str | None = None) -> None:
        self._add("corrupt", n, path)

    def truncate_next(self, n: int, path: str | None = None) -> None:
        self._add("truncate", n, path)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and (fault.path is None or path.startswith(fault.path)):
                    fault.remaining -= 1
                    return fault
        return None

    # --- observation ---------------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def count(self, method: str | None = None, path: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method) and (path is None or r.path == path)
            )

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
