"""BlobDevice reads through blobcache and dummycache: data, cache hits, on-disk layout, restart,
merging and amplification."""

from __future__ import annotations

import errno
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.rafs.fs import RafsFs
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage import compress
from nydusfs.storage.cache.chunkmap import HEADER_SIZE, MAGIC1, MAGIC2, MAGIC_ALL_READY
from nydusfs.storage.cache.filecache import FileCache
from nydusfs.storage.device import BlobDevice
from nydusfs.storage.meta import compressed_data_size, load_blob_meta, pack_blob_meta_file
from tests.cache.backend import FileBackend
from tests.cache.util import Image, chunk_desc, chunks_of, descs_for, make_config

pytestmark = pytest.mark.timeout(60)

MODES = [
    pytest.param("blobcache", False, id="blobcache"),
    pytest.param("blobcache", True, id="blobcache-compressed"),
    pytest.param("dummycache", False, id="dummycache"),
]


@pytest.mark.parametrize(("cache_type", "compressed"), MODES)
@pytest.mark.parametrize("batch_size", [0, 1 << 20])
def test_cold_then_warm_reads_equal_source(
    image: Image, tmp_path: Path, cache_type: str, compressed: bool, batch_size: int
) -> None:
    sup = image.load()
    backend = FileBackend(image.blob_dir)
    config = make_config(
        cache_type, tmp_path / "cache", compressed=compressed, batch_size=batch_size
    )

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        for name, data in image.files.items():
            assert await device.read(descs_for(sup, name)) == data, name
        # Unaligned pieces, across chunk boundaries, served warm (or again from the backend).
        for name, data in image.files.items():
            for offset, size in ((1, 100), (0x10000 - 7, 20), (12345, 200_000), (len(data) - 3, 3)):
                got = await device.read(descs_for(sup, name, offset, size))
                assert got == data[offset : offset + size], (name, offset, size)
        await device.close()

    trio.run(main)


def test_warm_read_hits_cache_without_backend(image: Image, tmp_path: Path) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    backend = FileBackend(image.blob_dir)
    config = make_config("blobcache", tmp_path, batch_size=0)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        assert await device.read(descs_for(sup, "text")) == image.files["text"]
        cold = len(backend.data_reads(blob))
        assert cold == 1  # ten adjacent chunks, one ranged request
        assert device.metrics.whole_hits == 0
        assert (
            await device.read(descs_for(sup, "text", 1000, 300_000))
            == (image.files["text"][1000:301_000])
        )
        assert len(backend.data_reads(blob)) == cold
        assert device.metrics.whole_hits == 1
        assert device.backend.metrics.read_count == cold
        # Half warm: the text chunks are cached, small's chunk is not.
        iovec = descs_for(sup, "text", 0, 10) + descs_for(sup, "small")
        assert await device.read(iovec) == image.files["text"][:10] + image.files["small"]
        assert device.metrics.partial_hits == 1
        assert device.metrics.total == 3
        assert device.metrics.entries_count == 11
        await device.close()

    trio.run(main)


def test_blob_data_layout(image: Image, tmp_path: Path) -> None:
    """``.blob.data``: sparse, uncompressed_size bytes, each chunk at its uncompressed offset."""
    sup = image.load()
    blob = sup.blobs[0]
    config = make_config("blobcache", tmp_path, batch_size=1 << 20)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, FileBackend(image.blob_dir))
        for name in image.files:
            await device.read(descs_for(sup, name))
        assert device.metrics.data_all_ready
        # The CI array, as amplification and blob prefetch load it: kept in .blob.meta.
        assert await device.cache_of(0).entries()
        await device.close()

    trio.run(main)
    data_file = tmp_path / f"{blob.blob_id}.blob.data"
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"{blob.blob_id}{suffix}" for suffix in (".blob.data", ".blob.data.chunk_map", ".blob.meta")
    )
    assert data_file.stat().st_size == blob.uncompressed_size
    cached = data_file.read_bytes()
    for name, data in image.files.items():
        for c in chunks_of(sup, name):
            piece = cached[c.uncompressed_offset : c.uncompressed_offset + c.uncompressed_size]
            assert piece == data[c.file_offset : c.file_offset + c.uncompressed_size]
    with open(image.blob_dir / blob.blob_id, "rb") as f:
        meta = load_blob_meta(blob, lambda off, size: os.pread(f.fileno(), size, off))
    assert (tmp_path / f"{blob.blob_id}.blob.meta").read_bytes() == pack_blob_meta_file(meta)
    header = (tmp_path / f"{blob.blob_id}.blob.data.chunk_map").read_bytes()
    assert len(header) == HEADER_SIZE + (blob.chunk_count + 7) // 8
    # Every chunk was read, so the map says "all ready" in its header as well as in its bits.
    assert struct.unpack_from("<IIII", header) == (MAGIC1, 1, MAGIC2, MAGIC_ALL_READY)
    assert header[HEADER_SIZE:-1] == b"\xff" * (len(header) - HEADER_SIZE - 1)


