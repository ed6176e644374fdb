"""nydusfs.storage.meta: chunk info, CI header, tar headers, ToC and digest table.

Round trips and hostile input, plus the blob upstream nydus-image 2.2 built for the
``rafs-v6-2.2.boot`` fixture, read end to end and checked section by section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import struct
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nydusfs.errors import DigestMismatch, FormatError
from nydusfs.storage import compress, meta
from nydusfs.storage import toc as blob_toc
from nydusfs.storage.device import BlobInfo
from nydusfs.storage.meta import BlobCompressionContextHeader, CiEntry
from nydusfs.storage.toc import TocEntry
from nydusfs.types import BlobFeatures, Compressor, Digester
from tests.fixtures_path import UPSTREAM

BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
TOC_FEATURES = (
    BlobFeatures.ALIGNED
    | BlobFeatures.INLINED_CHUNK_DIGEST
    | BlobFeatures.HAS_TAR_HEADER
    | BlobFeatures.HAS_TOC
    | BlobFeatures.CAP_TAR_TOC
)

sizes = st.integers(min_value=1, max_value=meta.MAX_CHUNK_SIZE)
comp_offsets = st.integers(min_value=0, max_value=(1 << 40) - 1)
uncomp_offsets = st.integers(min_value=0, max_value=(1 << 32) - 1).map(lambda n: n << 12)


@st.composite
def v1_entries(draw: st.DrawFn) -> CiEntry:
    cs, us = draw(sizes), draw(sizes)
    return CiEntry(draw(comp_offsets), cs, draw(uncomp_offsets), us, compressed=cs != us)


@st.composite
def v2_entries(draw: st.DrawFn) -> CiEntry:
    flag = st.booleans()
    return CiEntry(
        draw(comp_offsets),
        draw(st.integers(min_value=0, max_value=0xFF_FFFF)),
        draw(uncomp_offsets),
        draw(sizes),
        compressed=draw(flag),
        zran=draw(flag),
        batch=draw(flag),
        encrypted=draw(flag),
        has_crc32=draw(flag),
        data=draw(st.integers(min_value=0, max_value=(1 << 64) - 1)),
    )


# --- chunk info ---------------------------------------------------------------------------------


@given(st.lists(v1_entries(), max_size=20))
def test_ci_v1_round_trip(entries: list[CiEntry]) -> None:
    raw = meta.encode_ci_v1(entries)
    assert len(raw) == 16 * len(entries)
    assert meta.decode_ci_v1(raw) == entries


@given(st.lists(v2_entries(), max_size=20))
def test_ci_v2_round_trip(entries: list[CiEntry]) -> None:
    raw = meta.encode_ci_v2(entries)
    assert len(raw) == 24 * len(entries)
    assert meta.decode_ci_v2(raw) == entries


def test_ci_v1_bit_layout() -> None:
    # Sizes with all 24 bits of (size - 1) in use show where the high nibble goes.
    e = CiEntry(0xFF_FFFF_FFFF, 0xABCDEF + 1, 0xFFF_FFFF_F000, 0x123456 + 1, compressed=True)
    uncomp, comp = struct.unpack("<QQ", meta.encode_ci_v1([e]))
    assert uncomp == 0x23456 << 44 | 0xFFF_FFFF_F000 | 0x1 << 8
    assert comp == 0xBCDEF << 44 | 0xA << 40 | 0xFF_FFFF_FFFF
    biggest = CiEntry(0, meta.MAX_CHUNK_SIZE, 0, meta.MAX_CHUNK_SIZE)
    assert meta.decode_ci_v1(meta.encode_ci_v1([biggest])) == [biggest]


def test_ci_v2_bit_layout() -> None:
    e = CiEntry(0x12_3456_789A, 0xFF_FFFF, 0x5000, 0x100000, True, False, False, False, True, 7)
    uncomp, comp, data = struct.unpack("<QQQ", meta.encode_ci_v2([e]))
    assert uncomp == (0x01 | 0x10) << 56 | 0xFFFFF << 32 | 0x5
    assert comp == 0xFF_FFFF << 40 | 0x12_3456_789A
    assert data == 7 and meta.decode_ci_v2(meta.encode_ci_v2([e]))[0].crc32 == 7
    zran = CiEntry(0, 10, 0, 100, zran=True, data=3 << 32 | 0x400)
    assert (zran.context_index, zran.context_offset) == (3, 0x400)


BAD_V1 = [
    CiEntry(1 << 40, 10, 0, 10),
    CiEntry(0, 0, 0, 0),
    CiEntry(0, 10, 0, 0, compressed=True),
    CiEntry(0, meta.MAX_CHUNK_SIZE + 1, 0, 10, compressed=True),
    CiEntry(0, 10, 0, meta.MAX_CHUNK_SIZE + 1, compressed=True),
    CiEntry(0, 10, 0x800, 10),
    CiEntry(0, 10, 1 << 44, 10),
    CiEntry(-1, 10, 0, 10),
    CiEntry(0, 10, 0, 10, compressed=True),  # v1 cannot say "compressed" with equal sizes
    CiEntry(0, 5, 0, 10, compressed=False),
    CiEntry(0, 5, 0, 10, compressed=True, zran=True),
    CiEntry(0, 5, 0, 10, compressed=True, encrypted=True),
]


@pytest.mark.parametrize("entry", BAD_V1)
def test_ci_v1_rejects_unrepresentable(entry: CiEntry) -> None:
    with pytest.raises(FormatError):
        meta.encode_ci_v1([CiEntry(0, 1, 0, 1), entry])


@pytest.mark.parametrize(
    "entry",
    [
        CiEntry(0, 1 << 24, 0, 10),  # stored as is in 24 bits, unlike v1's size - 1
        CiEntry(0, -1, 0, 10),
        CiEntry(0, 10, 0, 10, data=1 << 64),
        CiEntry(0, 10, 0x1001, 10),
        CiEntry(1 << 40, 10, 0, 10),
    ],
)
def test_ci_v2_rejects_unrepresentable(entry: CiEntry) -> None:
    with pytest.raises(FormatError):
        meta.encode_ci_v2([entry])


@given(st.binary(max_size=200))
def test_ci_decoders_accept_only_whole_entries(raw: bytes) -> None:
    for decode, size in ((meta.decode_ci_v1, 16), (meta.decode_ci_v2, 24)):
        if len(raw) % size:
            with pytest.raises(FormatError):
                decode(raw)
        else:
            assert len(decode(raw)) == len(raw) // size


# --- header ---------------------------------------------------------------------------------------


@given(
    features=st.integers(min_value=0, max_value=(1 << 32) - 1),
    algo=st.sampled_from(list(Compressor)),
    u32=st.integers(min_value=0, max_value=(1 << 32) - 1),
    u64s=st.lists(st.integers(min_value=0, max_value=(1 << 64) - 1), min_size=5, max_size=5),
)
def test_header_round_trip(features: int, algo: Compressor, u32: int, u64s: list[int]) -> None:
    offset, c_size, u_size, zran_offset, zran_size = u64s
    header = BlobCompressionContextHeader(
        BlobFeatures(features), algo, u32, offset, c_size, u_size, zran_offset, zran_size, u32
    )
    raw = header.pack()
    assert len(raw) == 4096
    assert raw[:4] == raw[-4:] == b"\x0b\xb1\x0b\xb1"
    assert not any(raw[60:4092])
    assert BlobCompressionContextHeader.unpack(raw) == header


def test_header_rejects_malformed() -> None:
    good = BlobCompressionContextHeader(ci_entries=2).pack()
    for bad in (good[:-1], good + b"\0", b"\0" * 4096, good[:-4] + b"\0\0\0\0"):
        with pytest.raises(FormatError):
            BlobCompressionContextHeader.unpack(bad)
    with pytest.raises(FormatError):
        BlobCompressionContextHeader.unpack(good[:8] + b"\x09\0\0\0" + good[12:])
    with pytest.raises(FormatError):
        BlobCompressionContextHeader(ci_offset=1 << 64).pack()


@settings(max_examples=200)
@given(st.binary(min_size=60, max_size=60), st.binary(max_size=8), st.booleans())
def test_header_garbage(head: bytes, tail: bytes, magics: bool) -> None:
    raw = (head + bytes(4032) + tail)[:4096]
    if magics:
        raw = b"\x0b\xb1\x0b\xb1" + raw[4:-4] + b"\x0b\xb1\x0b\xb1"
    with contextlib.suppress(FormatError):
        BlobCompressionContextHeader.unpack(raw)


# --- tar headers ----------------------------------------------------------------------------------


@given(
    name=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=100),
    size=st.integers(min_value=0, max_value=(1 << 64) - 1),
)
def test_tar_header_round_trip(name: str, size: int) -> None:
    raw = blob_toc.make_tar_header(name, size)
    assert len(raw) == 512
    assert blob_toc.parse_tar_header(raw) == blob_toc.TarHeader(name, size)


def test_tar_header_fields() -> None:
    raw = blob_toc.make_tar_header("blob.digest", 64)
    assert raw[:11] == b"blob.digest" and not any(raw[11:124])  # mode, uid, gid stay NUL
    assert raw[124:136] == b"00000000100\0"
    assert raw[136:148] == b"00000000000\0"
    assert raw[156:157] == b"0" and raw[257:265] == b"ustar  \0"
    unsigned = sum(raw[:148]) + 8 * 32 + sum(raw[156:])
    assert raw[148:156] == f"{unsigned:07o}\0".encode()
    big = blob_toc.make_tar_header("image.blob", 8**11)
    assert big[124:136] == b"\x80\0\0\0" + (8**11).to_bytes(8, "big")


def test_tar_header_rejects() -> None:
    good = blob_toc.make_tar_header("rafs.blob.toc", 512)
    for bad in (
        good[:511],
        good[:257] + b"ustar\x0000" + good[265:],  # POSIX ustar, not GNU
        good[:156] + b"5" + good[157:],  # a directory
        good[:150] + b"7" + good[151:],  # checksum
        good[:124] + b"0000000009\0\0" + good[136:],
        good[:124] + b"\0" * 12 + good[136:],
    ):
        with pytest.raises(FormatError):
            blob_toc.parse_tar_header(bad)
    for name in ("", "x" * 101, "a\0b"):
        with pytest.raises(FormatError):
            blob_toc.make_tar_header(name, 1)
    with pytest.raises(FormatError):
        blob_toc.make_tar_header("x", -1)
    # Builders before 2.2 left the checksum empty; the header is still accepted.
    assert blob_toc.parse_tar_header(good[:148] + b"\0" * 8 + good[156:]).size == 512


@given(st.binary(min_size=512, max_size=512), st.booleans())
def test_tar_header_garbage(raw: bytes, gnu: bool) -> None:
    if gnu:
        raw = raw[:156] + b"0" + raw[157:257] + b"ustar  \0" + raw[265:]
    with contextlib.suppress(FormatError):
        blob_toc.parse_tar_header(raw)


# --- ToC ------------------------------------------------------------------------------------------

toc_entries = st.builds(
    TocEntry,
    name=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=16),
    compressor=st.sampled_from([Compressor.NONE, Compressor.ZSTD, Compressor.LZ4_BLOCK]),
    uncompressed_digest=st.binary(min_size=32, max_size=32),
    compressed_offset=st.integers(min_value=0, max_value=(1 << 64) - 1),
    compressed_size=st.integers(min_value=0, max_value=(1 << 64) - 1),
    uncompressed_size=st.integers(min_value=0, max_value=(1 << 64) - 1),
)


@given(st.lists(toc_entries, max_size=8))
def test_toc_round_trip(entries: list[TocEntry]) -> None:
    toc = blob_toc.build_toc(entries)
    assert toc.size == 128 * len(entries) + 512
    assert toc.digest == hashlib.sha256(toc.data).digest()
    tail = b"padding in front" + toc.data
    parsed = blob_toc.parse_toc(tail, toc.digest)
    assert parsed.entries == entries and parsed.data == toc.data


def test_toc_entry_layout_and_rejects() -> None:
    entry = TocEntry("blob.digest", Compressor.ZSTD, bytes(range(32)), 1, 2, 3)
    raw = entry.pack()
    assert len(raw) == 128
    assert struct.unpack_from("<II16s", raw) == (2, 0, b"blob.digest" + bytes(5))
    assert raw[24:56] == bytes(range(32)) and struct.unpack_from("<QQQ", raw, 56) == (1, 2, 3)
    assert not any(raw[80:])
    for bad in (
        dataclasses.replace(entry, name="x" * 17),
        dataclasses.replace(entry, compressor=Compressor.GZIP),
        dataclasses.replace(entry, uncompressed_digest=b"short"),
        dataclasses.replace(entry, compressed_size=-1),
    ):
        with pytest.raises(FormatError):
            bad.pack()
    for flags in (0, 3, 8, 0x101):
        with pytest.raises(FormatError):
            TocEntry.unpack(struct.pack("<I", flags) + raw[4:])
    with pytest.raises(FormatError):
        TocEntry.unpack(raw[:8] + b"\xff" * 16 + raw[24:])
    with pytest.raises(FormatError):
        blob_toc.decode_toc(raw[:100])


def test_parse_toc_rejects() -> None:
    entry = TocEntry("blob.digest", Compressor.NONE, bytes(32), 0, 64, 64)
    toc = blob_toc.build_toc([entry])
    with pytest.raises(DigestMismatch):
        blob_toc.parse_toc(toc.data, b"\1" * 32)
    assert blob_toc.parse_toc(toc.data, bytes(32)).entries == [entry]  # zero digest: not checked
    other = toc.data[:128] + blob_toc.make_tar_header("image.boot", 128)
    with pytest.raises(FormatError):
        blob_toc.parse_toc(other)
    for size in (100, 256):  # not whole entries / more than the buffer holds
        with pytest.raises(FormatError):
            blob_toc.parse_toc(toc.data[:128] + blob_toc.make_tar_header("rafs.blob.toc", size))
    with pytest.raises(FormatError):
        blob_toc.parse_toc(toc.data[-511:])


@given(st.binary(max_size=2048))
def test_parse_toc_garbage(raw: bytes) -> None:
    with contextlib.suppress(FormatError):
        blob_toc.parse_toc(raw)


def test_read_toc_area_sizes() -> None:
    toc = blob_toc.build_toc([TocEntry("image.blob", Compressor.NONE, bytes(32), 0, 10, 4096)])
    for prefix in (b"", b"p" * 10, b"q" * 5000):
        blob = prefix + toc.data
        reads: list[tuple[int, int]] = []

        def read_at(
            offset: int, size: int, blob: bytes = blob, reads: list[tuple[int, int]] = reads
        ) -> bytes:
            reads.append((offset, size))
            return blob[offset : offset + size]

        # Auto-detect: the last 4 KiB, or a small blob rounded down to 128 bytes.
        assert blob_toc.read_toc(len(blob), read_at)[0].name == "image.blob"
        assert reads[-1][1] == min(4096, len(blob) // 128 * 128)
        assert blob_toc.read_toc(len(blob), read_at, toc.size, toc.digest)[0].name == "image.blob"
        assert reads[-1] == (len(blob) - toc.size, toc.size)
    for bad_size in (256, 700, 0x10080, len(blob) + 128):
        with pytest.raises(FormatError):
            blob_toc.read_toc_area(len(blob), read_at, bad_size)
    with pytest.raises(FormatError):
        blob_toc.read_toc_area(len(blob), lambda offset, size: b"short", 0)


# --- a blob built from the pieces -----------------------------------------------------------------


def _build_blob(
    chunks: list[bytes], algo: Compressor, *, v2: bool = False
) -> tuple[bytes, BlobInfo, list[bytes]]:
    """A native blob with ToC, written the way upstream's builder writes one."""
    out = bytearray()
    hashed = hashlib.sha256()  # upstream's blob hash skips the digest table
    entries, digests = [], []
    uncompressed = 0
    for data in chunks:
        payload, compressed = compress.compress(algo, data)
        entries.append(CiEntry(len(out), len(payload), uncompressed, len(data), compressed, data=0))
        digests.append(blake3.blake3(data).digest())
        out += payload
        uncompressed += meta.round_up_4k(len(data))
    hashed.update(out)
    data_size = len(out)
    tar = blob_toc.make_tar_header(blob_toc.TOC_ENTRY_BLOB_RAW, data_size)
    out += tar
    hashed.update(tar)
    toc = [
        TocEntry(
            blob_toc.TOC_ENTRY_BLOB_RAW,
            Compressor.NONE,
            hashed.digest(),
            0,
            data_size,
            uncompressed,
        )
    ]
    features = TOC_FEATURES | (BlobFeatures.CHUNK_INFO_V2 if v2 else 0)
    ci_data = (meta.encode_ci_v2 if v2 else meta.encode_ci_v1)(entries)
    ci_payload, ci_compressed = compress.compress(algo, ci_data)
    ci_algo = algo if ci_compressed else Compressor.NONE
    header = BlobCompressionContextHeader(
        features, ci_algo, len(entries), len(out), len(ci_payload), len(ci_data)
    ).pack()
    toc += blob_toc.blob_meta_toc_entries(ci_data, len(out), len(ci_payload), ci_algo, header)
    info = BlobInfo(
        0, "test", 0x100000, len(chunks), algo, Digester.BLAKE3, features, 0, uncompressed,
        ci_compressor=ci_algo, ci_offset=len(out), ci_compressed_size=len(ci_payload),
        ci_uncompressed_size=len(ci_data),
    )  # fmt: skip
    out += ci_payload + header + blob_toc.make_tar_header("blob.meta", len(ci_payload) + 4096)
    table = blob_toc.encode_digest_table(digests)
    table_digest = hashlib.sha256(table).digest()
    toc.append(
        TocEntry("blob.digest", Compressor.NONE, table_digest, len(out), len(table), len(table))
    )
    out += table + blob_toc.make_tar_header("blob.digest", len(table))
    built = blob_toc.build_toc(toc)
    out += built.data
    info.compressed_size = len(out)
    info.blob_toc_size = built.size
    info.blob_toc_digest = built.digest
    return bytes(out), info, digests


