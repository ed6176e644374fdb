"""RAFS v5 on-disk structures: the directly mappable bootstrap layout of nydus-image 1.x/2.x.

Pure layout code: ``struct`` formats, constants and pack/unpack helpers, no I/O and no policy.
The reader (``rafs/v5.py``) and a writer share these definitions so each field is defined once.
The 80-byte chunk record (``RafsV5ChunkInfo``) also forms the RAFS v6 chunk table, so v6 code
imports ``CHUNK_INFO_V5``/``unpack_chunk_info``/``pack_chunk_info`` from here. Upstream's
``rafs/src/metadata/layout/v5.rs`` is the specification. All integers are little-endian and every
section is 8-byte aligned::

    0       superblock (8192 B)
    8192    inode table: u32 per table index = inode record offset >> 3, padded to 8
            prefetch table: u32 inode numbers, padded to 8
            blob table: ``u32 readahead_offset | u32 readahead_size | blob id``, NUL separated
            extended blob table: 64 B per blob
            inode records: 128 B header, name, symlink target, xattr table, chunk records

Unpack helpers check bounds and raise ``FormatError``; they do not judge whether values make
sense together (that is the reader's validation).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from nydusfs.errors import FormatError
from nydusfs.storage.device import ChunkInfo
from nydusfs.types import ChunkFlags

RAFSV5_SUPER_MAGIC = 0x5241_4653
RAFS_SUPER_VERSION_V4 = 0x400
RAFS_SUPER_VERSION_V5 = 0x500
RAFSV5_ALIGNMENT = 8
RAFSV5_SUPERBLOCK_SIZE = 8192
RAFSV5_EXT_BLOB_ENTRY_SIZE = 64
RAFS_V5_ROOT_INODE = 1
RAFS_DEFAULT_CHUNK_SIZE = 0x10_0000
RAFS_MAX_CHUNK_SIZE = 0x100_0000
RAFS_MAX_NAME = 255
# Inode table values are offsets >> 3; upstream rejects anything inside the superblock or at or
# beyond 4 GiB (2^29 << 3).
INODE_TABLE_MIN_VALUE = RAFSV5_SUPERBLOCK_SIZE >> 3
INODE_TABLE_MAX_VALUE = 1 << 29
# Directories have no dirents in v5; the builder reports Σ(name_len + 8), rounded up to 4 KiB.
RAFS_V5_VIRTUAL_ENTRY_SIZE = 8
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 0x10000
# Valid xattr name prefixes, in upstream's order (``RAFS_XATTR_PREFIXES``). The two ACL entries
# are whole names.
XATTR_PREFIXES: tuple[bytes, ...] = (
    b"user.",
    b"security.",
    b"trusted.",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
)

# Every ``RafsSuperFlags`` bit upstream defines, including the six reserved compat bits; any other
# bit makes upstream's ``RafsSuperFlags::from_bits`` fail and the image is refused.
SUPER_FLAGS_KNOWN_MASK = 0x0000_03FF | 0xFF00_0000
CHUNK_FLAGS_KNOWN_MASK = int(
    ChunkFlags.COMPRESSED
    | ChunkFlags.HOLECHUNK
    | ChunkFlags.ENCRYPTED
    | ChunkFlags.BATCH
    | ChunkFlags.HAS_CRC32
)


class RafsV5InodeFlags:
    """``RafsInodeFlags`` (u64, v5 only)."""

    SYMLINK = 0x1
    HARDLINK = 0x2  # not reliably set: readers treat ``reg && nlink > 1`` as a hardlink
    XATTR = 0x4  # an xattr table follows the symlink target
    HAS_HOLE = 0x8  # chunks do not tile the file; map reads through ``file_offset``


SUPERBLOCK = struct.Struct("<IIIIQQQQQIIIIQ8112s")
EXT_BLOB_ENTRY = struct.Struct("<IIQQ40s")
INODE = struct.Struct("<32sQQIIIIQQQIIIHHIIQ8s")
CHUNK_INFO_V5 = struct.Struct("<32sIIIIQQQII")
XATTR_TABLE_HEADER = struct.Struct("<Q")
XATTR_PAIR_SIZE = struct.Struct("<I")
BLOB_ENTRY_HEADER = struct.Struct("<II")

assert SUPERBLOCK.size == RAFSV5_SUPERBLOCK_SIZE
assert EXT_BLOB_ENTRY.size == RAFSV5_EXT_BLOB_ENTRY_SIZE
assert INODE.size == 128 and CHUNK_INFO_V5.size == 80

INODE_SIZE = INODE.size
CHUNK_INFO_SIZE = CHUNK_INFO_V5.size


def align8(n: int) -> int:
    """``rafsv5_align``: round up to the 8-byte section alignment."""
    return (n + RAFSV5_ALIGNMENT - 1) & ~(RAFSV5_ALIGNMENT - 1)


def _pad8(data: bytes | bytearray) -> bytes:
    return bytes(data) + bytes(-len(data) % RAFSV5_ALIGNMENT)


def _need(buf: bytes | memoryview, offset: int, size: int, what: str) -> None:
    if offset < 0 or offset + size > len(buf):
        raise FormatError(
            f"{what} at {offset:#x} (+{size}) runs past the end of the bootstrap ({len(buf)} B)"
        )


# --- superblock -------------------------------------------------------------------------------


@dataclass(slots=True)
class RafsV5SuperBlock:
    """``RafsV5SuperBlock``. ``block_size`` is the chunk size, not a filesystem block size."""

    magic: int = RAFSV5_SUPER_MAGIC
    fs_version: int = RAFS_SUPER_VERSION_V5
    sb_size: int = RAFSV5_SUPERBLOCK_SIZE
    block_size: int = RAFS_DEFAULT_CHUNK_SIZE
    flags: int = 0
    inodes_count: int = 0
    inode_table_offset: int = 0
    prefetch_table_offset: int = 0
    blob_table_offset: int = 0
    inode_table_entries: int = 0
    prefetch_table_entries: int = 0
    blob_table_size: int = 0
    extended_blob_table_entries: int = 0
    extended_blob_table_offset: int = 0

    def pack(self) -> bytes:
        try:
            return SUPERBLOCK.pack(
                self.magic, self.fs_version, self.sb_size, self.block_size, self.flags,
                self.inodes_count, self.inode_table_offset, self.prefetch_table_offset,
                self.blob_table_offset, self.inode_table_entries, self.prefetch_table_entries,
                self.blob_table_size, self.extended_blob_table_entries,
                self.extended_blob_table_offset, bytes(8112),
            )  # fmt: skip
        except struct.error as e:
            raise FormatError(f"v5 superblock field out of range: {e}") from None

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, offset: int = 0) -> RafsV5SuperBlock:
        _need(buf, offset, SUPERBLOCK.size, "v5 superblock")
        fields = SUPERBLOCK.unpack_from(buf, offset)
        return cls(*fields[:14])


# --- tables -----------------------------------------------------------------------------------


def pack_u32_table(values: Sequence[int]) -> bytes:
    """The inode or prefetch table: packed u32s, zero padded to 8 bytes."""
    try:
        return _pad8(struct.pack(f"<{len(values)}I", *values))
    except struct.error as e:
        raise FormatError(f"u32 table value out of range: {e}") from None


def unpack_u32_table(buf: bytes | memoryview, offset: int, count: int) -> tuple[int, ...]:
    _need(buf, offset, 4 * count, "u32 table")
    return struct.unpack_from(f"<{count}I", buf, offset)


@dataclass(slots=True)
class RafsV5BlobEntry:
    """One entry of the v5 blob table."""

    blob_id: str
    readahead_offset: int = 0
    readahead_size: int = 0


def blob_table_size(entries: Sequence[RafsV5BlobEntry]) -> int:
    """``s_blob_table_size``: the padded size of the packed blob table (0 without blobs)."""
    return len(pack_blob_table(entries))


def pack_blob_table(entries: Sequence[RafsV5BlobEntry]) -> bytes:
    """Entries joined by a single NUL (none after the last), padded to 8 bytes."""
    parts = []
    for entry in entries:
        raw = entry.blob_id.encode()
        if b"\0" in raw:
            raise FormatError(f"blob id {entry.blob_id!r} contains a NUL byte")
        try:
            header = BLOB_ENTRY_HEADER.pack(entry.readahead_offset, entry.readahead_size)
        except struct.error as e:
            raise FormatError(f"blob {entry.blob_id}: readahead out of range: {e}") from None
        parts.append(header + raw)
    return _pad8(b"\0".join(parts))


def unpack_blob_table(data: bytes | memoryview) -> list[RafsV5BlobEntry]:
    """Parse a blob table exactly as upstream does.

    An entry starts wherever more than 8 bytes remain, so the zero padding after the last blob id
    (at most 7 bytes) never forms an entry. Blob ids must be UTF-8.
    """
    raw = bytes(data)
    entries: list[RafsV5BlobEntry] = []
    pos = 0
    while len(raw) - pos > BLOB_ENTRY_HEADER.size:
        readahead_offset, readahead_size = BLOB_ENTRY_HEADER.unpack_from(raw, pos)
        start = pos + BLOB_ENTRY_HEADER.size
        nul = raw.find(b"\0", start)
        stop = len(raw) if nul < 0 else nul
        try:
            blob_id = raw[start:stop].decode()
        except UnicodeDecodeError:
            raise FormatError(
                f"blob table entry {len(entries)}: blob id is not UTF-8: {raw[start:stop]!r}"
            ) from None
        entries.append(RafsV5BlobEntry(blob_id, readahead_offset, readahead_size))
        pos = stop + 1
    return entries


@dataclass(slots=True)
class RafsV5ExtBlobEntry:
    """``RafsV5ExtBlobEntry``: per-blob facts the original blob table has no room for."""

    chunk_count: int = 0
    features: int = 0
    uncompressed_size: int = 0
    compressed_size: int = 0

    def pack(self) -> bytes:
        try:
            return EXT_BLOB_ENTRY.pack(
                self.chunk_count,
                self.features,
                self.uncompressed_size,
                self.compressed_size,
                bytes(40),
            )
        except struct.error as e:
            raise FormatError(f"extended blob entry field out of range: {e}") from None

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, offset: int) -> RafsV5ExtBlobEntry:
        _need(buf, offset, EXT_BLOB_ENTRY.size, "extended blob table entry")
        chunk_count, features, uncompressed, compressed, _ = EXT_BLOB_ENTRY.unpack_from(buf, offset)
        return cls(chunk_count, features, uncompressed, compressed)


# --- inodes -----------------------------------------------------------------------------------


@dataclass(slots=True)
class RafsV5InodeRecord:
    """The 128-byte header of an inode record (upstream ``RafsV5Inode``).

    ``child_index``/``child_count`` are the children's inode-table range for a directory; for a
    regular file ``child_count`` is the number of chunk records. ``blocks`` counts 512-byte units
    of size plus aligned xattr table size, as the builder computes it.
    """

    digest: bytes = bytes(32)
    parent: int = 0
    ino: int = 0
    uid: int = 0
    gid: int = 0
    projid: int = 0
    mode: int = 0
    size: int = 0
    blocks: int = 0
    flags: int = 0
    nlink: int = 1
    child_index: int = 0
    child_count: int = 0
    name_size: int = 0
    symlink_size: int = 0
    rdev: int = 0
    mtime_nsec: int = 0
    mtime: int = 0

    def pack(self) -> bytes:
        try:
            return INODE.pack(
                self.digest, self.parent, self.ino, self.uid, self.gid, self.projid, self.mode,
                self.size, self.blocks, self.flags, self.nlink, self.child_index,
                self.child_count, self.name_size, self.symlink_size, self.rdev, self.mtime_nsec,
                self.mtime, bytes(8),
            )  # fmt: skip
        except struct.error as e:
            raise FormatError(f"v5 inode {self.ino}: field out of range: {e}") from None

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, offset: int) -> RafsV5InodeRecord:
        _need(buf, offset, INODE.size, "v5 inode record")
        return cls(*INODE.unpack_from(buf, offset)[:18])

    @property
    def fixed_size(self) -> int:
        """Header plus aligned name and symlink target: where the xattr table would start."""
        return INODE.size + align8(self.name_size) + align8(self.symlink_size)


def pack_inode(
    record: RafsV5InodeRecord,
    name: bytes,
    symlink: bytes = b"",
    xattrs: Sequence[tuple[bytes, bytes]] = (),
    chunks: Sequence[ChunkInfo] = (),
) -> bytes:
    """A whole inode record as the builder writes it. ``record`` sizes and flags must agree."""
    if record.name_size != len(name) or record.symlink_size != len(symlink):
        raise FormatError(f"v5 inode {record.ino}: name/symlink sizes disagree with the header")
    if bool(record.flags & RafsV5InodeFlags.XATTR) != bool(xattrs):
        raise FormatError(f"v5 inode {record.ino}: XATTR flag disagrees with the xattr list")
    if chunks and record.child_count != len(chunks):
        raise FormatError(f"v5 inode {record.ino}: child_count disagrees with the chunk list")
    out = [record.pack(), _pad8(name), _pad8(symlink), pack_xattrs(xattrs)]
    out.extend(pack_chunk_info(c) for c in chunks)
    return b"".join(out)


# --- chunk info (shared with v6) ----------------------------------------------------------------


def unpack_chunk_info(buf: bytes | memoryview, offset: int) -> ChunkInfo:
    """One 80-byte ``RafsV5ChunkInfo``. ``crc32`` is reported only when HAS_CRC32 is set.

    Flag bits upstream does not define are refused: no builder sets them, and every distinct
    unknown value would otherwise be cached by ``enum`` for the life of the process.
    """
    _need(buf, offset, CHUNK_INFO_V5.size, "chunk info")
    (
        digest, blob_index, flags, compressed_size, uncompressed_size, compressed_offset,
        uncompressed_offset, file_offset, index, crc32,
    ) = CHUNK_INFO_V5.unpack_from(buf, offset)  # fmt: skip
    if flags & ~CHUNK_FLAGS_KNOWN_MASK:
        raise FormatError(f"chunk info at {offset:#x} has unknown flags {flags:#x}")
    chunk_flags = ChunkFlags(flags)
    return ChunkInfo(
        digest=digest,
        blob_index=blob_index,
        flags=chunk_flags,
        compressed_offset=compressed_offset,
        compressed_size=compressed_size,
        uncompressed_offset=uncompressed_offset,
        uncompressed_size=uncompressed_size,
        file_offset=file_offset,
        index=index,
        crc32=crc32 if chunk_flags & ChunkFlags.HAS_CRC32 else 0,
    )


def pack_chunk_info(chunk: ChunkInfo) -> bytes:
    if len(chunk.digest) != 32:
        raise FormatError(f"chunk digest must be 32 bytes, got {len(chunk.digest)}")
    try:
        return CHUNK_INFO_V5.pack(
            chunk.digest, chunk.blob_index, int(chunk.flags), chunk.compressed_size,
            chunk.uncompressed_size, chunk.compressed_offset, chunk.uncompressed_offset,
            chunk.file_offset, chunk.index, chunk.crc32,
        )  # fmt: skip
    except struct.error as e:
        raise FormatError(f"chunk info field out of range: {e}") from None


# --- xattrs -----------------------------------------------------------------------------------


def check_xattr(name: bytes, value: bytes) -> None:
    """Upstream's ``RafsXAttrs::add`` rules: a known prefix, name ≤ 255 B, value ≤ 64 KiB."""
    if len(name) > XATTR_NAME_MAX:
        raise FormatError(f"xattr name {name[:32]!r}... is longer than {XATTR_NAME_MAX} bytes")
    if len(value) > XATTR_VALUE_MAX:
        raise FormatError(f"xattr {name!r}: value is larger than 64 KiB")
    if not name.startswith(XATTR_PREFIXES):
        raise FormatError(f"xattr name {name!r} has no supported prefix")


