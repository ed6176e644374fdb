"""The API's HTTP server in-process (no daemon, no root): socket file, parsing, limits, timeouts."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from nydusfs.api.client import ApiClientError, NydusdClient
from nydusfs.api.server import ApiServer, Request, Response, bind_unix_socket
from nydusfs.errors import NydusError

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")


async def echo(req: Request) -> Response:
    if req.path == "/api/v1/boom":
        raise RuntimeError("handler bug")
    if req.path == "/api/v1/empty":
        return Response(204)
    body = {"method": req.method, "path": req.path, "query": req.query, "body": req.body.decode()}
    return Response(200, json.dumps(body).encode())


def with_server(path: Path, fn: Callable[[], T], **kw: Any) -> T:
    """Run ``fn`` in a thread while an ``ApiServer(echo)`` serves ``path``."""

    async def main() -> T:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: ApiServer(str(path), echo, **kw).serve(task_status=task_status)
            )
            try:
                return await trio.to_thread.run_sync(fn)
            finally:
                nursery.cancel_scope.cancel()

    return trio.run(main)


def raw_exchange(path: Path, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.settimeout(read_timeout)
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_socket_mode_is_0600_and_removed_on_exit(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    old = os.umask(0)  # even with a permissive umask
    try:
        mode = with_server(sock, lambda: stat.S_IMODE(os.stat(sock).st_mode))
    finally:
        os.umask(old)
    assert mode == 0o600
    assert not sock.exists()


def test_stale_socket_is_replaced_live_one_refused(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    stale = bind_unix_socket(str(sock))
    stale.close()  # a crashed daemon leaves the file, and nobody listens
    assert sock.exists()
    with NydusdClient(str(sock)) as client:
        assert with_server(sock, lambda: client.get("/api/v1/x"))["path"] == "/api/v1/x"

    live = bind_unix_socket(str(sock))
    try:
        with pytest.raises(NydusError, match="in use"):
            bind_unix_socket(str(sock))
    finally:
        live.close()
        sock.unlink()

    sock.write_text("not a socket")
    with pytest.raises(NydusError, match="not a socket"):
        bind_unix_socket(str(sock))
    assert sock.read_text() == "not a socket"


def test_keep_alive_pipelining_chunked_and_http10(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"

    def check() -> None:
        with NydusdClient(str(sock)) as client:
            for i in range(3):  # one connection, kept alive
                got = client.put("v1/thing", {"n": i}, query={"id": "/a b", "x": "1"})
                assert got["body"] == json.dumps({"n": i})
                assert got["query"] == {"id": "/a b", "x": "1"}
            assert client.get("v1/empty") is None
        two = (
            b"GET /api/v1/one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /api/v1/two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        reply = raw_exchange(sock, two)
        assert reply.count(b"HTTP/1.1 200") == 2
        assert b'"/api/v1/one"' in reply and b'"abcde"' in reply
        reply = raw_exchange(sock, b"GET http://localhost/api/v1/abs?k=v HTTP/1.0\r\n\r\n")
        assert status_of(reply) == 200 and b'"/api/v1/abs"' in reply and b'"k": "v"' in reply

    with_server(sock, check)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413),
    ],
    ids=["garbage", "no-host", "two-lengths", "bad-header", "huge-header", "huge-body"],
)
def test_bad_requests_are_rejected_and_the_server_goes_on(
    tmp_path: Path, request_bytes: bytes, status: int
) -> None:
    sock = tmp_path / "api.sock"

    def check() -> None:
        reply = raw_exchange(sock, request_bytes)
        assert status_of(reply) == status, reply[:200]
        body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        assert set(body) == {"code", "message"} and body["message"]
        with NydusdClient(str(sock)) as client:  # still serving
            assert client.get("v1/after")["path"] == "/api/v1/after"

    with_server(sock, check)


def test_chunked_body_over_the_limit(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    chunk = b"a" * 4096
    data = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += (b"1000\r\n" + chunk + b"\r\n") * 260  # > 1 MiB

    def check() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.settimeout(5)
            # The server may answer and close before the rest arrives.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(data)
            assert status_of(s.recv(65536)) == 413

    with_server(sock, check)


def test_slow_client_gets_408_and_does_not_block_others(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"

    def check() -> None:
        slow = socket.socket(socket.AF_UNIX)
        slow.connect(str(sock))
        slow.sendall(b"GET /api/v1/slow HTTP/1.1\r\nHo")  # and nothing more
        idle = socket.socket(socket.AF_UNIX)
        idle.connect(str(sock))  # sends nothing at all
        with NydusdClient(str(sock)) as client:
            for _ in range(5):
                assert client.get("v1/fast")["path"] == "/api/v1/fast"
        # Served while the slow request was still pending: it has had no answer yet.
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):
            slow.recv(1)
        slow.settimeout(10)
        reply = b""
        while chunk := slow.recv(65536):  # the 408, then the server closes
            reply += chunk
        assert status_of(reply) == 408
        idle.settimeout(5)
        assert idle.recv(100) == b""  # an idle connection is closed without a reply
        slow.close()
        idle.close()

    with_server(sock, check, request_timeout=3.0, idle_timeout=4.0)


def test_handler_bug_is_500_and_expect_100_continue(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"

    def check() -> None:
        with NydusdClient(str(sock)) as client:
            with pytest.raises(ApiClientError) as e:
                client.get("v1/boom")
            assert e.value.status == 500 and "handler bug" in e.value.message
            assert client.get("v1/ok")["path"] == "/api/v1/ok"
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.settimeout(5)
            s.sendall(
                b"PUT /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
            )
            assert s.recv(100).startswith(b"HTTP/1.1 100 ")
            s.sendall(b"{}")
            assert status_of(s.recv(65536)) == 200

    with_server(sock, check)


def test_many_concurrent_clients(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with NydusdClient(str(sock)) as client:
                for i in range(20):
                    assert client.post("v1/w", {"n": n, "i": i})["body"] == json.dumps(
                        {"n": n, "i": i}
                    )
        except BaseException as e:  # collected and checked below
            errors.append(e)

    def check() -> None:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    with_server(sock, check)
    assert errors == []
