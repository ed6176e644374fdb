"""Background prefetch: workers fed from a trio memory channel, rate-limited, yielding to reads.

Upstream's ``storage/src/cache/worker.rs`` (``AsyncWorkerMgr``), in trio terms:

* ``Prefetcher.submit`` merges chunks into requests of up to ``batch_size`` compressed bytes
  (``merging_size``; below 128 KiB it is raised to 128 KiB, as upstream) and puts them on an
  unbounded memory channel; it never blocks. ``threads_count`` worker tasks take requests from
  the channel; each runs its backend requests one at a time in threads under its own
  ``CapacityLimiter`` (separate from the one on-demand reads use, so prefetch never takes a
  thread an on-demand read is waiting for).
* ``bandwidth_limit`` (bytes/s) is a token bucket (``TokenBucket``): a rate raised to the largest
  chunk size when smaller (a chunk must fit in a second), a burst of a tenth of a second (at
  least one chunk), and debt: a request takes its bytes and then sleeps until the bucket is back
  at zero, so N bytes at R bytes/s take at least (N - burst) / R seconds. While prefetch is busy,
  on-demand backend bytes are charged to the same bucket (upstream's
  ``consume_prefetch_budget``), with at most one second of debt, so prefetch backs off when the
  user needs the network.
* Yielding to on-demand reads: ``Foreground`` counts on-demand reads that are waiting on the
  backend. Before each backend request a worker waits until that count is zero
  (``Foreground.wait_idle``), *then* claims its chunks, with no await in between, so a prefetch
  never holds a claim an on-demand read would wait on while it is itself waiting. The number of
  such waits and their total time are in ``Prefetcher.yields`` / ``yield_seconds``.

Metrics (``BlobcacheMetrics``): ``prefetch_workers`` (live workers), ``prefetch_requests_count``
and ``prefetch_data_amount`` (backend requests issued by prefetch and their bytes, so their ratio
is the average merged request size), ``prefetch_unmerged_chunks`` (chunks submitted),
``prefetch_begin_time_*`` (first worker start), ``prefetch_end_time_*`` and
``prefetch_cumulative_time_millis`` (per finished request, from its submission).

Concurrency: all methods run on the trio thread. Await points: ``TokenBucket.acquire``,
``Foreground.wait_idle``, the workers' ``receive`` and the cache fetches they run; ``join`` waits
for the queue to drain, ``stop`` for the workers to finish their current backend request.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from nydusfs.config import PrefetchConfig
from nydusfs.metrics import BlobcacheMetrics
from nydusfs.storage.cache.merge import MIN_BATCH_SIZE, max_gap, merge_chunks
from nydusfs.storage.device import ChunkInfo

if TYPE_CHECKING:
    from nydusfs.storage.cache.base import BlobCache

log = logging.getLogger(__name__)


class Foreground:
    """How many on-demand reads are waiting on the backend right now."""

    def __init__(self) -> None:
        self.busy = 0
        self._idle = trio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.busy == 0:
            self._idle = trio.Event()
        self.busy += 1

    def leave(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self._idle.set()

    async def wait_idle(self) -> bool:
        """Return once no on-demand read waits on the backend; True if that took a wait."""
        if self.busy == 0:
            return False
        while self.busy:
            await self._idle.wait()
        return True


class TokenBucket:
    """Bytes-per-second limiter with a burst allowance and debt (see the module docstring)."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.delays = 0  # acquisitions that had to sleep
        self._stamp: float | None = None

    def _refill(self) -> None:
        now = trio.current_time()
        if self._stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, size: int) -> None:
        """Await point: take ``size`` bytes, sleeping off any debt they leave."""
        self._refill()
        self.tokens -= size
        if self.tokens < 0:
            self.delays += 1
            await trio.sleep(-self.tokens / self.rate)

    def charge(self, size: int) -> None:
        """Spend ``size`` bytes used by someone else, without waiting (at most 1 s of debt)."""
        self._refill()
        self.tokens = max(self.tokens - size, -self.rate)


@dataclass(eq=False, slots=True)
class PrefetchRequest:
    cache: BlobCache
    chunks: list[ChunkInfo]
    size: int
    queued_at: float  # time.time() at submission


