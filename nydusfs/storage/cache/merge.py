"""Turning wanted chunks into backend requests: merging and read amplification (pure functions).

The rules are upstream's (``storage/src/cache/mod.rs::BlobIoMergeState``,
``cachedfile.rs::extend_pending_chunks``, ``meta/mod.rs::_add_more_chunks``,
``device.rs::BlobIoDesc::is_continuous``):

* Chunks are merged into one ranged read while each next chunk starts at or after the previous
  one's compressed end, with a gap of at most ``batch_size >> 7`` bytes (``RAFS_BATCH_SIZE_TO_
  GAP_SHIFT``; the gap bytes are read and dropped), and the request stays within ``batch_size``.
* Amplification (``extend``) appends following chunks: the file's own (what the caller
  passes), or those that follow the last one in the blob's chunk-info (CI) array (``amplify``)
  while the request, measured from the first chunk's compressed offset, stays within
  ``batch_size``. Upstream appends ready chunks in the middle too and strips only trailing ready
  ones; here amplification stops at the first chunk that is ready or already being fetched, so
  no chunk is ever fetched twice at once.
* A non-zero batch size below 128 KiB is raised to 128 KiB (``user_io_batch_size()`` and
  ``prefetch_batch_size()`` floor at ``0x2_0000``). Unlike upstream, a batch size of 0 means "no
  amplification": only the requested chunks are fetched (they are still merged when adjacent).

Zran, batch and encrypted chunks are not supported by this cache; amplification never adds them.
Everything here is pure and cheap: it runs on the trio thread between two await points, which is
what makes "check readiness, then claim" atomic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from nydusfs.storage.device import BlobInfo, ChunkInfo
from nydusfs.storage.meta import CiEntry
from nydusfs.types import ChunkFlags

BATCH_SIZE_TO_GAP_SHIFT = 7  # RAFS_BATCH_SIZE_TO_GAP_SHIFT
MIN_BATCH_SIZE = 0x2_0000  # floor of user_io_batch_size() / prefetch_batch_size()
NO_DIGEST = bytes(32)


def effective_batch_size(batch_size: int) -> int:
    """0 stays 0 (no amplification); anything else is at least 128 KiB, as upstream."""
    return 0 if batch_size <= 0 else max(batch_size, MIN_BATCH_SIZE)


def max_gap(batch_size: int) -> int:
    return batch_size >> BATCH_SIZE_TO_GAP_SHIFT


@dataclass(slots=True)
class FetchPlan:
    """One ranged backend read of ``[offset, offset + size)`` covering ``chunks`` (sorted by
    compressed offset). ``amplified`` counts the trailing chunks nobody asked for."""

    offset: int
    size: int
    chunks: list[ChunkInfo]
    amplified: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.size

    @classmethod
    def of(cls, chunks: list[ChunkInfo], amplified: int = 0) -> FetchPlan:
        start = chunks[0].compressed_offset
        end = max(c.compressed_offset + c.compressed_size for c in chunks)
        return cls(start, end - start, chunks, amplified)


def merge_chunks(chunks: Sequence[ChunkInfo], max_size: int, gap: int) -> list[list[ChunkInfo]]:
    """Group ``chunks`` (unique, sorted by compressed offset) into contiguous requests.

    A chunk joins the current group if it starts at or after the group's end, no more than
    ``gap`` bytes later, and the group stays within ``max_size`` bytes (0 = no size limit). A
    single chunk larger than ``max_size`` is a group of its own.
    """
    groups: list[list[ChunkInfo]] = []
    current: list[ChunkInfo] = []
    start = end = 0
    for c in chunks:
        c_end = c.compressed_offset + c.compressed_size
        if current:
            distance = c.compressed_offset - end
            fits = max_size == 0 or c_end - start <= max_size
            if 0 <= distance <= gap and fits:
                current.append(c)
                end = c_end
                continue
            groups.append(current)
        current, start, end = [c], c.compressed_offset, c_end
    if current:
        groups.append(current)
    return groups


def chunk_from_entry(blob: BlobInfo, index: int, entry: CiEntry) -> ChunkInfo:
    """A ``ChunkInfo`` for a chunk known only from the CI array (amplification, blob prefetch).

    The CI array carries no digest, so ``digest`` is all zeros ("unknown"): such a chunk is
    checked by its CRC when the CI records one, and by digest only when read with a known digest.
    """
    flags = ChunkFlags(0)
    if entry.compressed:
        flags |= ChunkFlags.COMPRESSED
    if entry.has_crc32:
        flags |= ChunkFlags.HAS_CRC32
    if entry.batch:
        flags |= ChunkFlags.BATCH
    if entry.encrypted:
        flags |= ChunkFlags.ENCRYPTED
    return ChunkInfo(
        digest=NO_DIGEST,
        blob_index=blob.blob_index,
        flags=flags,
        compressed_offset=entry.compressed_offset,
        compressed_size=entry.compressed_size,
        uncompressed_offset=entry.uncompressed_offset,
        uncompressed_size=entry.uncompressed_size,
        file_offset=0,
        index=index,
        crc32=entry.crc32,
    )


def plainly_fetchable(entry: CiEntry) -> bool:
    """A chunk this cache can fetch by itself: not zran, batch or encrypted, and not empty."""
    return not (entry.zran or entry.batch or entry.encrypted) and entry.compressed_size > 0


def extend(
    group: list[ChunkInfo],
    candidates: Iterable[ChunkInfo],
    batch_size: int,
    claimable: Callable[[int], bool],
) -> list[ChunkInfo]:
    """The leading ``candidates`` to append to ``group``: each must be contiguous with what
    comes before it (within the gap rule), end within ``group[0].compressed_offset +
    batch_size`` and be ``claimable`` (neither ready nor in flight); the first that is not ends
    the extension. ``candidates`` is consumed lazily, so it may be a long generator."""
    if batch_size <= 0 or not group:
        return []
    fetch_end = group[0].compressed_offset + batch_size
    gap = max_gap(batch_size)
    end = max(c.compressed_offset + c.compressed_size for c in group)
    extra: list[ChunkInfo] = []
    for c in candidates:
        c_end = c.compressed_offset + c.compressed_size
        if c_end > fetch_end or not 0 <= c.compressed_offset - end <= gap:
            break
        if not claimable(c.index):
            break
        extra.append(c)
        end = c_end
    return extra


def following_chunks(
    entries: Sequence[CiEntry], first: int, make: Callable[[int, CiEntry], ChunkInfo]
) -> Iterator[ChunkInfo]:
    """The blob's chunks from CI index ``first`` on, up to the first one this cache cannot
    fetch by itself (zran, batch, encrypted or empty)."""
    for index in range(first, len(entries)):
        entry = entries[index]
        if not plainly_fetchable(entry):
            return
        yield make(index, entry)


def amplify(
    group: list[ChunkInfo],
    entries: Sequence[CiEntry],
    batch_size: int,
    claimable: Callable[[int], bool],
    make: Callable[[int, CiEntry], ChunkInfo],
) -> list[ChunkInfo]:
    """The chunks to append to ``group`` (upstream ``_add_more_chunks`` for normal chunks): the
    ones after the group's last chunk in the CI array, by the rules of ``extend``. ``make``
    builds the ``ChunkInfo`` (so callers can prefer one with a known digest)."""
    if not group:
        return []
    return extend(group, following_chunks(entries, group[-1].index + 1, make), batch_size,
                  claimable)  # fmt: skip


def split_by_size(chunks: Sequence[ChunkInfo], batch_size: int) -> list[list[ChunkInfo]]:
    """Blob-level prefetch: cut a blob's chunks (sorted by compressed offset) into requests of
    about ``batch_size`` compressed bytes, as upstream cuts ``[0, compressed_data_size)``."""
    size = batch_size or MIN_BATCH_SIZE
    out: list[list[ChunkInfo]] = []
    current: list[ChunkInfo] = []
    start = 0
    for c in chunks:
        if current and c.compressed_offset + c.compressed_size - start > size:
            out.append(current)
            current = []
        if not current:
            start = c.compressed_offset
        current.append(c)
    if current:
        out.append(current)
    return out
