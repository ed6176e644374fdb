"""The local file cache (``blobcache`` / ``filecache``): chunks kept in files under ``work_dir``.

Layout, as upstream's ``storage/src/cache/filecache/mod.rs``:

* ``<blob_id>.blob.data`` (``compressed = false``): the blob's uncompressed view, a sparse file
  of ``uncompressed_size`` bytes; chunk *i* lives at its ``uncompressed_offset``. Ready chunks
  are read by byte range straight from it (no decoding) unless ``validate`` is on.
* ``<blob_id>.blob.raw`` (``compressed = true``): the blob's chunk data as stored in the blob,
  ``compressed_data_size`` bytes; chunk *i* lives at its ``compressed_offset`` and is inflated
  (and verified) on every read.
* ``<blob_id>.blob.data.chunk_map``: the readiness bitmap (``chunkmap.py``). Upstream names it
  after the ``.blob.data`` file in both modes; so do we, so the two share work dirs.
* ``<blob_id>.blob.meta``: the blob's CI array (``meta.py``), fetched from the blob the first
  time amplification or blob prefetch needs it, and reused after a restart.

Consistency rules beyond upstream: the chunk map is reset whenever the data file is new (first
use, someone deleted it, or a switch between ``compressed`` modes, whose other file is removed
because the shared map cannot describe two files), or has an unexpected size (upstream refuses
to open such a cache). Writes are ``pwrite`` then ``fdatasync``, and only then does the caller
set the ready bits, so a crash never leaves a partly written chunk marked ready. One sync covers
every chunk written since the last (``BlobCache.sync``); until then, written chunks are read
from the file (the page cache) but not yet marked in the chunk map.

Concurrency: construction and ``close_blocking`` do blocking I/O (the device constructs caches
before serving, and closes them in a thread). The storage hooks run in worker threads and only
use ``pread``/``pwrite``/``fdatasync`` on the data file's descriptor, which is safe from several
threads; different chunks never overlap, and a chunk is written by its single fetcher.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from nydusfs.errors import FormatError, NydusError
from nydusfs.storage.cache.base import BlobCache, CacheContext, ChunkResult
from nydusfs.storage.cache.chunkmap import (
    CHUNK_MAP_SUFFIX,
    ChunkMap,
    IndexedChunkMap,
    MemoryChunkMap,
)
from nydusfs.storage.cache.merge import FetchPlan
from nydusfs.storage.device import BlobInfo, ChunkInfo
from nydusfs.storage.meta import (
    BLOB_META_FILE_SUFFIX,
    CiEntry,
    compressed_data_size,
    load_blob_meta,
    read_blob_meta_file,
    write_blob_meta_file,
)
from nydusfs.types import BlobFeatures, Cipher

log = logging.getLogger(__name__)

BLOB_DATA_FILE_SUFFIX = ".blob.data"
BLOB_RAW_FILE_SUFFIX = ".blob.raw"


class FileCache(BlobCache):
    """One blob cached in ``work_dir``."""

    kind = "blobcache"
    keeps_data = True
    amplifies = True

    def __init__(self, blob: BlobInfo, ctx: CacheContext, work_dir: str, compressed: bool) -> None:
        base = os.path.join(work_dir, blob.blob_id)
        self.compressed = compressed
        self.keeps_raw = compressed
        self.fast_path = not compressed and not ctx.validate
        suffix = BLOB_RAW_FILE_SUFFIX if compressed else BLOB_DATA_FILE_SUFFIX
        other = BLOB_DATA_FILE_SUFFIX if compressed else BLOB_RAW_FILE_SUFFIX
        self.data_path = base + suffix
        self.meta_path = f"{base}.{BLOB_META_FILE_SUFFIX}"
        self.map_path = f"{base}{BLOB_DATA_FILE_SUFFIX}.{CHUNK_MAP_SUFFIX}"
        expected = compressed_data_size(blob) if compressed else blob.uncompressed_size

        reset = False
        if os.path.exists(base + other):
            log.info("blob %s: switching cache mode, removing %s", blob.blob_id, base + other)
            os.unlink(base + other)
            reset = True
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                reset = True
            elif expected and size != expected:
                log.warning("blob %s: cache file %s has %d bytes, expected %d: starting afresh",
                            blob.blob_id, self.data_path, size, expected)  # fmt: skip
                os.ftruncate(fd, 0)
                reset = True
            if expected and os.fstat(fd).st_size != expected:
                os.ftruncate(fd, expected)  # sparse: only fetched chunks take space
            chunk_map: ChunkMap
            if blob.chunk_count > 0 and not blob.has(BlobFeatures.V5_NO_EXT_BLOB_TABLE):
                chunk_map = IndexedChunkMap(self.map_path, blob.chunk_count, reset=reset)
            else:
                chunk_map = MemoryChunkMap(blob.chunk_count)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        try:
            super().__init__(blob, ctx, chunk_map)
        except BaseException:
            chunk_map.close()
            os.close(fd)
            raise
        ctx.metrics.underlying_files.add(blob.blob_id + suffix)
        ctx.metrics.add(entries_count=chunk_map.ready_count)

    # --- storage hooks --------------------------------------------------------------------------
    def _persist(
        self, plan: FetchPlan, raw: memoryview, results: dict[int, ChunkResult]
    ) -> set[int]:
        good = [c for c in plan.chunks if isinstance(results[c.index], bytes)]
        if not good:
            return set()
        pieces: list[tuple[bytes | memoryview, int]] = []
        for c in good:
            if self.compressed:
                start = c.compressed_offset - plan.offset
                pieces.append((raw[start : start + c.compressed_size], c.compressed_offset))
            else:
                data = results[c.index]
                assert isinstance(data, bytes)
                pieces.append((data, c.uncompressed_offset))
        amount = sum(len(p) for p, _ in pieces)
        self.ctx.metrics.add(buffered_backend_size=amount)
        try:
            for piece, offset in pieces:
                written = os.pwrite(self.fd, piece, offset)
                if written != len(piece):
                    raise OSError(f"short write: {written} of {len(piece)} bytes at {offset:#x}")
        except OSError as e:
            log.warning("blob %s: cannot store chunks in %s (they stay not ready): %s",
                        self.blob.blob_id, self.data_path, e)  # fmt: skip
            return set()
        finally:
            self.ctx.metrics.add(buffered_backend_size=-amount)
        return {c.index for c in good}

    def _sync_data(self) -> None:
        # The ready bits are set by the caller after this returns: data first, durably.
        os.fdatasync(self.fd)

    def _read_cached(self, chunks: Sequence[ChunkInfo]) -> dict[int, ChunkResult]:
        out: dict[int, ChunkResult] = {}
        for c in chunks:
            try:
                if self.compressed:
                    stored = os.pread(self.fd, c.compressed_size, c.compressed_offset)
                    out[c.index] = self.decode(c, stored)
                else:
                    data = os.pread(self.fd, c.uncompressed_size, c.uncompressed_offset)
                    if len(data) != c.uncompressed_size:
                        raise FormatError(f"{self._where(c)}cache file is truncated")
                    self.verify(c, data)
                    out[c.index] = data
            except (NydusError, OSError) as e:
                out[c.index] = e
        return out

    def _read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        pieces = self._read_runs(ranges, nowait=False)
        assert pieces is not None  # only a non-blocking read gives up
        return pieces

    def _read_ranges_nowait(self, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        return self._read_runs(ranges, nowait=True)

    def _read_runs(self, ranges: Sequence[tuple[int, int]], *, nowait: bool) -> list[bytes] | None:
        """The ``(offset, size)`` ranges; adjacent ones (consecutive pieces of one file) are
        read with one call. ``nowait``: preadv2(RWF_NOWAIT), which reads from the page cache or
        fails with EAGAIN (or comes back short) instead of blocking; then None, and the caller
        reads in a worker thread. A warm read served that way costs no thread hand-off, which
        is most of its time."""
        out: list[bytes] = []
        i = 0
        while i < len(ranges):
            start, size = ranges[i]
            j = i + 1
            end = start + size
            while j < len(ranges) and ranges[j][0] == end:
                end += ranges[j][1]
                j += 1
            buf: bytes | bytearray
            if nowait:
                buf = bytearray(end - start)
                try:
                    if os.preadv(self.fd, [buf], start, os.RWF_NOWAIT) != len(buf):
                        return None
                except OSError:  # EAGAIN, or no RWF_NOWAIT here: not worth telling apart
                    return None
            else:
                buf = os.pread(self.fd, end - start, start)
                if len(buf) != end - start:
                    raise FormatError(f"blob {self.blob.blob_id}: cache file {self.data_path} "
                                      f"is truncated at {start + len(buf):#x}")  # fmt: skip
            view = memoryview(buf)
            pos = 0
            for k in range(i, j):
                out.append(bytes(view[pos : pos + ranges[k][1]]))
                pos += ranges[k][1]
            i = j
        return out

    def _load_meta(self) -> list[CiEntry] | None:
        blob = self.blob
        if not blob.ci_compressed_size or not blob.ci_uncompressed_size:
            return None
        if blob.cipher != Cipher.NONE:
            return None
        try:
            return read_blob_meta_file(self.meta_path, blob).entries
        except FileNotFoundError:
            pass
        except (NydusError, OSError) as e:
            log.warning("blob %s: ignoring %s: %s", blob.blob_id, self.meta_path, e)
        meta = load_blob_meta(blob, self.reader.read)
        try:
            write_blob_meta_file(self.meta_path, meta)
        except OSError as e:
            log.warning("blob %s: cannot write %s: %s", blob.blob_id, self.meta_path, e)
        return meta.entries

    def close_blocking(self) -> None:
        try:
            super().close_blocking()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