def _reader(blob: bytes) -> meta.ReadAt:
    return lambda offset, size: blob[offset : offset + size]


@pytest.mark.parametrize("algo", [Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.ZSTD])
@pytest.mark.parametrize("v2", [False, True])
def test_synthetic_blob(algo: Compressor, v2: bool) -> None:
    chunks = [b"a" * 5000, bytes(range(256)) * 40, b"tail", b"a" * 4096]
    blob, info, digests = _build_blob(chunks, algo, v2=v2)
    read_at = _reader(blob)
    loaded = meta.load_blob_meta(info, read_at)
    assert len(loaded.entries) == 4
    toc = blob_toc.parse_toc(blob_toc.read_toc_area(len(blob), read_at), info.blob_toc_digest)
    assert [e.name for e in toc.entries] == [
        "image.blob",
        "blob.meta",
        "blob.meta.header",
        "blob.digest",
    ]
    assert blob_toc.read_digest_table(toc.entries, read_at, 4) == digests
    for entry, data, d in zip(loaded.entries, chunks, digests, strict=True):
        payload = read_at(entry.compressed_offset, entry.compressed_size)
        used = algo if entry.compressed else Compressor.NONE
        assert compress.decompress(used, payload, entry.uncompressed_size) == data
        assert blake3.blake3(data).digest() == d
    meta_entry = toc.get("blob.meta")
    assert meta_entry is not None
    assert blob_toc.extract_toc_entry(meta_entry, read_at) == loaded.ci_data

    # The blob table and the header must agree; a stale table is an error, not garbage.
    for change in (
        {"ci_offset": info.ci_offset + 1},
        {"ci_compressed_size": info.ci_compressed_size + 1},
        {"ci_uncompressed_size": info.ci_uncompressed_size + 16},
        {"chunk_count": 3},
        {"chunk_count": 0},
        {"features": info.features ^ BlobFeatures.CHUNK_INFO_V2},
        {"features": info.features | BlobFeatures.ZRAN},
        {"uncompressed_size": 4096},
        {"ci_compressed_size": 0},
    ):
        with pytest.raises(FormatError):
            meta.load_blob_meta(dataclasses.replace(info, **change), read_at)


