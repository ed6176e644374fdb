"""``BlobDevice``: RAFS's only door to storage (upstream ``storage/src/device.rs::BlobDevice``).

A device is built from an image's blob table, the mount's ``ConfigV2`` and a ``BlobBackend``. It
owns one cache per blob (``FileCache`` for ``blobcache``/``filecache``, ``DummyCache`` for
``dummycache`` or no type), the prefetch workers and the ``BlobcacheMetrics``.

Lifecycle and contract::

    device = BlobDevice(sup.blobs, config, backend)   # blocking: opens/creates cache files
    device.start(nursery)                             # prefetch workers, if prefetch is enabled
    data = await device.read([BlobIoDesc(...), ...])  # concatenated bytes of the descriptors
    await device.prefetch_chunks(chunks)              # file-level prefetch (RAFS's prefetch list)
    await device.prefetch_blobs()                     # blob-level prefetch (cache.prefetch.enable)
    await device.close()                              # stops prefetch, waits for reads, closes

* ``read`` is the only data path. Descriptors may span chunks and blobs; each run of one blob goes
  to that blob's cache (``cache/base.py``). It awaits backend fetches (threads), local cache
  reads (threads) and other readers' fetches of the same chunks. It raises ``OSError(EINVAL)``
  for a descriptor outside its chunk or blob, ``BackendError`` (``OSError``, EIO) when the
  backend fails, ``DigestMismatch`` when a chunk fails its CRC or digest, ``FormatError`` for
  corrupt chunk data or chunk records, ``UnsupportedError`` for zran/batch/encrypted chunks. RAFS
  answers EIO for all but EINVAL. A failure fails that read only.
* Prefetch goes through the workers (``cache/prefetch.py``): the workers start when
  ``cache.prefetch.enable`` or ``rafs.prefetch.enable`` (their settings come from
  ``cache.prefetch`` when it is enabled, else ``rafs.prefetch``; upstream silently drops file
  prefetch unless ``cache.prefetch`` is enabled). ``prefetch_chunks`` and ``prefetch_blobs`` only
  queue work and return the number of requests queued; ``wait_prefetch`` awaits the queue.
  Prefetch yields to on-demand reads and honours ``bandwidth_limit``.
* ``close`` does not close the backend: whoever made it owns it.

Concurrency: one trio thread. Construction does blocking file I/O: build devices before serving
or in a thread. ``metrics`` may be read from any thread (``to_dict``).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

import trio

from nydusfs.config import ConfigV2, FileCacheConfig
from nydusfs.errors import FormatError, UnsupportedError
from nydusfs.metrics import BlobcacheMetrics
from nydusfs.storage.backends.base import BlobBackend
from nydusfs.storage.cache.base import BlobCache, CacheContext
from nydusfs.storage.cache.dummycache import DummyCache
from nydusfs.storage.cache.filecache import FileCache
from nydusfs.storage.cache.merge import effective_batch_size, split_by_size
from nydusfs.storage.cache.prefetch import Foreground, Prefetcher
from nydusfs.storage.device import BlobInfo, BlobIoDesc, ChunkInfo
from nydusfs.types import BlobFeatures, Cipher

log = logging.getLogger(__name__)

ONDEMAND_THREADS = 16  # concurrent on-demand backend requests per device
LOCAL_THREADS = max(4, os.cpu_count() or 1)  # cache file reads and decompression


class BlobDevice:
    """The blobs of one RAFS instance, behind their caches."""

    def __init__(self, blobs: Sequence[BlobInfo], config: ConfigV2, backend: BlobBackend) -> None:
        cache_config = config.cache
        self.blobs = list(blobs)
        self.config = config
        self.backend = backend
        self.metrics = BlobcacheMetrics()
        self.foreground = Foreground()
        self._unique: list[BlobCache] = []
        prefetch_config = (
            cache_config.prefetch if cache_config.prefetch.enable else config.rafs.prefetch
        )
        self.prefetcher = Prefetcher(
            prefetch_config,
            self.metrics,
            self.foreground,
            max_chunk_size=max((b.chunk_size for b in self.blobs), default=0),
        )
        self._blob_prefetch = cache_config.prefetch.enable
        self.ctx = CacheContext(
            backend=backend,
            metrics=self.metrics,
            validate=cache_config.validate,
            user_batch_size=effective_batch_size(config.rafs.batch_size),
            foreground=self.foreground,
            fetch_limiter=trio.CapacityLimiter(ONDEMAND_THREADS),
            prefetch_limiter=self.prefetcher.limiter,
            local_limiter=trio.CapacityLimiter(LOCAL_THREADS),
            charge=self.prefetcher.charge,
            on_all_ready=self._update_all_ready,
        )
        make = self._factory(cache_config.type, cache_config.compressed, cache_config.filecache)
        self._caches: dict[int, BlobCache] = {}
        by_id: dict[str, BlobCache] = {}
        try:
            for blob in self.blobs:
                _check_supported(blob)
                cache = by_id.get(blob.blob_id)
                if cache is None:
                    cache = by_id[blob.blob_id] = make(blob)
                self._caches[blob.blob_index] = cache
        except BaseException:
            for cache in by_id.values():
                cache.close_blocking()
            raise
        self._unique = list(by_id.values())
        self._active_reads = 0
        self._reads_done = trio.Event()
        self._reads_done.set()
        self._closed = False
        self._nursery: trio.Nursery | None = None
        self._background = 0  # tasks started by _spawn and not finished
        self._background_done = trio.Event()
        self._background_done.set()
        self._update_all_ready()

    def _factory(
        self, kind: str, compressed: bool, filecache: FileCacheConfig | None
    ) -> Callable[[BlobInfo], BlobCache]:
        ctx = self.ctx
        if kind in ("blobcache", "filecache"):
            fc = filecache or FileCacheConfig()
            if fc.enable_encryption:
                raise UnsupportedError("cache.filecache.enable_encryption is not supported")
            work_dir = os.path.abspath(fc.work_dir or ".")
            os.makedirs(work_dir, exist_ok=True)
            self.metrics.store_path = work_dir
            return lambda blob: FileCache(blob, ctx, work_dir, compressed)
        if kind in ("", "dummycache"):
            return lambda blob: DummyCache(blob, ctx)
        raise UnsupportedError(f"cache type {kind!r} is not supported")

    @property
    def cache_type(self) -> str:
        return self._unique[0].kind if self._unique else "dummycache"

    def cache_of(self, blob_index: int) -> BlobCache:
        """The cache serving blob ``blob_index`` (``KeyError`` if the image has no such blob)."""
        return self._caches[blob_index]

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        """Start the prefetch workers in ``nursery`` (when prefetch is enabled) and let the
        caches run their background work there (read-ahead, writing fetched chunks)."""
        self.prefetcher.start(nursery)
        self._nursery = nursery
        self.ctx.spawn = self._spawn

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Run ``fn(*args)`` in the background; False once the device is closing."""
        if self._closed or self._nursery is None:
            return False

        async def tracked() -> None:
            try:
                await fn(*args)
            finally:
                self._background -= 1
                if self._background == 0:
                    self._background_done.set()

        if self._background == 0:
            self._background_done = trio.Event()
        self._background += 1
        self._nursery.start_soon(tracked)
        return True

    async def close(self) -> None:
        """Stop prefetch, refuse new reads, wait for running ones and background work, sync
        and close the cache files."""
        if self._closed:
            return
        self._closed = True
        await self.prefetcher.stop()
        while self._active_reads:
            await self._reads_done.wait()
        for cache in self._unique:
            cache.request_flush()  # pending syncs run now instead of after their delay
        while self._background:
            await self._background_done.wait()
        for cache in self._unique:
            await cache.sync()  # whatever was written last, so a restart finds it ready
        for cache in self._unique:
            await trio.to_thread.run_sync(cache.close_blocking)

    # --- reads ---------------------------------------------------------------------------------
    async def read(self, iovec: Sequence[BlobIoDesc], hint: Sequence[ChunkInfo] = ()) -> bytes:
        """The concatenated bytes of ``iovec``, in order (see the module docstring). ``hint``:
        the chunks of the file that follow the read, in file order, which the cache may fetch
        along (in-file amplification and read-ahead)."""
        if self._closed:
            raise OSError(errno.EBADF, "blob device is closed")
        if not iovec:
            return b""
        for desc in iovec:
            self._check(desc)
        if self._active_reads == 0:
            self._reads_done = trio.Event()
        self._active_reads += 1
        try:
            parts: list[bytes] = []
            start = 0
            while start < len(iovec):
                index = iovec[start].blob.blob_index
                end = start + 1
                while end < len(iovec) and iovec[end].blob.blob_index == index:
                    end += 1
                run_hint: Sequence[ChunkInfo] = ()
                if end == len(iovec) and hint:
                    run_hint = [c for c in hint if c.blob_index == index]
                parts.append(await self._caches[index].read(iovec[start:end], run_hint))
                start = end
            return b"".join(parts)
        finally:
            self._active_reads -= 1
            if self._active_reads == 0:
                self._reads_done.set()

    def _check(self, desc: BlobIoDesc) -> None:
        blob, chunk = desc.blob, desc.chunk
        if blob.blob_index not in self._caches or chunk.blob_index != blob.blob_index:
            raise OSError(errno.EINVAL, f"read of chunk {chunk.index} names an unknown blob")
        if desc.offset < 0 or desc.size < 0 or desc.offset + desc.size > chunk.uncompressed_size:
            raise OSError(
                errno.EINVAL,
                f"read of {desc.size} bytes at {desc.offset} is outside chunk {chunk.index} "
                f"({chunk.uncompressed_size} bytes)",
            )
        if blob.chunk_count and chunk.index >= blob.chunk_count:
            raise FormatError(f"blob {blob.blob_id}: chunk index {chunk.index} out of range")
        if blob.compressed_size and (
            chunk.compressed_offset + chunk.compressed_size > blob.compressed_size
        ):
            raise FormatError(
                f"blob {blob.blob_id}: chunk {chunk.index} ends past the blob "
                f"({chunk.compressed_offset:#x}+{chunk.compressed_size:#x})"
            )

    def all_chunks_ready(self, iovec: Sequence[BlobIoDesc]) -> bool:
        """Whether every chunk of ``iovec`` is in the local cache (upstream's helper for RAFS v5
        read amplification)."""
        return all(self._caches[d.blob.blob_index].state.is_ready(d.chunk.index) for d in iovec)

    # --- prefetch ------------------------------------------------------------------------------
    async def prefetch_chunks(self, chunks: Sequence[ChunkInfo]) -> int:
        """Queue file-level prefetch of ``chunks`` (RAFS's prefetch table or file list), merged
        per blob up to the prefetch batch size. Returns the number of requests queued (0 when
        prefetch is off or the device is not started)."""
        if not self.prefetcher.running:
            log.debug("prefetch is not running: dropping %d chunks", len(chunks))
            return 0
        by_blob: dict[int, list[ChunkInfo]] = {}
        for chunk in chunks:
            cache = self._caches.get(chunk.blob_index)
            if cache is not None and cache.keeps_data:
                by_blob.setdefault(chunk.blob_index, []).append(chunk)
        queued = 0
        for index, group in by_blob.items():
            queued += self.prefetcher.submit(self._caches[index], group)
        return queued

    async def prefetch_blobs(self) -> int:
        """Queue every chunk of every blob (upstream's blob-level "prefetch all"), in requests
        of the prefetch batch size. Needs ``cache.prefetch.enable`` and the blobs' CI arrays
        (awaits their loading); returns the number of requests queued."""
        if not self._blob_prefetch or not self.prefetcher.running:
            return 0
        queued = 0
        for cache in self._unique:
            chunks = await cache.all_chunks()
            if not chunks:
                if cache.amplifies:
                    log.warning("blob %s: no chunk info, cannot prefetch the whole blob",
                                cache.blob.blob_id)  # fmt: skip
                continue
            groups = split_by_size(chunks, self.prefetcher.batch_size)
            queued += self.prefetcher.submit_groups(cache, groups)
        return queued

    async def wait_prefetch(self) -> None:
        """Return once every queued prefetch request has been handled (or prefetch stopped),
        and what it fetched is synced and marked in the chunk maps."""
        await self.prefetcher.join()
        for cache in self._unique:
            await cache.sync()

    def _update_all_ready(self) -> None:
        self.metrics.data_all_ready = bool(self._unique) and all(
            c.state.base.all_ready for c in self._unique
        )


def _check_supported(blob: BlobInfo) -> None:
    if blob.has(BlobFeatures.ZRAN) or blob.has(BlobFeatures.TARFS):
        raise UnsupportedError(f"blob {blob.blob_id}: zran and tarfs blobs are not supported")
    if blob.has(BlobFeatures.ENCRYPTED) or blob.cipher != Cipher.NONE:
        raise UnsupportedError(f"blob {blob.blob_id}: encrypted blobs are not supported")