def xattrs_content_size(pairs: Sequence[tuple[bytes, bytes]]) -> int:
    """The unaligned ``total_size`` stored in front of the pairs."""
    return sum(XATTR_PAIR_SIZE.size + len(name) + 1 + len(value) for name, value in pairs)


def pack_xattrs(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """``u64 total_size`` then ``u32 pair_size | name NUL value`` pairs, padded once to 8 bytes.

    No xattrs means no table at all (not even the size word), as the builder writes it.
    """
    if not pairs:
        return b""
    out = bytearray(XATTR_TABLE_HEADER.pack(xattrs_content_size(pairs)))
    for name, value in pairs:
        check_xattr(name, value)
        if b"\0" in name:
            raise FormatError(f"xattr name {name!r} contains a NUL byte")
        out += XATTR_PAIR_SIZE.pack(len(name) + 1 + len(value))
        out += name + b"\0" + value
    return _pad8(out)


def xattr_table_extent(buf: bytes | memoryview, offset: int) -> tuple[int, int]:
    """``(content_size, bytes the table occupies)`` for the table at ``offset``, bounds-checked."""
    _need(buf, offset, XATTR_TABLE_HEADER.size, "xattr table size")
    (size,) = XATTR_TABLE_HEADER.unpack_from(buf, offset)
    total = XATTR_TABLE_HEADER.size + align8(size)
    _need(buf, offset, total, "xattr table")
    return size, total


def unpack_xattrs(data: bytes | memoryview) -> list[tuple[bytes, bytes]]:
    """Parse the pairs of a table (``data`` is exactly ``total_size`` bytes, no size word).

    Stricter than upstream, which silently skips a pair without a NUL: every pair must hold a
    name, a NUL and a value inside ``data``, and the name must be one RAFS can store.
    """
    raw = bytes(data)
    pairs: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(raw):
        if pos + XATTR_PAIR_SIZE.size > len(raw):
            raise FormatError(f"xattr table: truncated pair size at byte {pos}")
        (pair_size,) = XATTR_PAIR_SIZE.unpack_from(raw, pos)
        start = pos + XATTR_PAIR_SIZE.size
        stop = start + pair_size
        if stop > len(raw):
            raise FormatError(f"xattr table: pair at byte {pos} ({pair_size} B) runs past the end")
        nul = raw.find(b"\0", start, stop)
        if nul < 0:
            raise FormatError(f"xattr table: pair at byte {pos} has no NUL after its name")
        name, value = raw[start:nul], raw[nul + 1 : stop]
        check_xattr(name, value)
        pairs.append((name, value))
        pos = stop
    return pairs
