"""``rafs.blockdev``: the flat block view's layout rules, reads across extents and the export.

The export is checked against an independent construction: the bootstrap file followed by each
blob's uncompressed view as ``rafs.blobview`` writes it (through ``LocalBlobReader``, not the
storage stack), placed at the device table's ``mapped_blkaddr``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from nydusfs.config import localfs_config
from nydusfs.errors import ConfigError, FormatError, UnsupportedError
from nydusfs.rafs.blobview import write_uncompressed_blobs
from nydusfs.rafs.blockdev import (
    BLOCK_SIZE,
    BlobChunks,
    BlockDevice,
    block_layout,
    export,
)
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage.device import BlobInfo, BlobIoDesc, ChunkInfo
from nydusfs.types import BlobFeatures, ChunkFlags, Compressor, Digester


def _blob(index: int, mapped: int, size: int) -> BlobInfo:
    return BlobInfo(
        blob_index=index, blob_id=f"{index:064x}", chunk_size=0x1000, chunk_count=0,
        compressor=Compressor.NONE, digester=Digester.BLAKE3, features=BlobFeatures(0),
        compressed_size=size, uncompressed_size=size, mapped_blkaddr=mapped,
    )  # fmt: skip


def _chunk(index: int, offset: int, size: int) -> ChunkInfo:
    return ChunkInfo(bytes(32), 0, ChunkFlags(0), offset, size, offset, size, 0, index)


def test_layout_places_blobs_at_their_mapped_blocks() -> None:
    extents = block_layout(3 * BLOCK_SIZE, [_blob(0, 128, 5 * BLOCK_SIZE), _blob(1, 133, 100)])
    assert [(e.start // BLOCK_SIZE, e.end // BLOCK_SIZE) for e in extents] == [
        (0, 3), (128, 133), (133, 134),  # a partial last block is kept whole
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("meta_size", "blobs", "message"),
    [
        (1000, [], "not a multiple"),
        (0, [], "not a multiple"),
        (BLOCK_SIZE, [_blob(0, 0, BLOCK_SIZE)], "mapped block address is 0"),
        (8 * BLOCK_SIZE, [_blob(0, 4, BLOCK_SIZE)], "overlaps"),
        (BLOCK_SIZE, [_blob(0, 1, 8 * BLOCK_SIZE), _blob(1, 5, BLOCK_SIZE)], "overlaps"),
        (BLOCK_SIZE, [_blob(0, 0xFFFF_FFF0, 64 * BLOCK_SIZE)], "ends past block"),
    ],
)
def test_layout_refuses_bad_images(meta_size: int, blobs: list[BlobInfo], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        block_layout(meta_size, blobs)


def test_chunk_index_rejects_unaligned_and_overlapping_chunks() -> None:
    blob = _blob(0, 1, 4 * BLOCK_SIZE)
    with pytest.raises(UnsupportedError, match="4 KiB block"):
        BlobChunks(blob, [_chunk(0, 100, 10)], 4 * BLOCK_SIZE)
    with pytest.raises(FormatError, match="overlaps"):
        BlobChunks(blob, [_chunk(0, 0, 8192), _chunk(1, 4096, 10)], 4 * BLOCK_SIZE)
    with pytest.raises(FormatError, match="both start"):
        BlobChunks(blob, [_chunk(0, 0, 10), _chunk(1, 0, 10)], 4 * BLOCK_SIZE)
    with pytest.raises(FormatError, match="past the blob"):
        BlobChunks(blob, [_chunk(0, 3 * BLOCK_SIZE, 2 * BLOCK_SIZE)], 4 * BLOCK_SIZE)


def test_chunk_pieces_skip_gaps() -> None:
    blob = _blob(0, 1, 4 * BLOCK_SIZE)
    # The same chunk listed twice (shared by two files) counts once.
    chunks = BlobChunks(blob, [_chunk(1, 8192, 5000), _chunk(0, 0, 100), _chunk(1, 8192, 5000)],
                        4 * BLOCK_SIZE)  # fmt: skip
    pieces = chunks.pieces(50, 8192 + 10)
    assert [(pos, d.chunk.index, d.offset, d.size) for pos, d in pieces] == [
        (0, 0, 50, 50),
        (8142, 1, 0, 10),
    ]
    assert chunks.pieces(100, 8192) == []  # only the gap


class _Recorder:
    """A data source that answers with a recognisable pattern and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[list[BlobIoDesc]] = []

    async def read(self, iovec: Sequence[BlobIoDesc]) -> bytes:
        self.calls.append(list(iovec))
        return b"".join(bytes([d.chunk.index + 1]) * d.size for d in iovec)


def _fake_device(tmp_path: Path) -> tuple[BlockDevice, _Recorder]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(6000))
    boot = tmp_path / "boot"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    build(BuildOptions(source=str(src), bootstrap=str(boot), blob_dir=str(blobs),
                       compressor=Compressor.NONE, chunk_size=0x1000))  # fmt: skip
    sup = RafsSuper.load(boot)
    recorder = _Recorder()
    return BlockDevice(sup, boot.read_bytes(), recorder), recorder  # type: ignore[arg-type]


