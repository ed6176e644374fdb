"""The flat block view of a RAFS v6 image: one disk the kernel's EROFS driver mounts.

A RAFS v6 bootstrap is an EROFS image whose file data lives on extra devices, one per blob; the
device table gives each blob a ``mapped_blkaddr``. Laid end to end, the bootstrap at block 0 and
each blob's *uncompressed* view at its ``mapped_blkaddr`` (holes between them read as zeros),
they form a single block device that EROFS mounts without ``device=`` (its "flatdev" mode, Linux
6.12+). This is upstream's ``service/src/block_device.rs``; ``nydusd nbd`` serves the view and
``nydus-image export --block`` writes it to a file, so both give the same bytes.

Layout rules, as upstream: the bootstrap is served unchanged (its device table already holds the
``mapped_blkaddr`` values the builder chose), its size must be a multiple of 4096; a blob with
``mapped_blkaddr`` 0 or overlapping what comes before it is refused; the device ends where the
last blob ends. One deliberate difference: a blob whose uncompressed size is not block aligned
is rounded *up* to whole blocks (upstream rounds down and cuts off its last partial block).

Data is fetched lazily through the storage stack (``BlobDevice``: backend, cache, decompression,
digest checks), whatever the blob compressor. Chunks must start on a block boundary, which every
v6 builder guarantees (the kernel could not address them otherwise).

Concurrency: ``read`` runs on a trio loop and may be called by many tasks at once; it awaits
``BlobDevice.read`` (threads for fetches and decompression). ``BlockDevice.open`` blocks (bootstrap
mapping, cache files): call it in a thread. The bootstrap bytes are an immutable mmap.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from nydusfs.config import ConfigV2
from nydusfs.errors import ConfigError, FormatError, UnsupportedError
from nydusfs.rafs.layout import v6 as L
from nydusfs.rafs.layout.v5 import CHUNK_INFO_V5, unpack_chunk_info
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.rafs.v6 import RafsV6Super
from nydusfs.storage.backends import new_backend
from nydusfs.storage.backends.base import BlobBackend
from nydusfs.storage.blobdevice import BlobDevice
from nydusfs.storage.device import BlobInfo, BlobIoDesc, ChunkInfo

BLOCK_SIZE = L.EROFS_BLOCK_SIZE_4096
# Export copies in pieces of this size, as upstream (BLOCK_DEVICE_EXPORT_BATCH_SIZE).
EXPORT_BATCH_SIZE = 0x8_0000
MAX_BLOCKS = 0xFFFF_FFFF  # block addresses are u32


class DataSource(Protocol):
    """What the view reads blob data through (``BlobDevice``, or a test double)."""

    async def read(self, iovec: Sequence[BlobIoDesc]) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range of the view: the bootstrap (``blob`` None) or one blob's data."""

    start: int
    end: int
    blob: BlobInfo | None


