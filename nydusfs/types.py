"""Value types shared across layers: on-disk enumerations and the FileSystem value tuples.

Enumeration values are the numbers upstream stores on disk, so ``Compressor(3)`` reads a blob
table field directly. The ``Attr``/``Entry``/... tuples are the immutable values the FileSystem
interface passes between filesystems and frontends.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class Compressor(enum.IntEnum):
    """``compress::Algorithm`` as stored in blob tables and CI headers."""

    NONE = 0
    LZ4_BLOCK = 1
    GZIP = 2
    ZSTD = 3

    @classmethod
    def from_name(cls, name: str) -> Compressor:
        try:
            return _COMPRESSOR_NAMES[name]
        except KeyError:
            raise ValueError(
                f"unknown compressor {name!r} (expected none, lz4_block, zstd or gzip)"
            ) from None

    @property
    def label(self) -> str:
        return {0: "none", 1: "lz4_block", 2: "gzip", 3: "zstd"}[self.value]


_COMPRESSOR_NAMES = {
    "none": Compressor.NONE,
    "lz4_block": Compressor.LZ4_BLOCK,
    "lz4": Compressor.LZ4_BLOCK,
    "gzip": Compressor.GZIP,
    "zstd": Compressor.ZSTD,
}


class Digester(enum.IntEnum):
    """``digest::Algorithm``: every digest is 32 bytes."""

    BLAKE3 = 0
    SHA256 = 1

    @classmethod
    def from_name(cls, name: str) -> Digester:
        try:
            return {"blake3": cls.BLAKE3, "sha256": cls.SHA256}[name]
        except KeyError:
            raise ValueError(f"unknown digester {name!r} (expected blake3 or sha256)") from None

    @property
    def label(self) -> str:
        return "blake3" if self is Digester.BLAKE3 else "sha256"


class Cipher(enum.IntEnum):
    NONE = 0
    AES128_XTS = 1
    AES256_XTS = 2
    AES256_GCM = 3


class SuperFlags(enum.IntFlag):
    """``RafsSuperFlags`` (u64) in the v5 superblock and the v6 extended superblock."""

    COMPRESSION_NONE = 0x1
    COMPRESSION_LZ4 = 0x2
    HASH_BLAKE3 = 0x4
    HASH_SHA256 = 0x8
    EXPLICIT_UID_GID = 0x10
    HAS_XATTR = 0x20
    COMPRESSION_GZIP = 0x40
    COMPRESSION_ZSTD = 0x80
    INLINED_CHUNK_DIGEST = 0x100
    TARTFS_MODE = 0x200
    ENCRYPTION_NONE = 0x0100_0000
    ENCRYPTION_ASE_128_XTS = 0x0200_0000

    @classmethod
    def for_compressor(cls, c: Compressor) -> SuperFlags:
        return {
            Compressor.NONE: cls.COMPRESSION_NONE,
            Compressor.LZ4_BLOCK: cls.COMPRESSION_LZ4,
            Compressor.GZIP: cls.COMPRESSION_GZIP,
            Compressor.ZSTD: cls.COMPRESSION_ZSTD,
        }[c]

    @classmethod
    def for_digester(cls, d: Digester) -> SuperFlags:
        return cls.HASH_BLAKE3 if d is Digester.BLAKE3 else cls.HASH_SHA256

    def compressor(self) -> Compressor:
        """Upstream rule: no compression flag means lz4."""
        if self & SuperFlags.COMPRESSION_NONE:
            return Compressor.NONE
        if self & SuperFlags.COMPRESSION_ZSTD:
            return Compressor.ZSTD
        if self & SuperFlags.COMPRESSION_GZIP:
            return Compressor.GZIP
        return Compressor.LZ4_BLOCK

    def digester(self) -> Digester:
        """Upstream rule: no hash flag means blake3."""
        return Digester.SHA256 if self & SuperFlags.HASH_SHA256 else Digester.BLAKE3


class BlobFeatures(enum.IntFlag):
    """``BlobFeatures`` (u32) in the v6 blob table, v5 extended blob table and CI header."""

    ALIGNED = 0x1
    INLINED_FS_META = 0x2
    CHUNK_INFO_V2 = 0x4
    ZRAN = 0x8
    SEPARATE = 0x10
    INLINED_CHUNK_DIGEST = 0x20
    TARFS = 0x40
    BATCH = 0x80
    ENCRYPTED = 0x100
    IS_CHUNKDICT_GENERATED = 0x200
    IS_SEPARATED_WITH_PREFETCH_FILES = 0x400
    EXTERNAL = 0x800
    HAS_TAR_HEADER = 0x1000_0000
    HAS_TOC = 0x2000_0000
    CAP_TAR_TOC = 0x4000_0000
    V5_NO_EXT_BLOB_TABLE = 0x8000_0000


class ChunkFlags(enum.IntFlag):
    """``BlobChunkFlags`` (u32) in v5/v6 chunk info records."""

    COMPRESSED = 0x1
    HOLECHUNK = 0x2
    ENCRYPTED = 0x4
    BATCH = 0x8
    HAS_CRC32 = 0x10


# --- FileSystem value types -------------------------------------------------------------------


class Attr(NamedTuple):
    """Attributes of an inode, as ``stat`` reports them. Times are integer nanoseconds."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class Entry(NamedTuple):
    """A lookup result: the inode, its attributes and how long the kernel may cache both."""

    ino: int
    attr: Attr
    generation: int = 0
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0


class DirEntry(NamedTuple):
    """One directory entry. ``offset`` is the cookie that resumes listing after this entry."""

    ino: int
    offset: int
    type: int  # DT_* value
    name: bytes


class Context(NamedTuple):
    """Who makes a request."""

    uid: int
    gid: int
    pid: int
    umask: int = 0o022


class StatVfs(NamedTuple):
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    fsid: int
    namemax: int