def test_blob_raw_layout(image: Image, tmp_path: Path) -> None:
    """``.blob.raw``: the blob's chunk data as stored, each chunk at its compressed offset,
    inflated again on every read."""
    sup = image.load()
    blob = sup.blobs[0]
    config = make_config("blobcache", tmp_path, compressed=True, batch_size=0)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, FileBackend(image.blob_dir))
        assert await device.read(descs_for(sup, "text")) == image.files["text"]
        assert await device.read(descs_for(sup, "text")) == image.files["text"]
        await device.close()

    trio.run(main)
    raw = (tmp_path / f"{blob.blob_id}.blob.raw").read_bytes()
    assert not (tmp_path / f"{blob.blob_id}.blob.data").exists()
    assert len(raw) == compressed_data_size(blob)
    source = (image.blob_dir / blob.blob_id).read_bytes()
    for c in chunks_of(sup, "text"):
        assert c.is_compressed
        stored = raw[c.compressed_offset : c.compressed_offset + c.compressed_size]
        assert stored == source[c.compressed_offset : c.compressed_offset + c.compressed_size]
        inflated = compress.decompress(blob.compressor, stored, c.uncompressed_size)
        assert inflated == image.files["text"][c.file_offset : c.file_offset + c.uncompressed_size]
    # Chunks never fetched are holes (zeros) in the sparse file.
    rand0 = chunks_of(sup, "rand")[5]
    assert raw[rand0.compressed_offset : rand0.compressed_offset + 16] == bytes(16)


def test_chunk_map_bit_order(image: Image, tmp_path: Path) -> None:
    """Chunk i is bit 7 - i % 8 of byte i // 8 (upstream: set_ready(3) gives 0b0001_0000)."""
    sup = image.load()
    blob = sup.blobs[0]
    rand = chunks_of(sup, "rand")
    config = make_config("blobcache", tmp_path, batch_size=0)
    path = tmp_path / f"{blob.blob_id}.blob.data.chunk_map"

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, FileBackend(image.blob_dir))
        assert rand[3].index == 3 and rand[9].index == 9
        await device.read(chunk_desc(blob, rand[3]))
        bitmap = path.read_bytes()[HEADER_SIZE:]
        assert bitmap[:2] == b"\x10\x00"
        await device.read(chunk_desc(blob, rand[9]))
        await device.read(chunk_desc(blob, rand[0]))
        bitmap = path.read_bytes()[HEADER_SIZE:]
        assert bitmap[:2] == b"\x90\x40"
        assert struct.unpack_from("<IIII", path.read_bytes()) == (MAGIC1, 1, MAGIC2, 0)
        await device.close()

    trio.run(main)


@pytest.mark.parametrize("compressed", [False, True])
def test_restart_fetches_only_missing_chunks(
    image: Image, tmp_path: Path, compressed: bool
) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    rand = chunks_of(sup, "rand")
    config = make_config("blobcache", tmp_path, compressed=compressed, batch_size=0)
    first = FileBackend(image.blob_dir)

    async def before() -> None:
        device = BlobDevice(sup.blobs, config, first)
        assert (
            await device.read(descs_for(sup, "rand", 0, 10 * 0x10000))
            == (image.files["rand"][: 10 * 0x10000])
        )
        await device.close()

    trio.run(before)
    assert first.chunks_read(blob, rand) == set(range(10))
    second = FileBackend(image.blob_dir)

    async def after() -> None:
        device = BlobDevice(sup.blobs, config, second)
        assert device.metrics.entries_count == 10
        assert (
            await device.read(descs_for(sup, "rand", 0, 10 * 0x10000))
            == (image.files["rand"][: 10 * 0x10000])
        )
        assert second.reads == []
        assert device.metrics.whole_hits == 1
        assert await device.read(descs_for(sup, "rand")) == image.files["rand"]
        await device.close()

    trio.run(after)
    assert second.chunks_read(blob, rand) == {c.index for c in rand[10:]}


