"""Blob-side metadata of a native RAFS data blob: chunk info, its header, tar headers, ToC, digests.

A blob built with ``--features blob-toc`` (the usual case) is a "reverse tar": each section is
followed by a 512-byte GNU tar header that names it, and the last one names the ToC::

    chunk data | hdr image.blob | CI array | CI header | hdr blob.meta
        | digest table | hdr blob.digest | [bootstrap | hdr image.boot] | ToC | hdr rafs.blob.toc

* The chunk-info (CI) array describes every chunk: v1 entries are 16 bytes, v2 entries (feature
  ``CHUNK_INFO_V2``: zran, batch, encryption, crc32) 24 bytes. It may be compressed; the 4 KiB
  ``BlobCompressionContextHeader`` follows it immediately, and the bootstrap's blob table repeats
  the header's location fields, which a reader cross-checks.
* The local cache keeps the CI array uncompressed in ``<blob_id>.blob.meta``: the array padded
  to 4 KiB, then the header.
* The ToC lists sections by name with their sha256; ``blob_toc_digest`` in the blob table is the
  sha256 of the ToC entries plus their tar header.

Every decoder raises ``FormatError`` on malformed input; every encoder raises ``FormatError``
on values the format cannot hold. Functions are pure or take a ``read_at(offset, size)``
callable, so they run in any thread; none keeps state.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nydusfs.errors import FormatError, UnsupportedError
from nydusfs.storage import compress
from nydusfs.storage.device import BlobInfo
from nydusfs.types import BlobFeatures, Cipher, Compressor

ReadAt = Callable[[int, int], bytes]
"""``read_at(offset, size)`` returns up to ``size`` bytes of a blob from ``offset``."""

BLOB_CCT_MAGIC = 0xB10B_B10B
BLOB_CCT_HEADER_SIZE = 0x1000
MAX_CHUNK_SIZE = 0x100_0000  # RAFS_MAX_CHUNK_SIZE
MAX_CHUNKS_PER_BLOB = 1 << 24  # RAFS_MAX_CHUNKS_PER_BLOB
CI_V1_SIZE = 16
CI_V2_SIZE = 24
TAR_HEADER_SIZE = 512  # a GNU tar header follows each section of a blob-toc blob
DIGEST_SIZE = 32


BLOB_META_FILE_SUFFIX = "blob.meta"
BLOB_DIGEST_FILE_SUFFIX = "blob.digest"
BLOB_TOC_FILE_SUFFIX = "blob.toc"

_CI_SIZE_MASK = 0xFF_FFFF
_COMP_OFFSET_LIMIT = 1 << 40
_UNCOMP_OFFSET_LIMIT = 1 << 44
_V2_COMPRESSED, _V2_ZRAN, _V2_BATCH, _V2_ENCRYPTED, _V2_CRC32 = 0x1, 0x2, 0x4, 0x8, 0x10
_CI_LIMIT = 1 << 30  # cap on a CI array (+ zran/batch tables) this reader will inflate


def round_up_4k(value: int) -> int:
    return (value + 0xFFF) & ~0xFFF


# --- chunk info entries ---------------------------------------------------------------------


@dataclass(slots=True)
class CiEntry:
    """One chunk as the CI array records it (``BlobChunkInfoV1Ondisk`` / ``V2Ondisk``).

    v1 stores only offsets and sizes and signals compression by the sizes differing; the flags
    and ``data`` (crc32, or zran/batch index << 32 | offset) exist in v2 only.
    """

    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool = False
    zran: bool = False
    batch: bool = False
    encrypted: bool = False
    has_crc32: bool = False
    data: int = 0

    @property
    def compressed_end(self) -> int:
        return self.compressed_offset + self.compressed_size

    @property
    def uncompressed_end(self) -> int:
        return self.uncompressed_offset + self.uncompressed_size

    @property
    def crc32(self) -> int:
        return self.data & 0xFFFF_FFFF if self.has_crc32 else 0

    @property
    def context_index(self) -> int:
        """zran context or batch index (``data >> 32``) of a zran or batch chunk."""
        return self.data >> 32

    @property
    def context_offset(self) -> int:
        """Offset of the chunk in its zran stream or batch buffer (low 32 bits of ``data``)."""
        return self.data & 0xFFFF_FFFF


def _check_common(i: int, e: CiEntry) -> None:
    if not 0 <= e.compressed_offset < _COMP_OFFSET_LIMIT:
        raise FormatError(f"chunk {i}: compressed offset {e.compressed_offset:#x} out of range")
    if not 1 <= e.uncompressed_size <= MAX_CHUNK_SIZE:
        raise FormatError(f"chunk {i}: uncompressed size {e.uncompressed_size} out of range")
    off = e.uncompressed_offset
    if off & 0xFFF or not 0 <= off < _UNCOMP_OFFSET_LIMIT:
        raise FormatError(f"chunk {i}: uncompressed offset {off:#x} is not 4K-aligned in range")


def encode_ci_v1(entries: Iterable[CiEntry]) -> bytes:
    """Pack entries as v1 (16 bytes each).

    Layout: ``uncomp_info`` = (size-1) low 20 bits << 44 | offset (4K-aligned, bits 12-43) |
    (size-1) high 4 bits << 8; ``comp_info`` = (size-1) low 20 bits << 44 | (size-1) high 4
    bits << 40 | offset (bits 0-39). v1 cannot flag zran, batch or encrypted chunks, and says
    "compressed" only by the two sizes differing; a CRC is dropped, as upstream's v1 array does.
    """
    out = bytearray()
    pack = struct.Struct("<QQ").pack
    for i, e in enumerate(entries):
        _check_common(i, e)
        if not 1 <= e.compressed_size <= MAX_CHUNK_SIZE:
            raise FormatError(f"chunk {i}: compressed size {e.compressed_size} out of range")
        if e.zran or e.batch or e.encrypted:
            raise FormatError(f"chunk {i}: zran, batch and encrypted chunks need chunk info v2")
        if e.compressed != (e.compressed_size != e.uncompressed_size):
            raise FormatError(
                f"chunk {i}: v1 marks a chunk compressed exactly when its sizes differ "
                f"(compressed={e.compressed}, sizes {e.compressed_size}/{e.uncompressed_size})"
            )
        us, cs = e.uncompressed_size - 1, e.compressed_size - 1
        uncomp = (us & 0xF_FFFF) << 44 | e.uncompressed_offset | (us >> 20) << 8
        comp = (cs & 0xF_FFFF) << 44 | (cs >> 20) << 40 | e.compressed_offset
        out += pack(uncomp, comp)
    return bytes(out)


def decode_ci_v1(buf: bytes | memoryview) -> list[CiEntry]:
    """Unpack a v1 CI array (a whole number of 16-byte entries)."""
    if len(buf) % CI_V1_SIZE:
        raise FormatError(f"v1 chunk info array of {len(buf)} bytes is not a multiple of 16")
    entries = []
    for uncomp, comp in struct.iter_unpack("<QQ", buf):
        us = (uncomp >> 44 | (uncomp & 0xF00) << 12) + 1
        cs = (comp >> 44 | (comp & 0xF00_0000_0000) >> 20) + 1
        entries.append(
            CiEntry(comp & 0xFF_FFFF_FFFF, cs, uncomp & 0xFFF_FFFF_F000, us, compressed=cs != us)
        )
    return entries


def encode_ci_v2(entries: Iterable[CiEntry]) -> bytes:
    """Pack entries as v2 (24 bytes each).

    Layout: ``uncomp_info`` = flags << 56 | (size-1) << 32 | offset >> 12; ``comp_info`` =
    size << 40 | offset (the compressed size is stored as is, so at most 2^24-1, and may be 0
    for batch members); ``data`` = crc32, or zran/batch index << 32 | offset.
    """
    out = bytearray()
    pack = struct.Struct("<QQQ").pack
    for i, e in enumerate(entries):
        _check_common(i, e)
        if not 0 <= e.compressed_size <= _CI_SIZE_MASK:
            raise FormatError(f"chunk {i}: compressed size {e.compressed_size} out of range")
        if not 0 <= e.data < 1 << 64:
            raise FormatError(f"chunk {i}: data {e.data:#x} does not fit in 64 bits")
        flags = (
            _V2_COMPRESSED * e.compressed
            | _V2_ZRAN * e.zran
            | _V2_BATCH * e.batch
            | _V2_ENCRYPTED * e.encrypted
            | _V2_CRC32 * e.has_crc32
        )
        uncomp = flags << 56 | (e.uncompressed_size - 1) << 32 | e.uncompressed_offset >> 12
        out += pack(uncomp, e.compressed_size << 40 | e.compressed_offset, e.data)
    return bytes(out)


def decode_ci_v2(buf: bytes | memoryview) -> list[CiEntry]:
    """Unpack a v2 CI array (a whole number of 24-byte entries). Unknown flag bits are ignored,
    as upstream only warns about them."""
    if len(buf) % CI_V2_SIZE:
        raise FormatError(f"v2 chunk info array of {len(buf)} bytes is not a multiple of 24")
    entries = []
    for uncomp, comp, data in struct.iter_unpack("<QQQ", buf):
        flags = uncomp >> 56
        entries.append(
            CiEntry(
                comp & 0xFF_FFFF_FFFF,
                comp >> 40,
                (uncomp & 0xFFFF_FFFF) << 12,
                (uncomp >> 32 & _CI_SIZE_MASK) + 1,
                bool(flags & _V2_COMPRESSED),
                bool(flags & _V2_ZRAN),
                bool(flags & _V2_BATCH),
                bool(flags & _V2_ENCRYPTED),
                bool(flags & _V2_CRC32),
                data,
            )
        )
    return entries


# --- compression context header ---------------------------------------------------------------

_HEADER = struct.Struct("<IIIIQQQQQI")  # the fields before the reserved area, 60 bytes
_NO_FEATURES = BlobFeatures(0)


@dataclass(slots=True)
class BlobCompressionContextHeader:
    """The 4 KiB header after the CI array; magics at offsets 0 and 4092, little-endian."""

    features: BlobFeatures = _NO_FEATURES
    ci_compressor: Compressor = Compressor.NONE
    ci_entries: int = 0
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    ci_zran_offset: int = 0  # also the batch context table offset within the CI data
    ci_zran_size: int = 0
    ci_zran_count: int = 0

    def pack(self) -> bytes:
        try:
            head = _HEADER.pack(
                BLOB_CCT_MAGIC,
                int(self.features),
                int(self.ci_compressor),
                self.ci_entries,
                self.ci_offset,
                self.ci_compressed_size,
                self.ci_uncompressed_size,
                self.ci_zran_offset,
                self.ci_zran_size,
                self.ci_zran_count,
            )
        except struct.error as err:
            raise FormatError(f"blob meta header field out of range: {err}") from None
        pad = bytes(BLOB_CCT_HEADER_SIZE - 4 - len(head))
        return head + pad + BLOB_CCT_MAGIC.to_bytes(4, "little")

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> BlobCompressionContextHeader:
        if len(buf) != BLOB_CCT_HEADER_SIZE:
            raise FormatError(f"blob meta header must be 4096 bytes, got {len(buf)}")
        magic, features, compressor, entries, *rest = _HEADER.unpack_from(buf)
        magic2 = int.from_bytes(buf[-4:], "little")
        if magic != BLOB_CCT_MAGIC or magic2 != BLOB_CCT_MAGIC:
            raise FormatError(f"bad blob meta header magic {magic:#x}/{magic2:#x}")
        try:
            ci_compressor = Compressor(compressor)
        except ValueError:
            raise FormatError(f"unknown chunk info compressor {compressor}") from None
        return cls(BlobFeatures(features), ci_compressor, entries, *rest)


def compressed_data_size(info: BlobInfo) -> int:
    """Size of the chunk data alone (upstream ``BlobInfo::compressed_data_size``)."""
    if info.has(BlobFeatures.SEPARATE) or not info.has(BlobFeatures.CAP_TAR_TOC):
        return info.compressed_size
    tar = TAR_HEADER_SIZE if info.has(BlobFeatures.HAS_TAR_HEADER) else 0
    if info.ci_compressed_size and info.ci_uncompressed_size:
        return info.ci_offset - tar
    return info.compressed_size - tar


def check_header(header: BlobCompressionContextHeader, info: BlobInfo) -> None:
    """Cross-check a CI header with the bootstrap's blob table, as nydusd does before use."""
    mismatch = [
        name
        for name, ours, theirs in (
            ("ci_compressor", header.ci_compressor, info.ci_compressor),
            ("ci_offset", header.ci_offset, info.ci_offset),
            ("ci_compressed_size", header.ci_compressed_size, info.ci_compressed_size),
            ("ci_uncompressed_size", header.ci_uncompressed_size, info.ci_uncompressed_size),
        )
        if ours != theirs
    ]
    chunkdict = info.has(BlobFeatures.IS_CHUNKDICT_GENERATED)
    if not chunkdict and header.ci_entries != info.chunk_count:
        mismatch.append("ci_entries")
    if mismatch:
        raise FormatError(f"blob {info.blob_id}: meta header disagrees on {', '.join(mismatch)}")
    count = info.chunk_count
    if not 0 < count <= MAX_CHUNKS_PER_BLOB:
        raise FormatError(f"blob {info.blob_id}: invalid chunk count {count}")
    size = header.ci_uncompressed_size
    extra = info.has(BlobFeatures.ZRAN) or info.has(BlobFeatures.BATCH)
    if info.has(BlobFeatures.CHUNK_INFO_V2):
        # zran and batch blobs append their context tables to the CI array.
        bad = size < count * CI_V2_SIZE if extra else size != count * CI_V2_SIZE
    elif extra:
        raise FormatError(f"blob {info.blob_id}: zran and batch blobs need chunk info v2")
    else:
        bad = not chunkdict and size != count * CI_V1_SIZE
    if bad or round_up_4k(size) > _CI_LIMIT:
        raise FormatError(f"blob {info.blob_id}: invalid chunk info size {size} for {count} chunks")
    if info.has(BlobFeatures.ZRAN) and (
        header.ci_zran_offset != count * CI_V2_SIZE
        or header.ci_zran_offset + header.ci_zran_size > size
        or header.ci_zran_count > count
        or header.ci_zran_count * 40 > header.ci_zran_size
    ):
        raise FormatError(f"blob {info.blob_id}: invalid zran context table in meta header")


