"""nydusfs.storage.compress and nydusfs.storage.digest: upstream's rules and hostile input."""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import os
import zlib

import blake3
import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydusfs.errors import FormatError
from nydusfs.storage import compress, digest
from nydusfs.types import Compressor, Digester

ALL = list(Compressor)
CODECS = [Compressor.LZ4_BLOCK, Compressor.ZSTD, Compressor.GZIP]


@given(algo=st.sampled_from(ALL), data=st.binary(max_size=20_000))
def test_round_trip(algo: Compressor, data: bytes) -> None:
    payload, compressed = compress.compress(algo, data)
    if compressed:
        assert len(payload) < len(data)
        assert compress.decompress(algo, payload, len(data)) == data
    else:
        assert payload is data
        assert compress.decompress(Compressor.NONE, payload, len(data)) == data


@pytest.mark.parametrize("algo", CODECS)
def test_compressible_data_is_compressed(algo: Compressor) -> None:
    data = b"nydus " * 10_000
    payload, compressed = compress.compress(algo, data)
    assert compressed and len(payload) < len(data) // 10


@pytest.mark.parametrize("algo", ALL)
def test_incompressible_and_empty_data_stay_raw(algo: Compressor) -> None:
    data = os.urandom(4096)
    assert compress.compress(algo, data) == (data, False)
    assert compress.compress(algo, b"") == (b"", False)


class _FixedOutput:
    def __init__(self, delta: int) -> None:
        self.delta = delta

    def compress(self, data: bytes) -> bytes:
        return b"z" * (len(data) + self.delta)


@pytest.mark.parametrize(("delta", "kept"), [(-1, True), (0, False), (1, False)])
def test_keep_only_if_strictly_smaller(
    monkeypatch: pytest.MonkeyPatch, delta: int, kept: bool
) -> None:
    # COMPRESSION_MINIMUM_RATIO is 100: a result as long as its input is thrown away.
    monkeypatch.setattr(compress, "_zstd_compressor", lambda: _FixedOutput(delta))
    data = b"q" * 1000
    payload, compressed = compress.compress(Compressor.ZSTD, data)
    assert compressed is kept
    assert payload == (b"z" * 999 if kept else data)


def test_formats_match_upstream_codecs() -> None:
    data = b"0123456789abcdef" * 512
    lz4_payload, _ = compress.compress(Compressor.LZ4_BLOCK, data)
    # Raw block, no size prefix: exactly what LZ4_compress_default produces.
    assert lz4_payload == lz4.block.compress(data, mode="default", store_size=False)
    zstd_payload, _ = compress.compress(Compressor.ZSTD, data)
    assert zstd_payload == zstandard.ZstdCompressor(level=3).compress(data)
    params = zstandard.get_frame_parameters(zstd_payload)
    assert params.content_size == len(data) and not params.has_checksum
    gz_payload, _ = compress.compress(Compressor.GZIP, data)
    assert gzip.decompress(gz_payload) == data
    assert gz_payload[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@pytest.mark.parametrize("algo", ALL)
def test_wrong_size_is_format_error(algo: Compressor) -> None:
    data = b"abc" * 1000
    payload, compressed = compress.compress(algo, data)
    if not compressed:
        algo = Compressor.NONE
    for size in (len(data) - 1, len(data) + 1, 0):
        with pytest.raises(FormatError):
            compress.decompress(algo, payload, size)
    with pytest.raises(FormatError):
        compress.decompress(algo, payload, -1)


@pytest.mark.parametrize("algo", CODECS)
def test_trailing_and_truncated_payloads(algo: Compressor) -> None:
    data = b"xyz" * 1000
    payload, _ = compress.compress(algo, data)
    with pytest.raises(FormatError):
        compress.decompress(algo, payload[:-3], len(data))
    if algo is Compressor.GZIP:
        # A generous window past the member is fine (stargz readers over-read on purpose).
        assert compress.decompress(algo, payload + b"junk", len(data)) == data
    else:
        with pytest.raises(FormatError):
            compress.decompress(algo, payload + b"\0", len(data))


def test_zstd_lying_content_size_is_rejected_before_allocating() -> None:
    frame = bytearray(zstandard.ZstdCompressor(level=3).compress(b"a" * 300))
    # Single-segment frame with a 2-byte content size field: claim 65535 + 256 bytes instead.
    assert frame[4] & 0xC0 == 0x40 and frame[4] & 0x20
    frame[5:7] = b"\xff\xff"
    with pytest.raises(FormatError):
        compress.decompress(Compressor.ZSTD, bytes(frame), 300)


def test_zstd_without_content_size_is_bounded() -> None:
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=False)
    frame = cctx.compress(b"b" * 100_000)
    assert compress.decompress(Compressor.ZSTD, frame, 100_000) == b"b" * 100_000
    with pytest.raises(FormatError):
        compress.decompress(Compressor.ZSTD, frame, 1000)


