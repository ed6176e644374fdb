"""Hypothesis fuzzing of the split virtqueue walker: whatever a guest writes into its rings,
``pop`` returns a chain whose buffers lie in guest memory or raises ``VirtqueueError``; it never
loops forever and never reads outside the mapping."""

from __future__ import annotations

import mmap
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from nydusfs.virtiofs.memory import GuestMemory, map_region
from nydusfs.virtiofs.virtqueue import BadChain, Virtqueue, VirtqueueError

MEM = 64 * 1024
QSIZE = 8
DESC, AVAIL, USED = 0x0, 0x100, 0x200

descriptors = st.tuples(
    st.one_of(st.integers(0, MEM + 64), st.integers(0, 2**64 - 1)),  # addr
    st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),  # len
    st.integers(0, 7),  # NEXT | WRITE | INDIRECT
    st.integers(0, 2 * QSIZE),  # next
)


@settings(max_examples=300, deadline=None)
@given(
    table=st.lists(descriptors, min_size=QSIZE, max_size=QSIZE),
    indirect=st.lists(descriptors, max_size=6),
    heads=st.lists(st.integers(0, 2 * QSIZE), min_size=1, max_size=QSIZE),
    avail_idx=st.integers(0, 0xFFFF),
)
def test_any_ring_contents(
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_idx: int,
) -> None:
    fd = os.memfd_create("fuzz")
    try:
        os.ftruncate(fd, MEM)
        mem = mmap.mmap(fd, MEM)
        memory = GuestMemory()
        memory.add(map_region(fd, 0, MEM, 0, 0))
        for i, d in enumerate(table):
            struct.pack_into("<QIHH", mem, DESC + 16 * i, *d)
        for i, d in enumerate(indirect):  # an indirect table at 0x1000 for addr 0x1000 to hit
            struct.pack_into("<QIHH", mem, 0x1000 + 16 * i, *d)
        struct.pack_into("<H", mem, AVAIL + 2, avail_idx)
        for i, h in enumerate(heads):
            struct.pack_into("<H", mem, AVAIL + 4 + 2 * i, h)
        q = Virtqueue(1)
        q.set_num(QSIZE)
        q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
        q.attach(memory)
        for _ in range(QSIZE + 1):
            try:
                chain = q.pop()
            except BadChain as e:
                q.push(e.chain.head, 0)
                continue
            except VirtqueueError:
                break  # the avail index itself is impossible: the ring is stopped
            if chain is None:
                break
            for addr, length in chain.readable + chain.writable:
                assert addr >= 0 and addr + length <= MEM
            assert len(q.gather(chain, 1 << 20)) == chain.readable_len
            q.push(chain.head, 0)
        memory.clear()
        mem.close()
    finally:
        os.close(fd)