def check_entries(entries: Sequence[CiEntry], info: BlobInfo) -> None:
    """Check every chunk lies within the blob and its flags agree (upstream ``validate``).

    Unlike upstream this accepts a chunk whose recorded crc32 is 0: that is a valid checksum.
    """
    c_end, u_end = compressed_data_size(info), round_up_4k(info.uncompressed_size)
    v2, separate = info.has(BlobFeatures.CHUNK_INFO_V2), info.has(BlobFeatures.SEPARATE)
    for i, e in enumerate(entries):
        if e.compressed_end > c_end or e.uncompressed_end > u_end:
            raise FormatError(
                f"blob {info.blob_id}: chunk {i} ends at {e.compressed_end:#x}/"
                f"{e.uncompressed_end:#x}, beyond the blob's {c_end:#x}/{u_end:#x}"
            )
        if not e.compressed and not e.encrypted and e.compressed_size != e.uncompressed_size:
            raise FormatError(f"blob {info.blob_id}: uncompressed chunk {i} has two sizes")
        if v2 and e.compressed_size == 0 and not (separate or e.batch):
            raise FormatError(f"blob {info.blob_id}: chunk {i} has no compressed data")
        if e.zran and not info.has(BlobFeatures.ZRAN):
            raise FormatError(f"blob {info.blob_id}: zran chunk {i} in a non-zran blob")
        if e.batch and not info.has(BlobFeatures.BATCH):
            raise FormatError(f"blob {info.blob_id}: batch chunk {i} in a non-batch blob")