def test_switching_compressed_mode_starts_afresh(image: Image, tmp_path: Path) -> None:
    """The chunk map is shared by name between modes (as upstream), so a mode switch must not
    trust bits that describe the other file."""
    sup = image.load()
    blob = sup.blobs[0]

    async def read(compressed: bool, backend: FileBackend) -> None:
        config = make_config("blobcache", tmp_path, compressed=compressed, batch_size=0)
        device = BlobDevice(sup.blobs, config, backend)
        assert await device.read(descs_for(sup, "text")) == image.files["text"]
        await device.close()

    trio.run(read, True, FileBackend(image.blob_dir))
    again = FileBackend(image.blob_dir)
    trio.run(read, False, again)
    assert len(again.data_reads(blob)) == 1
    assert not (tmp_path / f"{blob.blob_id}.blob.raw").exists()


def test_merging_adjacent_missing_chunks(image: Image, tmp_path: Path) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    rand = chunks_of(sup, "rand")[10:18]  # 8 adjacent 64 KiB chunks

    async def one_read(batch_size: int, workdir: Path) -> FileBackend:
        backend = FileBackend(image.blob_dir)
        device = BlobDevice(
            sup.blobs, make_config("blobcache", workdir, batch_size=batch_size), backend
        )
        await device.read([d for c in rand for d in chunk_desc(blob, c)])
        await device.close()
        return backend

    async def separate_reads(batch_size: int, workdir: Path) -> FileBackend:
        backend = FileBackend(image.blob_dir)
        device = BlobDevice(
            sup.blobs, make_config("blobcache", workdir, batch_size=batch_size), backend
        )
        for c in rand:
            await device.read(chunk_desc(blob, c))
        await device.close()
        return backend

    # One read of N missing chunks with a large batch: one request, exactly the chunks' range
    # (a lone read with no file hint and no stream behind it is not amplified).
    backend = trio.run(one_read, 1 << 20, tmp_path / "a")
    assert backend.data_reads(blob) == [(rand[0].compressed_offset, 8 * 0x10000)]
    # batch_size 0: no amplification, so N separate reads make N requests ...
    backend = trio.run(separate_reads, 0, tmp_path / "b")
    assert backend.data_reads(blob) == [(c.compressed_offset, c.compressed_size) for c in rand]
    # ... while one read of N adjacent chunks is still one request, of exactly those chunks.
    backend = trio.run(one_read, 0, tmp_path / "c")
    assert backend.data_reads(blob) == [(rand[0].compressed_offset, 8 * 0x10000)]
    # A batch smaller than the read splits it (128 KiB is the floor, as upstream).
    backend = trio.run(one_read, 0x20000, tmp_path / "d")
    assert len(backend.data_reads(blob)) == 4


def test_amplification_stays_within_the_file(image: Image, tmp_path: Path) -> None:
    """A lone read fetches the file's following chunks up to the batch size (``hint``, as
    RAFS passes it), never the chunks of whatever file is stored next."""
    sup = image.load()
    blob = sup.blobs[0]
    rand = chunks_of(sup, "rand")
    backend = FileBackend(image.blob_dir)
    config = make_config("blobcache", tmp_path, batch_size=0x40000)  # 4 chunks

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        await device.read(descs_for(sup, "rand", 20 * 0x10000, 100), rand[21:])
        assert backend.chunks_read(blob, rand) == {20, 21, 22, 23}
        for i in (21, 22, 23):
            assert device.cache_of(0).state.is_ready(i)
        await device.read(descs_for(sup, "rand", 21 * 0x10000, 3 * 0x10000), rand[24:])
        assert len(backend.data_reads(blob)) == 1
        # Amplification stops at the first ready chunk: reading 19 fetches only 19.
        await device.read(descs_for(sup, "rand", 19 * 0x10000, 10), rand[20:])
        assert backend.data_reads(blob)[-1] == (rand[19].compressed_offset, 0x10000)
        # The last chunk of rand, read alone, does not pull in the file stored after it.
        last = rand[-1]
        await device.read(descs_for(sup, "rand", last.file_offset, 10), [])
        assert backend.data_reads(blob)[-1] == (last.compressed_offset, last.compressed_size)
        await device.close()

    trio.run(main)


