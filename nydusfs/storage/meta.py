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

import hashlib
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nydusfs.errors import DigestMismatch, FormatError, UnsupportedError
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
TAR_HEADER_SIZE = 512
TOC_ENTRY_SIZE = 128
DIGEST_SIZE = 32

TOC_ENTRY_BLOB_RAW = "image.blob"
TOC_ENTRY_BOOTSTRAP = "image.boot"
TOC_ENTRY_BLOB_META = "blob.meta"
TOC_ENTRY_BLOB_META_HEADER = "blob.meta.header"
TOC_ENTRY_BLOB_DIGEST = "blob.digest"
TOC_ENTRY_BLOB_TOC = "rafs.blob.toc"

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


# --- tar headers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TarHeader:
    name: str
    size: int


def _octal(value: int, width: int) -> bytes:
    # tar-rs ``octal_into``: zero-padded digits, NUL in the last byte.
    return f"{value:0{width - 1}o}".encode() + b"\0"


def make_tar_header(name: str, size: int) -> bytes:
    """The 512-byte header upstream writes after a section (``write_tar_header``).

    It is tar-rs ``Header::new_gnu()`` + ``set_path`` + ``set_entry_type(Regular)`` +
    ``set_size`` + ``set_cksum``: name, size, mtime 0 ("00000000000"), type '0', GNU magic
    "ustar  \\0", checksum as 7 octal digits and NUL; mode, uid, gid and the rest stay NUL bytes.
    """
    raw = name.encode()
    if not raw or len(raw) > 100 or b"\0" in raw:
        raise FormatError(f"invalid tar entry name {name!r}")
    if size < 0 or size >= 1 << 64:
        raise FormatError(f"invalid tar entry size {size}")
    # Sizes of 8 GiB and more do not fit 11 octal digits: GNU base-256, as tar-rs writes them.
    size_field = _octal(size, 12) if size < 8**11 else b"\x80\0\0\0" + size.to_bytes(8, "big")
    header = bytearray(TAR_HEADER_SIZE)
    header[0 : len(raw)] = raw
    header[124:136] = size_field
    header[136:148] = _octal(0, 12)
    header[156:157] = b"0"
    header[257:265] = b"ustar  \0"
    header[148:156] = b" " * 8
    header[148:156] = _octal(sum(header), 8)
    return bytes(header)


def parse_tar_header(buf: bytes | memoryview) -> TarHeader:
    """Parse a header as upstream's ToC reader does: GNU, regular file; returns name and size.

    The checksum is verified when present (builders before nydus 2.2 left it empty).
    """
    block = bytes(buf)
    if len(block) != TAR_HEADER_SIZE:
        raise FormatError(f"tar header must be 512 bytes, got {len(block)}")
    if block[257:265] != b"ustar  \0":
        raise FormatError("not a GNU tar header")
    if block[156:157] not in (b"0", b"\0"):
        raise FormatError(f"tar entry type {block[156:157]!r} is not a regular file")
    cksum = block[148:156].strip(b" \0")
    if cksum:
        expected = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        if not cksum.isdigit() or int(cksum, 8) != expected:
            raise FormatError("tar header checksum mismatch")
    field = block[124:136]
    if field[0] & 0x80:
        size = int.from_bytes(field[1:], "big")
    else:
        digits = field.strip(b" \0")
        if not digits or not all(0x30 <= c <= 0x37 for c in digits):
            raise FormatError(f"invalid tar size field {field!r}")
        size = int(digits, 8)
    try:
        name = block[:100].split(b"\0", 1)[0].decode()
    except UnicodeDecodeError:
        raise FormatError("tar entry name is not UTF-8") from None
    return TarHeader(name, size)


# --- table of contents ---------------------------------------------------------------------------

_TOC = struct.Struct("<II16s32sQQQ48x")
_TOC_FLAGS = {Compressor.NONE: 0x1, Compressor.ZSTD: 0x2, Compressor.LZ4_BLOCK: 0x4}
_TOC_COMPRESSORS = {flag: algo for algo, flag in _TOC_FLAGS.items()}


