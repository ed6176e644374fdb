"""Unit tests: the chunk map file (upstream's persist_map.rs cases) and the merge rules."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from nydusfs.storage.cache.chunkmap import (
    HEADER_SIZE,
    MAGIC1,
    MAGIC2,
    MAGIC_ALL_READY,
    IndexedChunkMap,
    bit_mask,
)
from nydusfs.storage.cache.merge import (
    FetchPlan,
    amplify,
    effective_batch_size,
    merge_chunks,
    split_by_size,
)
from nydusfs.storage.cache.readahead import ReadSpan, Streams
from nydusfs.storage.device import ChunkInfo
from nydusfs.storage.meta import CiEntry
from nydusfs.types import ChunkFlags

pytestmark = pytest.mark.timeout(30)


def header(all_ready: int = 0, version: int = 1, magic2: int = MAGIC2) -> bytes:
    return struct.pack("<IIII", MAGIC1, version, magic2, all_ready).ljust(HEADER_SIZE, b"\0")


def test_new_map(tmp_path: Path) -> None:
    path = tmp_path / "b.chunk_map"
    m = IndexedChunkMap(str(path), 1)
    assert path.stat().st_size == 0x1001
    assert not m.is_ready(0) and not m.all_ready
    assert m.set_ready(0)  # the last chunk
    assert m.is_ready(0)
    m.mark_all_ready()
    m.close()
    assert path.read_bytes() == header(MAGIC_ALL_READY) + b"\x80"


def test_zero_filled_file_gets_a_header(tmp_path: Path) -> None:
    # Upstream's race window: size set, header not yet written.
    path = tmp_path / "b.chunk_map"
    path.write_bytes(bytes(0x1001))
    m = IndexedChunkMap(str(path), 1)
    assert not m.is_ready(0)
    m.close()
    assert path.read_bytes()[:16] == header()[:16]


def test_all_ready_header_and_counted_bits(tmp_path: Path) -> None:
    path = tmp_path / "b.chunk_map"
    path.write_bytes(header(MAGIC_ALL_READY) + b"\x00")
    m = IndexedChunkMap(str(path), 1)
    assert m.all_ready and m.is_ready(0)
    m.close()
    # Every bit set but no all_ready mark: counted at open, then marked (as upstream).
    path.write_bytes(header() + b"\xff\xc0")
    m = IndexedChunkMap(str(path), 10)
    assert m.all_ready
    m.close()
    assert struct.unpack_from("<I", path.read_bytes(), 12)[0] == MAGIC_ALL_READY


def test_v0_header_bits_are_used(tmp_path: Path) -> None:
    path = tmp_path / "b.chunk_map"
    path.write_bytes(header(version=0, magic2=0) + b"\x40")
    m = IndexedChunkMap(str(path), 3)
    assert [m.is_ready(i) for i in range(3)] == [False, True, False]
    assert m.ready_count == 1
    m.close()


@pytest.mark.parametrize(
    "content",
    [b"\x00", header() + b"\xff\xff", b"junk".ljust(0x1001, b"\x01"), header(magic2=7) + b"\xff"],
    ids=["short", "long", "bad-magic", "bad-magic2"],
)
def test_damaged_map_is_reset(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "b.chunk_map"
    path.write_bytes(content)
    m = IndexedChunkMap(str(path), 8)
    assert m.ready_count == 0 and not any(m.is_ready(i) for i in range(8))
    m.close()
    assert path.read_bytes() == header() + b"\x00"


def test_reset_and_clear(tmp_path: Path) -> None:
    path = tmp_path / "b.chunk_map"
    m = IndexedChunkMap(str(path), 9)
    for i in range(9):
        m.set_ready(i)
    m.mark_all_ready()
    m.clear_ready(8)
    assert not m.all_ready and not m.is_ready(8) and m.is_ready(7)
    m.close()
    assert path.read_bytes() == header() + b"\xff\x00"
    m = IndexedChunkMap(str(path), 9, reset=True)
    assert m.ready_count == 0
    with pytest.raises(IndexError):
        m.is_ready(9)
    m.close()


def test_bit_mask_is_msb_first() -> None:
    assert [bit_mask(i) for i in range(9)] == [0x80, 0x40, 0x20, 0x10, 8, 4, 2, 1, 0x80]


def chunk(index: int, offset: int, size: int) -> ChunkInfo:
    return ChunkInfo(bytes(32), 0, ChunkFlags(0), offset, size, index * 0x1000, size, 0, index)


def test_merge_rules() -> None:
    cs = [chunk(0, 0, 100), chunk(1, 100, 100), chunk(2, 200, 100), chunk(3, 400, 100)]
    assert [[c.index for c in g] for g in merge_chunks(cs, 0, 0)] == [[0, 1, 2], [3]]
    assert [[c.index for c in g] for g in merge_chunks(cs, 0, 100)] == [[0, 1, 2, 3]]
    assert [[c.index for c in g] for g in merge_chunks(cs, 200, 100)] == [[0, 1], [2], [3]]
    plan = FetchPlan.of(cs)
    assert (plan.offset, plan.size) == (0, 500)
    assert effective_batch_size(0) == 0
    assert effective_batch_size(1) == 0x20000
    assert effective_batch_size(1 << 20) == 1 << 20
    assert [[c.index for c in g] for g in split_by_size(cs, 250)] == [[0, 1], [2], [3]]
    assert [[c.index for c in g] for g in split_by_size(cs, 300)] == [[0, 1, 2], [3]]


def test_amplify_stops_at_limits() -> None:
    entries = [CiEntry(i * 0x10000, 0x10000, i * 0x10000, 0x10000) for i in range(8)]
    entries[6].zran = True

    def make(i: int, e: CiEntry) -> ChunkInfo:
        return chunk(i, e.compressed_offset, e.compressed_size)

    first = [make(1, entries[1])]
    extra = amplify(first, entries, 0x40000, lambda i: True, make)
    assert [c.index for c in extra] == [2, 3, 4]  # 4 chunks fit in 256 KiB
    extra = amplify(first, entries, 1 << 20, lambda i: i != 4, make)
    assert [c.index for c in extra] == [2, 3]  # chunk 4 is ready or in flight
    extra = amplify(first, entries, 1 << 20, lambda i: True, make)
    assert [c.index for c in extra] == [2, 3, 4, 5]  # chunk 6 is a zran chunk
    assert amplify(first, entries, 0, lambda i: True, make) == []


def test_streams_need_dense_file_after_file_reads_to_span_files() -> None:
    streams = Streams(initial_window=1 << 20, max_window=8 << 20, gap=0x2000, back=1 << 20)
    # Four 100 KiB files read whole, one after another: the stream spans files after three
    # crossings, and read-ahead becomes due as soon as a read moves past the first one.
    s, due = streams.observe(_span(0, 100_000, 1, file_start=True))
    assert not due and not s.spans_files
    for i in range(1, 4):
        t, due = streams.observe(_span(i * 100_000, (i + 1) * 100_000, i + 1, True))
        assert t is s and due
    assert s.spans_files and s.pos == 400_000
    # Across files, no more is read ahead than the stream has read (400 KB so far) ...
    assert streams.window_of(s) == 400_000
    # ... and as it reads on, windows double up to the maximum.
    for i in range(4, 100):
        streams.observe(_span(i * 100_000, (i + 1) * 100_000, i + 1, True))
    assert [streams.window_of(s) for _ in range(5)] == [800_000, 1_600_000, 3_200_000,
                                                         6_400_000, 8 << 20]  # fmt: skip
    # The trigger sits half a window before the new end.
    Streams.advanced(s, 10_000_000 + (8 << 20), 999)
    assert s.end == 10_000_000 + (8 << 20) and s.trigger == s.end - (4 << 20)
    # A read far from every stream starts a new one.
    u, due = streams.observe(_span(50 << 20, (50 << 20) + 10, 500, True))
    assert u is not s and not due


def test_sparse_file_after_file_reads_do_not_span_files() -> None:
    """One file in twenty, read in blob order, inside a region read ahead after a false start
    (three neighbours read in a row): the reads continue the stream, but cover too little of
    it to go on amplifying across files."""
    streams = Streams(initial_window=1 << 20, max_window=8 << 20, gap=0x2000, back=1 << 20)
    s, _ = streams.observe(_span(0, 10_000, 0, file_start=True))
    for i in range(1, 4):
        streams.observe(_span(i * 10_000, (i + 1) * 10_000, i, file_start=True))
    assert s.spans_files
    Streams.advanced(s, 8 << 20, 800)  # what read-ahead claimed
    for i in range(1, 30):
        start = 40_000 + i * 20 * 10_000
        t, _ = streams.observe(_span(start, start + 10_000, i * 20, file_start=True))
        assert t is s
    assert not s.spans_files


def _span(start: int, end: int, index: int, file_start: bool) -> ReadSpan:
    """A read of one chunk, ``index``, stored at ``[start, end)``."""
    return ReadSpan(start, end, index, file_start, [(index, start, end - start)])


def test_a_chunk_read_in_pieces_counts_once() -> None:
    """FUSE reads a file 128 KiB at a time: ten reads of one chunk are not ten chunks' worth
    of density. Files of one chunk each, read in pieces, one file in five: not dense."""
    streams = Streams(initial_window=1 << 20, max_window=8 << 20, gap=0x2000, back=1 << 20)
    s, _ = streams.observe(_span(0, 10_000, 0, True))
    for i in range(1, 4):  # three neighbours: a stream that spans files
        streams.observe(_span(i * 10_000, (i + 1) * 10_000, i, True))
    Streams.advanced(s, 8 << 20, 800)
    for i in range(1, 30):
        start = 40_000 + i * 5 * 10_000
        for piece in range(10):
            streams.observe(_span(start, start + 10_000, 4 + i * 5, piece == 0))
    assert not s.spans_files