def _many_files(tmp_path: Path, count: int = 24) -> tuple[RafsSuper, Path, list[str]]:
    """An image of ``count`` files of 1-3 chunks (64 KiB), and their names in blob order."""
    rng = random.Random(3)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(count):
        size = rng.randint(1, 3) * 0x10000 + rng.randint(0, 5000)
        (src / f"f{i:02}").write_bytes(rng.randbytes(size))
    (tmp_path / "blobs").mkdir()
    build(BuildOptions(source=str(src), bootstrap=str(tmp_path / "boot"),
                       blob_dir=str(tmp_path / "blobs"), chunk_size=0x10000))  # fmt: skip
    sup = RafsSuper.load(tmp_path / "boot")
    names = sorted(os.listdir(src), key=lambda n: sup.lookup_path("/" + n).chunks()[0].index)
    return sup, src, names


async def _read_whole(device: BlobDevice, sup: RafsSuper, src: Path, name: str) -> None:
    """Read ``name`` in one piece, with the hint RAFS gives, and check its bytes."""
    node = sup.lookup_path("/" + name)
    hint = RafsFs(sup, None)._following(node, node.size)
    assert await device.read(descs_for(sup, name), hint) == (src / name).read_bytes()


def test_reading_file_after_file_reads_ahead(tmp_path: Path) -> None:
    """Files read one after another in blob order form one stream: once it has crossed a few
    files, misses amplify into the blob and read-ahead fetches what follows, in the background,
    before anyone reads it. Reading two neighbours is not enough to start that."""
    sup, src, names = _many_files(tmp_path)
    blob = sup.blobs[0]
    backend = FileBackend(tmp_path / "blobs")
    config = make_config("blobcache", tmp_path / "cache", batch_size=0x40000)

    def fetched(name: str) -> set[int]:
        chunks = chunks_of(sup, name)
        return backend.chunks_read(blob, chunks) & {c.index for c in chunks}

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        async with trio.open_nursery() as nursery:
            device.start(nursery)
            for name in names[:2]:  # two neighbours: no read-ahead past them
                await _read_whole(device, sup, src, name)
            # Read-ahead claims its chunks before the read returns: none is claimed or fetched.
            state = device.cache_of(0).state
            third = chunks_of(sup, names[2])
            assert not any(state.inflight(c.index) or state.is_ready(c.index) for c in third)
            assert not fetched(names[2])
            for name in names[2:5]:  # the stream now spans files
                await _read_whole(device, sup, src, name)
            await device.close()
        ahead = [n for n in names[5:] if fetched(n)]
        assert ahead and ahead[0] == names[5]
        # The read-ahead went out as few large requests, not chunk by chunk.
        assert len(backend.data_reads(blob)) < 12

    trio.run(main)


def test_failed_read_ahead_fails_no_reader(tmp_path: Path) -> None:
    """Read-ahead is a guess: when its requests fail, readers fetch for themselves."""
    sup, src, names = _many_files(tmp_path)
    backend = FileBackend(tmp_path / "blobs")
    failed: list[int] = []

    def fail_large(blob_id: str, offset: int, size: int) -> bool:
        if size > 0x40000:  # larger than any on-demand request at this batch size
            failed.append(offset)
            return True
        return False

    backend.fail_if = fail_large
    config = make_config("blobcache", tmp_path / "cache", batch_size=0x40000)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        async with trio.open_nursery() as nursery:
            device.start(nursery)
            for name in names:
                await _read_whole(device, sup, src, name)
            await device.close()

    trio.run(main)
    assert failed  # read-ahead was tried, and failed


def test_deduplicated_chunks_read_once(image: Image, tmp_path: Path) -> None:
    """``dup`` shares its two chunks with ``rand``: reading one warms the other."""
    sup = image.load()
    blob = sup.blobs[0]
    backend = FileBackend(image.blob_dir)

    async def main() -> None:
        device = BlobDevice(sup.blobs, make_config("blobcache", tmp_path), backend)
        assert await device.read(descs_for(sup, "dup")) == image.files["dup"]
        assert await device.read(descs_for(sup, "rand", 0, 0x20000)) == image.files["dup"]
        # The same chunk twice in one iovec.
        twice = descs_for(sup, "dup", 0, 10) + descs_for(sup, "rand", 5, 10)
        assert await device.read(twice) == image.files["dup"][:10] + image.files["rand"][5:15]
        await device.close()

    trio.run(main)
    assert len(backend.data_reads(blob)) == 1


