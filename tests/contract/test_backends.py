"""The backend contract, run against every registered factory, then per-backend specifics.

Contract (``BlobReader``): ``blob_size()`` is the size; ``read(offset, size)`` returns exactly
the bytes there, fewer only at the end, ``b""`` at or past it and for ``size == 0``; readers
are cached per blob and safe to share between threads; a missing blob is a ``BackendError``
that is not retryable (so it fails at once); metrics count successful reads and their bytes.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from nydusfs.config import BackendConfig, LocalDiskConfig, LocalFsConfig
from nydusfs.errors import BackendError, ConfigError, FormatError, UnsupportedError
from nydusfs.storage.backends import (
    BACKENDS,
    LAZY_BACKENDS,
    BlobBackend,
    backend_class,
    backend_types,
    new_backend,
)
from nydusfs.storage.backends.localdisk import LocalDiskBackend, read_gpt
from nydusfs.storage.backends.localfs import LocalFsBackend
from tests.contract import BackendFactory
from tests.contract.conftest import SECTOR, blob_id, make_gpt_image

pytestmark = pytest.mark.timeout(120)


# --- the contract ------------------------------------------------------------------------------


def test_blob_size(backend: BlobBackend, served: dict[str, bytes]) -> None:
    for k, data in served.items():
        assert backend.get_reader(k).blob_size() == len(data), k


def test_reader_is_cached(backend: BlobBackend, served: dict[str, bytes]) -> None:
    k = next(iter(served))
    assert backend.get_reader(k) is backend.get_reader(k)


def test_reads_at_start_middle_end(backend: BlobBackend, served: dict[str, bytes]) -> None:
    for k, data in served.items():
        reader = backend.get_reader(k)
        n = len(data)
        for offset, size in [(0, 1), (0, 4096), (n // 2, 777), (max(0, n - 100), 100), (n - 1, 1)]:
            if offset < 0:
                continue
            assert reader.read(offset, size) == data[offset : offset + size], (k, offset, size)


def test_whole_blob_in_one_read(backend: BlobBackend, served: dict[str, bytes]) -> None:
    for k, data in served.items():
        assert backend.get_reader(k).read(0, len(data) or 1) == data, k


def test_read_past_end_is_short(backend: BlobBackend, served: dict[str, bytes]) -> None:
    for k, data in served.items():
        reader = backend.get_reader(k)
        n = len(data)
        if n >= 10:
            assert reader.read(n - 10, 100) == data[-10:], k
        assert reader.read(n, 10) == b"", k
        assert reader.read(n + 4096, 10) == b"", k


def test_zero_size_read(backend: BlobBackend, served: dict[str, bytes]) -> None:
    for k in served:
        assert backend.get_reader(k).read(0, 0) == b""


def test_concurrent_reads(backend: BlobBackend, served: dict[str, bytes]) -> None:
    ids = sorted(served, key=lambda k: -len(served[k]))[:3]
    failures: list[str] = []
    barrier = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for _ in range(25):
            k = rng.choice(ids)
            data = served[k]
            offset = rng.randrange(0, max(1, len(data)))
            size = rng.randrange(1, 256 << 10)
            got = backend.get_reader(k).read(offset, size)
            if got != data[offset : offset + size]:
                failures.append(f"{k[:12]} @{offset}+{size}: got {len(got)} bytes")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]


def test_missing_blob_fails_fast(backend: BlobBackend) -> None:
    missing = blob_id(b"this blob was never stored")
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        backend.get_reader(missing).read(0, 10)
    assert not info.value.retryable, info.value
    assert time.monotonic() - started < 10
    assert missing[:12] in str(info.value)


def test_blob_id_cannot_escape(backend: BlobBackend, served: dict[str, bytes]) -> None:
    k = next(iter(served))
    for bad in (f"../{k}", f"x/../../{k}", "..", f"/{k}"):
        with pytest.raises(BackendError):
            backend.get_reader(bad).read(0, 1)


def test_metrics_count_reads(
    backend: BlobBackend, backend_factory: BackendFactory, served: dict[str, bytes]
) -> None:
    k = max(served, key=lambda k: len(served[k]))
    reader = backend.get_reader(k)
    before = backend.metrics.to_dict()
    sizes = [1, 4096, 100_000]
    for size in sizes:
        reader.read(0, size)
    after = backend.metrics.to_dict()
    assert after["backend_type"] == backend.type
    assert after["read_count"] - before["read_count"] == len(sizes)
    assert after["read_amount_total"] - before["read_amount_total"] == sum(sizes)
    assert sum(after["read_count_block_size_dist"]) - sum(
        before["read_count_block_size_dist"]
    ) == len(sizes)
    assert after["read_errors"] == before["read_errors"]


# --- registry of types -------------------------------------------------------------------------


def test_backend_types_and_lazy_loading() -> None:
    assert backend_types() == sorted(
        ["localfs", "localdisk", "http-proxy", "registry", "s3", "oss"]
    )
    assert BACKENDS["localfs"] is LocalFsBackend
    for name in LAZY_BACKENDS:
        try:
            cls = backend_class(name)
        except UnsupportedError:
            continue  # that backend is not written yet
        assert issubclass(cls, BlobBackend) and cls.type == name
        assert name in BACKENDS  # cached after the first lookup
    with pytest.raises(ConfigError, match="unknown backend type 'ftp'"):
        backend_class("ftp")


def test_new_backend_builds_from_config(tmp_path: Path) -> None:
    (tmp_path / "b1").write_bytes(b"hello")
    backend = new_backend(BackendConfig("localfs", LocalFsConfig(dir=str(tmp_path))), "m1")
    try:
        assert isinstance(backend, LocalFsBackend) and backend.id == "m1"
        assert backend.get_reader("b1").read(1, 3) == b"ell"
    finally:
        backend.close()
    with pytest.raises(ConfigError):
        new_backend(BackendConfig("localfs", LocalDiskConfig(device_path="/dev/null")))


# --- localfs -----------------------------------------------------------------------------------


def test_localfs_blob_file_serves_every_id(tmp_path: Path) -> None:
    pinned = tmp_path / "the-blob"
    pinned.write_bytes(b"pinned data")
    backend = LocalFsBackend(LocalFsConfig(blob_file=str(pinned), dir=str(tmp_path / "nope")))
    try:
        for k in ("a", blob_id(b"x")):
            assert backend.get_reader(k).read(0, 100) == b"pinned data"
    finally:
        backend.close()


def test_localfs_alt_dirs_order(tmp_path: Path) -> None:
    d, a1, a2 = (tmp_path / n for n in ("d", "a1", "a2"))
    for p in (d, a1, a2):
        p.mkdir()
    (d / "empty-first").write_bytes(b"")
    (a2 / "empty-first").write_bytes(b"real")
    (a1 / "first-alt").write_bytes(b"one")
    (a2 / "first-alt").write_bytes(b"two")
    (d / "only-empty").write_bytes(b"")
    backend = LocalFsBackend(LocalFsConfig(dir=str(d), alt_dirs=[str(a1), str(a2)]))
    try:
        assert backend.blob_path("empty-first") == str(a2 / "empty-first")
        assert backend.blob_path("first-alt") == str(a1 / "first-alt")
        assert backend.get_reader("only-empty").blob_size() == 0
        with pytest.raises(BackendError, match=r"not found \(looked for .*/d/x, .*/a1/x"):
            backend.blob_path("x")
    finally:
        backend.close()


def test_localfs_keeps_its_descriptor(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"before")
    backend = LocalFsBackend(LocalFsConfig(dir=str(tmp_path)))
    try:
        reader = backend.get_reader("b")
        assert reader.read(0, 6) == b"before"
        os.unlink(tmp_path / "b")
        assert reader.read(0, 6) == b"before"  # still the file that was opened
        assert backend.get_reader("b") is reader
    finally:
        backend.close()


def test_localfs_needs_dir_or_blob_file() -> None:
    with pytest.raises(ConfigError, match="blob_file or dir"):
        LocalFsBackend(LocalFsConfig())


# --- localdisk ---------------------------------------------------------------------------------


@pytest.fixture
def gpt_blobs() -> dict[str, bytes]:
    rng = random.Random(7)
    return {blob_id(d): d for d in (rng.randbytes(n) for n in (700, 5000, SECTOR))}


def _corrupt(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_localdisk_names_are_name_plus_guid(tmp_path: Path, gpt_blobs: dict[str, bytes]) -> None:
    image = tmp_path / "disk.img"
    offsets = make_gpt_image(image, gpt_blobs)
    fd = os.open(image, os.O_RDONLY)
    try:
        _, parts = read_gpt(fd, image.stat().st_size)
    finally:
        os.close(fd)
    assert {p.blob_id: p.offset for p in parts} == offsets
    for p in parts:
        assert p.name == p.blob_id[:32] and p.part_guid.hex == p.blob_id[32:]
    backend = LocalDiskBackend(LocalDiskConfig(device_path=str(image)))
    try:
        assert not backend.legacy_gpt
        k = next(iter(gpt_blobs))
        with pytest.raises(BackendError):  # only legacy partitions match by prefix
            backend.get_reader(k[:32]).blob_size()
    finally:
        backend.close()


def test_localdisk_legacy_prefix_lookup(tmp_path: Path, gpt_blobs: dict[str, bytes]) -> None:
    image = tmp_path / "disk.img"
    make_gpt_image(image, gpt_blobs, legacy=True)
    backend = LocalDiskBackend(LocalDiskConfig(device_path=str(image)))
    try:
        assert backend.legacy_gpt
        for k, v in gpt_blobs.items():
            assert backend.get_reader(k).read(0, len(v)) == v  # full id -> 32-char prefix
            assert backend.get_reader(k[:32]).read(0, len(v)) == v
        with pytest.raises(BackendError):
            backend.get_reader(next(iter(gpt_blobs))[:31]).blob_size()
        with pytest.raises(BackendError, match="legacy GPT mode"):
            backend.add_blob("extra", 0, 512)
    finally:
        backend.close()


def test_localdisk_falls_back_to_backup_gpt(tmp_path: Path, gpt_blobs: dict[str, bytes]) -> None:
    image = tmp_path / "disk.img"
    make_gpt_image(image, gpt_blobs)
    _corrupt(image, SECTOR + 40)  # primary header: first usable LBA -> header CRC mismatch
    _corrupt(image, 2 * SECTOR + 60)  # primary entry array too
    backend = LocalDiskBackend(LocalDiskConfig(device_path=str(image)))
    try:
        for k, v in gpt_blobs.items():
            assert backend.get_reader(k).read(0, len(v)) == v
    finally:
        backend.close()


def test_localdisk_rejects_bad_tables(tmp_path: Path, gpt_blobs: dict[str, bytes]) -> None:
    image = tmp_path / "disk.img"
    make_gpt_image(image, gpt_blobs)
    size = image.stat().st_size
    _corrupt(image, 2 * SECTOR + 60)  # primary entries
    _corrupt(image, size - 33 * SECTOR + 60)  # backup entries (32 sectors before the header)
    with pytest.raises(FormatError, match=r"no valid GPT.*CRC mismatch"):
        LocalDiskBackend(LocalDiskConfig(device_path=str(image)))
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * 8192)
    with pytest.raises(FormatError, match="no 'EFI PART' signature"):
        LocalDiskBackend(LocalDiskConfig(device_path=str(plain)))
    with pytest.raises(ConfigError, match="cannot open"):
        LocalDiskBackend(LocalDiskConfig(device_path=str(tmp_path / "missing")))


def test_localdisk_duplicate_blob_ids(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    same = "0123456789abcdef" * 2
    make_gpt_image(image, {same + "a": b"1", same + "b": b"2"}, legacy=True)
    with pytest.raises(FormatError, match="two partitions hold blob"):
        LocalDiskBackend(LocalDiskConfig(device_path=str(image)))


def test_localdisk_disable_gpt(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(10_000)
    image = tmp_path / "blob.img"
    image.write_bytes(data)
    backend = LocalDiskBackend(LocalDiskConfig(device_path=str(image), disable_gpt=True))
    try:
        # Any id not added explicitly is the whole device.
        for k in (blob_id(data), "whatever"):
            reader = backend.get_reader(k)
            assert reader.blob_size() == len(data)
            assert reader.read(9_990, 100) == data[9_990:]
        backend.add_blob("part", 4096, 4096)
        assert backend.get_reader("part").read(0, 8192) == data[4096:8192]
        with pytest.raises(BackendError, match="already exists"):
            backend.add_blob("part", 0, 1)
        with pytest.raises(BackendError, match="does not fit"):
            backend.add_blob("big", 8192, 4096)
    finally:
        backend.close()
