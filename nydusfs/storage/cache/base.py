"""The read path shared by every cache: readiness, single flight, merging, fetch, decode, verify.

``BlobCache`` serves one blob (upstream's ``BlobCache`` trait plus ``FileCacheEntry``'s read
logic). A read resolves its chunks in rounds; in each round, on the trio thread and with no await
in between, every chunk is sorted into one of three cases:

* ready in the local cache: read from the cache file (the dummy cache has none);
* being fetched by someone else: wait on that fetch's ``Inflight`` event and take its bytes;
* neither: *claim* it. Claimed chunks are merged into ranged backend requests (``merge.py``), and
  amplified with the following not-ready chunks of the blob when the CI array is known.

Each backend request runs in one worker thread (``trio.to_thread.run_sync`` under a
``CapacityLimiter``): ranged read, then per chunk decompression and verification (CRC32C when
the chunk has one, digest when ``validate`` is on and the digest is known), then ``_persist``
(write + ``fdatasync``). Back on the trio thread, without an await, each chunk is marked ready
(only if persisted) and its waiters are woken with the bytes, or with the error. A failed chunk is
never marked ready and never returned.

Await points: ``read`` awaits the blob meta load (once per blob, only when amplifying), backend
requests, local cache reads and other readers' fetches; ``prefetch`` awaits its ``gate``
(bandwidth and "foreground busy", see ``prefetch.py``) before claiming each request. Claims are
always resolved, even on cancellation, so no reader can wait forever.

Errors: ``BackendError`` (an ``OSError``, EIO) when the backend fails; ``DigestMismatch`` when a
chunk's CRC or digest is wrong; ``FormatError`` when its compressed data is corrupt;
``UnsupportedError`` for zran, batch or encrypted chunks. A waiter gets the fetcher's error, except
when the fetch was a prefetch or was cancelled: then it fetches the chunk itself (once).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import crc32c
import trio

from nydusfs.errors import BackendError, DigestMismatch, FormatError, NydusError, UnsupportedError
from nydusfs.metrics import BlobcacheMetrics
from nydusfs.storage import compress, digest
from nydusfs.storage.backends.base import BlobBackend, BlobReader
from nydusfs.storage.cache.chunkmap import BlobStateMap, ChunkMap, Inflight
from nydusfs.storage.cache.merge import (
    NO_DIGEST,
    FetchPlan,
    amplify,
    chunk_from_entry,
    max_gap,
    merge_chunks,
    plainly_fetchable,
)
from nydusfs.storage.cache.prefetch import Foreground
from nydusfs.storage.device import BlobInfo, BlobIoDesc, ChunkInfo
from nydusfs.storage.meta import CiEntry
from nydusfs.types import ChunkFlags

log = logging.getLogger(__name__)

META_RETRY_SECONDS = 10.0  # after a failed blob meta load, read without amplification this long

Gate = Callable[[int], Awaitable[None]]
ChunkResult = bytes | Exception


@dataclass(eq=False)
class CacheContext:
    """What every blob cache of one ``BlobDevice`` shares."""

    backend: BlobBackend
    metrics: BlobcacheMetrics
    validate: bool
    user_batch_size: int  # effective rafs.batch_size (merge.effective_batch_size)
    foreground: Foreground
    fetch_limiter: trio.CapacityLimiter  # on-demand backend requests
    prefetch_limiter: trio.CapacityLimiter  # prefetch backend requests
    local_limiter: trio.CapacityLimiter  # cache file reads, decompression of cached data
    charge: Callable[[int], None] = lambda size: None  # on-demand bytes, for prefetch's budget
    on_all_ready: Callable[[], None] = lambda: None


@dataclass(slots=True)
class FetchResult:
    chunks: dict[int, ChunkResult]
    persisted: set[int]


@dataclass(slots=True)
class _Round:
    """What the tasks of one read round report back."""

    data: dict[int, bytes] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)
    again: list[ChunkInfo] = field(default_factory=list)
    hits: int = 0


class BlobCache(abc.ABC):
    """One blob behind a cache. Subclasses decide where (and whether) fetched chunks are kept."""

    kind = "dummycache"
    # Fetched chunks are kept (and so worth prefetching).
    keeps_data = False
    # Ready chunks may be read by byte range without decoding or verifying (plain data file).
    fast_path = False
    # Fetch more than asked for (needs somewhere to keep it) using the CI array.
    amplifies = False

    def __init__(self, blob: BlobInfo, ctx: CacheContext, chunk_map: ChunkMap) -> None:
        self.blob = blob
        self.ctx = ctx
        self.state = BlobStateMap(chunk_map)
        self.reader: BlobReader = ctx.backend.get_reader(blob.blob_id)
        # Chunks seen with their digest (validate mode), preferred over digest-less CI entries.
        self._known: dict[int, ChunkInfo] = {}
        self._entries: list[CiEntry] | None = None
        self._meta_loaded = False  # _entries is final (None: the blob has no CI array)
        self._meta_lock = trio.Lock()
        self._meta_failed_at: float | None = None

    # --- storage hooks (blocking, run in worker threads) ---------------------------------------
    def _persist(
        self, plan: FetchPlan, raw: memoryview, results: dict[int, ChunkResult]
    ) -> set[int]:
        """Store the good chunks of ``results``; return the indexes now safely on disk."""
        return set()

    @abc.abstractmethod
    def _read_cached(self, chunks: Sequence[ChunkInfo]) -> dict[int, ChunkResult]:
        """Whole ready chunks from the cache, decoded and verified."""

    def _read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """``(offset, size)`` ranges of the plain data file (``fast_path`` caches only)."""
        raise AssertionError(f"{type(self).__name__} has no plain data file (fast_path off)")

    def _load_meta(self) -> list[CiEntry] | None:
        """The blob's CI entries, or None if it has none."""
        return None

    def close_blocking(self) -> None:
        self.state.base.close()

    # --- decoding -------------------------------------------------------------------------
    def decode(self, chunk: ChunkInfo, payload: bytes | memoryview) -> bytes:
        """Blocking: inflate and verify one chunk's stored bytes. Raises ``NydusError``."""
        if chunk.flags & (ChunkFlags.BATCH | ChunkFlags.ENCRYPTED):
            raise UnsupportedError(
                f"blob {self.blob.blob_id}: chunk {chunk.index} is a batch or encrypted chunk"
            )
        try:
            if chunk.is_compressed:
                data = compress.decompress(self.blob.compressor, payload, chunk.uncompressed_size)
            elif len(payload) != chunk.uncompressed_size:
                raise FormatError(
                    f"stored size {len(payload)} differs from size {chunk.uncompressed_size}"
                )
            else:
                data = bytes(payload)
        except NydusError as e:
            raise type(e)(self._where(chunk) + str(e)) from None
        except Exception as e:  # a decompressor surprised by garbage must not take us down
            raise FormatError(f"{self._where(chunk)}corrupt data: {e!r}") from None
        self.verify(chunk, data)
        return data

    def verify(self, chunk: ChunkInfo, data: bytes) -> None:
        """CRC32C when the chunk carries one; the digest instead when validating and known."""
        if self.ctx.validate and chunk.digest != NO_DIGEST:
            if digest.digest(self.blob.digester, data) != chunk.digest:
                raise DigestMismatch(f"{self._where(chunk)}digest mismatch")
        elif chunk.flags & ChunkFlags.HAS_CRC32 and crc32c.crc32c(data) != chunk.crc32:
            raise DigestMismatch(f"{self._where(chunk)}crc32 mismatch")

    def _where(self, chunk: ChunkInfo) -> str:
        return (
            f"blob {self.blob.blob_id}: chunk {chunk.index} at compressed offset "
            f"{chunk.compressed_offset:#x}: "
        )

    # --- blob meta (CI array) ----------------------------------------------------------------
    async def entries(self) -> list[CiEntry] | None:
        """The CI entries, loaded once (in a thread); None without meta or after a failure."""
        if self._meta_loaded or not self.amplifies:
            return self._entries
        failed = self._meta_failed_at
        if failed is not None and time.monotonic() - failed < META_RETRY_SECONDS:
            return None
        async with self._meta_lock:
            if not self._meta_loaded:
                try:
                    self._entries = await trio.to_thread.run_sync(
                        self._load_meta, limiter=self.ctx.fetch_limiter
                    )
                    self._meta_loaded = True
                    self._meta_failed_at = None
                except NydusError as e:
                    log.warning("blob %s: no chunk info, reading without amplification: %s",
                                self.blob.blob_id, e)  # fmt: skip
                    self._meta_failed_at = time.monotonic()
        return self._entries

    async def all_chunks(self) -> list[ChunkInfo]:
        """Every chunk this cache can fetch, by compressed offset (blob-level prefetch)."""
        entries = await self.entries()
        if not entries:
            return []
        out = [self._chunk_for(i, e) for i, e in enumerate(entries) if plainly_fetchable(e)]
        out.sort(key=lambda c: (c.compressed_offset, c.index))
        return out

    def _chunk_for(self, index: int, entry: CiEntry) -> ChunkInfo:
        return self._known.get(index) or chunk_from_entry(self.blob, index, entry)

    # --- reading ------------------------------------------------------------------------------
    async def read(self, descs: Sequence[BlobIoDesc]) -> bytes:
        """The bytes of ``descs`` (all of this blob), concatenated."""
        self.ctx.metrics.add(total=1)
        wanted: dict[int, ChunkInfo] = {}
        for d in descs:
            if d.size:
                wanted.setdefault(d.chunk.index, d.chunk)
        if self.ctx.validate:
            self._known.update(wanted)
        chunks = list(wanted.values())
        data, fast, hits = await self._resolve(chunks)
        if chunks and hits == len(chunks):
            self.ctx.metrics.add(whole_hits=1)
        elif hits:
            self.ctx.metrics.add(partial_hits=1)
        fast_parts: list[bytes] = []
        if fast:
            ranges = [
                (d.chunk.uncompressed_offset + d.offset, d.size)
                for d in descs
                if d.size and d.chunk.index in fast
            ]
            fast_parts = await trio.to_thread.run_sync(
                self._read_ranges, ranges, limiter=self.ctx.local_limiter
            )
        out: list[bytes] = []
        next_fast = iter(fast_parts)
        for d in descs:
            if not d.size:
                continue
            if d.chunk.index in fast:
                out.append(next(next_fast))
            else:
                out.append(data[d.chunk.index][d.offset : d.offset + d.size])
        return b"".join(out)

    async def _resolve(self, chunks: list[ChunkInfo]) -> tuple[dict[int, bytes], set[int], int]:
        """Make every chunk available: returns (whole chunks, fast-path indexes, cache hits)."""
        data: dict[int, bytes] = {}
        fast: set[int] = set()
        hits = 0
        retried: set[int] = set()
        entries = None
        if (
            self.amplifies
            and self.ctx.user_batch_size
            and any(self.state.claimable(c.index) for c in chunks)
        ):
            entries = await self.entries()
        foreground = False
        pending = chunks
        try:
            while pending:
                rnd = _Round()
                async with trio.open_nursery() as nursery:
                    # From classification to start_soon there is no await: claims are atomic and
                    # every claimed chunk is owned by a task that is sure to run.
                    ready, mine, theirs = self._classify(pending)
                    plans = self._plan(mine, self.ctx.user_batch_size, entries, prefetch=False)
                    if (plans or theirs) and not foreground:
                        self.ctx.foreground.enter()
                        foreground = True
                    for plan in plans:
                        nursery.start_soon(self._fetch, plan, False, rnd)
                    for chunk, flight in theirs:
                        nursery.start_soon(self._join, chunk, flight, rnd, retried)
                    if ready and self.fast_path:
                        fast.update(c.index for c in ready)
                        rnd.hits += len(ready)
                    elif ready:
                        nursery.start_soon(self._read_ready, ready, rnd, retried)
                hits += rnd.hits
                data.update(rnd.data)
                for c in chunks:
                    error = rnd.errors.get(c.index)
                    if error is not None:
                        raise _clone(error)
                pending = rnd.again
        finally:
            if foreground:
                self.ctx.foreground.leave()
        return data, fast, hits

    def _classify(
        self, chunks: Sequence[ChunkInfo]
    ) -> tuple[list[ChunkInfo], list[ChunkInfo], list[tuple[ChunkInfo, Inflight]]]:
        ready: list[ChunkInfo] = []
        mine: list[ChunkInfo] = []
        theirs: list[tuple[ChunkInfo, Inflight]] = []
        for c in chunks:
            flight = self.state.inflight(c.index)
            if flight is not None:
                theirs.append((c, flight))
            elif self.state.is_ready(c.index):
                ready.append(c)
            else:
                mine.append(c)
        return ready, mine, theirs

    def _plan(
        self,
        chunks: Sequence[ChunkInfo],
        batch_size: int,
        entries: Sequence[CiEntry] | None,
        *,
        prefetch: bool,
    ) -> list[FetchPlan]:
        """Merge ``chunks`` (all claimable) into requests, amplify them, claim everything."""
        if not chunks:
            return []
        ordered = sorted(chunks, key=lambda c: (c.compressed_offset, c.index))
        groups = merge_chunks(ordered, batch_size, max_gap(batch_size))
        for group in groups:
            for c in group:
                self.state.claim(c.index, prefetch=prefetch)
        plans = []
        for group in groups:
            extra: list[ChunkInfo] = []
            if entries is not None:
                extra = amplify(group, entries, batch_size, self.state.claimable, self._chunk_for)
                for c in extra:
                    self.state.claim(c.index, prefetch=prefetch)
            plans.append(FetchPlan.of(group + extra, len(extra)))
        return plans

    async def _join(
        self, chunk: ChunkInfo, flight: Inflight, rnd: _Round, retried: set[int]
    ) -> None:
        await BlobStateMap.wait(flight)
        if flight.data is not None:
            rnd.data[chunk.index] = flight.data
        elif flight.retry and chunk.index not in retried:
            retried.add(chunk.index)
            rnd.again.append(chunk)
        else:
            rnd.errors[chunk.index] = flight.error or BackendError("chunk fetch failed")

    async def _read_ready(self, chunks: list[ChunkInfo], rnd: _Round, retried: set[int]) -> None:
        results = await trio.to_thread.run_sync(
            self._read_cached, chunks, limiter=self.ctx.local_limiter
        )
        for c in chunks:
            result = results[c.index]
            if isinstance(result, bytes):
                rnd.data[c.index] = result
                rnd.hits += 1
                continue
            # The cached copy is bad (disk corruption, a foreign writer): forget it, refetch.
            log.warning("%scached copy is unusable, fetching it again: %s", self._where(c), result)
            self.state.clear_ready(c.index)
            self.ctx.metrics.add(entries_count=-1)
            if c.index in retried:
                rnd.errors[c.index] = result
            else:
                retried.add(c.index)
                rnd.again.append(c)

    # --- fetching -----------------------------------------------------------------------------
    async def _fetch(self, plan: FetchPlan, prefetch: bool, rnd: _Round | None) -> bool:
        """Run one backend request and publish its chunks. Never raises ``Exception``: errors
        go to the waiters and to ``rnd``; ``Cancelled`` propagates after the claims are failed
        as retryable. Returns True if every chunk was fetched."""
        published = False
        try:
            if not prefetch:
                self.ctx.charge(plan.size)
            limiter = self.ctx.prefetch_limiter if prefetch else self.ctx.fetch_limiter
            result = await trio.to_thread.run_sync(self._fetch_blocking, plan, limiter=limiter)
            # No await until every claim is resolved.
            all_ready = False
            ok = True
            for c in plan.chunks:
                r = result.chunks[c.index]
                if isinstance(r, bytes):
                    all_ready |= self.state.complete(c.index, r, ready=c.index in result.persisted)
                    if rnd is not None:
                        rnd.data[c.index] = r
                else:
                    ok = False
                    self.state.fail(c.index, r, retry=prefetch)
                    if rnd is not None:
                        rnd.errors[c.index] = r
            published = True
            ready_now = len(result.persisted)
            if ready_now:
                self.ctx.metrics.add(entries_count=ready_now)
            if all_ready:
                await trio.to_thread.run_sync(self.state.base.mark_all_ready)
                self.ctx.on_all_ready()
            return ok
        except Exception as e:
            if not isinstance(e, NydusError):
                log.exception("%sunexpected error while fetching", self._where(plan.chunks[0]))
            if not published:
                for c in plan.chunks:
                    self.state.fail(c.index, e, retry=prefetch)
                    if rnd is not None:
                        rnd.errors[c.index] = e
            return False
        except BaseException:
            if not published:
                cancelled = BackendError(f"blob {self.blob.blob_id}: fetch was cancelled")
                for c in plan.chunks:
                    self.state.fail(c.index, cancelled, retry=True)
            raise

    def _fetch_blocking(self, plan: FetchPlan) -> FetchResult:
        raw = self.reader.read(plan.offset, plan.size)  # logs its own failures
        if len(raw) != plan.size:
            error = BackendError(
                f"blob {self.blob.blob_id}: backend returned {len(raw)} of {plan.size} bytes "
                f"at offset {plan.offset}",
                retryable=False,
            )
            log.error("%s", error)
            raise error
        view = memoryview(raw)
        results: dict[int, ChunkResult] = {}
        for c in plan.chunks:
            start = c.compressed_offset - plan.offset
            try:
                results[c.index] = self.decode(c, view[start : start + c.compressed_size])
            except NydusError as e:
                log.error("%s", e)
                results[c.index] = e
        persisted = self._persist(plan, view, results)
        return FetchResult(results, persisted)

    # --- prefetch -------------------------------------------------------------------------------
    async def prefetch(self, chunks: Sequence[ChunkInfo], gate: Gate, batch_size: int) -> int:
        """Fetch the chunks of ``chunks`` that are neither ready nor in flight, one backend
        request at a time, each after ``await gate(size)``. Failures are logged, not raised (the
        waiters of a failed prefetch fetch for themselves). Returns the bytes fetched."""
        entries = await self.entries()
        remaining = sorted({c.index: c for c in chunks}.values(),
                           key=lambda c: (c.compressed_offset, c.index))  # fmt: skip
        fetched = 0
        while True:
            todo = [c for c in remaining if self.state.claimable(c.index)]
            if not todo:
                return fetched
            first = merge_chunks(todo, batch_size, max_gap(batch_size))[0]
            await gate(FetchPlan.of(first).size)
            # The world moved while we waited: plan again, then claim without an await.
            todo = [c for c in remaining if self.state.claimable(c.index)]
            if not todo:
                return fetched
            first = merge_chunks(todo, batch_size, max_gap(batch_size))[0]
            plan = self._plan(first, batch_size, entries, prefetch=True)[0]
            self.ctx.metrics.add(prefetch_requests_count=1, prefetch_data_amount=plan.size)
            if not await self._fetch(plan, True, None):
                log.warning("blob %s: prefetch of %d bytes at offset %#x failed",
                            self.blob.blob_id, plan.size, plan.offset)  # fmt: skip
            fetched += plan.size
            done = {c.index for c in plan.chunks}
            remaining = [c for c in remaining if c.index not in done]


def _clone(error: BaseException) -> BaseException:
    """A fresh exception to raise in this reader (several readers may share one error)."""
    if isinstance(error, BackendError):
        return BackendError(error.message, code=error.errno or 5, retryable=error.retryable)
    if isinstance(error, NydusError):
        try:
            return type(error)(*error.args)
        except TypeError:
            pass
    return error
