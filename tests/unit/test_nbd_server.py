"""``nbd.server`` in-process over memory streams: timeouts, storage errors, out-of-order replies.

The device is a stand-in whose reads can be held back or made to fail, so these cases are
deterministic (no sockets, no subprocess).
"""

from __future__ import annotations

import errno
import logging
import struct

import trio
import trio.testing

from nydusfs.errors import DigestMismatch
from nydusfs.nbd.server import NbdServer


class FakeDevice:
    size = 1 << 20

    def __init__(self) -> None:
        self.gates: dict[int, trio.Event] = {}

    async def read(self, offset: int, size: int) -> bytes:
        if offset in self.gates:
            await self.gates[offset].wait()
        if offset == 4096:
            raise OSError(errno.EIO, "backend down")
        if offset == 8192:
            raise DigestMismatch("chunk 2 digest mismatch")
        if offset == 12288:
            raise RuntimeError("a bug")
        return bytes([offset >> 12]) * size


async def _recv(stream: trio.abc.Stream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = await stream.receive_some(n - len(out))
        assert data, "closed"
        out += data
    return out


async def _handshake(stream: trio.abc.Stream) -> None:
    await _recv(stream, 18)
    await stream.send_all(struct.pack(">I", 3))
    data = struct.pack(">I", 0) + struct.pack(">H", 0)
    await stream.send_all(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
    while True:
        _, _, kind, length = struct.unpack(">QIII", await _recv(stream, 20))
        await _recv(stream, length)
        if kind == 1:
            return


def _request(offset: int, length: int, cookie: int) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, offset, length)


def test_silent_client_is_dropped_after_the_handshake_timeout() -> None:
    async def main() -> None:
        server = NbdServer(FakeDevice(), handshake_timeout=0.2)  # type: ignore[arg-type]
        client, server_side = trio.testing.memory_stream_pair()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.handle, server_side)
                await _recv(client, 18)  # the greeting, then nothing
                assert await client.receive_some(100) == b""  # closed by the server
        assert server.connections == 0

    trio.run(main)


def test_storage_errors_become_error_replies_and_replies_may_overtake() -> None:
    async def main() -> None:
        device = FakeDevice()
        device.gates[0] = trio.Event()
        server = NbdServer(device)  # type: ignore[arg-type]
        client, server_side = trio.testing.memory_stream_pair()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.handle, server_side)
                await _handshake(client)
                await client.send_all(_request(0, 16, cookie=1))  # held back
                for cookie, offset in ((2, 4096), (3, 8192), (4, 12288), (5, 16384)):
                    await client.send_all(_request(offset, 16, cookie))
                got = {}
                for _ in range(4):
                    magic, error, cookie = struct.unpack(">IIQ", await _recv(client, 16))
                    assert magic == 0x67446698
                    got[cookie] = (error, await _recv(client, 16) if not error else b"")
                assert got == {2: (5, b""), 3: (5, b""), 4: (5, b""), 5: (0, b"\x04" * 16)}
                device.gates[0].set()
                assert struct.unpack(">IIQ", await _recv(client, 16))[1:] == (0, 1)
                assert await _recv(client, 16) == bytes(16)
                await client.send_all(struct.pack(">IHHQQI", 0x25609513, 0, 2, 9, 0, 0))
                assert await client.receive_some(100) == b""

    trio.run(main)


def test_garbage_during_transmission_is_logged_as_a_protocol_error(caplog) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        server = NbdServer(FakeDevice())  # type: ignore[arg-type]
        client, server_side = trio.testing.memory_stream_pair()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.handle, server_side)
                await _handshake(client)
                await client.send_all(b"\xff" * 28)
                assert await client.receive_some(100) == b""

    with caplog.at_level(logging.ERROR, logger="nydusfs.nbd.server"):
        trio.run(main)
    (record,) = caplog.records
    assert "bad request magic" in record.getMessage() and record.exc_info is None
