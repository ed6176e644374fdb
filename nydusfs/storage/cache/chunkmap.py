"""Chunk readiness: the persistent bitmap ``<blob_id>.blob.data.chunk_map`` and in-flight fetches.

Two layers, as upstream's ``storage/src/cache/state``:

* A ``ChunkMap`` answers "is chunk *i* in the local cache file?". ``IndexedChunkMap`` keeps the
  answer in a memory-mapped file in upstream's format (``persist_map.rs``), so a restarted daemon
  (or upstream nydusd sharing the work dir) fetches only what is missing. ``MemoryChunkMap``
  keeps it in memory (blobs without a chunk count); ``NoopChunkMap`` never says ready (dummy
  cache).
* ``BlobStateMap`` adds the in-flight state on top (upstream's ``BlobStateMap``): a reader that
  finds a chunk neither ready nor in flight *claims* it and fetches it; every other reader of that
  chunk waits on the claim's ``trio.Event`` and receives the fetched bytes (or the error) from it.
  One chunk, one backend fetch, however many readers.

File format (``persist_map.rs``), little-endian::

    0x0000  u32 magic     = 0x424D_4150 ("PAMB")
    0x0004  u32 version   = 1
    0x0008  u32 magic2    = 0x434D_4150 ("PAMC")
    0x000c  u32 all_ready = 0x4D4D_4150 ("PAMM") once every chunk is ready, else 0
    0x0010  reserved, zero, up to 0x1000
    0x1000  bitmap, ceil(chunk_count / 8) bytes; chunk i is bit (7 - i % 8) of byte i // 8,
            most significant bit first: setting chunk 3 turns [0x00] into [0x10].

Crash safety: the cache writes a chunk's bytes and ``fdatasync``s the data file *before* its bit
is set here (``BlobCache`` does both, in that order), so after a ``kill -9`` or a power cut a set
bit always means complete data; a chunk being written when the process died has its bit clear and
is fetched again. Bits are never flushed eagerly: losing a bit only costs a refetch.

Concurrency: everything here runs on the trio thread (no locks). ``IndexedChunkMap.open`` and
``close`` do blocking I/O and are called from worker threads or during setup; ``is_ready`` and
``set_ready`` touch only the mapping. ``BlobStateMap.wait`` is the one await point.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Protocol

import trio

log = logging.getLogger(__name__)

MAGIC1 = 0x424D_4150
MAGIC2 = 0x434D_4150
MAGIC_ALL_READY = 0x4D4D_4150
HEADER_SIZE = 4096
VERSION = 1
CHUNK_MAP_SUFFIX = "chunk_map"

_HEADER = struct.Struct("<IIII")


def chunk_map_file_size(chunk_count: int) -> int:
    return HEADER_SIZE + (chunk_count + 7) // 8


def bit_mask(index: int) -> int:
    """The bit of chunk ``index`` within its byte (upstream ``index_to_mask``): MSB first."""
    return 1 << (7 - (index & 7))


class ChunkMap(Protocol):
    """Which chunks of one blob are complete in the local cache file."""

    persistent: bool

    def is_ready(self, index: int) -> bool: ...

    def set_ready(self, index: int) -> bool:
        """Mark chunk ``index`` ready; True if that made every chunk ready."""
        ...

    def clear_ready(self, index: int) -> None:
        """Forget chunk ``index`` (its cached bytes failed validation)."""
        ...

    @property
    def all_ready(self) -> bool: ...

    @property
    def ready_count(self) -> int: ...

    def mark_all_ready(self) -> None:
        """Blocking: persist the "all ready" state (call from a worker thread)."""
        ...

    def close(self) -> None: ...


class NoopChunkMap:
    """Nothing is ever ready: the dummy cache keeps no data."""

    persistent = False
    all_ready = False
    ready_count = 0

    def is_ready(self, index: int) -> bool:
        return False

    def set_ready(self, index: int) -> bool:
        return False

    def clear_ready(self, index: int) -> None:
        pass

    def mark_all_ready(self) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryChunkMap:
    """Readiness kept in memory only: for blobs whose chunk count is unknown (old v5 images
    without an extended blob table, where upstream uses its digest-keyed map). Nothing survives a
    restart, so such blobs are fetched again after one."""

    persistent = False

    def __init__(self, chunk_count: int = 0) -> None:
        self.chunk_count = chunk_count
        self._ready: set[int] = set()

    def is_ready(self, index: int) -> bool:
        return index in self._ready

    def set_ready(self, index: int) -> bool:
        self._ready.add(index)
        return self.all_ready

    def clear_ready(self, index: int) -> None:
        self._ready.discard(index)

    @property
    def all_ready(self) -> bool:
        return 0 < self.chunk_count <= len(self._ready)

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    def mark_all_ready(self) -> None:
        pass

    def close(self) -> None:
        pass


class IndexedChunkMap:
    """Upstream's ``IndexedChunkMap`` over ``PersistMap``: one bit per chunk in a mapped file.

    Opening follows ``PersistMap::open``: a new or all-zero file gets its size set and synced,
    then its header written and synced (so a crash between the two leaves a detectable all-zero
    file); an existing file with the right size and header is trusted and its bits counted. Where
    upstream refuses a file of the wrong size or with a damaged header (making the blob
    unreadable until someone deletes it), this resets it to "nothing ready" with a warning: the
    data file is then simply refilled.
    """

    persistent = True

    def __init__(self, path: str, chunk_count: int, *, reset: bool = False) -> None:
        """Blocking: open or create the map at ``path``. ``reset`` starts with nothing ready
        (the cache data file was just created, so old bits would lie)."""
        if chunk_count <= 0:
            raise ValueError("chunk count should be greater than 0")
        self.path = path
        self.chunk_count = chunk_count
        size = chunk_map_file_size(chunk_count)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fresh = reset or not self._usable(fd, size)
            if fresh:
                self._write_header(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._not_ready = chunk_count
        all_ready = _HEADER.unpack_from(self._map, 0)[3]
        if all_ready == MAGIC_ALL_READY:
            self._not_ready = 0
        elif not fresh:
            ready = sum(b.bit_count() for b in self._map[HEADER_SIZE:])
            self._not_ready = max(0, chunk_count - ready)
            if self._not_ready == 0:
                self.mark_all_ready()

    def _usable(self, fd: int, size: int) -> bool:
        st = os.fstat(fd)
        if st.st_size == 0:
            return False
        if st.st_size != size:
            log.warning("chunk map %s has %d bytes, expected %d: resetting it",
                        self.path, st.st_size, size)  # fmt: skip
            return False
        head = os.pread(fd, HEADER_SIZE, 0)
        magic, version, magic2, _all_ready = _HEADER.unpack_from(head, 0)
        if magic != MAGIC1:
            # Upstream's race window: size set but header not yet written leaves all zeros.
            if any(os.pread(fd, size, 0)):
                log.warning("chunk map %s has a bad header: resetting it", self.path)
            return False
        if version >= 1 and magic2 != MAGIC2:
            log.warning("chunk map %s has a bad second magic: resetting it", self.path)
            return False
        return True

    @staticmethod
    def _write_header(fd: int, size: int) -> None:
        # Upstream's order: size the file (zeros) and sync, then the header and sync.
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        os.fsync(fd)
        header = _HEADER.pack(MAGIC1, VERSION, MAGIC2, 0).ljust(HEADER_SIZE, b"\0")
        os.pwrite(fd, header, 0)
        os.fsync(fd)

    def is_ready(self, index: int) -> bool:
        if self._not_ready == 0:
            return True
        self._check(index)
        return bool(self._map[HEADER_SIZE + (index >> 3)] & bit_mask(index))

    def set_ready(self, index: int) -> bool:
        self._check(index)
        pos = HEADER_SIZE + (index >> 3)
        byte = self._map[pos]
        mask = bit_mask(index)
        if byte & mask:
            return False
        self._map[pos] = byte | mask
        self._not_ready -= 1
        return self._not_ready == 0

    def clear_ready(self, index: int) -> None:
        self._check(index)
        if self._not_ready == 0:
            _HEADER.pack_into(self._map, 0, MAGIC1, VERSION, MAGIC2, 0)
        pos = HEADER_SIZE + (index >> 3)
        mask = bit_mask(index)
        if self._map[pos] & mask:
            self._map[pos] &= ~mask & 0xFF
            self._not_ready += 1

    @property
    def all_ready(self) -> bool:
        return self._not_ready == 0

    @property
    def ready_count(self) -> int:
        return self.chunk_count - self._not_ready

    def mark_all_ready(self) -> None:
        """Flush the bits, then record ``all_ready`` in the header and flush again.

        Upstream sets the header only when it finds a full bitmap at open (its runtime write is
        commented out); doing it as soon as the last bit is set is equivalent for readers and
        lets the next open skip counting bits.
        """
        if self._not_ready:
            return
        self._map.flush()
        _HEADER.pack_into(self._map, 0, MAGIC1, VERSION, MAGIC2, MAGIC_ALL_READY)
        self._map.flush()

    def close(self) -> None:
        if not self._map.closed:
            self._map.flush()
            self._map.close()

    def _check(self, index: int) -> None:
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk index {index} exceeds chunk count {self.chunk_count}")


# --- in-flight fetches ----------------------------------------------------------------------


@dataclass(eq=False)
class Inflight:
    """One claimed chunk: set ``event`` once, with either ``data`` or ``error``. A chunk with
    ``data`` may stay in flight a while longer, while it is written to the cache.

    ``retry`` tells waiters the failure was not theirs to report (a prefetch fetch failed, or
    the fetching reader was cancelled): they should claim the chunk and fetch it themselves.
    """

    prefetch: bool = False
    event: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None
    retry: bool = False


class BlobStateMap:
    """A ``ChunkMap`` plus the chunks being fetched right now (single flight per chunk)."""

    def __init__(self, base: ChunkMap) -> None:
        self.base = base
        self._inflight: dict[int, Inflight] = {}
        # Written to the cache file, not yet synced: readable, but not yet in the map.
        self._written: set[int] = set()

    def is_ready(self, index: int) -> bool:
        return index in self._written or self.base.is_ready(index)

    def inflight(self, index: int) -> Inflight | None:
        return self._inflight.get(index)

    def claimable(self, index: int) -> bool:
        """Neither ready nor being fetched: whoever claims it now must fetch it."""
        return index not in self._inflight and not self.is_ready(index)

    def claim(self, index: int, *, prefetch: bool = False) -> Inflight:
        if not self.claimable(index):
            raise RuntimeError(f"chunk {index} is ready or in flight")
        flight = self._inflight[index] = Inflight(prefetch=prefetch)
        return flight

    def publish(self, index: int, data: bytes) -> None:
        """Hand ``data`` to the waiters now. The chunk stays in flight (so nobody fetches it
        again, and later readers get ``data`` too) until ``settle``."""
        flight = self._inflight[index]
        flight.data = data
        flight.event.set()

    def settle(self, index: int, *, ready: bool) -> bool:
        """End the flight of a published chunk; mark it ready if it was persisted (the caller
        has written and synced it). Returns True if that made every chunk ready."""
        self._inflight.pop(index)
        return self.base.set_ready(index) if ready else False

    def written(self, index: int) -> None:
        """End the flight of a published chunk that is in the cache file but not yet synced:
        it reads as ready from now on, and is marked in the map by ``synced``."""
        self._inflight.pop(index)
        self._written.add(index)

    def unsynced(self) -> frozenset[int]:
        """The written chunks not yet synced (they stay ready while the caller syncs them)."""
        return frozenset(self._written)

    def synced(self, batch: frozenset[int], *, ok: bool) -> bool:
        """``batch`` (from ``unsynced``) is on disk (``ok``): set its bits. If the sync failed,
        forget the chunks instead, so they are fetched again. Returns True if that made every
        chunk ready."""
        all_ready = False
        for index in batch:
            if index in self._written:  # not cleared meanwhile
                self._written.discard(index)
                if ok:
                    all_ready |= self.base.set_ready(index)
        return all_ready

    def complete(self, index: int, data: bytes, *, ready: bool) -> bool:
        """``publish`` and ``settle`` at once."""
        self.publish(index, data)
        return self.settle(index, ready=ready)

    def fail(self, index: int, error: BaseException, *, retry: bool) -> None:
        """Wake the waiters with ``error``; the chunk stays not ready."""
        flight = self._inflight.pop(index, None)
        if flight is None:
            return
        flight.error = error
        flight.retry = retry
        flight.event.set()

    def clear_ready(self, index: int) -> None:
        self._written.discard(index)
        self.base.clear_ready(index)

    @property
    def inflight_count(self) -> int:
        return len(self._inflight)

    @staticmethod
    async def wait(flight: Inflight) -> Inflight:
        """Await point: returns once the fetch that owns ``flight`` has finished."""
        await flight.event.wait()
        return flight
