"""Split virtqueues (virtio 1.x, section 2.7): descriptor chains in, used elements out.

The driver (the guest) publishes chain heads in the avail ring; the device walks each chain
through the descriptor table (and indirect tables), reads the device-readable buffers, writes
the device-writable ones and returns the head in the used ring with the number of bytes it
wrote. Everything the guest wrote is checked: ring indexes, descriptor indexes, loops in a
chain, readable-after-writable order, nested indirect tables and buffer addresses; a broken
chain raises ``VirtqueueError`` and is not followed.

Ring addresses are front-end (QEMU) virtual addresses, descriptor addresses guest-physical;
both resolve through ``GuestMemory``. Little-endian (VIRTIO_F_VERSION_1). Used from one trio
loop: pushes of concurrently served requests are serialised by construction.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from dataclasses import dataclass, field

from nydusfs.virtiofs.memory import GuestMemory, GuestMemoryError

DESC = struct.Struct("<QIHH")  # addr len flags next
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
F_EVENT_IDX = 1 << 29  # VIRTIO_RING_F_EVENT_IDX
MAX_QUEUE_SIZE = 32768
ONE = (1).to_bytes(8, "little")


class VirtqueueError(ValueError):
    """The guest put something into the ring that the device must not follow."""


@dataclass
class Chain:
    """One request: its head index and its buffers as (guest-physical address, length)."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


