"""The API's HTTP/1.1 server on a unix socket (upstream: ``dbs-uhttp`` in a thread).

``ApiServer(path, handler).serve()`` binds the socket and hands each complete request to
``handler`` (``nydusfs.api.routes.ApiRoutes``), which returns a ``Response``. HTTP parsing is
``h11``'s, a strict, well-tested sans-I/O HTTP/1.1 state machine (chunked bodies, pipelining,
keep-alive and ``Expect: 100-continue`` included): a hand-written parser for a control socket
would be smaller but would have to get the same corner cases right (conflicting
``Content-Length``/``Transfer-Encoding``, obsolete line folding, header syntax) with far fewer
tests behind it.

Robustness, since one daemon serves every container of a host:

- The socket file is created with mode 0600 (umask while binding, then chmod, so no window
  where it is wider), removed when the server stops, and a stale one left by a crashed daemon
  (nobody accepts on it) is replaced; a live one, or a path that is not a socket, is an error.
- Each connection runs in its own task; at most ``max_connections`` at once (more wait in the
  listen backlog). Keep-alive and pipelining work; HTTP/1.0 closes after each reply.
- Limits: request line and headers 64 KiB (431), body 1 MiB (413, refused before it is read
  when ``Content-Length`` says so). A request must arrive within ``request_timeout`` of its
  first byte (else 408) and a connection may idle ``idle_timeout`` between requests, so a slow
  or silent client holds one task and one fd for a bounded time and never the daemon.
- A malformed request gets 400 with a JSON error body and the connection is closed; the
  daemon goes on serving others. A handler that raises gets 500, not a dropped connection.

Concurrency: one trio task per connection on the daemon's loop; the handler runs in that task,
so a slow handler (a mount) delays only its own connection. ``Response.after_send`` runs once
the reply is written: ``PUT /daemon/exit`` stops the daemon from there, after answering.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from nydusfs.api.errors import error_body
from nydusfs.errors import NydusError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT = 10.0  # seconds for one request, from its first byte to its end
IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may wait for its next request
MAX_CONNECTIONS = 128
RECEIVE_SIZE = 64 * 1024
SERVER_NAME = "Nydus API"  # upstream's Server header


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # as sent: origin form (/api/v1/daemon?x=1) or absolute (http://h/api/...)
    path: str
    query: dict[str, str]  # the first value of each key, like upstream's extract_query_part
    headers: list[tuple[str, str]]
    body: bytes

    def param(self, key: str) -> str | None:
        return self.query.get(key)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    after_send: Callable[[], None] | None = field(default=None, repr=False)


Handler = Callable[[Request], Awaitable[Response]]


class _Reject(Exception):
    """Answer ``status`` with an error body and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- the socket file ---------------------------------------------------------------------------


