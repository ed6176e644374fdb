"""Reader for RAFS v6 bootstraps (EROFS-compatible metadata with nydus blob tables).

``RafsV6Super`` validates the superblocks, device slots, blob table and table ranges when it
loads, then serves ``RafsV6Inode`` views parsed lazily from the mapped bootstrap. An inode is
addressed by its nid; the nid is also the inode number a filesystem reports (as nydusd does).

Every offset read from the image is checked against the bootstrap's size before use, so a
corrupt image raises ``FormatError`` rather than reading out of range, allocating without bound
or looping (directory blocks and chunk arrays are bounded by the inode size and the file size).
Views are immutable and may be shared between threads.
"""

from __future__ import annotations

import itertools
import mmap
import stat
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property

from nydusfs.errors import FormatError, UnsupportedError
from nydusfs.rafs.inode import RafsInode
from nydusfs.rafs.layout import v6 as L
from nydusfs.rafs.layout.v5 import CHUNK_INFO_V5, unpack_chunk_info
from nydusfs.rafs.superblock import RafsSuper, SuperMeta
from nydusfs.storage.device import BlobInfo, ChunkInfo
from nydusfs.types import BlobFeatures, Cipher, Compressor, Digester, SuperFlags

_HEX = frozenset(b"0123456789abcdefABCDEF")
INODE_CACHE_SIZE = 16384