def test_blob_meta_corruption() -> None:
    blob, info, _ = _build_blob([b"x" * 9000, b"y" * 100], Compressor.ZSTD)
    ci_end = info.ci_offset + info.ci_compressed_size
    # The top byte of the first entry's uncompressed size, then both header magics.
    for pos in (info.ci_offset + 7, ci_end, ci_end + 4095):
        broken = bytearray(blob)
        broken[pos] ^= 0xFF
        with pytest.raises(FormatError):
            meta.load_blob_meta(info, _reader(bytes(broken)))
    with pytest.raises(FormatError):
        meta.load_blob_meta(info, _reader(blob[: ci_end + 100]))
    toc = blob_toc.read_toc(len(blob), _reader(blob))
    table_at = toc[-1].compressed_offset
    broken = bytearray(blob)
    broken[table_at] ^= 1
    with pytest.raises(DigestMismatch):
        blob_toc.read_digest_table(toc, _reader(bytes(broken)), 2)
    with pytest.raises(FormatError):
        blob_toc.read_digest_table(toc, _reader(blob), 3)
    with pytest.raises(FormatError):
        blob_toc.read_digest_table(toc[:-1], _reader(blob), 2)


def test_chunk_beyond_blob_is_rejected() -> None:
    entries = [CiEntry(0, 100, 0, 100), CiEntry(100, 50, 4096, 200, compressed=True)]
    info = BlobInfo(
        0, "x", 0x100000, 2, Compressor.ZSTD, Digester.BLAKE3, BlobFeatures.ALIGNED, 150, 8192
    )
    meta.check_entries(entries, info)
    for bad in (CiEntry(100, 51, 4096, 200, True), CiEntry(100, 50, 8192, 200, True)):
        with pytest.raises(FormatError):
            meta.check_entries([entries[0], bad], info)


