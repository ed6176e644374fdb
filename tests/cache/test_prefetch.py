"""Prefetch: workers fill the cache, merge requests, honour bandwidth_limit and yield to
on-demand reads."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from nydusfs.config import PrefetchConfig
from nydusfs.storage.cache.chunkmap import MAGIC_ALL_READY
from nydusfs.storage.cache.prefetch import TokenBucket
from nydusfs.storage.device import BlobDevice
from tests.cache.backend import FileBackend
from tests.cache.util import Image, chunk_desc, chunks_of, descs_for, make_config

pytestmark = pytest.mark.timeout(60)


def test_prefetch_chunks_fills_the_cache(image: Image, tmp_path: Path) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    chunks = chunks_of(sup, "rand") + chunks_of(sup, "text")
    backend = FileBackend(image.blob_dir)
    prefetch = PrefetchConfig(enable=True, threads_count=3, batch_size=0x40000)
    config = make_config("blobcache", tmp_path, prefetch=prefetch, batch_size=0)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        async with trio.open_nursery() as nursery:
            device.start(nursery)
            await trio.testing.wait_all_tasks_blocked()
            assert device.metrics.prefetch_workers == 3
            queued = await device.prefetch_chunks(chunks)
            assert queued == 18  # 75 chunks in 256 KiB requests: 17 for rand (+1 for text)
            await device.wait_prefetch()
            cache = device.cache_of(0)
            assert all(cache.state.is_ready(c.index) for c in chunks)
            fetched = len(backend.data_reads(blob))
            m = device.metrics
            assert m.prefetch_requests_count == fetched
            assert m.prefetch_data_amount == sum(size for _, size in backend.data_reads(blob))
            assert m.prefetch_unmerged_chunks == len(chunks)
            assert m.prefetch_begin_time_secs > 0 and m.prefetch_end_time_secs > 0
            assert await device.read(descs_for(sup, "rand")) == image.files["rand"]
            assert await device.read(descs_for(sup, "text")) == image.files["text"]
            assert len(backend.data_reads(blob)) == fetched
            assert m.whole_hits == 2
            await device.close()
        assert device.metrics.prefetch_workers == 0

    trio.run(main)


def test_prefetch_blobs_fetches_everything(image: Image, tmp_path: Path) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    backend = FileBackend(image.blob_dir)
    prefetch = PrefetchConfig(enable=True, threads_count=4, batch_size=1 << 20, prefetch_all=True)
    config = make_config("blobcache", tmp_path, compressed=True, prefetch=prefetch)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        async with trio.open_nursery() as nursery:
            device.start(nursery)
            assert await device.prefetch_blobs() == 5  # 4.3 MiB of chunks, 1 MiB requests
            await device.wait_prefetch()
            assert device.metrics.data_all_ready
            before = len(backend.reads)
            for name, data in image.files.items():
                assert await device.read(descs_for(sup, name)) == data
            assert len(backend.reads) == before
            await device.close()

    trio.run(main)
    header = (tmp_path / f"{blob.blob_id}.blob.data.chunk_map").read_bytes()
    assert struct.unpack_from("<I", header, 12)[0] == MAGIC_ALL_READY


def test_prefetch_off_queues_nothing(image: Image, tmp_path: Path) -> None:
    sup = image.load()

    async def main() -> None:
        device = BlobDevice(
            sup.blobs, make_config("blobcache", tmp_path), FileBackend(image.blob_dir)
        )
        async with trio.open_nursery() as nursery:
            device.start(nursery)
            assert await device.prefetch_chunks(chunks_of(sup, "rand")) == 0
            assert await device.prefetch_blobs() == 0
            await device.wait_prefetch()
            await device.close()

    trio.run(main)


@pytest.mark.parametrize("limit", [0, 2 << 20])
def test_bandwidth_limit(image: Image, tmp_path: Path, limit: int) -> None:
    """4 MiB at 2 MiB/s takes about 2 s (a burst of 0.1 s is free): a correctness check of the
    limiter with a generous bound, not a benchmark."""
    sup = image.load()
    rand = chunks_of(sup, "rand")
    prefetch = PrefetchConfig(
        enable=True, threads_count=4, batch_size=0x40000, bandwidth_limit=limit
    )
    config = make_config("blobcache", tmp_path, prefetch=prefetch)
    elapsed: list[float] = []

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, FileBackend(image.blob_dir))
        async with trio.open_nursery() as nursery:
            device.start(nursery)
            started = trio.current_time()
            await device.prefetch_chunks(rand)
            await device.wait_prefetch()
            elapsed.append(trio.current_time() - started)
            assert all(device.cache_of(0).state.is_ready(c.index) for c in rand)
            if limit:
                assert device.prefetcher.bucket is not None
                assert device.prefetcher.bucket.delays > 0
            await device.close()

    trio.run(main)
    size = sum(c.compressed_size for c in rand)
    if limit:
        assert size > 4 << 20
        assert 1.5 <= elapsed[0] < 15
    else:
        assert elapsed[0] < 1.5


def test_on_demand_reads_during_prefetch(image: Image, tmp_path: Path) -> None:
    """A prefetch of 33 slow requests runs on one worker; an on-demand read in the middle is
    served at once (its own thread limiter), and the worker waits for it before its next backend
    request (``yields``)."""
    sup = image.load()
    blob = sup.blobs[0]
    rand = chunks_of(sup, "rand")
    target = rand[60]
    backend = FileBackend(image.blob_dir, delay=0.04)
    backend.delay_if = lambda _b, off, _s: 0.3 if off == target.compressed_offset else 0.0
    prefetch = PrefetchConfig(enable=True, threads_count=1, batch_size=0x20000)
    config = make_config("blobcache", tmp_path, prefetch=prefetch, batch_size=0)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        async with trio.open_nursery() as nursery:
            device.start(nursery)
            await device.prefetch_chunks(rand)
            await trio.sleep(0.2)
            started = trio.current_time()
            got = await device.read(chunk_desc(blob, target))
            took = trio.current_time() - started
            assert got == image.files["rand"][target.file_offset : target.file_offset + 0x10000]
            assert took < 1.0
            assert device.prefetcher._outstanding > 0  # prefetch is still at work
            await device.wait_prefetch()
            assert device.prefetcher.yields >= 1
            assert device.prefetcher.yield_seconds > 0
            assert all(device.cache_of(0).state.is_ready(c.index) for c in rand)
            assert await device.read(descs_for(sup, "rand")) == image.files["rand"]
            await device.close()

    trio.run(main)
    # The on-demand chunk was fetched once, by the reader; prefetch skipped it.
    assert sum(1 for off, _ in backend.data_reads(blob) if off <= target.compressed_offset
               < off + _) == 1  # fmt: skip


def test_close_stops_prefetch(image: Image, tmp_path: Path) -> None:
    sup = image.load()
    backend = FileBackend(image.blob_dir, delay=0.05)
    prefetch = PrefetchConfig(enable=True, threads_count=2, batch_size=0x20000)
    config = make_config("blobcache", tmp_path, prefetch=prefetch)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        async with trio.open_nursery() as nursery:
            device.start(nursery)
            await device.prefetch_chunks(chunks_of(sup, "rand"))
            await trio.sleep(0.12)
            with trio.fail_after(5):
                await device.close()
            await device.wait_prefetch()
        assert device.metrics.prefetch_workers == 0

    trio.run(main)
    assert len(backend.reads) < 20


def test_token_bucket_rate() -> None:
    """Virtual time: 40 requests of 64 KiB at 1 MiB/s with a 64 KiB burst take 2.4375 s."""

    async def main() -> float:
        bucket = TokenBucket(1 << 20, 0x10000)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(4):

                async def worker() -> None:
                    for _ in range(10):
                        await bucket.acquire(0x10000)

                nursery.start_soon(worker)
        return trio.current_time() - start

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert elapsed == pytest.approx(39 * 0x10000 / (1 << 20), rel=1e-6)


def test_token_bucket_charge_is_bounded() -> None:
    async def main() -> float:
        bucket = TokenBucket(1000, 100)
        bucket.charge(10**9)  # on-demand traffic: at most one second of debt
        start = trio.current_time()
        await bucket.acquire(100)
        return trio.current_time() - start

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert elapsed == pytest.approx(1.1)