def _remove_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a unix socket nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise NydusError(f"API socket {path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.warning("api: replaced the stale socket %s (its daemon is gone)", path)
        return
    except OSError as e:
        raise NydusError(f"API socket {path} exists and cannot be probed: {e}") from e
    finally:
        probe.close()
    raise NydusError(f"API socket {path} is in use by a running daemon")


def bind_unix_socket(path: str, backlog: int = 128) -> socket.socket:
    """A listening unix socket at ``path`` with mode 0600."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The socket file's mode comes from the umask at bind(); narrowing the umask for the
        # call means the file never exists with wider permissions. (The umask is per process:
        # a file another thread creates in this instant would only get stricter permissions.)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)  # default ACLs on the directory can override the umask
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


# --- the server --------------------------------------------------------------------------------


class ApiServer:
    """Serves ``handler`` on the unix socket ``path`` until cancelled."""

    def __init__(
        self,
        path: str,
        handler: Handler,
        *,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.path = path
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self._slots = trio.Semaphore(max_connections)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, call ``task_status.started()``, accept until cancelled; remove the socket."""
        sock = bind_unix_socket(self.path)
        st = os.stat(self.path)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        log.info("api: listening on %s", self.path)
        try:
            async with listener, trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await self._slots.acquire()
                    try:
                        stream = await listener.accept()
                    except OSError as e:
                        # EMFILE and friends: back off instead of taking the daemon down.
                        self._slots.release()
                        log.error("api: accept failed: %s", e)
                        await trio.sleep(0.1)
                        continue
                    except BaseException:
                        self._slots.release()
                        raise
                    nursery.start_soon(self._connection, stream)
        finally:
            self._remove_socket(st)

    def _remove_socket(self, st: os.stat_result) -> None:
        try:
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):  # not another daemon's
                os.unlink(self.path)
        except OSError:
            pass
        log.info("api: stopped serving %s", self.path)

    # --- one connection -----------------------------------------------------------------------
    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        try:
            async with stream:
                while True:
                    try:
                        request = await self._receive(conn, stream)
                    except _Reject as r:
                        await self._send_error(conn, stream, r.status, r.message)
                        return
                    if request is None:
                        return
                    response = await self._dispatch(request)
                    try:
                        await self._send(conn, stream, response)
                    finally:  # even if the client left without its reply (an exit still exits)
                        if response.after_send is not None:
                            response.after_send()
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client went away or stopped reading; nothing to answer
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.warning("api: connection failed: %s", e)
        finally:
            self._slots.release()

    async def _receive(self, conn: h11.Connection, stream: trio.SocketStream) -> Request | None:
        """The next complete request; None when the client closed or stayed idle too long."""
        started = bool(conn.trailing_data[0])  # a pipelined request may already be buffered
        now = trio.current_time()
        scope = trio.CancelScope(
            deadline=now + (self.request_timeout if started else self.idle_timeout)
        )
        head: h11.Request | None = None
        body = bytearray()
        with scope:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as e:
                    raise _Reject(e.error_status_hint, f"malformed HTTP request: {e}") from None
                if event is h11.NEED_DATA:
                    if head is not None and conn.they_are_waiting_for_100_continue:
                        await stream.send_all(
                            conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                        )
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if data and not started:
                        started = True
                        scope.deadline = trio.current_time() + self.request_timeout
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    head = event
                    self._check_head(event)
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.max_body_bytes:
                        raise _Reject(413, f"request body larger than {self.max_body_bytes} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    return _request(head, bytes(body))
                else:  # ConnectionClosed (or PAUSED after a protocol switch we never agree to)
                    return None
        if started:
            raise _Reject(408, f"request not received within {self.request_timeout:g}s")
        return None  # idle keep-alive connection: close quietly

    def _check_head(self, head: h11.Request) -> None:
        # h11 bounds only an *incomplete* head; one that arrived whole in a read is checked here.
        size = len(head.method) + len(head.target) + 12
        size += sum(len(name) + len(value) + 4 for name, value in head.headers)
        if size > self.max_header_bytes:
            raise _Reject(
                431, f"request line and headers larger than {self.max_header_bytes} bytes"
            )
        for name, value in head.headers:
            if name == b"content-length" and int(value) > self.max_body_bytes:
                raise _Reject(413, f"request body larger than {self.max_body_bytes} bytes")

    async def _dispatch(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except Exception as e:  # the routes map their errors; this is a bug, not a reply
            log.exception("api: %s %s failed", request.method, request.path)
            return Response(500, error_body("Internal", f"{type(e).__name__}: {e}"))

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        response: Response,
        close: bool = False,
    ) -> None:
        headers = [("Server", SERVER_NAME)]
        if response.status != 204:
            headers += [
                ("Content-Type", response.content_type),
                ("Content-Length", str(len(response.body))),
            ]
        if close:
            headers.append(("Connection", "close"))
        try:
            phrase = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            phrase = b""
        with trio.fail_after(self.request_timeout):  # a client that never reads its reply
            await stream.send_all(
                conn.send(h11.Response(status_code=response.status, headers=headers, reason=phrase))
            )
            if response.body and response.status != 204:
                await stream.send_all(conn.send(h11.Data(data=response.body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _send_error(
        self, conn: h11.Connection, stream: trio.SocketStream, status: int, message: str
    ) -> None:
        log.info("api: rejected a request (%d): %s", status, message)
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a reply is already under way: all we can do is close
        code = "BadRequest" if status == 400 else HTTPStatus(status).phrase.replace(" ", "")
        await self._send(conn, stream, Response(status, error_body(code, message)), close=True)


def _request(head: h11.Request, body: bytes) -> Request:
    target = head.target.decode("ascii", "replace")
    parts = urlsplit(target)
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        query.setdefault(key, value)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
    return Request(head.method.decode("ascii"), target, parts.path, query, headers, body)