def test_digest_table() -> None:
    digests = [bytes([i]) * 32 for i in range(5)]
    table = blob_toc.encode_digest_table(digests)
    assert blob_toc.decode_digest_table(table, 5) == digests
    with pytest.raises(FormatError):
        blob_toc.decode_digest_table(table, 4)
    with pytest.raises(FormatError):
        blob_toc.encode_digest_table([b"short"])


def test_extract_compressed_bootstrap() -> None:
    boot = b"bootstrap " * 1000
    payload, _ = compress.compress(Compressor.ZSTD, boot)
    entry = TocEntry(
        "image.boot", Compressor.ZSTD, hashlib.sha256(boot).digest(), 3, len(payload), len(boot)
    )
    blob = b"abc" + payload
    assert blob_toc.extract_toc_entry(entry, _reader(blob)) == boot
    with pytest.raises(FormatError):
        blob_toc.extract_toc_entry(entry, _reader(blob), limit=100)
    with pytest.raises(FormatError):
        blob_toc.extract_toc_entry(
            dataclasses.replace(entry, compressor=Compressor.NONE), _reader(blob)
        )


# --- the upstream-built blob ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_blob() -> bytes:
    path = UPSTREAM / "blobs" / BLOB_ID
    if not path.exists():
        pytest.skip(f"fixture {path} is missing")
    return path.read_bytes()