class Prefetcher:
    """The prefetch workers of one ``BlobDevice``."""

    def __init__(
        self,
        config: PrefetchConfig,
        metrics: BlobcacheMetrics,
        foreground: Foreground,
        *,
        max_chunk_size: int,
    ) -> None:
        self.enabled = config.enable
        self.threads = max(1, config.threads_count)
        # prefetch_batch_size(): never below 128 KiB.
        self.batch_size = max(config.batch_size, MIN_BATCH_SIZE)
        self.metrics = metrics
        self.foreground = foreground
        self.limiter = trio.CapacityLimiter(self.threads)
        self.bucket: TokenBucket | None = None
        if config.bandwidth_limit > 0:
            rate = max(config.bandwidth_limit, max_chunk_size)
            self.bucket = TokenBucket(rate, max(rate / 10, max_chunk_size))
        self.yields = 0
        self.yield_seconds = 0.0
        send, receive = trio.open_memory_channel[PrefetchRequest](math.inf)
        self._send: trio.MemorySendChannel[PrefetchRequest] = send
        self._receive: trio.MemoryReceiveChannel[PrefetchRequest] = receive
        self._outstanding = 0
        self._drained = trio.Event()
        self._drained.set()
        self._scope: trio.CancelScope | None = None
        self._finished = trio.Event()
        self._began = False

    @property
    def running(self) -> bool:
        return self._scope is not None and not self._scope.cancel_called

    def start(self, nursery: trio.Nursery) -> None:
        """Start the workers in ``nursery`` (no-op when prefetch is disabled)."""
        if not self.enabled or self._scope is not None:
            return
        self._scope = trio.CancelScope()
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        assert self._scope is not None
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for num in range(self.threads):
                        nursery.start_soon(self._worker, num)
        finally:
            self._finished.set()

    async def _worker(self, num: int) -> None:
        self.metrics.add(prefetch_workers=1)
        if not self._began:
            self._began = True
            self.metrics.mark_prefetch(begin=True)
        try:
            async for request in self._receive:
                try:
                    await request.cache.prefetch(request.chunks, self._gate, self.batch_size)
                except Exception:
                    log.exception("prefetch worker %d: request failed", num)
                finally:
                    self._finish(request)
        finally:
            self.metrics.add(prefetch_workers=-1)

    def _finish(self, request: PrefetchRequest) -> None:
        self.metrics.mark_prefetch(begin=False)
        elapsed = max(0.0, time.time() - request.queued_at)
        self.metrics.add(prefetch_cumulative_time_millis=int(elapsed * 1000))
        self._outstanding -= 1
        if self._outstanding == 0:
            self._drained.set()

    async def _gate(self, size: int) -> None:
        if self.bucket is not None:
            await self.bucket.acquire(size)
        started = trio.current_time()
        if await self.foreground.wait_idle():
            self.yields += 1
            self.yield_seconds += trio.current_time() - started

    def submit(self, cache: BlobCache, chunks: Sequence[ChunkInfo]) -> int:
        """Queue ``chunks`` of ``cache`` (merged into requests); returns the request count.

        Chunks already ready are dropped here; the workers check again before fetching.
        """
        if not self.running:
            return 0
        self.metrics.add(prefetch_unmerged_chunks=len(chunks))
        unique = {c.index: c for c in chunks if cache.state.claimable(c.index)}
        ordered = sorted(unique.values(), key=lambda c: (c.compressed_offset, c.index))
        groups = merge_chunks(ordered, self.batch_size, max_gap(self.batch_size))
        now = time.time()
        for group in groups:
            size = group[-1].compressed_offset + group[-1].compressed_size
            request = PrefetchRequest(cache, group, size - group[0].compressed_offset, now)
            self._send.send_nowait(request)
            if self._outstanding == 0:
                self._drained = trio.Event()
            self._outstanding += 1
        return len(groups)

    def submit_groups(self, cache: BlobCache, groups: Sequence[list[ChunkInfo]]) -> int:
        """Queue pre-cut requests (blob-level prefetch); returns the request count."""
        if not self.running:
            return 0
        now = time.time()
        count = 0
        for group in groups:
            group = [c for c in group if cache.state.claimable(c.index)]
            if not group:
                continue
            size = group[-1].compressed_offset + group[-1].compressed_size
            self._send.send_nowait(
                PrefetchRequest(cache, group, size - group[0].compressed_offset, now)
            )
            if self._outstanding == 0:
                self._drained = trio.Event()
            self._outstanding += 1
            count += 1
        return count

    def charge(self, size: int) -> None:
        """On-demand backend bytes: they count against the prefetch budget while it works."""
        if self.bucket is not None and self._outstanding > 0:
            self.bucket.charge(size)

    async def join(self) -> None:
        """Await point: return once every submitted request has been handled."""
        while self._outstanding and self.running:
            await self._drained.wait()

    async def stop(self) -> None:
        """Stop the workers: pending requests are dropped; an in-flight backend request
        finishes (threads cannot be interrupted) and its chunks are published first."""
        if self._scope is None:
            return
        self._send.close()
        self._scope.cancel()
        await self._finished.wait()
        self._drained.set()