# --- blob meta: from the data blob and in the local cache file -----------------------------------


@dataclass(slots=True)
class BlobMeta:
    """A blob's decoded chunk info: the header, the raw uncompressed CI data, the entries."""

    header: BlobCompressionContextHeader
    ci_data: bytes  # CI array, followed by the zran or batch context tables if any
    entries: list[CiEntry]

    @property
    def context_table(self) -> bytes:
        """The zran (contexts + dictionaries) or batch context data after the CI array."""
        start = self.header.ci_zran_offset
        return self.ci_data[start : start + self.header.ci_zran_size]


def _decode_entries(ci_data: bytes, info: BlobInfo) -> list[CiEntry]:
    v2 = info.has(BlobFeatures.CHUNK_INFO_V2)
    size = info.chunk_count * (CI_V2_SIZE if v2 else CI_V1_SIZE)
    if len(ci_data) < size:
        raise FormatError(f"blob {info.blob_id}: chunk info array is truncated")
    entries = (decode_ci_v2 if v2 else decode_ci_v1)(memoryview(ci_data)[:size])
    check_entries(entries, info)
    return entries


def load_blob_meta(info: BlobInfo, read_at: ReadAt) -> BlobMeta:
    """Fetch and decode the CI array of a data blob, located by its blob table entry.

    Reads ``ci_compressed_size + 4096`` bytes at ``ci_offset`` (one request, as nydusd does),
    checks the header against ``info`` before inflating, then checks every entry.
    """
    if info.cipher != Cipher.NONE:
        raise UnsupportedError(f"blob {info.blob_id}: encrypted blob meta is not supported")
    if not info.ci_compressed_size or not info.ci_uncompressed_size:
        raise FormatError(f"blob {info.blob_id}: blob table has no chunk info location")
    if info.ci_compressed_size > _CI_LIMIT:
        raise FormatError(f"blob {info.blob_id}: chunk info of {info.ci_compressed_size} bytes")
    want = info.ci_compressed_size + BLOB_CCT_HEADER_SIZE
    raw = read_at(info.ci_offset, want)
    if len(raw) != want:
        raise FormatError(f"blob {info.blob_id}: short read of blob meta ({len(raw)}/{want})")
    header = BlobCompressionContextHeader.unpack(memoryview(raw)[-BLOB_CCT_HEADER_SIZE:])
    check_header(header, info)
    payload = memoryview(raw)[: info.ci_compressed_size]
    ci_data = compress.decompress(info.ci_compressor, payload, info.ci_uncompressed_size)
    return BlobMeta(header, ci_data, _decode_entries(ci_data, info))