@pytest.fixture(scope="module")
def upstream_info() -> BlobInfo:
    """The blob's entry in the bootstrap's v6 blob table (at 0x1000), decoded by hand."""
    boot = (UPSTREAM / "rafs-v6-2.2.boot").read_bytes()
    table = boot[0x1000:0x1100]
    fields = struct.unpack_from("<IIIIIIQQIIQQQ32s", table, 64)
    index, chunk_size, count, algo, digester, features, c_size, u_size, toc_size = fields[:9]
    ci_algo, ci_offset, ci_c_size, ci_u_size, toc_digest = fields[9:]
    return BlobInfo(
        index, table[:64].decode(), chunk_size, count, Compressor(algo), Digester(digester),
        BlobFeatures(features), c_size, u_size, toc_size, Compressor(ci_algo), ci_offset,
        ci_c_size, ci_u_size, toc_digest,
    )  # fmt: skip


def test_upstream_blob_table(upstream_blob: bytes, upstream_info: BlobInfo) -> None:
    info = upstream_info
    assert info.blob_id == BLOB_ID and len(upstream_blob) == info.compressed_size == 14554
    assert (info.ci_offset, info.ci_compressed_size, info.ci_uncompressed_size) == (
        0x207A,
        0x20,
        0x20,
    )
    assert info.features == TOC_FEATURES and info.blob_toc_size == 0x400
    assert info.compressor is Compressor.ZSTD and info.chunk_count == 2
    assert meta.compressed_data_size(info) == 0x1E7A