def test_bad_descriptors(image: Image, tmp_path: Path) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    chunk = chunks_of(sup, "small")[0]
    from nydusfs.storage.device import BlobIoDesc

    async def main() -> None:
        device = BlobDevice(
            sup.blobs, make_config("blobcache", tmp_path), FileBackend(image.blob_dir)
        )
        assert await device.read([]) == b""
        assert await device.read([BlobIoDesc(blob, chunk, 5, 0)]) == b""
        with pytest.raises(OSError) as err:
            await device.read([BlobIoDesc(blob, chunk, 10, chunk.uncompressed_size)])
        assert err.value.errno == 22
        await device.close()
        with pytest.raises(OSError):
            await device.read(chunk_desc(blob, chunk))

    trio.run(main)


def test_localfs_backend(image: Image, tmp_path: Path) -> None:
    """The real localfs backend."""
    from nydusfs.config import BackendConfig, LocalFsConfig
    from nydusfs.storage.backends import new_backend

    sup = image.load()
    backend = new_backend(BackendConfig("localfs", LocalFsConfig(dir=str(image.blob_dir))), "t")

    async def main() -> None:
        config = make_config("blobcache", tmp_path, batch_size=1 << 20)
        device = BlobDevice(sup.blobs, config, backend)
        for name, data in image.files.items():
            assert await device.read(descs_for(sup, name)) == data
        count = backend.metrics.read_count
        for name, data in image.files.items():
            assert await device.read(descs_for(sup, name)) == data
        assert backend.metrics.read_count == count
        await device.close()

    trio.run(main)
    backend.close()


def test_warm_reads_from_the_page_cache_skip_the_worker_thread(
    image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ready data in the page cache is read on the trio thread (preadv2 RWF_NOWAIT); when that
    would block, the read goes to a worker thread as before."""
    sup = image.load()
    backend = FileBackend(image.blob_dir)
    config = make_config("blobcache", tmp_path, batch_size=0)
    want = image.files["text"][100:200_100]
    threaded: list[int] = []
    real_read_ranges = FileCache._read_ranges

    def counting(self: FileCache, ranges: list[tuple[int, int]]) -> list[bytes]:
        threaded.append(len(ranges))
        return real_read_ranges(self, ranges)

    monkeypatch.setattr(FileCache, "_read_ranges", counting)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        await device.read(descs_for(sup, "text"))  # cold: fetched and written
        assert await device.read(descs_for(sup, "text", 100, 200_000)) == want
        assert threaded == []
        with monkeypatch.context() as m:

            def would_block(*args: object) -> int:
                raise BlockingIOError(errno.EAGAIN, "would block")

            m.setattr(os, "preadv", would_block)
            assert await device.read(descs_for(sup, "text", 100, 200_000)) == want
        assert threaded
        await device.close()

    trio.run(main)


def test_written_chunks_are_marked_in_the_chunk_map_only_once_synced(
    image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetched chunk reads as ready as soon as it is written, but its bit in the chunk map
    (what a restart trusts) is set only after the data file is synced; a failed sync forgets
    the chunk, so it is fetched again."""
    sup = image.load()
    blob = sup.blobs[0]
    backend = FileBackend(image.blob_dir)
    config = make_config("blobcache", tmp_path, batch_size=0)
    (text0,) = chunks_of(sup, "text")[:1]
    syncs: list[int] = []
    real_sync = FileCache._sync_data

    def counting_sync(self: FileCache) -> None:
        syncs.append(1)
        real_sync(self)

    monkeypatch.setattr(FileCache, "_sync_data", counting_sync)

    async def main() -> None:
        device = BlobDevice(sup.blobs, config, backend)
        async with trio.open_nursery() as nursery:
            device.start(nursery)
            cache = device.cache_of(0)
            await device.read(descs_for(sup, "text", 0, 10))
            await _until(lambda: cache.state.is_ready(text0.index))  # written in the background
            assert not cache.state.base.is_ready(text0.index)
            assert syncs == []
            await device.read(descs_for(sup, "text", 0, 10))  # from the file, not the backend
            assert len(backend.data_reads(blob)) == 1
            await cache.sync()
            assert syncs == [1] and cache.state.base.is_ready(text0.index)
            # A sync that fails: the chunk is forgotten, and the next read fetches it again.
            small = chunks_of(sup, "small")[0]
            await device.read(descs_for(sup, "small"))
            await _until(lambda: cache.state.is_ready(small.index))
            with monkeypatch.context() as m:

                def failing(self: FileCache) -> None:
                    raise OSError(errno.EIO, "injected")

                m.setattr(FileCache, "_sync_data", failing)
                await cache.sync()
            assert not cache.state.is_ready(small.index)
            assert await device.read(descs_for(sup, "small")) == image.files["small"]
            assert len(backend.data_reads(blob)) == 3
            await device.close()

    trio.run(main)


async def _until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.01)