@dataclass(frozen=True, slots=True)
class TocEntry:
    """One 128-byte ToC entry: flags u32 (compressor), u32 reserved, name[16],
    sha256 of the uncompressed section, compressed offset/size, uncompressed size, 48 reserved."""

    name: str
    compressor: Compressor
    uncompressed_digest: bytes
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int

    def pack(self) -> bytes:
        raw = self.name.encode()
        if len(raw) > 16:
            raise FormatError(f"ToC entry name {self.name!r} is longer than 16 bytes")
        if self.compressor not in _TOC_FLAGS:
            raise FormatError(f"ToC entries cannot record compressor {self.compressor.label}")
        if len(self.uncompressed_digest) != DIGEST_SIZE:
            raise FormatError("ToC entry digest must be 32 bytes")
        try:
            return _TOC.pack(
                _TOC_FLAGS[self.compressor],
                0,
                raw,
                self.uncompressed_digest,
                self.compressed_offset,
                self.compressed_size,
                self.uncompressed_size,
            )
        except struct.error as err:
            raise FormatError(f"ToC entry {self.name!r} out of range: {err}") from None

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> TocEntry:
        if len(buf) != TOC_ENTRY_SIZE:
            raise FormatError(f"ToC entry must be 128 bytes, got {len(buf)}")
        flags, _, raw, digest, c_off, c_size, u_size = _TOC.unpack(buf)
        try:
            name = raw.rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise FormatError("ToC entry name is not UTF-8") from None
        algo = _TOC_COMPRESSORS.get(flags)
        if algo is None:
            raise FormatError(f"ToC entry {name!r} has unknown flags {flags:#x}")
        return cls(name, algo, digest, c_off, c_size, u_size)


def encode_toc(entries: Iterable[TocEntry]) -> bytes:
    return b"".join(e.pack() for e in entries)


def decode_toc(buf: bytes | memoryview) -> list[TocEntry]:
    if len(buf) % TOC_ENTRY_SIZE:
        raise FormatError(f"ToC of {len(buf)} bytes is not a multiple of 128")
    view = memoryview(buf)
    return [TocEntry.unpack(view[i : i + TOC_ENTRY_SIZE]) for i in range(0, len(view), 128)]


@dataclass(frozen=True, slots=True)
class Toc:
    """A blob's ToC. ``data`` (entries + tar header) is what ends the blob; ``digest`` and
    ``size`` are the blob table's ``blob_toc_digest`` and ``blob_toc_size``."""

    entries: list[TocEntry]
    data: bytes

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.data).digest()

    @property
    def size(self) -> int:
        return len(self.data)

    def get(self, name: str) -> TocEntry | None:
        return next((e for e in self.entries if e.name == name), None)


def build_toc(entries: Sequence[TocEntry]) -> Toc:
    """Serialize ToC entries and their ``rafs.blob.toc`` tar header (upstream ``dump_toc``).

    Upstream records, in this order (blob_offset is 0 except when several layers share a blob):

    * ``image.blob``: none; sha256 of everything written so far *including* the image.blob tar
      header; offset blob_offset; size of the chunk data; the blob's uncompressed size. (nydus
      2.2 wrote the end of the chunk data as offset; fixed upstream in PR #1096.)
    * ``blob.meta``: the CI compressor; sha256 of the uncompressed CI data; at ci_offset, the CI
      payload's compressed and uncompressed sizes (see ``blob_meta_toc_entries``).
    * ``blob.meta.header``: none; sha256 of the 4 KiB header; right after the CI payload.
    * ``blob.digest``: none; sha256 of the digest table; its offset and size.
    * ``image.boot`` (inlined bootstrap only): zstd unless that does not shrink it; sha256 of
      the uncompressed bootstrap; its offset, stored and uncompressed sizes.
    """
    body = encode_toc(entries)
    return Toc(list(entries), body + make_tar_header(TOC_ENTRY_BLOB_TOC, len(body)))


def blob_meta_toc_entries(
    ci_data: bytes, ci_offset: int, ci_payload_size: int, ci_compressor: Compressor, header: bytes
) -> tuple[TocEntry, TocEntry]:
    """The ``blob.meta`` and ``blob.meta.header`` entries for a CI array written at
    ``ci_offset`` as a payload of ``ci_payload_size`` bytes followed by ``header``."""
    return (
        TocEntry(
            TOC_ENTRY_BLOB_META,
            ci_compressor,
            hashlib.sha256(ci_data).digest(),
            ci_offset,
            ci_payload_size,
            len(ci_data),
        ),
        TocEntry(
            TOC_ENTRY_BLOB_META_HEADER,
            Compressor.NONE,
            hashlib.sha256(header).digest(),
            ci_offset + ci_payload_size,
            len(header),
            len(header),
        ),
    )