def test_upstream_blob_end_to_end(upstream_blob: bytes, upstream_info: BlobInfo) -> None:
    blob, info, read_at = upstream_blob, upstream_info, _reader(upstream_blob)

    toc = blob_toc.parse_toc(blob_toc.read_toc_area(len(blob), read_at), info.blob_toc_digest)
    assert toc.size == info.blob_toc_size and toc.digest == info.blob_toc_digest
    assert [(e.name, e.compressor) for e in toc.entries] == [
        ("image.blob", Compressor.NONE),
        ("blob.meta", Compressor.NONE),
        ("blob.meta.header", Compressor.NONE),
        ("blob.digest", Compressor.NONE),
    ]
    by_name = {e.name: e for e in toc.entries}
    assert blob_toc.read_toc(len(blob), read_at, info.blob_toc_size) == toc.entries

    loaded = meta.load_blob_meta(info, read_at)
    header = loaded.header
    assert header.features == info.features and header.ci_entries == 2
    assert (header.ci_offset, header.ci_compressed_size) == (0x207A, 0x20)
    assert loaded.entries == [
        CiEntry(0, 4828, 0, 16931, compressed=True),
        CiEntry(4828, 2974, 0x5000, 13400, compressed=True),
    ]
    assert meta.read_ci_entries(info, read_at) == loaded.entries

    digests = blob_toc.read_digest_table(toc.entries, read_at, info.chunk_count)
    for entry, expected in zip(loaded.entries, digests, strict=True):
        payload = read_at(entry.compressed_offset, entry.compressed_size)
        data = compress.decompress(Compressor.ZSTD, payload, entry.uncompressed_size)
        assert blake3.blake3(data).digest() == expected
        assert data.startswith(b"// Copyright")

    # Each section's sha256 as recorded in the ToC.
    ci = by_name["blob.meta"]
    assert (ci.compressed_offset, ci.compressed_size) == (info.ci_offset, 0x20)
    assert ci.uncompressed_digest == hashlib.sha256(loaded.ci_data).digest()
    hdr = by_name["blob.meta.header"]
    assert (hdr.compressed_offset, hdr.compressed_size) == (0x209A, 4096)
    assert hdr.uncompressed_digest == hashlib.sha256(read_at(0x209A, 4096)).digest()
    assert blob_toc.extract_toc_entry(hdr, read_at) == header.pack()
    table = by_name["blob.digest"]
    assert (table.compressed_offset, table.compressed_size) == (0x329A, 64)
    # image.blob: the digest covers the chunk data *and* its tar header; nydus 2.2 recorded
    # the end of the chunk data as the offset (PR #1096 later changed it to the blob start).
    raw = by_name["image.blob"]
    assert raw.uncompressed_digest == hashlib.sha256(blob[: info.ci_offset]).digest()
    assert (raw.compressed_offset, raw.compressed_size) == (0x1E7A, 0x1E7A)
    assert raw.uncompressed_size == info.uncompressed_size == 0x9000
    assert blob_toc.blob_meta_toc_entries(
        loaded.ci_data, info.ci_offset, info.ci_compressed_size, Compressor.NONE, header.pack()
    ) == (ci, hdr)


