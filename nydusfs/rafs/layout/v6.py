"""RAFS v6 on-disk structures: the EROFS-compatible layout upstream nydus-image writes.

Pure layout code: ``struct`` formats, constants and small pack/unpack helpers, no I/O. The reader
(``rafs/v6.py``) and the writer (``rafs/builder/v6.py``) share these definitions, so a field has
one definition. Upstream's ``rafs/src/metadata/layout/v6.rs`` is the specification.

Overall bootstrap layout::

    0       1024 zero bytes
    1024    EROFS superblock (128 B)
    1152    RAFS extended superblock (256 B)
    1408    device slots (128 B per blob)
    4K      blob table (256 B per blob), then the optional prefetch table (u32 nids)
    4K      meta area: inodes, inline xattrs, chunk address arrays, dirents, symlink data
    4K      chunk info table (80 B ``RafsV5ChunkInfo`` records), zero padded to 4K
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from nydusfs.errors import FormatError

EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC = 0xE0F5_E1E2
EROFS_SUPER_BLOCK_SIZE = 128
EROFS_EXT_SUPER_BLOCK_SIZE = 256
EROFS_DEVTABLE_OFFSET = EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK_SIZE + EROFS_EXT_SUPER_BLOCK_SIZE
EROFS_BLOCK_BITS_12 = 12
EROFS_BLOCK_BITS_9 = 9
EROFS_BLOCK_SIZE_4096 = 4096
EROFS_BLOCK_SIZE_512 = 512
EROFS_INODE_SLOT_BITS = 5
EROFS_INODE_SLOT_SIZE = 1 << EROFS_INODE_SLOT_BITS

EROFS_FEATURE_COMPAT_RAFS_V6 = 0x4000_0000
EROFS_FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
EROFS_FEATURE_INCOMPAT_DEVICE_TABLE = 0x8
EROFS_FEATURE_INCOMPAT_RAFS_V6 = EROFS_FEATURE_INCOMPAT_CHUNKED_FILE | (
    EROFS_FEATURE_INCOMPAT_DEVICE_TABLE
)

# i_format: bit 0 = layout version (compact/extended), bits 1-3 = data layout
EROFS_INODE_LAYOUT_COMPACT = 0
EROFS_INODE_LAYOUT_EXTENDED = 1
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_CHUNK_BASED = 4

EROFS_CHUNK_FORMAT_INDEXES_FLAG = 0x0020
EROFS_CHUNK_FORMAT_SIZE_MASK = 0x001F

# The builder aligns each blob's start in the flat block view to 512 KiB.
V6_BLOCK_SEG_ALIGNMENT = 0x8_0000
BLOB_SHA256_LEN = 64
BLOB_MAX_SIZE_UNCOMPRESSED = 1 << 44
BLOB_MAX_SIZE_COMPRESSED = 1 << 40
RAFS_MAX_CHUNKS_PER_BLOB = 1 << 24
RAFS_MAX_CHUNK_SIZE = 0x100_0000
RAFS_MAX_NAME = 255

SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHH38s")
EXT_SUPER = struct.Struct("<QQIIQQQII200s")
DEVICE = struct.Struct("<64sII56s")
BLOB = struct.Struct("<64sIIIIIIQQIIQQQ32s32sQ8sI36s")
INODE_COMPACT = struct.Struct("<HHHHIIIIHH4s")
INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16s")
DIRENT = struct.Struct("<QHBB")
CHUNK_ADDR = struct.Struct("<HHI")
XATTR_IBODY_HEADER = struct.Struct("<IB7s")
XATTR_ENTRY = struct.Struct("<BBH")

assert SUPER.size == EROFS_SUPER_BLOCK_SIZE
assert EXT_SUPER.size == EROFS_EXT_SUPER_BLOCK_SIZE
assert DEVICE.size == 128 and BLOB.size == 256
assert INODE_COMPACT.size == 32 and INODE_EXTENDED.size == 64
assert DIRENT.size == 12 and CHUNK_ADDR.size == 8

# EROFS dirent file types
EROFS_FT_UNKNOWN = 0
EROFS_FT_REG_FILE = 1
EROFS_FT_DIR = 2
EROFS_FT_CHRDEV = 3
EROFS_FT_BLKDEV = 4
EROFS_FT_FIFO = 5
EROFS_FT_SOCK = 6
EROFS_FT_SYMLINK = 7

_FT_BY_FMT = {
    stat.S_IFREG: EROFS_FT_REG_FILE,
    stat.S_IFDIR: EROFS_FT_DIR,
    stat.S_IFCHR: EROFS_FT_CHRDEV,
    stat.S_IFBLK: EROFS_FT_BLKDEV,
    stat.S_IFIFO: EROFS_FT_FIFO,
    stat.S_IFSOCK: EROFS_FT_SOCK,
    stat.S_IFLNK: EROFS_FT_SYMLINK,
}


def file_type(mode: int) -> int:
    """The EROFS dirent file type for an ``st_mode``."""
    return _FT_BY_FMT.get(stat.S_IFMT(mode), EROFS_FT_UNKNOWN)


# Xattr name prefixes and their EROFS name index. The order is the matching order upstream uses;
# the two ACL names are whole names stored with an empty suffix.
XATTR_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"user.", 1),
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"trusted.", 4),
    (b"security.", 6),
)
XATTR_PREFIX_BY_INDEX = {index: prefix for prefix, index in XATTR_PREFIXES}


def xattr_split(name: bytes) -> tuple[int, bytes]:
    """Split a full xattr name into (EROFS name index, suffix); ``FormatError`` if unsupported."""
    for prefix, index in XATTR_PREFIXES:
        if name.startswith(prefix):
            return index, name[len(prefix) :]
    raise FormatError(f"xattr name {name!r} has no prefix RAFS can store")


def xattr_body_size(pairs: list[tuple[bytes, bytes]]) -> int:
    """Bytes of the inline xattr area (header plus 4-byte aligned entries); 0 without xattrs."""
    if not pairs:
        return 0
    size = XATTR_IBODY_HEADER.size
    for name, value in pairs:
        _, suffix = xattr_split(name)
        size += XATTR_ENTRY.size + len(suffix) + len(value)
        size = (size + 3) & ~3
    return size


def xattr_icount(pairs: list[tuple[bytes, bytes]]) -> int:
    """``i_xattr_icount``: 0 without xattrs, else 1 + (body - header) / 4."""
    size = xattr_body_size(pairs)
    if size == 0:
        return 0
    return (size - XATTR_IBODY_HEADER.size) // 4 + 1


def xattr_body_from_icount(icount: int) -> int:
    return 0 if icount == 0 else XATTR_IBODY_HEADER.size + (icount - 1) * 4


def pack_xattrs(pairs: list[tuple[bytes, bytes]]) -> bytes:
    if not pairs:
        return b""
    out = bytearray(XATTR_IBODY_HEADER.pack(0, 0, bytes(7)))
    for name, value in pairs:
        index, suffix = xattr_split(name)
        if len(suffix) > 255:
            raise FormatError(f"xattr name {name!r} is longer than 255 bytes after its prefix")
        if len(value) > 0xFFFF:
            raise FormatError(f"xattr {name!r} value is larger than 64 KiB")
        out += XATTR_ENTRY.pack(len(suffix), index, len(value))
        out += suffix
        out += value
        out += bytes(-len(out) % 4)
    return bytes(out)


def unpack_xattrs(buf: bytes | memoryview) -> list[tuple[bytes, bytes]]:
    """Parse an inline xattr area (header included). Bounds-checked; raises ``FormatError``."""
    pairs: list[tuple[bytes, bytes]] = []
    if len(buf) == 0:
        return pairs
    if len(buf) < XATTR_IBODY_HEADER.size:
        raise FormatError("inline xattr area is smaller than its header")
    _, shared_count, _ = XATTR_IBODY_HEADER.unpack_from(buf, 0)
    if shared_count != 0:
        raise FormatError("shared xattrs are not supported by RAFS v6")
    pos = XATTR_IBODY_HEADER.size
    end = len(buf)
    while pos + XATTR_ENTRY.size <= end:
        name_len, index, value_size = XATTR_ENTRY.unpack_from(buf, pos)
        if name_len == 0 and index == 0 and value_size == 0:
            break  # zero padding after the last entry
        start = pos + XATTR_ENTRY.size
        stop = start + name_len + value_size
        if stop > end:
            raise FormatError("inline xattr entry runs past the xattr area")
        prefix = XATTR_PREFIX_BY_INDEX.get(index)
        if prefix is None:
            raise FormatError(f"unknown xattr name index {index}")
        name = prefix + bytes(buf[start : start + name_len])
        pairs.append((name, bytes(buf[start + name_len : stop])))
        pos = (stop + 3) & ~3
    return pairs


@dataclass(slots=True)
class ChunkAddr:
    """``RafsV6InodeChunkAddr``: where one chunk of a file lives."""

    blob_index: int
    ci_index: int
    block_addr: int

    def pack(self) -> bytes:
        if not 0 <= self.blob_index < 255:
            raise FormatError(f"blob index {self.blob_index} out of range")
        if not 0 <= self.ci_index < RAFS_MAX_CHUNKS_PER_BLOB:
            raise FormatError(f"chunk index {self.ci_index} out of range")
        hi = ((self.ci_index >> 16) & 0xFF) << 8 | (self.blob_index + 1)
        return CHUNK_ADDR.pack(self.ci_index & 0xFFFF, hi, self.block_addr)

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, offset: int) -> ChunkAddr:
        lo, hi, blk = CHUNK_ADDR.unpack_from(buf, offset)
        device = hi & 0xFF
        if device == 0:
            raise FormatError(f"chunk address at {offset:#x} names device 0 (the bootstrap)")
        return cls(device - 1, (hi >> 8) << 16 | lo, blk)


def chunk_format(chunk_size: int, block_bits: int) -> int:
    """``i_u`` of a chunk-based inode: indexes flag plus log2(chunk size) - block bits."""
    bits = chunk_size.bit_length() - 1
    return EROFS_CHUNK_FORMAT_INDEXES_FLAG | ((bits - block_bits) & EROFS_CHUNK_FORMAT_SIZE_MASK)


def align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def nid_of(offset: int, meta_addr: int) -> int:
    return (offset - meta_addr) >> EROFS_INODE_SLOT_BITS


def mapped_blkaddr(pos: int, block_size: int) -> int:
    """The first block of a blob in the flat device view, aligned as upstream does."""
    return align(pos, V6_BLOCK_SEG_ALIGNMENT) // block_size
