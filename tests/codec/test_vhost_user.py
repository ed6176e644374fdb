"""The vhost-user-fs device against a front-end written here: QEMU's side of the protocol.

The test owns the "guest memory" (a memfd it maps too), lays out split virtqueues in it, sends
the vhost-user messages QEMU sends (with fds as SCM_RIGHTS) and then plays the guest driver:
it publishes descriptor chains (split across descriptors, through indirect tables, broken on
purpose), kicks, waits for the call eventfd and reads the used ring.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
from pathlib import Path

import pytest
import trio

from nydusfs.virtiofs.device import VhostUserFsDevice
from nydusfs.virtiofs.vhost_user import (
    ADD_MEM_REG,
    GET_FEATURES,
    GET_PROTOCOL_FEATURES,
    GET_QUEUE_NUM,
    GET_VRING_BASE,
    RESET_DEVICE,
    SET_FEATURES,
    SET_MEM_TABLE,
    SET_OWNER,
    SET_PROTOCOL_FEATURES,
    SET_VRING_ADDR,
    SET_VRING_BASE,
    SET_VRING_CALL,
    SET_VRING_ENABLE,
    SET_VRING_KICK,
    SET_VRING_NUM,
)
from tests.codec.memfs import MemFs
from tests.codec.test_fuse_codec import IN, name

pytestmark = pytest.mark.timeout(60)
MEM = 1 << 20
UVA = 0x7F00_0000_0000  # where "QEMU" maps the memory: ring addresses are in this space
QSIZE = 16
RING = {0: 0x1000, 1: 0x3000}  # desc table per queue; avail at +0x100, used at +0x200
DATA = 0x10000
GETATTR, STATFS, INIT, FORGET, LOOKUP, MKDIR = 3, 17, 26, 2, 1, 9


class SlowFs(MemFs):
    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()

    async def statfs(self, ctx: object, inode: int) -> object:  # type: ignore[override]
        await self.gate.wait()
        return await super().statfs(ctx, inode)  # type: ignore[arg-type]


class Driver:
    """The front-end and the guest driver, over one connection."""

    def __init__(self, conn: trio.socket.SocketType, mem: mmap.mmap) -> None:
        self.conn = conn
        self.mem = mem
        self.kick = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in RING}
        self.call = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in RING}
        self.avail_idx = {q: 0 for q in RING}
        self.used_seen = {q: 0 for q in RING}
        self.free = DATA

    async def message(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
                      reply: bool = False, need_reply: bool = False) -> bytes:  # fmt: skip
        flags = 0x9 if need_reply else 0x1
        data = struct.pack("=III", request, flags, len(payload)) + payload
        reply = reply or need_reply
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        await self.conn.sendmsg([data], anc if fds else [])
        if not reply:
            return b""
        with trio.fail_after(10):  # a missing reply fails the test instead of hanging it
            head = await self.conn.recv(12)
            req, flags, size = struct.unpack("=III", head)
            assert (req, flags) == (request, 0x5)
            return await self.conn.recv(size)

    event_idx = False
    protocol = 1 | 1 << 15  # MQ, CONFIGURE_MEM_SLOTS

    async def setup(self, memfd: int, *, add_mem_reg: bool = False) -> None:
        features = struct.unpack("=Q", await self.message(GET_FEATURES, reply=True))[0]
        wanted = 1 << 32 | 1 << 30 | 1 << 28 | (1 << 29 if self.event_idx else 0)
        assert features & wanted == wanted
        proto = struct.unpack("=Q", await self.message(GET_PROTOCOL_FEATURES, reply=True))[0]
        await self.message(SET_PROTOCOL_FEATURES, struct.pack("=Q", proto & self.protocol))
        assert await self.message(GET_QUEUE_NUM, reply=True) == struct.pack("=Q", 9)
        await self.message(SET_OWNER)
        await self.message(SET_FEATURES, struct.pack("=Q", wanted))
        region = struct.pack("=QQQQ", 0, MEM, UVA, 0)
        if add_mem_reg:
            await self.message(ADD_MEM_REG, struct.pack("=Q", 0) + region, (memfd,))
        else:
            await self.message(SET_MEM_TABLE, struct.pack("=II", 1, 0) + region, (memfd,))
        for q, desc in RING.items():
            await self.message(SET_VRING_NUM, struct.pack("=II", q, QSIZE))
            await self.message(SET_VRING_BASE, struct.pack("=II", q, 0))
            addr = struct.pack("=IIQQQQ", q, 0, UVA + desc, UVA + desc + 0x200,
                               UVA + desc + 0x100, 0)  # fmt: skip
            await self.message(SET_VRING_ADDR, addr)
            await self.message(SET_VRING_KICK, struct.pack("=Q", q), (self.kick[q],))
            await self.message(SET_VRING_CALL, struct.pack("=Q", q), (self.call[q],))
            await self.message(SET_VRING_ENABLE, struct.pack("=II", q, 1))

    def alloc(self, data: bytes | int) -> int:
        addr = self.free
        size = data if isinstance(data, int) else len(data)
        if not isinstance(data, int):
            self.mem[addr : addr + size] = data
        self.free += (size + 15) & ~15
        return addr

    def publish(self, q: int, descs: list[tuple[int, int, int, int]], table: int | None = None,
                head: int = 0) -> int:  # fmt: skip
        """Write ``descs`` (addr, len, flags, next) at ``head`` of the queue's table (or into a
        table at guest address ``table``); put ``head`` in the avail ring; kick."""
        base = RING[q] if table is None else table
        for i, d in enumerate(descs):
            struct.pack_into("<QIHH", self.mem, base + 16 * (head + i if table is None else i), *d)
        slot = RING[q] + 0x100 + 4 + 2 * (self.avail_idx[q] % QSIZE)
        struct.pack_into("<H", self.mem, slot, head)
        self.avail_idx[q] += 1
        struct.pack_into("<H", self.mem, RING[q] + 0x100 + 2, self.avail_idx[q])
        os.eventfd_write(self.kick[q], 1)
        return head

    async def used(self, q: int, count: int = 1) -> list[tuple[int, int]]:
        """Wait for ``count`` more used elements of queue ``q``: their (head, len)."""
        if self.event_idx:  # used_event: interrupt me once the next element is used
            struct.pack_into("<H", self.mem, RING[q] + 0x104 + 2 * QSIZE, self.used_seen[q])
        with trio.fail_after(10):
            while True:
                idx = struct.unpack_from("<H", self.mem, RING[q] + 0x200 + 2)[0]
                if idx - self.used_seen[q] >= count:
                    break
                await trio.lowlevel.wait_readable(self.call[q])
                os.eventfd_read(self.call[q])
        out = []
        for i in range(self.used_seen[q], self.used_seen[q] + count):
            out.append(struct.unpack_from("<II", self.mem, RING[q] + 0x204 + 8 * (i % QSIZE)))
        self.used_seen[q] += count
        return out

    def request(self, q: int, opcode: int, body: bytes, *, unique: int, nodeid: int = 1,
                head: int = 0, indirect: bool = False, out_room: int = 256) -> int:  # fmt: skip
        """A FUSE request split as the Linux driver splits it: the in header and the body in
        two readable descriptors, the out header and the reply in two writable ones."""
        header = struct.pack(IN, 40 + len(body), opcode, unique, nodeid, 0, 0, 1, 0, 0)
        h, b = self.alloc(header), self.alloc(body or b"\0")
        oh, ob = self.alloc(16), self.alloc(out_room)
        self.replies[unique] = (oh, ob)
        descs = [(h, 40, 1, 1), (b, len(body), 1, 2), (oh, 16, 3, 3), (ob, out_room, 2, 0)]
        if not body:
            descs = [(h, 40, 1, 1), (oh, 16, 3, 2), (ob, out_room, 2, 0)]
        if not indirect:
            return self.publish(q, [(a, n, f, x + head) for a, n, f, x in descs], head=head)
        table = self.alloc(16 * len(descs))
        for i, d in enumerate(descs):
            struct.pack_into("<QIHH", self.mem, table + 16 * i, *d)
        return self.publish(q, [(table, 16 * len(descs), 4, 0)], head=head)

    replies: dict[int, tuple[int, int]]

    def reply(self, unique: int, length: int) -> tuple[int, bytes]:
        oh, ob = self.replies[unique]
        out_len, err, u = struct.unpack_from("<IiQ", self.mem, oh)
        assert u == unique and out_len == length
        return err, bytes(self.mem[ob : ob + length - 16])


async def _with_device(fs: MemFs, tmp: Path, test: object) -> VhostUserFsDevice:
    device = VhostUserFsDevice(fs)
    sock = str(tmp / "vu.sock")
    memfd = os.memfd_create("guest")
    os.ftruncate(memfd, MEM)
    mem = mmap.mmap(memfd, MEM)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(device.serve, sock)
            conn = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await conn.connect(sock)
            driver = Driver(conn, mem)
            driver.replies = {}
            await test(driver, memfd)  # type: ignore[operator]
            nursery.cancel_scope.cancel()
    finally:
        os.close(memfd)
    return device


@pytest.mark.parametrize("event_idx", [False, True])
def test_requests_split_indirect_out_of_order_and_broken(tmp_path: Path, event_idx: bool) -> None:
    fs = SlowFs()

    async def scenario(d: Driver, memfd: int) -> None:
        d.event_idx = event_idx
        await d.setup(memfd)
        d.request(1, INIT, struct.pack("<IIII", 7, 38, 65536, 0x7BFFFFFB), unique=2)
        ((head, length),) = await d.used(1)
        err, out = d.reply(2, length)
        assert (head, err, length) == (0, 0, 16 + 64) and struct.unpack_from("<II", out) == (7, 31)
        # Out of order: STATFS waits on the gate, GETATTR (through an indirect table) does not.
        d.request(1, STATFS, b"", unique=4, head=4)
        d.request(1, GETATTR, bytes(16), unique=6, head=8, indirect=True)
        ((head, length),) = await d.used(1)
        assert head == 8 and d.reply(6, length)[0] == 0
        fs.gate.set()
        ((head, length),) = await d.used(1)
        assert head == 4 and d.reply(4, length) == (0, struct.pack(
            "<QQQQQIIII24x", 1000, 500, 400, 100, 50, 4096, 255, 4096, 0))  # fmt: skip
        # A reply that does not fit the writable buffers: EIO in the header, not an overflow.
        d.request(1, MKDIR, struct.pack("<II", 0o755, 0) + name(b"d"), unique=8, head=12,
                  out_room=32)  # fmt: skip
        ((head, length),) = await d.used(1)
        assert (head, length) == (12, 16) and d.reply(8, 16)[0] == -5
        assert fs.lookups == {2: 1}  # made, and counted: the session gives it back at the end
        # Broken chains come back unserved (len 0) and the queue goes on.
        d.publish(1, [(MEM - 8, 64, 0, 0)], head=2)  # buffer outside guest memory
        d.publish(1, [(DATA, 8, 1, 3)], head=3)  # a chain that loops on itself
        table = d.alloc(32)
        struct.pack_into("<QIHH", d.mem, table, table, 16, 4, 0)  # nested indirect
        d.publish(1, [(table, 16, 4, 0)], head=6)
        assert await d.used(1, 3) == [(2, 0), (3, 0), (6, 0)]
        d.request(1, GETATTR, bytes(16), unique=10, head=0)
        ((_, length),) = await d.used(1)
        assert d.reply(10, length)[0] == 0
        # hiprio: FORGET has no reply; the buffer comes back with len 0.
        forget = struct.pack(IN, 48, FORGET, 12, 2, 0, 0, 0, 0, 0) + struct.pack("<Q", 1)
        d.publish(0, [(d.alloc(forget), 48, 0, 0)])
        assert await d.used(0) == [(0, 0)]
        assert fs.lookups == {2: 0}
        if event_idx:
            # used_event far ahead: the request completes without an interrupt.
            struct.pack_into("<H", d.mem, RING[1] + 0x104 + 2 * QSIZE, d.used_seen[1] + 5)
            d.request(1, GETATTR, bytes(16), unique=14, head=4)
            with trio.fail_after(10):
                while struct.unpack_from("<H", d.mem, RING[1] + 0x202)[0] == d.used_seen[1]:
                    await trio.sleep(0.01)
            with pytest.raises(BlockingIOError):
                os.eventfd_read(d.call[1])
            d.used_seen[1] += 1
            # avail_event: the device asks for a kick when the guest adds more
            avail_event = struct.unpack_from("<H", d.mem, RING[1] + 0x204 + 8 * QSIZE)[0]
            assert avail_event == d.avail_idx[1]
        reply = await d.message(GET_VRING_BASE, struct.pack("=II", 1, 0), reply=True)
        assert reply == struct.pack("=II", 1, d.avail_idx[1])

    device = trio.run(_with_device, fs, tmp_path, scenario)
    assert device.connections == 1


def test_disconnect_ends_the_session_and_a_new_front_end_connects(tmp_path: Path) -> None:
    fs = MemFs()
    device = VhostUserFsDevice(fs)
    sock = str(tmp_path / "vu.sock")

    async def one_guest(memfd: int, mem: mmap.mmap, add_mem_reg: bool) -> None:
        conn = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await conn.connect(sock)
        d = Driver(conn, mem)
        d.replies = {}
        await d.setup(memfd, add_mem_reg=add_mem_reg)
        d.request(1, INIT, struct.pack("<IIII", 7, 38, 65536, 0), unique=2)
        await d.used(1)
        d.request(1, MKDIR, struct.pack("<II", 0o755, 0) + name(b"d" * (1 + add_mem_reg)),
                  unique=4, head=4)  # fmt: skip
        ((_, length),) = await d.used(1)
        assert d.reply(4, length)[0] == 0
        conn.close()  # QEMU exits: the guest's references go back to the filesystem
        with trio.fail_after(10):
            while any(fs.lookups.values()):
                await trio.sleep(0.01)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(device.serve, sock)
            for add_mem_reg in (False, True):
                memfd = os.memfd_create("guest")
                os.ftruncate(memfd, MEM)
                try:
                    await one_guest(memfd, mmap.mmap(memfd, MEM), add_mem_reg)
                finally:
                    os.close(memfd)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert device.connections == 2
    assert fs.lookups == {2: 0, 3: 0}


def test_device_reset_ends_the_session_and_keeps_protocol_features(tmp_path: Path) -> None:
    fs = MemFs()

    async def scenario(d: Driver, memfd: int) -> None:
        d.protocol |= 1 << 3  # REPLY_ACK
        await d.setup(memfd)
        d.request(1, INIT, struct.pack("<IIII", 7, 38, 65536, 0), unique=2)
        await d.used(1)
        d.request(1, MKDIR, struct.pack("<II", 0o755, 0) + name(b"d"), unique=4, head=4)
        await d.used(1)
        assert fs.lookups == {2: 1}
        assert await d.message(RESET_DEVICE, need_reply=True) == struct.pack("=Q", 0)
        assert fs.lookups == {2: 0}
        # REPLY_ACK is still in force after the reset; a bad request is acked as failed.
        ack = await d.message(SET_VRING_NUM, struct.pack("=II", 1, 3), need_reply=True)
        assert ack == struct.pack("=Q", 1)
        # The rings start again.
        d.avail_idx = {q: 0 for q in RING}
        d.used_seen = {q: 0 for q in RING}
        for q in RING:
            struct.pack_into("<H", d.mem, RING[q] + 0x202, 0)
        await d.setup(memfd)
        d.request(1, INIT, struct.pack("<IIII", 7, 38, 65536, 0), unique=6)
        ((_, length),) = await d.used(1)
        assert d.reply(6, length)[0] == 0

    trio.run(_with_device, fs, tmp_path, scenario)


def test_protocol_errors_close_the_connection(tmp_path: Path) -> None:
    fs = MemFs()

    async def scenario(d: Driver, memfd: int) -> None:
        # A vring index the device does not have: the device hangs up.
        await d.message(SET_VRING_NUM, struct.pack("=II", 77, 16))
        with trio.fail_after(10):
            assert await d.conn.recv(1) == b""

    trio.run(_with_device, fs, tmp_path, scenario)