def test_upstream_blob_bytes_are_reproduced(upstream_blob: bytes, upstream_info: BlobInfo) -> None:
    blob, info = upstream_blob, upstream_info
    loaded = meta.load_blob_meta(info, _reader(blob))
    assert meta.encode_ci_v1(loaded.entries) == blob[0x207A:0x209A]
    assert loaded.header.pack() == blob[0x209A:0x309A]
    # Every tar header, byte for byte.
    for offset, name, size in (
        (0x1E7A, "image.blob", 0x1E7A),
        (0x309A, "blob.meta", 0x1020),
        (0x32DA, "blob.digest", 64),
        (len(blob) - 512, "rafs.blob.toc", 512),
    ):
        assert blob_toc.make_tar_header(name, size) == blob[offset : offset + 512]
    # The ToC, except 2.2's uninitialised reserved bytes (current upstream zeroes them).
    toc = blob_toc.parse_toc(blob[-info.blob_toc_size :])
    built = blob_toc.build_toc(toc.entries)
    expected = bytearray(blob[-info.blob_toc_size :])
    for i in range(len(toc.entries)):
        expected[128 * i + 80 : 128 * i + 128] = bytes(48)
    assert built.data == bytes(expected)
    # The blob id is the sha256 of the file except the digest table, which upstream writes
    # past its blob hasher.
    assert hashlib.sha256(blob[:0x329A] + blob[0x32DA:]).hexdigest() == BLOB_ID