def parse_toc(buf: bytes, expected_digest: bytes | None = None) -> Toc:
    """Parse a ToC from a tail of its blob whose last 512 bytes are the ``rafs.blob.toc`` header.

    ``expected_digest`` (the blob table's ``blob_toc_digest``) is checked unless absent or zero.
    """
    if len(buf) < TAR_HEADER_SIZE:
        raise FormatError(f"blob ToC area of {len(buf)} bytes is too small")
    end = len(buf) - TAR_HEADER_SIZE
    header = parse_tar_header(buf[end:])
    if header.name != TOC_ENTRY_BLOB_TOC:
        raise FormatError(f"last tar header names {header.name!r}, not {TOC_ENTRY_BLOB_TOC!r}")
    if header.size > end or header.size % TOC_ENTRY_SIZE:
        raise FormatError(f"invalid ToC size {header.size} in tar header")
    start = end - header.size
    toc = Toc(decode_toc(buf[start:end]), bytes(buf[start:]))
    if expected_digest and any(expected_digest) and toc.digest != expected_digest:
        raise DigestMismatch(
            f"blob ToC digest {toc.digest.hex()} does not match {expected_digest.hex()}"
        )
    return toc


def read_toc_area(blob_size: int, read_at: ReadAt, toc_size: int = 0) -> bytes:
    """Read the blob tail holding the ToC: ``toc_size`` bytes if the blob table gives it, else
    (auto-detect, as ``read_toc_header``) the last 4 KiB, or all of a smaller blob rounded
    down to 128 bytes."""
    if toc_size:
        if not 512 <= toc_size <= 0x10000 or toc_size % 128 or toc_size > blob_size:
            raise FormatError(f"invalid blob ToC size {toc_size}")
        size = toc_size
    else:
        size = 0x1000 if blob_size > 0x1000 else blob_size >> 7 << 7
    data = read_at(blob_size - size, size)
    if len(data) != size:
        raise FormatError(f"short read of blob ToC ({len(data)}/{size} bytes)")
    return data


def read_toc(
    blob_size: int, read_at: ReadAt, toc_size: int = 0, expected_digest: bytes | None = None
) -> list[TocEntry]:
    """The ToC entries of a blob, found through its trailing ``rafs.blob.toc`` tar header."""
    return parse_toc(read_toc_area(blob_size, read_at, toc_size), expected_digest).entries


def extract_toc_entry(entry: TocEntry, read_at: ReadAt, limit: int = 1 << 30) -> bytes:
    """Read, inflate and verify one ToC section (``blob.digest``, ``image.boot``, ...).

    The sha256 is checked unless recorded as zero. (``image.blob`` describes the chunk data, it
    is not an extractable section.)
    """
    if entry.uncompressed_size > limit or entry.compressed_size > limit:
        raise FormatError(f"ToC entry {entry.name!r} is larger than {limit} bytes")
    if entry.compressor is Compressor.NONE and entry.compressed_size != entry.uncompressed_size:
        raise FormatError(f"invalid ToC entry {entry.name!r}: sizes differ but not compressed")
    payload = read_at(entry.compressed_offset, entry.compressed_size)
    if len(payload) != entry.compressed_size:
        raise FormatError(f"short read of ToC entry {entry.name!r}")
    data = compress.decompress(entry.compressor, payload, entry.uncompressed_size)
    if any(entry.uncompressed_digest) and hashlib.sha256(data).digest() != (
        entry.uncompressed_digest
    ):
        raise DigestMismatch(f"ToC entry {entry.name!r}: content digest mismatch")
    return data


# --- chunk digest table --------------------------------------------------------------------------


def encode_digest_table(digests: Iterable[bytes]) -> bytes:
    """``blob.digest``: each chunk's 32-byte digest, in CI order, uncompressed."""
    table = list(digests)
    if any(len(d) != DIGEST_SIZE for d in table):
        raise FormatError("chunk digests must be 32 bytes")
    return b"".join(table)


def decode_digest_table(buf: bytes, chunk_count: int) -> list[bytes]:
    if len(buf) != chunk_count * DIGEST_SIZE:
        raise FormatError(f"digest table has {len(buf)} bytes, expected {chunk_count} x 32")
    return [buf[i : i + DIGEST_SIZE] for i in range(0, len(buf), DIGEST_SIZE)]


def read_digest_table(toc: Iterable[TocEntry], read_at: ReadAt, chunk_count: int) -> list[bytes]:
    """The chunk digests of a blob with ``INLINED_CHUNK_DIGEST``, through its ToC."""
    entry = next((e for e in toc if e.name == TOC_ENTRY_BLOB_DIGEST), None)
    if entry is None:
        raise FormatError("blob ToC has no blob.digest entry")
    limit = MAX_CHUNKS_PER_BLOB * DIGEST_SIZE
    return decode_digest_table(extract_toc_entry(entry, read_at, limit), chunk_count)