class BlobChunks:
    """One blob's chunks ordered by uncompressed offset, to turn a byte range into descriptors."""

    def __init__(self, blob: BlobInfo, chunks: Sequence[ChunkInfo], size: int) -> None:
        self.blob = blob
        unique: dict[int, ChunkInfo] = {}
        for chunk in chunks:
            seen = unique.setdefault(chunk.uncompressed_offset, chunk)
            if seen.index != chunk.index or seen.uncompressed_size != chunk.uncompressed_size:
                raise FormatError(
                    f"blob {blob.blob_id}: chunks {seen.index} and {chunk.index} both start at "
                    f"uncompressed offset {chunk.uncompressed_offset:#x}"
                )
        self.chunks = [unique[k] for k in sorted(unique)]
        self.offsets = [c.uncompressed_offset for c in self.chunks]
        end = 0
        for chunk in self.chunks:
            if chunk.uncompressed_offset % BLOCK_SIZE:
                raise UnsupportedError(
                    f"blob {blob.blob_id}: chunk {chunk.index} starts at "
                    f"{chunk.uncompressed_offset:#x}, not on a 4 KiB block, so the image cannot "
                    "be a block device"
                )
            if chunk.uncompressed_offset < end:
                raise FormatError(f"blob {blob.blob_id}: chunk {chunk.index} overlaps another")
            end = chunk.uncompressed_offset + chunk.uncompressed_size
            if end > size:
                raise FormatError(
                    f"blob {blob.blob_id}: chunk {chunk.index} ends at {end:#x}, past the blob's "
                    f"uncompressed size {blob.uncompressed_size:#x}"
                )

    def pieces(self, start: int, end: int) -> list[tuple[int, BlobIoDesc]]:
        """``(position relative to start, descriptor)`` for the chunk data in ``[start, end)``;
        the gaps between chunks are zeros."""
        out: list[tuple[int, BlobIoDesc]] = []
        i = max(0, bisect.bisect_right(self.offsets, start) - 1)
        while i < len(self.chunks):
            chunk = self.chunks[i]
            c_start = chunk.uncompressed_offset
            if c_start >= end:
                break
            lo = max(start, c_start)
            hi = min(end, c_start + chunk.uncompressed_size)
            if lo < hi:
                out.append((lo - start, BlobIoDesc(self.blob, chunk, lo - c_start, hi - lo)))
            i += 1
        return out


def image_chunks(sup: RafsV6Super, meta: bytes | memoryview) -> list[ChunkInfo]:
    """Every chunk record of the image: the v6 chunk table, or the files' chunks without one."""
    if sup.chunk_table_size:
        base = sup.chunk_table_offset
        count = sup.chunk_table_size // CHUNK_INFO_V5.size
        return [unpack_chunk_info(meta, base + i * CHUNK_INFO_V5.size) for i in range(count)]
    chunks: list[ChunkInfo] = []
    for _, inode in sup.walk():
        if inode.is_reg():
            chunks.extend(inode.chunks())
    return chunks


def block_layout(meta_size: int, blobs: Sequence[BlobInfo]) -> list[Extent]:
    """The extents of the flat view (upstream's ``BlockDevice::new_with_cache_manager`` rules)."""
    if meta_size == 0 or meta_size % BLOCK_SIZE:
        raise FormatError(f"bootstrap size {meta_size:#x} is not a multiple of {BLOCK_SIZE}")
    extents = [Extent(0, meta_size, None)]
    pos = meta_size // BLOCK_SIZE
    for blob in blobs:
        if blob.mapped_blkaddr == 0:
            raise FormatError(
                f"blob {blob.blob_id}: mapped block address is 0 (the bootstrap was not built "
                "for a block device)"
            )
        if blob.mapped_blkaddr < pos:
            raise FormatError(
                f"blob {blob.blob_id}: mapped block address {blob.mapped_blkaddr} overlaps the "
                f"previous device (which ends at block {pos})"
            )
        blocks = (blob.uncompressed_size + BLOCK_SIZE - 1) // BLOCK_SIZE
        if blob.mapped_blkaddr + blocks > MAX_BLOCKS:
            raise FormatError(f"blob {blob.blob_id}: ends past block 2^32")
        start = blob.mapped_blkaddr * BLOCK_SIZE
        pos = blob.mapped_blkaddr + blocks
        extents.append(Extent(start, pos * BLOCK_SIZE, blob))
    return extents