def test_upstream_blob_meta_cache_file(
    upstream_blob: bytes, upstream_info: BlobInfo, tmp_path: Path
) -> None:
    loaded = meta.load_blob_meta(upstream_info, _reader(upstream_blob))
    packed = meta.pack_blob_meta_file(loaded)
    assert len(packed) == meta.blob_meta_file_size(0x20) == 8192
    assert packed[:32] == loaded.ci_data and not any(packed[32:4096])
    assert packed[4096:] == upstream_blob[0x209A:0x309A]
    path = tmp_path / f"{BLOB_ID}.blob.meta"
    meta.write_blob_meta_file(path, loaded)
    assert path.read_bytes() == packed and list(tmp_path.iterdir()) == [path]
    assert meta.read_blob_meta_file(path, upstream_info) == loaded
    for bad in (packed[:-1], packed[:4096] + bytes(4096), bytes(8192)):
        with pytest.raises(FormatError):
            meta.parse_blob_meta_file(bad, upstream_info)
    stale = dataclasses.replace(upstream_info, ci_offset=0x3000)
    with pytest.raises(FormatError):
        meta.parse_blob_meta_file(packed, stale)


@settings(max_examples=300)
@given(pos=st.integers(min_value=0x1E7A, max_value=14553), value=st.integers(0, 255))
def test_upstream_blob_with_a_damaged_byte(
    upstream_blob: bytes, upstream_info: BlobInfo, pos: int, value: int
) -> None:
    broken = bytearray(upstream_blob)
    broken[pos] = value
    read_at = _reader(bytes(broken))
    with contextlib.suppress(FormatError):
        meta.load_blob_meta(upstream_info, read_at)
    with contextlib.suppress(FormatError):
        toc = blob_toc.read_toc(len(broken), read_at, expected_digest=upstream_info.blob_toc_digest)
        blob_toc.read_digest_table(toc, read_at, upstream_info.chunk_count)
    with contextlib.suppress(FormatError):
        blob_toc.read_toc(len(broken), read_at)