class RafsV6Super(RafsSuper):
    """A loaded v6 bootstrap."""

    def __init__(self, buf: bytes | memoryview, mapping: mmap.mmap | None = None) -> None:
        self._buf = buf
        self._mapping = mapping
        self._size = len(buf)
        self._parse_superblocks()
        self.blobs = self._parse_blobs()
        self._chunk_map: dict[tuple[int, int, int], int] | None = None
        self._views: OrderedDict[int, RafsV6Inode] = OrderedDict()
        self._views_lock = threading.Lock()

    # --- loading ----------------------------------------------------------------------------
    def _parse_superblocks(self) -> None:
        size = self._size
        if size < L.EROFS_BLOCK_SIZE_4096:
            raise FormatError(f"RAFS v6 bootstrap is truncated ({size} bytes, need at least 4096)")
        (
            magic,
            checksum,
            compat,
            blkszbits,
            extslots,
            root_nid,
            inos,
            _build_time,
            _build_nsec,
            blocks,
            meta_blkaddr,
            xattr_blkaddr,
            _uuid,
            _volume,
            incompat,
            s_u,
            extra_devices,
            devt_slotoff,
            _reserved,
        ) = L.SUPER.unpack_from(self._buf, L.EROFS_SUPER_OFFSET)
        if magic != L.EROFS_SUPER_MAGIC:
            raise FormatError(f"invalid EROFS magic {magic:#x}")
        if checksum != 0:
            raise FormatError(f"invalid superblock checksum {checksum:#x} (RAFS v6 writes 0)")
        if not compat & L.EROFS_FEATURE_COMPAT_RAFS_V6:
            raise FormatError("not a RAFS v6 image: the RAFS_V6 compat feature is not set")
        if blkszbits not in (L.EROFS_BLOCK_BITS_12, L.EROFS_BLOCK_BITS_9):
            raise FormatError(f"invalid block size bits {blkszbits}")
        block_size = 1 << blkszbits
        if size % block_size:
            raise FormatError(f"bootstrap size {size} is not a multiple of the block size")
        if extslots != 0 or s_u != 0 or xattr_blkaddr != 0:
            raise FormatError("invalid superblock: extslots, s_u and xattr_blkaddr must be 0")
        if inos == 0:
            raise FormatError("invalid superblock: inode count is 0")
        if incompat != L.EROFS_FEATURE_INCOMPAT_RAFS_V6:
            raise FormatError(f"unsupported EROFS incompatible features {incompat:#x}")
        if devt_slotoff * 128 != L.EROFS_DEVTABLE_OFFSET:
            raise FormatError(f"invalid device slot offset {devt_slotoff}")
        meta_addr = meta_blkaddr * block_size
        if meta_addr >= size:
            raise FormatError(f"meta block address {meta_blkaddr} is beyond the bootstrap")
        (
            flags,
            blob_table_offset,
            blob_table_size,
            chunk_size,
            chunk_table_offset,
            chunk_table_size,
            prefetch_table_offset,
            prefetch_table_size,
            _padding,
            _reserved2,
        ) = L.EXT_SUPER.unpack_from(self._buf, L.EROFS_SUPER_OFFSET + L.EROFS_SUPER_BLOCK_SIZE)
        sflags = SuperFlags(flags)
        compress_bits = flags & (
            SuperFlags.COMPRESSION_NONE
            | SuperFlags.COMPRESSION_LZ4
            | SuperFlags.COMPRESSION_GZIP
            | SuperFlags.COMPRESSION_ZSTD
        )
        if compress_bits.bit_count() != 1:
            raise FormatError(f"invalid compression flags {flags:#x} in the extended superblock")
        if (flags & (SuperFlags.HASH_BLAKE3 | SuperFlags.HASH_SHA256)).bit_count() != 1:
            raise FormatError(f"invalid digest flags {flags:#x} in the extended superblock")
        if sflags & SuperFlags.TARTFS_MODE:
            raise UnsupportedError("RAFS v6 tarfs images are not supported")
        if (
            chunk_size & (chunk_size - 1)
            or not L.EROFS_BLOCK_SIZE_4096 <= chunk_size <= L.RAFS_MAX_CHUNK_SIZE
        ):
            raise FormatError(f"invalid chunk size {chunk_size:#x}")
        devslot_end = L.EROFS_DEVTABLE_OFFSET + extra_devices * L.DEVICE.size
        if (
            blob_table_offset % L.EROFS_BLOCK_SIZE_4096
            or blob_table_offset < max(L.EROFS_BLOCK_SIZE_4096, devslot_end)
            or blob_table_size % L.BLOB.size
            or blob_table_offset + blob_table_size > size
        ):
            raise FormatError(
                f"invalid blob table offset {blob_table_offset:#x} size {blob_table_size:#x}"
            )
        if blob_table_size // L.BLOB.size != extra_devices:
            raise FormatError(
                f"blob table has {blob_table_size // L.BLOB.size} entries but the superblock "
                f"names {extra_devices} devices"
            )
        if chunk_table_size and (
            chunk_table_offset % L.EROFS_BLOCK_SIZE_4096
            or chunk_table_offset < max(L.EROFS_BLOCK_SIZE_4096, devslot_end)
            or chunk_table_size % CHUNK_INFO_V5.size
            or chunk_table_offset + chunk_table_size > size
        ):
            raise FormatError(
                f"invalid chunk table offset {chunk_table_offset:#x} size {chunk_table_size:#x}"
            )
        if prefetch_table_size and (
            prefetch_table_size % 4
            or prefetch_table_offset < devslot_end
            or prefetch_table_offset + prefetch_table_size > size
        ):
            raise FormatError(
                f"invalid prefetch table offset {prefetch_table_offset:#x} "
                f"size {prefetch_table_size:#x}"
            )
        self.block_bits = blkszbits
        self.block_size = block_size
        self.meta_addr: int = meta_addr
        self.blocks = blocks
        self.extra_devices = extra_devices
        self.blob_table_offset = blob_table_offset
        self.blob_table_size = blob_table_size
        self.chunk_table_offset = chunk_table_offset
        self.chunk_table_size = chunk_table_size
        self.prefetch_table_offset = prefetch_table_offset
        self.prefetch_table_size = prefetch_table_size
        self.meta = SuperMeta(
            version=6,
            flags=sflags,
            chunk_size=chunk_size,
            inodes_count=inos,
            root_ino=root_nid,
            block_size=block_size,
        )
        self._inode_offset(root_nid)  # validates the root's location

    def _parse_blobs(self) -> list[BlobInfo]:
        blobs: list[BlobInfo] = []
        for index in range(self.extra_devices):
            slot_id, slot_blocks, slot_mapped, _ = L.DEVICE.unpack_from(
                self._buf, L.EROFS_DEVTABLE_OFFSET + index * L.DEVICE.size
            )
            fields = L.BLOB.unpack_from(self._buf, self.blob_table_offset + index * L.BLOB.size)
            (
                raw_id,
                blob_index,
                chunk_size,
                chunk_count,
                compression,
                digest_algo,
                features,
                compressed_size,
                uncompressed_size,
                toc_size,
                ci_compressor,
                ci_offset,
                ci_compressed_size,
                ci_uncompressed_size,
                toc_digest,
                meta_digest,
                meta_size,
                cipher_iv,
                cipher_algo,
                _reserved,
            ) = fields
            blob_id = _blob_id(raw_id, f"blob table entry {index}")
            if _blob_id(slot_id, f"device slot {index}") != blob_id:
                raise FormatError(f"device slot {index} and blob table disagree on the blob id")
            if blob_index != index:
                raise FormatError(f"blob table entry {index} records index {blob_index}")
            if chunk_size != self.meta.chunk_size:
                raise FormatError(f"blob {blob_id} chunk size differs from the superblock's")
            if chunk_count > L.RAFS_MAX_CHUNKS_PER_BLOB:
                raise FormatError(f"blob {blob_id} has too many chunks ({chunk_count})")
            if (
                compressed_size > L.BLOB_MAX_SIZE_COMPRESSED
                or uncompressed_size > L.BLOB_MAX_SIZE_UNCOMPRESSED
            ):
                raise FormatError(f"blob {blob_id} sizes are out of range")
            if not features & BlobFeatures.ALIGNED:
                raise FormatError(f"blob {blob_id} lacks the ALIGNED feature required by v6")
            try:
                compressor = Compressor(compression)
                ci_comp = Compressor(ci_compressor)
                digester = Digester(digest_algo)
                cipher = Cipher(cipher_algo)
            except ValueError as e:
                raise FormatError(f"blob {blob_id}: {e}") from None
            if slot_blocks == 0 and uncompressed_size:
                raise FormatError(f"device slot {index} has no blocks")
            blobs.append(
                BlobInfo(
                    blob_index=index,
                    blob_id=blob_id,
                    chunk_size=chunk_size,
                    chunk_count=chunk_count,
                    compressor=compressor,
                    digester=digester,
                    features=BlobFeatures(features),
                    compressed_size=compressed_size,
                    uncompressed_size=uncompressed_size,
                    blob_toc_size=toc_size,
                    ci_compressor=ci_comp,
                    ci_offset=ci_offset,
                    ci_compressed_size=ci_compressed_size,
                    ci_uncompressed_size=ci_uncompressed_size,
                    blob_toc_digest=toc_digest,
                    blob_meta_digest=meta_digest,
                    blob_meta_size=meta_size,
                    cipher_iv=cipher_iv,
                    cipher=cipher,
                    mapped_blkaddr=slot_mapped,
                    extra={"blocks": slot_blocks},
                )
            )
        return blobs

    # --- RafsSuper --------------------------------------------------------------------------
    def _inode_offset(self, nid: int) -> int:
        offset = self.meta_addr + nid * L.EROFS_INODE_SLOT_SIZE
        if nid < 0 or offset + L.INODE_COMPACT.size > self._size:
            raise FormatError(f"inode nid {nid} lies outside the bootstrap")
        return offset

    def inode(self, ino: int) -> RafsV6Inode:
        # Views are immutable and memoise their parsed directory, so reusing them saves the
        # re-parse of a whole directory on every lookup in it (the hot path under FUSE).
        with self._views_lock:
            view = self._views.get(ino)
            if view is not None:
                self._views.move_to_end(ino)
                return view
        view = RafsV6Inode(self, ino)
        with self._views_lock:
            self._views[ino] = view
            if len(self._views) > INODE_CACHE_SIZE:
                self._views.popitem(last=False)
        return view

    @property
    def prefetch_table(self) -> list[int]:
        count = self.prefetch_table_size // 4
        if not count:
            return []
        start = self.prefetch_table_offset
        return list(memoryview(self._buf)[start : start + count * 4].cast("I"))

    def chunk_record(self, addr: L.ChunkAddr) -> ChunkInfo:
        """The chunk table record matching a file's chunk address."""
        if self._chunk_map is None:
            self._chunk_map = self._load_chunk_map()
        key = (addr.blob_index, addr.ci_index, addr.block_addr)
        index = self._chunk_map.get(key)
        if index is None:
            raise FormatError(
                f"no chunk table record for blob {addr.blob_index} chunk {addr.ci_index}"
            )
        return unpack_chunk_info(self._buf, self.chunk_table_offset + index * CHUNK_INFO_V5.size)

    def _load_chunk_map(self) -> dict[tuple[int, int, int], int]:
        mapping: dict[tuple[int, int, int], int] = {}
        base = self.chunk_table_offset
        for i in range(self.chunk_table_size // CHUNK_INFO_V5.size):
            info = unpack_chunk_info(self._buf, base + i * CHUNK_INFO_V5.size)
            key = (info.blob_index, info.index, info.uncompressed_offset // self.block_size)
            mapping.setdefault(key, i)
        return mapping

    def close(self) -> None:
        if self._mapping is not None:
            try:
                if isinstance(self._buf, memoryview):
                    self._buf.release()
                self._mapping.close()
            except BufferError:
                # A view still references the mapping; the GC will unmap it later.
                pass
            self._mapping = None


def _blob_id(raw: bytes, where: str) -> str:
    if len(raw) != L.BLOB_SHA256_LEN or not all(c in _HEX for c in raw):
        raise FormatError(f"{where}: blob id is not 64 hex characters")
    return raw.decode()


class RafsV6Inode(RafsInode):
    """An inode view at ``nid``."""

    _format: int
    _xattr_icount: int
    _mode: int
    _size: int
    _u: int
    _uid: int
    _gid: int
    _mtime: int
    _mtime_nsec: int
    _nlink: int

    def __init__(self, sb: RafsV6Super, nid: int) -> None:
        self.sb = sb
        self.ino = nid
        self._offset = sb._inode_offset(nid)
        buf = sb._buf
        fmt = buf[self._offset] | buf[self._offset + 1] << 8
        if fmt & 1:
            if self._offset + L.INODE_EXTENDED.size > sb._size:
                raise FormatError(f"extended inode {nid} runs past the bootstrap")
            (
                self._format,
                self._xattr_icount,
                self._mode,
                _r,
                self._size,
                self._u,
                _ino,
                self._uid,
                self._gid,
                self._mtime,
                self._mtime_nsec,
                self._nlink,
                _res,
            ) = L.INODE_EXTENDED.unpack_from(buf, self._offset)
        else:
            (
                self._format,
                self._xattr_icount,
                self._mode,
                self._nlink,
                self._size,
                _r,
                self._u,
                _ino,
                self._uid,
                self._gid,
                _res,
            ) = L.INODE_COMPACT.unpack_from(buf, self._offset)
            # Compact inodes carry no mtime; nydusd reports 0 (the kernel reports the build
            # time, which RAFS writes as 0 too).
            self._mtime = 0
            self._mtime_nsec = 0
        if self._format & ~0x0F:
            raise FormatError(f"inode {nid} has an unknown i_format {self._format:#x}")

    # --- attributes -------------------------------------------------------------------------
    @property
    def mode(self) -> int:
        return self._mode

    @property
    def uid(self) -> int:
        return self._uid

    @property
    def gid(self) -> int:
        return self._gid

    @property
    def nlink(self) -> int:
        return self._nlink

    @property
    def size(self) -> int:
        return self._size

    @property
    def rdev(self) -> int:
        fmt = stat.S_IFMT(self._mode)
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            return self._u
        return 0

    @property
    def mtime(self) -> int:
        return self._mtime

    @property
    def mtime_nsec(self) -> int:
        return self._mtime_nsec

    @property
    def datalayout(self) -> int:
        return (self._format >> 1) & 0x7

    @property
    def inode_size(self) -> int:
        return L.INODE_EXTENDED.size if self._format & 1 else L.INODE_COMPACT.size

    @property
    def _xattr_size(self) -> int:
        return L.xattr_body_from_icount(self._xattr_icount)

    # --- content ----------------------------------------------------------------------------
    def xattrs(self) -> list[tuple[bytes, bytes]]:
        size = self._xattr_size
        if not size:
            return []
        start = self._offset + self.inode_size
        if start + size > self.sb._size:
            raise FormatError(f"xattrs of inode {self.ino} run past the bootstrap")
        return L.unpack_xattrs(memoryview(self.sb._buf)[start : start + size])

    def _data_block(self, index: int, nblocks: int) -> memoryview:
        """Block ``index`` of a FLAT_* inode's data, possibly the inline tail (shorter)."""
        bs = self.sb.block_size
        layout = self.datalayout
        last = index == nblocks - 1
        tail = self._size % bs
        if layout == L.EROFS_INODE_FLAT_INLINE and last and tail:
            start = self._offset + self.inode_size + self._xattr_size
            length = tail
            if start // bs != (start + length - 1) // bs:
                raise FormatError(f"inline data of inode {self.ino} crosses a block boundary")
        elif layout in (L.EROFS_INODE_FLAT_PLAIN, L.EROFS_INODE_FLAT_INLINE):
            start = (self._u + index) * bs
            length = tail if last and tail else bs
        else:
            raise FormatError(f"inode {self.ino} has data layout {layout}, expected a flat one")
        if start + length > self.sb._size:
            raise FormatError(f"data of inode {self.ino} lies outside the bootstrap")
        return memoryview(self.sb._buf)[start : start + length]

    def symlink(self) -> bytes:
        if not self.is_symlink():
            raise FormatError(f"inode {self.ino} is not a symlink")
        if self._size == 0 or self._size > self.sb.block_size:
            raise FormatError(f"symlink inode {self.ino} has invalid size {self._size}")
        return bytes(self._data_block(0, 1)[: self._size])

    @cached_property
    def _dirents(self) -> list[tuple[bytes, int, int]]:
        """All entries (name, nid, file type) including ``.`` and ``..``, in on-disk order."""
        if not self.is_dir():
            raise FormatError(f"inode {self.ino} is not a directory")
        bs = self.sb.block_size
        nblocks = (self._size + bs - 1) // bs
        if self._size > self.sb._size:
            raise FormatError(f"directory {self.ino} is larger than the bootstrap")
        entries: list[tuple[bytes, int, int]] = []
        for b in range(nblocks):
            entries.extend(_parse_dirent_block(self._data_block(b, nblocks), self.ino))
        for prev, cur in itertools.pairwise(entries):
            if prev[0] >= cur[0]:
                raise FormatError(f"directory {self.ino} entries are not sorted by name")
        return entries

    def children(self) -> Sequence[tuple[bytes, int]]:
        return [(n, nid) for n, nid, _ in self._dirents if n not in (b".", b"..")]

    def lookup(self, name: bytes) -> int | None:
        entries = self._dirents
        i = bisect_right(entries, name, key=lambda e: e[0]) - 1
        if i >= 0 and entries[i][0] == name and name not in (b".", b".."):
            return entries[i][1]
        return None

    @property
    def parent(self) -> int:
        for name, nid, _ in self._dirents:
            if name == b"..":
                return nid
        raise FormatError(f"directory {self.ino} has no '..' entry")

    def chunk_addrs(self) -> list[L.ChunkAddr]:
        """The chunk address array (one per ``chunk_size`` of file data)."""
        if not self.is_reg():
            return []
        if self.datalayout != L.EROFS_INODE_CHUNK_BASED:
            raise FormatError(f"regular file {self.ino} is not chunk-based")
        chunk_size = self.sb.meta.chunk_size
        count = (self._size + chunk_size - 1) // chunk_size
        start = L.align(self._offset + self.inode_size + self._xattr_size, L.CHUNK_ADDR.size)
        if start + count * L.CHUNK_ADDR.size > self.sb._size:
            raise FormatError(f"chunk array of inode {self.ino} runs past the bootstrap")
        max_blob = len(self.sb.blobs)
        addrs = []
        for i in range(count):
            addr = L.ChunkAddr.unpack_from(self.sb._buf, start + i * L.CHUNK_ADDR.size)
            if addr.blob_index >= max_blob:
                raise FormatError(f"inode {self.ino} chunk {i} names missing blob")
            addrs.append(addr)
        return addrs

    def chunks(self) -> Sequence[ChunkInfo]:
        chunk_size = self.sb.meta.chunk_size
        out = []
        for i, addr in enumerate(self.chunk_addrs()):
            info = self.sb.chunk_record(addr)
            expected = min(chunk_size, self._size - i * chunk_size)
            if info.uncompressed_size != expected:
                raise FormatError(
                    f"inode {self.ino} chunk {i}: record size {info.uncompressed_size}, "
                    f"expected {expected}"
                )
            # The table is shared by every file with the same chunk; the offset is ours.
            info.file_offset = i * chunk_size
            out.append(info)
        return out


def _parse_dirent_block(block: memoryview, ino: int) -> list[tuple[bytes, int, int]]:
    if len(block) < L.DIRENT.size:
        raise FormatError(f"directory {ino} has a truncated dirent block")
    _, first_nameoff, _, _ = L.DIRENT.unpack_from(block, 0)
    if first_nameoff % L.DIRENT.size or not L.DIRENT.size <= first_nameoff <= len(block):
        raise FormatError(f"directory {ino} has an invalid first name offset {first_nameoff}")
    count = first_nameoff // L.DIRENT.size
    heads = [L.DIRENT.unpack_from(block, i * L.DIRENT.size) for i in range(count)]
    out = []
    for i, (nid, nameoff, ftype, _) in enumerate(heads):
        end = heads[i + 1][1] if i + 1 < count else len(block)
        if not first_nameoff <= nameoff <= end <= len(block):
            raise FormatError(f"directory {ino} has an invalid name offset {nameoff}")
        name = bytes(block[nameoff:end])
        if i + 1 == count:
            name = name.split(b"\0", 1)[0]
        if not name or len(name) > L.RAFS_MAX_NAME:
            raise FormatError(f"directory {ino} has an entry with an invalid name length")
        out.append((name, nid, ftype))
    return out