def read_ci_entries(info: BlobInfo, read_at: ReadAt) -> list[CiEntry]:
    """The chunk entries of a data blob (``load_blob_meta(...).entries``)."""
    return load_blob_meta(info, read_at).entries


def blob_meta_file_size(ci_uncompressed_size: int) -> int:
    return round_up_4k(ci_uncompressed_size) + BLOB_CCT_HEADER_SIZE


def pack_blob_meta_file(meta: BlobMeta) -> bytes:
    """The ``<blob_id>.blob.meta`` cache file: CI data padded to 4 KiB, then the header."""
    pad = bytes(round_up_4k(len(meta.ci_data)) - len(meta.ci_data))
    return meta.ci_data + pad + meta.header.pack()


def parse_blob_meta_file(buf: bytes, info: BlobInfo) -> BlobMeta:
    """Decode a cache file; ``FormatError`` if it is stale or damaged (then refetch)."""
    expected = blob_meta_file_size(info.ci_uncompressed_size)
    if len(buf) != expected:
        raise FormatError(f"blob meta file has {len(buf)} bytes, expected {expected}")
    header = BlobCompressionContextHeader.unpack(memoryview(buf)[-BLOB_CCT_HEADER_SIZE:])
    check_header(header, info)
    ci_data = buf[: info.ci_uncompressed_size]
    return BlobMeta(header, ci_data, _decode_entries(ci_data, info))


def write_blob_meta_file(path: str | os.PathLike[str], meta: BlobMeta) -> None:
    """Write the cache file atomically, so a crash never leaves a half-written one behind."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(pack_blob_meta_file(meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def read_blob_meta_file(path: str | os.PathLike[str], info: BlobInfo) -> BlobMeta:
    return parse_blob_meta_file(Path(path).read_bytes(), info)
