"""Single flight, backend failures and corrupt data: one fetch per chunk, errors fail only the
reads that need the bad chunk, and nothing bad is ever marked ready or returned."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from nydusfs.errors import BackendError, DigestMismatch, FormatError, NydusError
from nydusfs.storage.device import BlobDevice, ChunkInfo
from tests.cache.backend import FileBackend
from tests.cache.util import Image, chunk_desc, chunks_of, descs_for, make_config

pytestmark = pytest.mark.timeout(60)


def covers(chunk: ChunkInfo) -> Callable[[str, int, int], bool]:
    """A FileBackend switch that fires for reads covering ``chunk``."""

    def predicate(blob_id: str, offset: int, size: int) -> bool:
        return offset <= chunk.compressed_offset < offset + size

    return predicate


async def wait_for_backend(backend: FileBackend) -> None:
    while not backend.read_started.is_set():
        await trio.sleep(0.005)
    await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize("cache_type", ["blobcache", "dummycache"])
def test_concurrent_readers_share_one_fetch(image: Image, tmp_path: Path, cache_type: str) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    chunk = chunks_of(sup, "text")[3]
    expected = image.files["text"][chunk.file_offset : chunk.file_offset + chunk.uncompressed_size]
    backend = FileBackend(image.blob_dir)
    gate = backend.gate = threading.Event()
    results: list[bytes] = []

    async def main() -> None:
        device = BlobDevice(sup.blobs, make_config(cache_type, tmp_path), backend)

        async def reader(offset: int) -> None:
            results.append(
                await device.read(descs_for(sup, "text", chunk.file_offset + offset, 100))
            )

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(reader, i * 1000)
            await wait_for_backend(backend)
            assert device.cache_of(0).state.inflight_count == 1
            gate.set()
        await device.close()

    trio.run(main)
    assert sorted(results) == sorted(expected[i * 1000 : i * 1000 + 100] for i in range(8))
    assert backend.data_reads(blob) == [(chunk.compressed_offset, chunk.compressed_size)]


def test_failed_fetch_wakes_waiters_with_the_error(image: Image, tmp_path: Path) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    chunk = chunks_of(sup, "rand")[7]
    backend = FileBackend(image.blob_dir)
    gate = backend.gate = threading.Event()
    backend.fail_if = covers(chunk)
    errors: list[BackendError] = []

    async def main() -> None:
        device = BlobDevice(sup.blobs, make_config("blobcache", tmp_path), backend)

        async def reader() -> None:
            try:
                await device.read(chunk_desc(blob, chunk))
            except BackendError as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(reader)
            await wait_for_backend(backend)
            gate.set()
        assert not device.cache_of(0).state.is_ready(chunk.index)
        # The failure was one read's: the chunk is fetched again, and now works.
        backend.fail_if = None
        got = await device.read(chunk_desc(blob, chunk))
        assert got == image.files["rand"][chunk.file_offset : chunk.file_offset + 0x10000]
        await device.close()

    trio.run(main)
    assert len(errors) == 5
    assert all(e.errno == 5 for e in errors)
    assert len(backend.data_reads(blob)) == 2


def test_backend_error_fails_only_that_read(
    image: Image, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    rand = chunks_of(sup, "rand")
    bad = rand[30]
    backend = FileBackend(image.blob_dir)
    backend.fail_if = covers(bad)
    outcomes: dict[int, object] = {}

    async def main() -> None:
        device = BlobDevice(sup.blobs, make_config("blobcache", tmp_path, batch_size=0), backend)

        async def reader(i: int) -> None:
            try:
                outcomes[i] = await device.read(chunk_desc(blob, rand[i]))
            except OSError as e:
                outcomes[i] = e

        with caplog.at_level(logging.ERROR):
            async with trio.open_nursery() as nursery:
                for i in range(26, 35):
                    nursery.start_soon(reader, i)
        for i in range(26, 35):
            assert device.cache_of(0).state.is_ready(i) == (i != 30)
        await device.close()

    trio.run(main)
    for i in range(26, 35):
        if i == 30:
            assert isinstance(outcomes[i], BackendError)
        else:
            assert outcomes[i] == image.files["rand"][i * 0x10000 : (i + 1) * 0x10000]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1
    assert blob.blob_id in lines[0]
    assert f"offset {bad.compressed_offset}" in lines[0]
    assert "injected failure" in lines[0]


@pytest.mark.parametrize("name", ["rand", "text"])
def test_corrupt_bytes_with_validate(image: Image, tmp_path: Path, name: str) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    chunk = chunks_of(sup, name)[2]
    backend = FileBackend(image.blob_dir)
    backend.corrupt_if = covers(chunk)
    config = make_config("blobcache", tmp_path, validate=True, batch_size=1 << 20)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        with pytest.raises((DigestMismatch, FormatError)):
            await device.read(chunk_desc(blob, chunk))
        assert not device.cache_of(0).state.is_ready(chunk.index)
        backend.corrupt_if = None
        assert await device.read(descs_for(sup, name)) == image.files[name]
        await device.close()

    trio.run(main)


@pytest.mark.parametrize("validate", [True, False])
def test_digest_mismatch_is_reported_as_such(image: Image, tmp_path: Path, validate: bool) -> None:
    """Uncompressed chunk, flipped bytes: only the digest (validate) or the CRC can notice."""
    sup = image.load()
    blob = sup.blobs[0]
    chunk = chunks_of(sup, "rand")[4]
    backend = FileBackend(image.blob_dir)
    backend.corrupt_if = covers(chunk)
    config = make_config("blobcache", tmp_path, validate=validate)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        with pytest.raises(DigestMismatch):
            await device.read(chunk_desc(blob, chunk))
        assert not device.cache_of(0).state.is_ready(chunk.index)
        await device.close()

    trio.run(main)


@pytest.mark.parametrize("cache_type", ["blobcache", "dummycache"])
def test_corrupt_compressed_data_without_validate_does_not_crash(
    image: Image, tmp_path: Path, cache_type: str
) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    chunk = chunks_of(sup, "text")[5]
    backend = FileBackend(image.blob_dir)
    backend.corrupt_if = covers(chunk)

    async def main() -> None:
        device = BlobDevice(sup.blobs, make_config(cache_type, tmp_path), backend)
        with pytest.raises(NydusError):
            await device.read(chunk_desc(blob, chunk))
        assert not device.cache_of(0).state.is_ready(chunk.index)
        # Neighbours in the same merged request are unaffected.
        other = chunks_of(sup, "text")[6]
        want = image.files["text"][other.file_offset : other.file_offset + other.uncompressed_size]
        assert await device.read(chunk_desc(blob, other)) == want
        await device.close()

    trio.run(main)


def test_corrupted_cache_file_is_refetched_when_validating(image: Image, tmp_path: Path) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    chunk = chunks_of(sup, "rand")[12]
    want = image.files["rand"][chunk.file_offset : chunk.file_offset + 0x10000]
    backend = FileBackend(image.blob_dir)
    config = make_config("blobcache", tmp_path, validate=True, batch_size=0)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        assert await device.read(chunk_desc(blob, chunk)) == want
        with open(tmp_path / f"{blob.blob_id}.blob.data", "r+b") as f:
            f.seek(chunk.uncompressed_offset + 100)
            f.write(b"garbage")
        assert await device.read(chunk_desc(blob, chunk)) == want
        await device.close()

    trio.run(main)
    assert len(backend.data_reads(blob)) == 2


def test_cancelled_fetcher_does_not_strand_waiters(image: Image, tmp_path: Path) -> None:
    """A fetching reader cancelled while another waits on its fetch: if the backend request is
    already running it completes and the waiter gets its bytes; if it had not started, the
    waiter fetches the chunk itself."""
    sup = image.load()
    blob = sup.blobs[0]
    chunks = chunks_of(sup, "rand")[40:42]
    backend = FileBackend(image.blob_dir)
    got: list[bytes] = []

    async def main() -> None:
        device = BlobDevice(sup.blobs, make_config("blobcache", tmp_path), backend)
        device.ctx.fetch_limiter = trio.CapacityLimiter(1)

        async def fetch_then_cancel(chunk: ChunkInfo, hold_limiter: bool) -> None:
            token = object()
            if hold_limiter:
                await device.ctx.fetch_limiter.acquire_on_behalf_of(token)
            else:
                backend.read_started.clear()
                backend.gate = threading.Event()
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def fetcher() -> None:
                    with scope:
                        await device.read(chunk_desc(blob, chunk))

                async def waiter() -> None:
                    got.append(await device.read(chunk_desc(blob, chunk)))

                nursery.start_soon(fetcher)
                if hold_limiter:
                    await trio.testing.wait_all_tasks_blocked()
                else:
                    await wait_for_backend(backend)
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert device.cache_of(0).state.inflight(chunk.index) is not None
                scope.cancel()
                if hold_limiter:
                    await trio.testing.wait_all_tasks_blocked()
                    device.ctx.fetch_limiter.release_on_behalf_of(token)
                else:
                    assert backend.gate is not None
                    backend.gate.set()

        await fetch_then_cancel(chunks[0], hold_limiter=False)
        await fetch_then_cancel(chunks[1], hold_limiter=True)
        await device.close()

    trio.run(main)
    assert got == [image.files["rand"][c.file_offset : c.file_offset + 0x10000] for c in chunks]
    assert backend.chunks_read(blob, chunks_of(sup, "rand")) == {c.index for c in chunks}
