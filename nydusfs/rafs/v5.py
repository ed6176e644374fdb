"""Reading RAFS v5 bootstraps: ``RafsV5Super`` and its ``RafsV5Inode`` views.

The superblock and the blob tables are checked when the image is loaded (upstream's
``RafsV5SuperBlock::validate`` plus the table parsing of ``DirectSuperBlockV5``); each inode
record is checked when a view is made for it (``OndiskInodeWrapper::validate``), and children,
chunks and xattrs when they are read. Every check raises ``FormatError`` naming the inode or table
and the offset, and every loop is bounded by a count that was first checked against the size of
the bootstrap.

A few rules are stricter than upstream's direct mode, because they hold for every image
nydus-image writes and they make cycles and ambiguous reads impossible:

- a record found through ``inode(ino)`` must carry ``i_ino == ino``;
- a directory entry's record must name the directory as its parent, and must carry its own
  table index as ino unless it is a hardlink (``reg && nlink > 1``). Together with upstream's
  "children come after their directory" rule, directory inos strictly increase downwards, so
  a corrupt image cannot make a directory contain itself, and a record belongs to one directory;
- a regular file has at most ``ceil(size / chunk_size)`` chunks, sorted by ``file_offset``,
  non-overlapping and inside the file; without HAS_HOLE chunk ``i`` must start at
  ``i * chunk_size``, which is what nydusd's read mapping assumes (so both readings agree).

Concurrency: nothing here blocks or awaits; the image is never written, so a ``RafsV5Super`` and
its views may be shared between threads. A view keeps only its parsed 128-byte header and reads
the rest from the buffer on demand, so ``close()`` must not race with readers.
"""

from __future__ import annotations

import functools
import logging
import mmap
import operator
import stat

from nydusfs.errors import FormatError
from nydusfs.rafs.inode import RafsInode
from nydusfs.rafs.layout import v5 as layout
from nydusfs.rafs.layout.v5 import RafsV5InodeFlags, RafsV5InodeRecord
from nydusfs.rafs.superblock import RAFS_MAX_METADATA_SIZE, RafsSuper, SuperMeta
from nydusfs.storage.device import BlobInfo, ChunkInfo
from nydusfs.types import BlobFeatures, SuperFlags

log = logging.getLogger(__name__)

RAFS_V5_BLOCK_SIZE = 4096
_KNOWN_BLOB_FEATURES = functools.reduce(operator.or_, (f.value for f in BlobFeatures), 0)
_FILE_TYPES: frozenset[int] = frozenset(
    {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
     stat.S_IFSOCK}
)  # fmt: skip


class _Range:
    """A byte range of the bootstrap, with upstream's ``MetaRange`` alignment rules."""

    __slots__ = ("end", "name", "start")

    def __init__(self, name: str, start: int, size: int, *, aligned_size: bool) -> None:
        if start % 8 or (aligned_size and size % 8):
            raise FormatError(f"{name} at {start:#x} (+{size:#x}) is not 8-byte aligned")
        self.name, self.start, self.end = name, start, start + size

    def check_inside(self, outer: _Range) -> None:
        if self.start < outer.start or self.end > outer.end:
            raise FormatError(
                f"{self.name} [{self.start:#x}, {self.end:#x}) lies outside the metadata area "
                f"[{outer.start:#x}, {outer.end:#x})"
            )

    def check_apart(self, other: _Range) -> None:
        if self.start < other.end and self.end > other.start:
            raise FormatError(
                f"{self.name} [{self.start:#x}, {self.end:#x}) overlaps {other.name} "
                f"[{other.start:#x}, {other.end:#x})"
            )


def _is_hardlink(rec: RafsV5InodeRecord) -> bool:
    return stat.S_ISREG(rec.mode) and rec.nlink > 1