def test_zstd_checksummed_frame_and_two_frames() -> None:
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    frame = cctx.compress(b"c" * 5000)
    assert compress.decompress(Compressor.ZSTD, frame, 5000) == b"c" * 5000
    with pytest.raises(FormatError):
        compress.decompress(Compressor.ZSTD, frame + frame, 10_000)


def test_lz4_empty_block() -> None:
    assert compress.decompress(Compressor.LZ4_BLOCK, b"\x00", 0) == b""
    with pytest.raises(FormatError):
        compress.decompress(Compressor.LZ4_BLOCK, b"\x01", 0)


def test_gzip_longer_stream_is_rejected() -> None:
    payload = gzip.compress(b"d" * 1000)
    with pytest.raises(FormatError):
        compress.decompress(Compressor.GZIP, payload, 999)


def test_accepts_memoryview() -> None:
    data = b"memoryview " * 100
    for algo in ALL:
        payload, compressed = compress.compress(algo, data)
        used = algo if compressed else Compressor.NONE
        assert compress.decompress(used, memoryview(payload), len(data)) == data


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    algo=st.sampled_from(ALL),
    payload=st.binary(max_size=300),
    size=st.integers(min_value=0, max_value=1 << 20),
)
def test_garbage_raises_only_format_error(algo: Compressor, payload: bytes, size: int) -> None:
    try:
        out = compress.decompress(algo, payload, size)
    except FormatError:
        return
    assert len(out) == size


@settings(max_examples=200)
@given(data=st.binary(min_size=1, max_size=4000), flip=st.integers(min_value=0))
def test_corrupted_payloads_raise_only_format_error(data: bytes, flip: int) -> None:
    for algo in CODECS:
        payload, compressed = compress.compress(algo, data * 4)
        if not compressed:
            continue
        broken = bytearray(payload)
        broken[flip % len(broken)] ^= 0x5A
        try:
            out = compress.decompress(algo, bytes(broken), len(data) * 4)
        except FormatError:
            continue
        assert len(out) == len(data) * 4


def test_zstd_magic_with_garbage() -> None:
    for tail in (b"", b"\x00", b"\xff" * 20, os.urandom(64)):
        with pytest.raises(FormatError):
            compress.decompress(Compressor.ZSTD, b"\x28\xb5\x2f\xfd" + tail, 100)
    with pytest.raises(FormatError):
        compress.decompress(Compressor.GZIP, zlib.compress(b"zlib, not gzip"), 14)


def test_thread_pool_use() -> None:
    chunks = [os.urandom(512) * 64 + bytes([i]) * 1000 for i in range(64)]

    def work(data: bytes) -> bytes:
        payload, compressed = compress.compress(Compressor.ZSTD, data)
        assert compressed
        return compress.decompress(Compressor.ZSTD, payload, len(data))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(work, chunks)) == chunks


# --- digests ----------------------------------------------------------------------------------


@given(data=st.binary(max_size=5000), split=st.integers(min_value=0, max_value=5000))
def test_digests(data: bytes, split: int) -> None:
    assert digest.digest(Digester.BLAKE3, data) == blake3.blake3(data).digest()
    assert digest.digest(Digester.SHA256, data) == hashlib.sha256(data).digest()
    for algo in Digester:
        hasher = digest.Hasher(algo)
        hasher.update(data[:split])
        snapshot = hasher.copy()
        hasher.update(memoryview(data)[split:])
        assert hasher.digest() == digest.digest(algo, data)
        assert hasher.digest() == hasher.digest()  # reading the value does not finalize
        assert snapshot.digest() == digest.digest(algo, data[:split])
        assert len(hasher.digest()) == digest.DIGEST_SIZE
        assert hasher.hexdigest() == digest.hexdigest(algo, data)
        assert digest.Hasher(algo, data).digest() == hasher.digest()
        assert hasher.algorithm is algo


def test_known_digest_values() -> None:
    assert digest.hexdigest(Digester.SHA256, b"") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert digest.hexdigest(Digester.BLAKE3, b"") == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