class Virtqueue:
    """One split virtqueue as configured by SET_VRING_NUM/ADDR/BASE/KICK/CALL."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.addr_set = False
        self.last_avail = 0
        self.used_idx = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.memory: GuestMemory | None = None
        # VIRTIO_RING_F_EVENT_IDX: the driver says at which used index it wants an interrupt
        # (used_event) and the device at which avail index it wants a kick (avail_event).
        self.event_idx = False
        self.signalled_used: int | None = None

    def set_num(self, num: int) -> None:
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise VirtqueueError(f"queue size {num} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        self.num = num

    def set_base(self, base: int) -> None:
        self.last_avail = self.used_idx = base & 0xFFFF

    @property
    def ready(self) -> bool:
        return self.num > 0 and self.addr_set and self.memory is not None

    def attach(self, memory: GuestMemory) -> None:
        """Check that the three rings lie in guest memory (addresses are re-resolved on use,
        so a later memory table change is seen)."""
        memory.uva(self.desc_addr, 16 * self.num)
        memory.uva(self.avail_addr, 6 + 2 * self.num)
        memory.uva(self.used_addr, 6 + 8 * self.num)
        self.memory = memory

    def _mem(self) -> GuestMemory:
        if self.memory is None:
            raise VirtqueueError(f"queue {self.index} has no memory")
        return self.memory

    # --- avail side ---------------------------------------------------------------------------
    def avail_idx(self) -> int:
        mm, off = self._mem().uva(self.avail_addr, 4)
        return int(U16.unpack_from(mm, off + 2)[0])

    def pending(self) -> int:
        """Heads the guest has published that the device has not taken yet."""
        n = (self.avail_idx() - self.last_avail) & 0xFFFF
        if n > self.num:
            raise VirtqueueError(f"queue {self.index}: avail index {n} ahead of a {self.num} ring")
        return n

    def pop(self) -> Chain | None:
        """The next published chain, or None when the device has taken them all."""
        if not self.pending():
            return None
        mm, off = self._mem().uva(self.avail_addr + 4 + 2 * (self.last_avail % self.num), 2)
        head = int(U16.unpack_from(mm, off)[0])
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.num:
            raise VirtqueueError(f"queue {self.index}: head {head} out of a {self.num} table")
        chain = Chain(head)
        try:
            self._walk(chain)
        except (GuestMemoryError, VirtqueueError) as e:
            raise BadChain(chain, str(e)) from None
        return chain

    def _walk(self, chain: Chain) -> None:
        memory = self._mem()
        table_mm, table_off = memory.uva(self.desc_addr, 16 * self.num)
        size = self.num
        index = chain.head
        indirect = False
        seen = 0
        while True:
            seen += 1
            if seen > size:
                raise VirtqueueError("descriptor chain loops or is longer than its table")
            addr, length, flags, nxt = DESC.unpack_from(table_mm, table_off + 16 * index)
            if flags & F_INDIRECT:
                if indirect or flags & F_NEXT:
                    raise VirtqueueError("nested or chained indirect descriptor table")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise VirtqueueError(f"indirect table of {length} bytes")
                table_mm, table_off = memory.gpa(addr, length)
                size, index, seen, indirect = length // 16, 0, 0, True
                continue
            memory.gpa(addr, length)  # the buffer must be guest memory
            if flags & F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise VirtqueueError("device-readable buffer after a device-writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & F_NEXT:
                return
            if nxt >= size:
                raise VirtqueueError(f"next descriptor {nxt} out of a {size} table")
            index = nxt

    # --- used side ----------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        memory = self._mem()
        slot = self.used_addr + 4 + 8 * (self.used_idx % self.num)
        mm, off = memory.uva(slot, 8)
        USED_ELEM.pack_into(mm, off, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # The element is written before the index that publishes it (x86 keeps store order;
        # CPython gives no reordering between these two statements).
        mm, off = memory.uva(self.used_addr + 2, 2)
        U16.pack_into(mm, off, self.used_idx)

    def kick_me_at_next(self) -> bool:
        """With EVENT_IDX, ask for a kick when the guest adds past what the device has taken;
        True when the guest already did (drain again instead of waiting for a kick)."""
        if not self.event_idx:
            return False
        mm, off = self._mem().uva(self.used_addr + 4 + 8 * self.num, 2)
        U16.pack_into(mm, off, self.last_avail)
        _full_barrier()  # the store above must be seen before the load below (virtio 2.7.10)
        return self.pending() > 0

    def notify(self) -> None:
        """Interrupt the guest unless it asked not to be (NO_INTERRUPT, or with EVENT_IDX a
        used_event the new used entries did not reach)."""
        if self.call_fd is None:
            return
        _full_barrier()  # used idx stored before the driver's wishes are read
        if self.event_idx:
            mm, off = self._mem().uva(self.avail_addr + 4 + 2 * self.num, 2)
            used_event = U16.unpack_from(mm, off)[0]
            old, new = self.signalled_used, self.used_idx
            self.signalled_used = new
            if old is not None and (new - used_event - 1) & 0xFFFF >= (new - old) & 0xFFFF:
                return
        else:
            mm, off = self._mem().uva(self.avail_addr, 2)
            if U16.unpack_from(mm, off)[0] & AVAIL_F_NO_INTERRUPT:
                return
        # BlockingIOError: the eventfd counter is saturated, the guest will be woken anyway.
        with contextlib.suppress(BlockingIOError):
            os.write(self.call_fd, ONE)

    # --- scatter/gather -----------------------------------------------------------------------
    def gather(self, chain: Chain, limit: int) -> bytes:
        """The chain's readable bytes (a copy), at most ``limit`` of them."""
        memory = self._mem()
        parts = []
        total = 0
        for addr, length in chain.readable:
            take = min(length, limit - total)
            if take <= 0:
                break
            parts.append(memory.read(addr, take))
            total += take
        return b"".join(parts)

    def scatter(self, chain: Chain, buffers: list[bytes | memoryview]) -> int:
        """Write ``buffers`` across the chain's writable buffers; the bytes written."""
        memory = self._mem()
        slots = iter(chain.writable)
        addr, room = 0, 0
        written = 0
        for buf in buffers:
            data = memoryview(buf).cast("B")
            while len(data):
                if room == 0:
                    addr, room = next(slots)  # callers check the total fits first
                    continue
                n = min(room, len(data))
                memory.write(addr, data[:n])
                data = data[n:]
                addr += n
                room -= n
                written += n
        return written


_BARRIER = threading.Lock()


def _full_barrier() -> None:
    """A full memory barrier: taking a lock is a locked (fencing) instruction on x86, which
    orders our store to guest memory before our next load from it, as the guest expects."""
    with _BARRIER:
        pass


class BadChain(VirtqueueError):
    """A chain that cannot be served; its head can still be returned to the guest."""

    def __init__(self, chain: Chain, why: str) -> None:
        super().__init__(why)
        self.chain = chain