class BlockDevice:
    """A RAFS v6 image as a read-only block device of ``size`` bytes (``blocks`` of 4 KiB)."""

    def __init__(
        self,
        sup: RafsV6Super,
        meta: bytes | memoryview,
        data: DataSource | None,
        *,
        owned: tuple[BlobBackend | None, BlobDevice | None, mmap.mmap | None] = (None, None, None),
    ) -> None:
        if sup.block_size != BLOCK_SIZE:
            raise UnsupportedError(f"RAFS v6 images with {sup.block_size}-byte blocks (tarfs) "
                                   "cannot be block devices")  # fmt: skip
        self.sup = sup
        self._meta = meta
        self._data = data
        self._owned = owned
        self.extents = block_layout(len(meta), sup.blobs)
        self._starts = [e.start for e in self.extents]
        self.size = self.extents[-1].end
        self.blocks = self.size // BLOCK_SIZE
        by_blob: dict[int, list[ChunkInfo]] = {b.blob_index: [] for b in sup.blobs}
        for chunk in image_chunks(sup, meta):
            if chunk.blob_index not in by_blob:
                raise FormatError(f"chunk {chunk.index} names missing blob {chunk.blob_index}")
            by_blob[chunk.blob_index].append(chunk)
        self._chunks = {
            e.blob.blob_index: BlobChunks(e.blob, by_blob[e.blob.blob_index], e.end - e.start)
            for e in self.extents
            if e.blob is not None
        }
        self._data_starts, self._data_ends = self._data_ranges()

    def _data_ranges(self) -> tuple[list[int], list[int]]:
        """Disjoint sorted block-aligned ranges holding data (the bootstrap and every chunk);
        the rest of the device reads as zeros."""
        starts: list[int] = []
        ends: list[int] = []
        for extent in self.extents:
            if extent.blob is None:
                ranges = [(extent.start, extent.end)]
            else:
                ranges = [
                    (extent.start + c.uncompressed_offset,
                     extent.start + L.align(c.uncompressed_offset + c.uncompressed_size,
                                            BLOCK_SIZE))
                    for c in self._chunks[extent.blob.blob_index].chunks
                ]  # fmt: skip
            for start, end in ranges:
                if ends and ends[-1] == start:
                    ends[-1] = end
                else:
                    starts.append(start)
                    ends.append(end)
        return starts, ends

    def allocation(self, offset: int, size: int) -> list[tuple[int, bool]]:
        """``(length, is_hole)`` runs covering ``[offset, offset + size)``: holes are ranges no
        bootstrap or chunk data maps to (they read as zeros). For NBD's ``base:allocation``."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise OSError(errno.EINVAL, f"range of {size} bytes at {offset} is outside the device")
        runs: list[tuple[int, bool]] = []

        def add(length: int, hole: bool) -> None:
            if length <= 0:
                return
            if runs and runs[-1][1] == hole:
                runs[-1] = (runs[-1][0] + length, hole)
            else:
                runs.append((length, hole))

        pos, end = offset, offset + size
        i = max(0, bisect.bisect_right(self._data_starts, pos) - 1)
        while pos < end and i < len(self._data_starts):
            start, stop = self._data_starts[i], self._data_ends[i]
            i += 1
            if stop <= pos:
                continue
            add(min(start, end) - pos, True)
            pos = max(pos, start)
            add(min(stop, end) - pos, False)
            pos = min(stop, end)
        add(end - pos, True)
        return runs

    @classmethod
    def open(cls, bootstrap: str, config: ConfigV2, id: str = "block-nbd") -> BlockDevice:
        """Map ``bootstrap`` and build the storage chain ``config`` describes (blocking)."""
        try:
            fd = os.open(bootstrap, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"cannot open bootstrap {bootstrap}: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FormatError(f"bootstrap {bootstrap} is not a regular file")
            if os.fstat(fd).st_size == 0:
                raise FormatError(f"bootstrap {bootstrap} is empty")
            mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        meta = memoryview(mapping)
        sup: RafsSuper | None = None
        backend: BlobBackend | None = None
        device: BlobDevice | None = None
        try:
            sup = RafsSuper.load(bootstrap)
            if not isinstance(sup, RafsV6Super):
                raise UnsupportedError(
                    f"{bootstrap} is a RAFS v{sup.meta.version} image; only RAFS v6 images can "
                    "be used as block devices"
                )
            # Validate the layout before touching storage: a bad image fails without side effects.
            view = cls(sup, meta, None)
            if sup.blobs:
                if config.backend is None:
                    raise ConfigError(f"{bootstrap} has data blobs but the config has no backend")
                backend = new_backend(config.backend, config.id or id)
                device = BlobDevice(sup.blobs, config, backend)  # closes its caches on failure
            view._data = device
            view._owned = (backend, device, mapping)
            return view
        except BaseException:
            if backend is not None:
                backend.close()
            if sup is not None:
                sup.close()
            meta.release()
            mapping.close()
            raise

    @property
    def storage(self) -> BlobDevice | None:
        """The blob device behind the view (devices made by ``open``), for prefetch and metrics."""
        return self._owned[1]

    def start(self, nursery: trio.Nursery) -> None:
        """Start the storage's prefetch workers and, with ``cache.prefetch.enable``, queue the
        whole of every blob (upstream's blob-level prefetch)."""
        device = self._owned[1]
        if device is not None:
            device.start(nursery)
            nursery.start_soon(device.prefetch_blobs)

    async def close(self) -> None:
        """Release the storage chain and the bootstrap mapping (for devices made by ``open``)."""
        backend, device, mapping = self._owned
        self._owned = (None, None, None)
        if device is not None:
            await device.close()
        if backend is not None:
            await trio.to_thread.run_sync(backend.close)
        self.sup.close()
        if mapping is not None:
            if isinstance(self._meta, memoryview):
                self._meta.release()
            mapping.close()

    async def read(self, offset: int, size: int) -> bytearray:
        """``size`` bytes of the view at byte ``offset``; ``OSError(EINVAL)`` outside the device,
        the storage stack's errors (``OSError``, ``NydusError``) when blob data cannot be read."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise OSError(
                errno.EINVAL,
                f"read of {size} bytes at {offset} is outside the device ({self.size} bytes)",
            )
        out = bytearray(size)
        end = offset + size
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while i < len(self.extents) and self.extents[i].start < end:
            extent = self.extents[i]
            lo, hi = max(offset, extent.start), min(end, extent.end)
            i += 1
            if lo >= hi:
                continue  # a hole before this extent, or the extent ends before the read
            if extent.blob is None:
                out[lo - offset : hi - offset] = self._meta[lo:hi]
                continue
            chunks = self._chunks[extent.blob.blob_index]
            pieces = chunks.pieces(lo - extent.start, hi - extent.start)
            if not pieces:
                continue
            if self._data is None:
                raise OSError(errno.EIO, "the image has data blobs but no storage to read them")
            data = await self._data.read([desc for _, desc in pieces])
            pos = 0
            base = lo - offset
            for where, desc in pieces:
                out[base + where : base + where + desc.size] = data[pos : pos + desc.size]
                pos += desc.size
        return out


async def export(device: BlockDevice, fd: int, *, tasks: int = 4) -> None:
    """Write the whole view to ``fd`` (a regular file, already truncated to ``device.size``):
    ``tasks`` concurrent writers, each taking the next ``EXPORT_BATCH_SIZE`` piece. Holes (see
    ``allocation``) are neither read nor written, so they stay sparse."""
    if os.fstat(fd).st_size != device.size:
        raise ValueError("export: the output must be truncated to the device size first")
    batches = iter(range(0, device.size, EXPORT_BATCH_SIZE))

    async def worker() -> None:
        for pos in batches:  # a shared iterator: each piece goes to one task
            at = pos
            for length, hole in device.allocation(pos, min(EXPORT_BATCH_SIZE, device.size - pos)):
                if not hole:
                    data = await device.read(at, length)
                    await trio.to_thread.run_sync(_pwrite_all, fd, data, at)
                at += length

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, tasks)):
            nursery.start_soon(worker)


def _pwrite_all(fd: int, data: bytes | bytearray, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        pos += n
        view = view[n:]