def test_read_spans_bootstrap_hole_and_blob(tmp_path: Path) -> None:
    device, recorder = _fake_device(tmp_path)
    meta = (tmp_path / "boot").read_bytes()
    (blob,) = device.sup.blobs
    start = blob.mapped_blkaddr * BLOCK_SIZE
    assert device.size == start + 2 * BLOCK_SIZE  # two 4 KiB chunks
    data = trio.run(device.read, len(meta) - 10, start - len(meta) + 10 + 4096 + 5)
    assert data[:10] == meta[-10:]
    assert data[10 : 10 + start - len(meta)] == bytes(start - len(meta))
    tail = data[10 + start - len(meta) :]
    assert tail == b"\x01" * 4096 + b"\x02" * 5
    assert len(recorder.calls) == 1  # one storage read for the whole blob range
    # The second chunk holds 6000 - 4096 bytes; the rest of its block reads as zeros.
    end = trio.run(device.read, device.size - 300, 300)
    assert end == bytes(300)
    with pytest.raises(OSError, match="outside the device"):
        trio.run(device.read, device.size - 1, 2)


@pytest.mark.parametrize("compressor", [Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE])
def test_export_is_bootstrap_plus_uncompressed_blobs(
    small_tree: Path, tmp_path: Path, compressor: Compressor
) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "boot"
    build(BuildOptions(source=str(small_tree), bootstrap=str(boot), blob_dir=str(blobs),
                       compressor=compressor, chunk_size=0x10000))  # fmt: skip
    config = localfs_config(str(blobs), str(tmp_path / "cache"))
    out = tmp_path / "disk"

    async def run() -> int:
        device = await trio.to_thread.run_sync(BlockDevice.open, str(boot), config)
        try:
            with open(out, "wb") as f:
                f.truncate(device.size)
                await export(device, f.fileno(), tasks=3)
            # Random reads agree with the exported file, whatever their alignment.
            rng = random.Random(5)
            disk = out.read_bytes()
            for _ in range(50):
                offset = rng.randrange(device.size)
                size = rng.randrange(min(300_000, device.size - offset) + 1)
                assert await device.read(offset, size) == disk[offset : offset + size]
            return device.size
        finally:
            await device.close()

    size = trio.run(run)
    (view,) = write_uncompressed_blobs(boot, blobs, tmp_path)
    with RafsSuper.load(boot) as sup:
        (blob,) = sup.blobs
    meta = boot.read_bytes()
    start = blob.mapped_blkaddr * BLOCK_SIZE
    expected = meta + bytes(start - len(meta)) + view.read_bytes()
    expected += bytes(-len(expected) % BLOCK_SIZE)
    assert size == len(expected)
    assert out.read_bytes() == expected


def test_open_refuses_bad_sources(tmp_path: Path, small_tree: Path) -> None:
    boot = tmp_path / "boot"
    build(BuildOptions(source=str(small_tree), bootstrap=str(boot), blob_dir=str(tmp_path)))
    no_backend = dataclasses.replace(localfs_config(str(tmp_path)), backend=None)
    with pytest.raises(ConfigError, match="no backend"):
        BlockDevice.open(str(boot), no_backend)
    (tmp_path / "junk").write_bytes(b"x" * 8192)
    with pytest.raises(FormatError, match="not a RAFS image"):
        BlockDevice.open(str(tmp_path / "junk"), localfs_config(str(tmp_path)))
    with pytest.raises(FormatError, match="cannot open"):
        BlockDevice.open(str(tmp_path / "missing"), localfs_config(str(tmp_path)))


def test_allocation_runs_cover_the_range_and_holes_read_as_zeros(tmp_path: Path) -> None:
    device, _ = _fake_device(tmp_path)
    (blob,) = device.sup.blobs
    meta_size = len((tmp_path / "boot").read_bytes())
    start = blob.mapped_blkaddr * BLOCK_SIZE
    # The bootstrap, the alignment gap, then two chunks (the second one's block counts whole).
    assert device.allocation(0, device.size) == [
        (meta_size, False), (start - meta_size, True), (2 * BLOCK_SIZE, False),
    ]  # fmt: skip
    assert device.allocation(meta_size - 1, 2) == [(1, False), (1, True)]
    assert device.allocation(start + 10, 5) == [(5, False)]
    assert device.allocation(5, 0) == []
    rng = random.Random(3)
    for _ in range(30):
        offset = rng.randrange(device.size)
        size = rng.randrange(device.size - offset + 1)
        runs = device.allocation(offset, size)
        assert sum(length for length, _ in runs) == size
        assert all(a[1] != b[1] for a, b in itertools.pairwise(runs))  # merged
        data = trio.run(device.read, offset, size)
        pos = 0
        for length, hole in runs:
            if hole:
                assert data[pos : pos + length] == bytes(length)
            pos += length
    with pytest.raises(OSError, match="outside the device"):
        device.allocation(device.size, 1)
