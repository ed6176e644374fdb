"""The read path shared by every cache: readiness, single flight, merging, fetch, decode, verify.

``BlobCache`` serves one blob (upstream's ``BlobCache`` trait plus ``FileCacheEntry``'s read
logic). A read resolves its chunks in rounds; in each round, on the trio thread and with no await
in between, every chunk is sorted into one of three cases:

* ready in the local cache: read from the cache file (the dummy cache has none);
* being fetched by someone else: wait on that fetch's ``Inflight`` event and take its bytes;
* neither: *claim* it. Claimed chunks are merged into ranged backend requests (``merge.py``)
  and amplified up to the batch size: with the following chunks of the same file (the read's
  ``hint``), and with the blob's following chunks (CI array) only when the read belongs to a
  stream that walks the blob file after file (``readahead.py``). Such streams also read ahead:
  the next window of chunks is claimed and fetched by background tasks.

Each backend request runs in one worker thread (``trio.to_thread.run_sync`` under a
``CapacityLimiter``): ranged read, then per chunk decompression and verification (CRC32C when
the chunk has one, digest when ``validate`` is on and the digest is known). Back on the trio
thread, without an await, the waiters are woken with the bytes, or with the error; the chunks
stay in flight (later readers take the same bytes) while ``_persist`` writes them and calls
``fdatasync`` in another thread, and only then are they marked ready. For a reader's fetch that
last step runs in the background (``CacheContext.spawn``), so readers never wait for the disk.
A failed chunk is never marked ready and never returned.

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
from collections.abc import Awaitable, Callable, Iterable, Sequence
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
    extend,
    following_chunks,
    max_gap,
    merge_chunks,
    plainly_fetchable,
)
from nydusfs.storage.cache.prefetch import Foreground
from nydusfs.storage.cache.readahead import ReadSpan, Stream, Streams
from nydusfs.storage.device import BlobInfo, BlobIoDesc, ChunkInfo
from nydusfs.storage.meta import CiEntry
from nydusfs.types import ChunkFlags

log = logging.getLogger(__name__)

META_RETRY_SECONDS = 10.0  # after a failed blob meta load, read without amplification this long
READAHEAD_REQUEST = 2 << 20  # least bytes per read-ahead request (and the batch size)
READAHEAD_PARALLEL = 4  # requests a full read-ahead window is cut into
# Written chunks are synced and marked ready in the chunk map this long after the first of
# them was written, or once this many fetched bytes wait, whichever comes first.
SYNC_DELAY = 0.5
SYNC_BYTES = 64 << 20
READAHEAD_WINDOWS = (1 << 20, 8 << 20)  # first and largest read-ahead window (memory)

Gate = Callable[[int], Awaitable[None]]
# Start ``fn(*args)`` in the background; False if it cannot be started (device not running).
Spawn = Callable[..., bool]
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
    spawn: Spawn | None = None  # set while the device runs (read-ahead, cache writes)


@dataclass(slots=True)
class FetchResult:
    chunks: dict[int, ChunkResult]  # decoded data or the error, by chunk index
    raw: memoryview  # the bytes as fetched (what ``compressed`` caches store)


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
    # ``_persist`` stores the bytes as fetched (so the fetched buffer lives until written).
    keeps_raw = False

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
        self._unsynced_bytes = 0
        self._sync_pending = False
        self._flush_requested = trio.Event()
        # Read streams, for caches that keep what they fetch and may amplify (batch size > 0).
        self.streams: Streams | None = None
        batch = ctx.user_batch_size
        if self.keeps_data and batch:
            first, largest = READAHEAD_WINDOWS
            self.streams = Streams(max(first, batch), max(largest, 4 * batch), max_gap(batch),
                                   back=max(batch, 1 << 20))  # fmt: skip

    # --- storage hooks (blocking, run in worker threads) ---------------------------------------
    def _persist(
        self, plan: FetchPlan, raw: memoryview, results: dict[int, ChunkResult]
    ) -> set[int]:
        """Write the good chunks of ``results`` to the cache file; return the indexes written
        (readable from the file, durable only after ``_sync_data``)."""
        return set()

    def _sync_data(self) -> None:
        """Make everything ``_persist`` wrote durable (``fdatasync``)."""
        return None

    @abc.abstractmethod
    def _read_cached(self, chunks: Sequence[ChunkInfo]) -> dict[int, ChunkResult]:
        """Whole ready chunks from the cache, decoded and verified."""

    def _read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """``(offset, size)`` ranges of the plain data file (``fast_path`` caches only)."""
        raise AssertionError(f"{type(self).__name__} has no plain data file (fast_path off)")

    def _read_ranges_nowait(self, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        """``_read_ranges`` if it can be done without blocking (all in the page cache), else
        None. Called on the trio thread."""
        return None

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
    async def read(
        self, descs: Sequence[BlobIoDesc], hint: Sequence[ChunkInfo] = ()
    ) -> bytes:
        """The bytes of ``descs`` (all of this blob), concatenated. ``hint``: the chunks of the
        same file that follow the read, in file order (what in-file amplification and
        read-ahead may fetch; see ``readahead.py``)."""
        self.ctx.metrics.add(total=1)
        wanted: dict[int, ChunkInfo] = {}
        for d in descs:
            if d.size:
                wanted.setdefault(d.chunk.index, d.chunk)
        if self.ctx.validate:
            self._known.update(wanted)
        chunks = list(wanted.values())
        stream: Stream | None = None
        due = False
        if chunks and self.streams is not None:
            stream, due = self.streams.observe(_span(descs, chunks))
            # Like the kernel's PG_readahead: only a stream that has missed, or whose earlier
            # read-ahead is being consumed, reads ahead; walking through data cached before
            # (prefetched, or from the last run) does not start fetching what follows it.
            if due and not stream.window and all(self.state.is_ready(c.index) for c in chunks):
                due = False
        data, fast, hits = await self._resolve(chunks, hint, stream, due)
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
            nowait = self._read_ranges_nowait(ranges)
            if nowait is not None:
                fast_parts = nowait
            else:
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

    async def _resolve(
        self,
        chunks: list[ChunkInfo],
        hint: Sequence[ChunkInfo],
        stream: Stream | None,
        due: bool,
    ) -> tuple[dict[int, bytes], set[int], int]:
        """Make every chunk available: returns (whole chunks, fast-path indexes, cache hits).
        Misses are amplified within the file (``hint``), and into the blob's following chunks
        only when ``stream`` spans files; read-ahead is issued when ``due``."""
        data: dict[int, bytes] = {}
        fast: set[int] = set()
        hits = 0
        retried: set[int] = set()
        cross_files = stream is not None and stream.spans_files
        entries = None
        if (
            self.amplifies
            and self.ctx.user_batch_size
            and cross_files
            and (due or any(self.state.claimable(c.index) for c in chunks))
        ):
            entries = await self.entries()
        foreground = False
        pending = chunks
        try:
            while pending:
                ready, mine, theirs = self._classify(pending)
                if not mine and not theirs and self.fast_path and not due:
                    # All cached and readable by range: no tasks, no threads here.
                    fast.update(c.index for c in ready)
                    hits += len(ready)
                    break
                rnd = _Round()
                # From classification to start_soon there is no await (entering a nursery is no
                # checkpoint): claims are atomic and every claimed chunk is owned by a task
                # that is sure to run.
                async with trio.open_nursery() as nursery:
                    plans = self._plan(
                        mine, self.ctx.user_batch_size, entries, prefetch=False, hint=hint
                    )
                    if due and stream is not None:
                        self._readahead(stream, hint, entries)
                        due = False
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
        hint: Sequence[ChunkInfo] = (),
    ) -> list[FetchPlan]:
        """Merge ``chunks`` (all claimable) into requests, claim them, and amplify them: the
        last request with the file's following chunks (``hint``), then every request with the
        blob's following chunks when ``entries`` is given."""
        if not chunks:
            return []
        ordered = sorted(chunks, key=lambda c: (c.compressed_offset, c.index))
        groups = merge_chunks(ordered, batch_size, max_gap(batch_size))
        for group in groups:
            for c in group:
                self.state.claim(c.index, prefetch=prefetch)
        plans = []
        for n, group in enumerate(groups):
            extra: list[ChunkInfo] = []
            if hint and n == len(groups) - 1 and self.keeps_data:
                extra = extend(group, hint, batch_size, self.state.claimable)
                for c in extra:
                    self.state.claim(c.index, prefetch=prefetch)
            if entries is not None:
                more = amplify(group + extra, entries, batch_size, self.state.claimable,
                               self._chunk_for)  # fmt: skip
                for c in more:
                    self.state.claim(c.index, prefetch=prefetch)
                extra += more
            plans.append(FetchPlan.of(group + extra, len(extra)))
        return plans

    def _readahead(
        self, stream: Stream, hint: Sequence[ChunkInfo], entries: Sequence[CiEntry] | None
    ) -> None:
        """Claim the next window of ``stream`` and fetch it in the background (no await).

        The window covers the file's following chunks (``hint``), or the blob's when the
        stream spans files and the CI array is known. Chunks already ready or in flight are
        stepped over; the rest go out in a few large requests on the on-demand limiter. A
        failed read-ahead is not an error: its waiters fetch for themselves."""
        if self.ctx.spawn is None:
            return  # nowhere to run it (the device was not started)
        assert self.streams is not None
        window = self.streams.window_of(stream)
        limit = stream.end + window
        candidates: Iterable[ChunkInfo]
        if stream.spans_files and entries is not None:
            candidates = following_chunks(entries, stream.next_index, self._chunk_for)
        else:
            candidates = hint
        todo: list[ChunkInfo] = []
        end, next_index = stream.end, stream.next_index
        for c in candidates:
            if c.compressed_offset < stream.end:
                continue  # shared with data before the stream (dedup), or behind it
            if c.compressed_offset >= limit:
                break
            if self.state.claimable(c.index):
                todo.append(c)
            c_end = c.compressed_offset + c.compressed_size
            if c_end >= end:  # (a deduplicated chunk may come from anywhere in the blob)
                end, next_index = c_end, c.index + 1
        Streams.advanced(stream, end, next_index)
        if not todo:
            return
        todo.sort(key=lambda c: (c.compressed_offset, c.index))
        batch = self.ctx.user_batch_size
        # Wider windows in fewer, larger requests: a few run at once, each long enough that
        # the backend's per-request cost no longer matters.
        size = max(batch, READAHEAD_REQUEST, window // READAHEAD_PARALLEL)
        for group in merge_chunks(todo, size, max_gap(batch)):
            for c in group:
                self.state.claim(c.index, prefetch=True)
            plan = FetchPlan.of(group, len(group))
            if not self._spawn(self._fetch, plan, True, None, True):
                for c in group:
                    self.state.fail(c.index, BackendError("read-ahead not started"), retry=True)

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
    async def _fetch(
        self, plan: FetchPlan, prefetch: bool, rnd: _Round | None, readahead: bool = False
    ) -> bool:
        """Run one backend request and publish its chunks. Never raises ``Exception``: errors
        go to the waiters and to ``rnd``; ``Cancelled`` propagates after the claims are failed
        as retryable. Returns True if every chunk was fetched.

        The waiters get the data as soon as it is decoded; writing it to the cache and marking
        it ready (``_settle``) comes after, and for a reader's fetch it happens in the
        background when the device runs a nursery, so a reader never waits for the disk.
        ``prefetch`` fetches (prefetch and read-ahead) fail retryably: their waiters fetch for
        themselves."""
        published = False
        try:
            if not prefetch:
                self.ctx.charge(plan.size)
            # Read-ahead is on-demand work done early: the on-demand limiter, not prefetch's.
            on_demand = readahead or not prefetch
            limiter = self.ctx.fetch_limiter if on_demand else self.ctx.prefetch_limiter
            result = await trio.to_thread.run_sync(self._fetch_blocking, plan, limiter=limiter)
            # No await until every claim is published or failed.
            good: list[ChunkInfo] = []
            for c in plan.chunks:
                r = result.chunks[c.index]
                if isinstance(r, bytes):
                    self.state.publish(c.index, r)
                    good.append(c)
                    if rnd is not None:
                        rnd.data[c.index] = r
                else:
                    self.state.fail(c.index, r, retry=prefetch)
                    if rnd is not None:
                        rnd.errors[c.index] = r
            published = True
            # A reader's fetch leaves the write to the background; prefetch and read-ahead are
            # background work already, and their callers count on the cache being filled.
            background = rnd is not None and self.keeps_data
            if good and not (background and self._spawn(self._settle, plan, result, good)):
                await self._settle(plan, result, good)
            return len(good) == len(plan.chunks)
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

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        return self.ctx.spawn is not None and self.ctx.spawn(fn, *args)

    async def _settle(self, plan: FetchPlan, result: FetchResult, good: list[ChunkInfo]) -> None:
        """Write the published chunks of ``plan`` to the cache, then end their flights: written
        chunks read as ready at once and are marked in the chunk map after the next sync
        (``sync``); a chunk that could not be written is simply not ready. Every flight is
        ended, whatever happens."""
        written: set[int] = set()
        try:
            if self.keeps_data:
                written = await trio.to_thread.run_sync(
                    self._persist, plan, result.raw, result.chunks, limiter=self.ctx.local_limiter
                )
        finally:
            for c in good:
                if c.index in written:
                    self.state.written(c.index)
                else:
                    self.state.settle(c.index, ready=False)
        if written:
            self._unsynced_bytes += plan.size
            await self._sync_soon()

    async def _sync_soon(self) -> None:
        """Have the written chunks synced and marked: after ``SYNC_DELAY`` seconds, or at once
        when ``SYNC_BYTES`` are waiting or there is nowhere to wait in the background. One
        ``fdatasync`` covers many requests, so no fetch waits for the disk."""
        if self._unsynced_bytes >= SYNC_BYTES or self.ctx.spawn is None:
            await self.sync()
        elif not self._sync_pending and self._spawn(self._sync_later):
            self._sync_pending = True
        elif not self._sync_pending:
            await self.sync()  # the device is closing

    async def _sync_later(self) -> None:
        try:
            with trio.move_on_after(SYNC_DELAY):
                await self._flush_requested.wait()
        finally:
            self._sync_pending = False
        await self.sync()

    def request_flush(self) -> None:
        """Cut a pending ``_sync_later`` wait short (the device is closing)."""
        self._flush_requested.set()

    async def sync(self) -> None:
        """Sync the written chunks now and mark them ready in the chunk map. A failed sync
        forgets them (they will be fetched again) and is logged."""
        batch = self.state.unsynced()
        if not batch:
            return
        self._unsynced_bytes = 0
        ok = True
        try:
            await trio.to_thread.run_sync(self._sync_data, limiter=self.ctx.local_limiter)
        except OSError as e:
            ok = False
            log.warning("blob %s: cannot sync the cache file, %d chunks will be fetched again: "
                        "%s", self.blob.blob_id, len(batch), e)  # fmt: skip
        all_ready = self.state.synced(batch, ok=ok)
        if ok:
            self.ctx.metrics.add(entries_count=len(batch))
        if all_ready:
            await trio.to_thread.run_sync(self.state.base.mark_all_ready)
            self.ctx.on_all_ready()

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
        # Without a use for it, the fetched buffer goes now, not after the background write.
        return FetchResult(results, view if self.keeps_raw else memoryview(b""))

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


def _span(descs: Sequence[BlobIoDesc], chunks: Sequence[ChunkInfo]) -> ReadSpan:
    last = max(chunks, key=lambda c: c.compressed_offset + c.compressed_size)
    first = descs[0]
    return ReadSpan(
        start=min(c.compressed_offset for c in chunks),
        end=last.compressed_offset + last.compressed_size,
        last_index=last.index,
        file_start=first.chunk.file_offset + first.offset == 0,
        chunks=[(c.index, c.compressed_offset, c.compressed_size) for c in chunks],
    )


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
