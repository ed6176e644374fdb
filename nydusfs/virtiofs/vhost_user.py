"""The vhost-user protocol, back-end side (QEMU ``docs/interop/vhost-user.rst``).

``VhostUserBackend`` listens on a unix socket; the front-end (QEMU) connects and configures the
device with messages: a 12-byte native-endian header (request, flags, size), a payload, and fds
as SCM_RIGHTS on the header. It negotiates features, takes the guest's memory table
(SET_MEM_TABLE, or ADD/REM_MEM_REG with CONFIGURE_MEM_SLOTS), sets up each virtqueue
(NUM/ADDR/BASE, KICK and CALL eventfds, ENABLE) and stops them (GET_VRING_BASE). A ring runs
once it has a kick fd, its addresses, memory and, with PROTOCOL_FEATURES, is enabled; then
every kick drains its avail ring and each chain is served by ``process`` (the device's part) in
its own task, so requests complete out of order and one queue never waits for another.

A connection ending (QEMU exits, the guest resets the device) stops every ring, lets go of the
guest's memory and fds and calls ``reset``; the back-end then waits for the next connection.
A malformed message ends the connection (the front-end is trusted to speak the protocol, but a
bug there must not take the daemon down); a malformed chain only fails its own request.

Concurrency: one trio task reads messages; ring runners and request tasks live in a nursery
per connection. ``process`` may await freely; ring state changes happen between awaits.
"""

from __future__ import annotations

import abc
import array
import contextlib
import logging
import os
import socket
import struct
from typing import Any

import trio

from nydusfs.virtiofs.memory import GuestMemory, GuestMemoryError, close_fd, map_region
from nydusfs.virtiofs.virtqueue import F_EVENT_IDX, BadChain, Chain, Virtqueue, VirtqueueError

log = logging.getLogger(__name__)

HEADER = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
VRING_ADDR = struct.Struct("=IIQQQQ")  # index flags desc used avail log
MEM_REGION = struct.Struct("=QQQQ")  # guest_phys_addr size user_addr mmap_offset
VERSION = 1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VRING_NOFD = 0x100
VRING_INDEX_MASK = 0xFF
MAX_PAYLOAD = 4096
MAX_FDS = 32
MAX_MEM_SLOTS = 32

# virtio feature bits
F_INDIRECT_DESC = 1 << 28
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
# protocol feature bits
PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_RESET_DEVICE = 1 << 13
PF_CONFIGURE_MEM_SLOTS = 1 << 15

GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SET_BACKEND_REQ_FD = 21
RESET_DEVICE = 34
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38

# How long GET_VRING_BASE waits for the ring's requests in flight before it answers.
DRAIN_TIMEOUT = 5.0


class VhostUserError(Exception):
    """The front-end broke the protocol; the connection is closed."""