class RafsV5Super(RafsSuper):
    """A validated RAFS v5 bootstrap held in ``buf`` (bytes, or a memoryview over ``mapping``)."""

    def __init__(self, buf: bytes | memoryview, mapping: mmap.mmap | None) -> None:
        self._buf: bytes | memoryview = buf
        self._mapping = mapping
        self._len = len(buf)
        self.superblock = sb = self._validate_superblock()
        self._entries = sb.inode_table_entries
        self._table_off = sb.inode_table_offset
        self.meta = SuperMeta(
            version=5,
            flags=SuperFlags(sb.flags),
            chunk_size=sb.block_size,
            inodes_count=sb.inodes_count,
            root_ino=layout.RAFS_V5_ROOT_INODE,
            block_size=RAFS_V5_BLOCK_SIZE,
        )
        self.blobs = self._load_blobs()
        root = self.inode(layout.RAFS_V5_ROOT_INODE)
        if not root.is_dir():
            raise FormatError(f"v5 root inode has mode {root.mode:#o}, not a directory")

    # --- load-time validation -----------------------------------------------------------------
    def _validate_superblock(self) -> layout.RafsV5SuperBlock:
        size = self._len
        sb = layout.RafsV5SuperBlock.unpack_from(self._buf, 0)
        if sb.magic != layout.RAFSV5_SUPER_MAGIC or sb.fs_version != layout.RAFS_SUPER_VERSION_V5:
            raise FormatError(
                f"not a RAFS v5 superblock (magic {sb.magic:#x}, version {sb.fs_version:#x})"
            )
        if sb.sb_size != layout.RAFSV5_SUPERBLOCK_SIZE:
            raise FormatError(f"v5 superblock size is {sb.sb_size}, expected 8192")
        if size <= layout.RAFSV5_SUPERBLOCK_SIZE or size > RAFS_MAX_METADATA_SIZE or size % 8:
            raise FormatError(
                f"v5 bootstrap size {size} is invalid (must exceed 8192, be a multiple of 8 and "
                "at most 2 GiB)"
            )
        bs = sb.block_size
        # 4 MiB is upstream's special case for stargz; it is already within the 16 MiB limit.
        if bs & (bs - 1) or bs < 0x1000 or (bs > layout.RAFS_MAX_CHUNK_SIZE and bs != 4 << 20):
            raise FormatError(f"v5 chunk size {bs:#x} is not a power of two in [4 KiB, 16 MiB]")
        if sb.flags & ~layout.SUPER_FLAGS_KNOWN_MASK:
            raise FormatError(f"v5 superblock has unknown flags {sb.flags:#x}")

        meta = _Range(
            "metadata area", layout.RAFSV5_SUPERBLOCK_SIZE, size - 8192, aligned_size=True
        )
        inodes = _Range(
            "inode table", sb.inode_table_offset, 4 * sb.inode_table_entries, aligned_size=False
        )
        inodes.check_inside(meta)
        if sb.inodes_count > sb.inode_table_entries:
            raise FormatError(
                f"v5 inodes count {sb.inodes_count} exceeds inode table entries "
                f"{sb.inode_table_entries}"
            )
        blobs = _Range("blob table", sb.blob_table_offset, sb.blob_table_size, aligned_size=False)
        blobs.check_inside(meta)
        blobs.check_apart(inodes)
        ext_size = sb.extended_blob_table_entries * layout.RAFSV5_EXT_BLOB_ENTRY_SIZE
        ext = _Range(
            "extended blob table", sb.extended_blob_table_offset, ext_size, aligned_size=True
        )
        if ext_size:
            ext.check_inside(meta)
            ext.check_apart(inodes)
            ext.check_apart(blobs)
        prefetch_size = 4 * sb.prefetch_table_entries
        prefetch = _Range(
            "prefetch table", sb.prefetch_table_offset, prefetch_size, aligned_size=False
        )
        if prefetch_size:
            prefetch.check_inside(meta)
            prefetch.check_apart(inodes)
            prefetch.check_apart(blobs)
            if ext_size:
                prefetch.check_apart(ext)
        return sb

    def _load_blobs(self) -> list[BlobInfo]:
        sb = self.superblock
        start = sb.blob_table_offset
        entries = layout.unpack_blob_table(self._buf[start : start + sb.blob_table_size])
        ext = [
            layout.RafsV5ExtBlobEntry.unpack_from(
                self._buf, sb.extended_blob_table_offset + i * layout.RAFSV5_EXT_BLOB_ENTRY_SIZE
            )
            for i in range(sb.extended_blob_table_entries)
        ]
        if ext and len(ext) < len(entries):
            raise FormatError(
                f"v5 extended blob table has {len(ext)} entries for {len(entries)} blobs"
            )
        flags = self.meta.flags
        blobs = []
        for index, entry in enumerate(entries):
            if ext:
                e = ext[index]
                unknown = e.features & ~_KNOWN_BLOB_FEATURES
                if unknown:
                    # Upstream truncates unknown feature bits with a warning.
                    log.warning(
                        "blob %s: ignoring unknown feature bits %#x", entry.blob_id, unknown
                    )
                features = BlobFeatures(e.features & _KNOWN_BLOB_FEATURES)
                counts = (e.chunk_count, e.uncompressed_size, e.compressed_size)
            else:
                features = BlobFeatures.V5_NO_EXT_BLOB_TABLE
                counts = (0, 0, 0)
            blobs.append(
                BlobInfo(
                    blob_index=index,
                    blob_id=entry.blob_id,
                    chunk_size=sb.block_size,
                    chunk_count=counts[0],
                    compressor=flags.compressor(),
                    digester=flags.digester(),
                    features=features,
                    compressed_size=counts[2],
                    uncompressed_size=counts[1],
                    prefetch_offset=entry.readahead_offset,
                    prefetch_size=entry.readahead_size,
                )
            )
        return blobs

    # --- inode access -------------------------------------------------------------------------
    def record_at(self, index: int) -> tuple[int, RafsV5InodeRecord]:
        """The validated record at inode-table ``index`` (1-based) and its file offset."""
        if not 1 <= index <= self._entries:
            raise FormatError(f"v5 inode table index {index} out of range 1..{self._entries}")
        (value,) = layout.unpack_u32_table(self._buf, self._table_off + 4 * (index - 1), 1)
        if not layout.INODE_TABLE_MIN_VALUE < value < layout.INODE_TABLE_MAX_VALUE:
            raise FormatError(f"v5 inode table entry {index} holds invalid offset {value << 3:#x}")
        offset = value << 3
        rec = RafsV5InodeRecord.unpack_from(self._buf, offset)
        self._check_record(index, offset, rec)
        return offset, rec

    def _check_record(self, index: int, offset: int, rec: RafsV5InodeRecord) -> None:
        where = f"v5 inode record {index} at {offset:#x}"
        if not 1 <= rec.ino <= self._entries:
            raise FormatError(f"{where}: ino {rec.ino} out of range 1..{self._entries}")
        if rec.ino != layout.RAFS_V5_ROOT_INODE and rec.parent == 0:
            raise FormatError(f"{where}: ino {rec.ino} has no parent")
        if not _is_hardlink(rec) and rec.parent >= rec.ino:
            raise FormatError(f"{where}: parent {rec.parent} is not below ino {rec.ino}")
        if rec.nlink == 0:
            raise FormatError(f"{where}: nlink is 0")
        if not 1 <= rec.name_size <= layout.RAFS_MAX_NAME:
            raise FormatError(f"{where}: name size {rec.name_size} out of range 1..255")
        fmt = stat.S_IFMT(rec.mode)
        if fmt not in _FILE_TYPES:
            raise FormatError(f"{where}: unknown file type in mode {rec.mode:#o}")
        if fmt == stat.S_IFLNK and rec.symlink_size == 0:
            raise FormatError(f"{where}: symlink with an empty target")
        end = offset + rec.fixed_size
        if end > self._len:
            raise FormatError(f"{where}: name/symlink run past the end of the bootstrap")
        if rec.flags & RafsV5InodeFlags.XATTR:
            try:
                end += layout.xattr_table_extent(self._buf, end)[1]
            except FormatError as e:
                raise FormatError(f"{where}: {e}") from None
        if fmt == stat.S_IFREG:
            chunk_size = self.meta.chunk_size
            max_chunks = -(-rec.size // chunk_size)
            if rec.child_count > max_chunks:
                raise FormatError(
                    f"{where}: {rec.child_count} chunks for {rec.size} bytes "
                    f"(at most {max_chunks} of {chunk_size:#x})"
                )
            end += rec.child_count * layout.CHUNK_INFO_SIZE
        elif fmt == stat.S_IFDIR and rec.child_count:
            last = rec.child_index + rec.child_count - 1
            if rec.child_index <= rec.ino or last > self._entries:
                raise FormatError(
                    f"{where}: children {rec.child_index}..{last} invalid for ino {rec.ino} "
                    f"with {self._entries} table entries"
                )
        if end > self._len:
            raise FormatError(f"{where}: record (ends {end:#x}) runs past the end of the bootstrap")

    def inode(self, ino: int) -> RafsV5Inode:
        offset, rec = self.record_at(ino)
        if rec.ino != ino:
            raise FormatError(f"v5 inode table entry {ino} leads to a record of ino {rec.ino}")
        return RafsV5Inode(self, offset, rec)

    @property
    def max_ino(self) -> int:
        return self._entries

    @property
    def prefetch_table(self) -> list[int]:
        """Inos of the prefetch table; a 0 entry ends the list, as nydusd reads it."""
        sb = self.superblock
        inos = []
        for ino in layout.unpack_u32_table(
            self._buf, sb.prefetch_table_offset, sb.prefetch_table_entries
        ):
            if ino == 0:
                break
            if ino > self._entries:
                raise FormatError(f"v5 prefetch table names ino {ino}, beyond {self._entries}")
            inos.append(ino)
        return inos

    def read(self, offset: int, size: int) -> bytes:
        """Raw bytes of the bootstrap, bounds-checked (for views and inspection tools)."""
        if offset < 0 or size < 0 or offset + size > self._len:
            raise FormatError(f"read of {size} B at {offset:#x} runs past the bootstrap end")
        return bytes(self._buf[offset : offset + size])

    @property
    def buffer(self) -> bytes | memoryview:
        return self._buf

    def close(self) -> None:
        buf, self._buf = self._buf, b""
        if isinstance(buf, memoryview):
            buf.release()
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                # A caller still holds a view of the buffer; the mapping goes away with it.
                log.debug("bootstrap mapping still exported; left to the garbage collector")
            self._mapping = None


class RafsV5Inode(RafsInode):
    """A view of one v5 inode record. Attributes are the on-disk values (uid/gid included)."""

    __slots__ = ("_offset", "_rec", "_sup", "ino")

    def __init__(self, sup: RafsV5Super, offset: int, rec: RafsV5InodeRecord) -> None:
        self._sup = sup
        self._offset = offset
        self._rec = rec
        self.ino = rec.ino

    def __repr__(self) -> str:
        return f"RafsV5Inode(ino={self.ino}, mode={self.mode:#o}, offset={self._offset:#x})"

    # --- attributes ---------------------------------------------------------------------------
    @property
    def mode(self) -> int:
        return self._rec.mode

    @property
    def uid(self) -> int:
        return self._rec.uid

    @property
    def gid(self) -> int:
        return self._rec.gid

    @property
    def nlink(self) -> int:
        return self._rec.nlink

    @property
    def size(self) -> int:
        return self._rec.size

    @property
    def rdev(self) -> int:
        return self._rec.rdev

    @property
    def mtime(self) -> int:
        return self._rec.mtime

    @property
    def mtime_nsec(self) -> int:
        return self._rec.mtime_nsec

    @property
    def blocks(self) -> int:
        # v5 records i_blocks and nydusd reports it as is (it includes the xattr table).
        return self._rec.blocks

    @property
    def parent(self) -> int:
        return self.ino if self.ino == layout.RAFS_V5_ROOT_INODE else self._rec.parent

    # --- v5 extras ----------------------------------------------------------------------------
    @property
    def record(self) -> RafsV5InodeRecord:
        return self._rec

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def flags(self) -> int:
        return self._rec.flags

    @property
    def digest(self) -> bytes:
        return self._rec.digest

    @property
    def projid(self) -> int:
        return self._rec.projid

    @property
    def has_hole(self) -> bool:
        return bool(self._rec.flags & RafsV5InodeFlags.HAS_HOLE)

    @property
    def name(self) -> bytes:
        """The name stored in this record (``/`` for the root; one of the names of a hardlink)."""
        return self._sup.read(self._offset + layout.INODE_SIZE, self._rec.name_size)

    # --- content ------------------------------------------------------------------------------
    def symlink(self) -> bytes:
        if not self.is_symlink():
            raise FormatError(f"v5 inode {self.ino} is not a symlink")
        start = self._offset + layout.INODE_SIZE + layout.align8(self._rec.name_size)
        return self._sup.read(start, self._rec.symlink_size)

    def _xattr_offset(self) -> int:
        return self._offset + self._rec.fixed_size

    def xattrs(self) -> list[tuple[bytes, bytes]]:
        if not self._rec.flags & RafsV5InodeFlags.XATTR:
            return []
        start = self._xattr_offset()
        size, _ = layout.xattr_table_extent(self._sup.buffer, start)
        try:
            return layout.unpack_xattrs(self._sup.read(start + 8, size))
        except FormatError as e:
            raise FormatError(f"v5 inode {self.ino}: {e}") from None

    def _entry(self, index: int) -> tuple[bytes, RafsV5InodeRecord]:
        """Name and record at table ``index``, checked as an entry of this directory."""
        offset, rec = self._sup.record_at(index)
        where = f"v5 directory {self.ino}: entry at table index {index}"
        if rec.parent != self.ino:
            raise FormatError(f"{where} names parent {rec.parent}")
        if rec.ino != index:
            if not _is_hardlink(rec):
                raise FormatError(f"{where} has ino {rec.ino} but is not a hardlink")
            # The ino is what callers open next: it must be a regular file too, or a forged
            # "hardlink" could name a directory and make the tree contain itself.
            _, primary = self._sup.record_at(rec.ino)
            if primary.ino != rec.ino or not _is_hardlink(primary):
                raise FormatError(f"{where} links to ino {rec.ino}, which is not a hardlinked file")
        name = self._sup.read(offset + layout.INODE_SIZE, rec.name_size)
        if b"/" in name or b"\0" in name or name in (b".", b".."):
            raise FormatError(f"{where} has invalid name {name!r}")
        return name, rec

    def children(self) -> list[tuple[bytes, int]]:
        if not self.is_dir():
            return []
        out: list[tuple[bytes, int]] = []
        first = self._rec.child_index
        for index in range(first, first + self._rec.child_count):
            name, rec = self._entry(index)
            if out and name <= out[-1][0]:
                raise FormatError(
                    f"v5 directory {self.ino}: entry {name!r} out of order after {out[-1][0]!r}"
                )
            out.append((name, rec.ino))
        return out

    def lookup(self, name: bytes) -> int | None:
        if not self.is_dir():
            return None
        lo, hi = 0, self._rec.child_count - 1
        first = self._rec.child_index
        # Entries are sorted by name bytes; at most log2(child_count) records are read.
        while lo <= hi:
            mid = (lo + hi) // 2
            target, rec = self._entry(first + mid)
            if target == name:
                return rec.ino
            if target > name:
                hi = mid - 1
            else:
                lo = mid + 1
        return None

    def chunks(self) -> list[ChunkInfo]:
        rec = self._rec
        if not self.is_reg() or rec.child_count == 0:
            return []
        start = self._xattr_offset()
        if rec.flags & RafsV5InodeFlags.XATTR:
            start += layout.xattr_table_extent(self._sup.buffer, start)[1]
        chunk_size = self._sup.meta.chunk_size
        blobs = self._sup.blobs
        out: list[ChunkInfo] = []
        end = 0
        for i in range(rec.child_count):
            where = f"v5 inode {self.ino}: chunk {i}"
            try:
                c = layout.unpack_chunk_info(self._sup.buffer, start + i * layout.CHUNK_INFO_SIZE)
            except FormatError as e:
                raise FormatError(f"{where}: {e}") from None
            if c.blob_index >= len(blobs):
                raise FormatError(f"{where} names blob {c.blob_index} of {len(blobs)}")
            blob = blobs[c.blob_index]
            if blob.chunk_count and c.index >= blob.chunk_count:
                raise FormatError(
                    f"{where} has index {c.index} beyond blob {blob.blob_id}'s {blob.chunk_count}"
                )
            if not 0 < c.uncompressed_size <= chunk_size:
                raise FormatError(f"{where} has uncompressed size {c.uncompressed_size}")
            if not self.has_hole and c.file_offset != i * chunk_size:
                raise FormatError(
                    f"{where} at file offset {c.file_offset}, expected {i * chunk_size}"
                )
            if c.file_offset < end or c.file_offset + c.uncompressed_size > rec.size:
                raise FormatError(
                    f"{where} [{c.file_offset}, +{c.uncompressed_size}) overlaps its predecessor "
                    f"or passes the file size {rec.size}"
                )
            end = c.file_offset + c.uncompressed_size
            out.append(c)
        return out