class VhostUserBackend(abc.ABC):
    """A vhost-user device back-end with ``num_queues`` split virtqueues."""

    features = F_VERSION_1 | F_PROTOCOL_FEATURES | F_INDIRECT_DESC | F_EVENT_IDX
    protocol_features = PF_MQ | PF_REPLY_ACK | PF_RESET_DEVICE | PF_CONFIGURE_MEM_SLOTS

    def __init__(self, num_queues: int) -> None:
        self.num_queues = num_queues
        self.queues = [Virtqueue(i) for i in range(num_queues)]
        self.memory = GuestMemory()
        self.acked_features = 0
        self.acked_protocol = 0
        self.inflight = [0] * num_queues
        self._runners: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.connections = 0

    # --- the device's part --------------------------------------------------------------------
    @abc.abstractmethod
    async def process(self, queue: Virtqueue, chain: Chain) -> int:
        """Serve one chain; return the bytes written to its writable buffers."""

    async def reset(self) -> None:
        """The guest's session ended (disconnect or device reset)."""
        return None

    # --- listening ----------------------------------------------------------------------------
    async def serve(self, path: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``path`` and serve front-ends one connection after another until
        cancelled; ``task_status.started()`` once the socket accepts connections."""
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path) and not os.path.isdir(path):
                os.unlink(path)  # a stale socket of an earlier run
            await listener.bind(path)
            listener.listen(1)
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                with conn:
                    self.connections += 1
                    log.info("vhost-user: front-end connected on %s", path)
                    await self.serve_connection(conn)
                    log.info("vhost-user: front-end disconnected")
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def serve_connection(self, conn: trio.socket.SocketType) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    while True:
                        message = await self._recv(conn)
                        if message is None:
                            break
                        await self._dispatch(conn, *message)
                except (VhostUserError, OSError) as e:
                    log.error("vhost-user: closing the connection: %s", e)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._reset_all()

    # --- messages -----------------------------------------------------------------------------
    async def _recv(self, conn: trio.socket.SocketType) -> tuple[int, int, bytes, list[int]] | None:
        header, ancdata, msg_flags, _ = await conn.recvmsg(
            HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4)
        )
        fds = _fds(ancdata)
        if not header:
            return None
        try:
            if msg_flags & socket.MSG_CTRUNC:
                raise VhostUserError("too many fds with one message")
            while len(header) < HEADER.size:
                more = await conn.recv(HEADER.size - len(header))
                if not more:
                    raise VhostUserError("connection closed inside a message header")
                header += more
            request, flags, size = HEADER.unpack(header)
            if flags & 0x3 != VERSION:
                raise VhostUserError(f"protocol version {flags & 3}, expected {VERSION}")
            if size > MAX_PAYLOAD:
                raise VhostUserError(f"message {request} with a {size}-byte payload")
            payload = b""
            while len(payload) < size:
                more = await conn.recv(size - len(payload))
                if not more:
                    raise VhostUserError("connection closed inside a message")
                payload += more
        except BaseException:
            for fd in fds:
                close_fd(fd)
            raise
        return request, flags, payload, fds

    async def _reply(self, conn: trio.socket.SocketType, request: int, payload: bytes) -> None:
        data = memoryview(HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)
        while data:
            data = data[await conn.send(data) :]

    async def _dispatch(
        self, conn: trio.socket.SocketType, request: int, flags: int, payload: bytes,
        fds: list[int],
    ) -> None:  # fmt: skip
        reply: bytes | None = None
        ok = True
        try:
            reply = await self._handle(request, payload, fds)
        except (VhostUserError, VirtqueueError, GuestMemoryError, struct.error) as e:
            if not (flags & FLAG_NEED_REPLY and self.acked_protocol & PF_REPLY_ACK):
                raise VhostUserError(f"message {request}: {e}") from e
            log.warning("vhost-user: message %d refused: %s", request, e)
            ok = False
        finally:
            for fd in fds:  # handlers take the fds they keep out of the list
                close_fd(fd)
        if reply is not None:
            await self._reply(conn, request, reply)
        elif flags & FLAG_NEED_REPLY and self.acked_protocol & PF_REPLY_ACK:
            await self._reply(conn, request, U64.pack(0 if ok else 1))

    def _queue(self, index: int) -> Virtqueue:
        if not 0 <= index < self.num_queues:
            raise VhostUserError(f"no virtqueue {index} (the device has {self.num_queues})")
        return self.queues[index]

    async def _handle(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        if request == GET_FEATURES:
            return U64.pack(self.features)
        if request == SET_FEATURES:
            (features,) = U64.unpack(payload)
            if features & ~self.features:
                raise VhostUserError(f"features {features:#x} were not offered")
            self.acked_features = features
        elif request == GET_PROTOCOL_FEATURES:
            return U64.pack(self.protocol_features)
        elif request == SET_PROTOCOL_FEATURES:
            (features,) = U64.unpack(payload)
            self.acked_protocol = features & self.protocol_features
        elif request == GET_QUEUE_NUM:
            return U64.pack(self.num_queues)
        elif request == GET_MAX_MEM_SLOTS:
            return U64.pack(MAX_MEM_SLOTS)
        elif request in (SET_OWNER, SET_BACKEND_REQ_FD, SET_LOG_FD):
            pass  # nothing to own; no back-end requests or dirty logging are offered
        elif request in (RESET_OWNER, RESET_DEVICE):
            await self._reset_all(keep_protocol=True)
        elif request == SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
        elif request == ADD_MEM_REG:
            self._add_mem_reg(payload, fds)
        elif request == REM_MEM_REG:
            _, gpa, size, _, _ = struct.unpack("=QQQQQ", payload[:40])
            self.memory.remove(gpa, size)
        elif request in (SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ENABLE, GET_VRING_BASE):
            index, num = VRING_STATE.unpack(payload[: VRING_STATE.size])
            return await self._vring_state(request, self._queue(index), num)
        elif request == SET_VRING_ADDR:
            index, _, desc, used, avail, _ = VRING_ADDR.unpack(payload[: VRING_ADDR.size])
            q = self._queue(index)
            q.desc_addr, q.used_addr, q.avail_addr = desc, used, avail
            q.addr_set = True
            if self.memory.regions:
                q.attach(self.memory)
        elif request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            self._vring_fd(request, payload, fds)
        else:
            raise VhostUserError(f"unsupported message {request}")
        return None

    async def _vring_state(self, request: int, q: Virtqueue, num: int) -> bytes | None:
        if request == SET_VRING_NUM:
            q.set_num(num)
        elif request == SET_VRING_BASE:
            q.set_base(num)
        elif request == SET_VRING_ENABLE:
            q.enabled = bool(num)
            if not q.enabled:
                self._stop(q)
            self._maybe_start(q)
        else:  # GET_VRING_BASE stops the ring and reports where the guest should resume
            self._stop(q)
            with trio.move_on_after(DRAIN_TIMEOUT):
                while self.inflight[q.index]:
                    await trio.sleep(0.005)
            q.enabled = False
            close_fd(q.kick_fd)
            q.kick_fd = None
            return VRING_STATE.pack(q.index, q.last_avail)
        return None

    def _vring_fd(self, request: int, payload: bytes, fds: list[int]) -> None:
        (value,) = U64.unpack(payload[:8])
        q = self._queue(value & VRING_INDEX_MASK)
        fd = None
        if not value & VRING_NOFD:
            if len(fds) != 1:
                raise VhostUserError(f"message {request} carries {len(fds)} fds, expected 1")
            fd = fds.pop()
            os.set_blocking(fd, False)
        if request == SET_VRING_KICK:
            if fd is None:
                raise VhostUserError("polling mode (no kick fd) is not supported")
            self._stop(q)
            old, q.kick_fd = q.kick_fd, fd
            if old is not None:
                trio.lowlevel.notify_closing(old)
                close_fd(old)
            if not self.acked_features & F_PROTOCOL_FEATURES:
                q.enabled = True  # without PROTOCOL_FEATURES a ring runs once kicked
            self._maybe_start(q)
        elif request == SET_VRING_CALL:
            close_fd(q.call_fd)
            q.call_fd = fd
        else:
            close_fd(q.err_fd)
            q.err_fd = fd

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        nregions, _ = struct.unpack("=II", payload[:8])
        if not 0 < nregions <= MAX_MEM_SLOTS or len(fds) != nregions:
            raise VhostUserError(f"memory table of {nregions} regions with {len(fds)} fds")
        if len(payload) < 8 + nregions * MEM_REGION.size:
            raise VhostUserError("memory table shorter than its region count")
        for q in self.queues:
            self._stop(q)
        self.memory.clear()
        for i in range(nregions):
            gpa, size, uva, offset = MEM_REGION.unpack_from(payload, 8 + i * MEM_REGION.size)
            self.memory.add(map_region(fds[i], gpa, size, uva, offset))
        self._memory_changed()

    def _add_mem_reg(self, payload: bytes, fds: list[int]) -> None:
        if len(fds) != 1 or len(payload) < 8 + MEM_REGION.size:
            raise VhostUserError("ADD_MEM_REG needs one region and one fd")
        if len(self.memory.regions) >= MAX_MEM_SLOTS:
            raise VhostUserError("all memory slots are in use")
        gpa, size, uva, offset = MEM_REGION.unpack_from(payload, 8)
        self.memory.add(map_region(fds[0], gpa, size, uva, offset))
        self._memory_changed()

    def _memory_changed(self) -> None:
        for q in self.queues:
            if q.addr_set and q.num:
                try:
                    q.attach(self.memory)
                except GuestMemoryError:
                    q.memory = None  # not (yet) mapped: checked again on the next change
            self._maybe_start(q)

    # --- rings --------------------------------------------------------------------------------
    def _maybe_start(self, q: Virtqueue) -> None:
        if q.index in self._runners or self._nursery is None:
            return
        if q.kick_fd is None or not q.enabled or not q.ready:
            return
        q.event_idx = bool(self.acked_features & F_EVENT_IDX)
        q.signalled_used = None
        scope = trio.CancelScope()
        self._runners[q.index] = scope
        self._nursery.start_soon(self._run_ring, q, scope)

    def _stop(self, q: Virtqueue) -> None:
        scope = self._runners.pop(q.index, None)
        if scope is not None:
            scope.cancel()

    async def _run_ring(self, q: Virtqueue, scope: trio.CancelScope) -> None:
        with scope:
            kick = q.kick_fd
            assert kick is not None and self._nursery is not None
            try:
                while True:
                    self._drain(q, self._nursery)  # the guest may have kicked before we ran
                    await trio.lowlevel.wait_readable(kick)
                    with contextlib.suppress(BlockingIOError):
                        os.read(kick, 8)
            except (trio.ClosedResourceError, OSError) as e:
                log.debug("vhost-user: ring %d stopped: %s", q.index, e)
            except VirtqueueError as e:
                log.error("vhost-user: ring %d is broken, stopped: %s", q.index, e)
        if self._runners.get(q.index) is scope:
            del self._runners[q.index]

    def _drain(self, q: Virtqueue, nursery: trio.Nursery) -> None:
        while True:
            try:
                chain = q.pop()
            except BadChain as e:
                log.error("vhost-user: ring %d: bad descriptor chain: %s", q.index, e)
                q.push(e.chain.head, 0)  # give the head back so the guest does not wait
                q.notify()
                continue
            if chain is None:
                if q.kick_me_at_next():
                    continue
                return
            self.inflight[q.index] += 1
            nursery.start_soon(self._serve_chain, q, chain)

    async def _serve_chain(self, q: Virtqueue, chain: Chain) -> None:
        written = 0
        try:
            written = await self.process(q, chain)
        except (GuestMemoryError, VirtqueueError) as e:
            log.error("vhost-user: ring %d: request failed: %s", q.index, e)
        finally:
            self.inflight[q.index] -= 1
        if q.memory is None or not q.memory.regions:
            return  # the front-end took the memory away meanwhile
        try:
            q.push(chain.head, written)
            q.notify()
        except (GuestMemoryError, VirtqueueError) as e:
            log.error("vhost-user: ring %d: cannot complete a request: %s", q.index, e)

    async def _reset_all(self, keep_protocol: bool = False) -> None:
        """Back to the state of a new connection (a device reset keeps the negotiated
        protocol features, as the front-end does not negotiate them again)."""
        for q in self.queues:
            self._stop(q)
            for fd in (q.kick_fd, q.call_fd, q.err_fd):
                if fd is not None and fd == q.kick_fd:
                    trio.lowlevel.notify_closing(fd)
                close_fd(fd)
        self.queues = [Virtqueue(i) for i in range(self.num_queues)]
        self.inflight = [0] * self.num_queues
        self.memory.clear()
        self.acked_features = 0
        if not keep_protocol:
            self.acked_protocol = 0
        await self.reset()


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds
