"""``RafsFs``: a read-only RAFS image (v5 or v6) behind the ``FileSystem`` interface.

Metadata comes from the mapped bootstrap (``RafsSuper``); file data only through
``BlobDevice.read``. Behaviour follows upstream nydusd where users notice it: inode numbers
are the image's (v6: the nid; v5: ``i_ino``) except the root, which is ``ROOT_INODE``;
attribute and entry timeouts are effectively forever (the image never changes); xattr calls
answer ENOSYS unless ``enable_xattr``; without ``EXPLICIT_UID_GID`` every inode belongs to the
daemon's euid/egid; ``statfs`` reports upstream's values; files open with ``keep_cache``.

Concurrency: metadata operations parse the mapped bootstrap on the event loop (no await
points; each touches a few hundred bytes). ``read`` awaits the device, which fetches, caches,
decompresses and validates off the loop. Per-inode chunk lists are memoised in a small LRU.
"""

from __future__ import annotations

import bisect
import errno
import functools
import itertools
import os
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

from nydusfs.errors import BackendError, FormatError
from nydusfs.filesystem import ROOT_INODE, FileSystem, OpenResult
from nydusfs.metrics import FsIoStats
from nydusfs.rafs.inode import RafsInode
from nydusfs.rafs.superblock import EROFS_SUPER_MAGIC, RAFS_V5_MAGIC, RafsSuper
from nydusfs.storage.device import BlobIoDesc, ChunkInfo
from nydusfs.types import Attr, Context, DirEntry, Entry, StatVfs

# Upstream's RAFS_DEFAULT_ATTR_TIMEOUT (1 << 32 seconds): the image is immutable.
ATTR_TIMEOUT = float(1 << 32)
ATTR_BLOCK_SIZE = 4096
CHUNK_CACHE_INODES = 4096
# Chunks of a file offered to the cache past each read (in-file amplification, read-ahead).
READAHEAD_HINT_CHUNKS = 32
_DT = {
    stat.S_IFREG: 8,
    stat.S_IFDIR: 4,
    stat.S_IFLNK: 10,
    stat.S_IFCHR: 2,
    stat.S_IFBLK: 6,
    stat.S_IFIFO: 1,
    stat.S_IFSOCK: 12,
}


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _recorded(fop: str) -> Callable[[F], F]:
    """Count an operation in ``self.stats`` (upstream's FopRecorder): hits, errors, latency."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        async def wrapper(self: RafsFs, ctx: Context, inode: int, *args: Any) -> Any:
            started = time.perf_counter()
            try:
                result = await func(self, ctx, inode, *args)
            except BaseException:
                self.stats.record(fop, inode, ok=False, micros=_since(started))
                raise
            size = len(result) if fop == "read" else 0
            self.stats.record(fop, inode, ok=True, micros=_since(started), size=size)
            return result

        return cast(F, wrapper)

    return wrap


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1e6


class DataDevice(Protocol):
    """What ``RafsFs`` needs of ``BlobDevice``."""

    async def read(
        self, iovec: Sequence[BlobIoDesc], hint: Sequence[ChunkInfo] = ()
    ) -> bytes: ...


class RafsFs(FileSystem):
    """One mounted RAFS image."""

    def __init__(
        self,
        sup: RafsSuper,
        device: DataDevice | None,
        *,
        enable_xattr: bool = False,
        attr_timeout: float = ATTR_TIMEOUT,
        entry_timeout: float = ATTR_TIMEOUT,
        stats: FsIoStats | None = None,
    ) -> None:
        self.sup = sup
        self.stats = stats if stats is not None else FsIoStats()
        self.device = device
        self.enable_xattr = enable_xattr
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self._root = sup.meta.root_ino
        self._chunks: OrderedDict[int, tuple[list[ChunkInfo], list[int]]] = OrderedDict()
        self._handles = itertools.count(1)
        if sup.meta.explicit_uidgid:
            self._owner: tuple[int, int] | None = None
        else:
            self._owner = (os.geteuid(), os.getegid())
        self._magic = EROFS_SUPER_MAGIC if sup.meta.version == 6 else RAFS_V5_MAGIC

    # --- inode numbers ------------------------------------------------------------------------
    def _to_image(self, ino: int) -> int:
        return self._root if ino == ROOT_INODE else ino

    def _to_fuse(self, ino: int) -> int:
        return ROOT_INODE if ino == self._root else ino

    def _inode(self, ino: int) -> RafsInode:
        try:
            return self.sup.inode(self._to_image(ino))
        except FormatError as e:
            raise OSError(errno.EIO, f"inode {ino}: {e}") from e

    def _attr(self, inode: RafsInode) -> Attr:
        uid, gid = self._owner if self._owner is not None else (inode.uid, inode.gid)
        mtime = inode.mtime * 1_000_000_000 + inode.mtime_nsec
        return Attr(
            ino=self._to_fuse(inode.ino),
            mode=inode.mode,
            nlink=inode.nlink,
            uid=uid,
            gid=gid,
            rdev=inode.rdev,
            size=inode.size,
            blocks=inode.blocks,
            blksize=ATTR_BLOCK_SIZE,
            atime_ns=mtime,
            mtime_ns=mtime,
            ctime_ns=mtime,
        )

    def _entry(self, inode: RafsInode) -> Entry:
        attr = self._attr(inode)
        return Entry(attr.ino, attr, 0, self.entry_timeout, self.attr_timeout)

    # --- metadata -----------------------------------------------------------------------------
    @_recorded("lookup")
    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        dir_inode = self._inode(parent)
        if not dir_inode.is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")
        try:
            ino = dir_inode.lookup(name)
            if ino is None:
                raise OSError(errno.ENOENT, "no such file")
            return self._entry(self.sup.inode(ino))
        except FormatError as e:
            raise OSError(errno.EIO, f"lookup in inode {parent}: {e}") from e

    @_recorded("getattr")
    async def getattr(self, ctx: Context, inode: int, fh: int | None = None) -> Attr:
        return self._attr(self._inode(inode))

    @_recorded("readlink")
    async def readlink(self, ctx: Context, inode: int) -> bytes:
        node = self._inode(inode)
        if not node.is_symlink():
            raise OSError(errno.EINVAL, "not a symlink")
        try:
            return node.symlink()
        except FormatError as e:
            raise OSError(errno.EIO, str(e)) from e

    @_recorded("access")
    async def access(self, ctx: Context, inode: int, mask: int) -> None:
        attr = self._attr(self._inode(inode))
        if mask & os.W_OK:
            raise OSError(errno.EROFS, "read-only filesystem")
        if ctx.uid == 0:
            return
        for bit in (os.R_OK, os.X_OK):
            if not mask & bit:
                continue
            if attr.uid == ctx.uid:
                allowed = attr.mode & (bit << 6)
            elif attr.gid == ctx.gid:
                allowed = attr.mode & (bit << 3)
            else:
                allowed = attr.mode & bit
            if not allowed:
                raise OSError(errno.EACCES, "permission denied")

    @_recorded("statfs")
    async def statfs(self, ctx: Context, inode: int) -> StatVfs:
        return StatVfs(
            bsize=512,
            frsize=0,
            blocks=0,
            bfree=0,
            bavail=0,
            files=self.sup.meta.inodes_count,
            ffree=0,
            favail=0,
            fsid=self._magic,
            namemax=255,
        )

    # --- files --------------------------------------------------------------------------------
    @_recorded("open")
    async def open(self, ctx: Context, inode: int, flags: int) -> OpenResult:
        node = self._inode(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise OSError(errno.EROFS, "read-only filesystem")
        if node.is_dir():
            raise OSError(errno.EISDIR, "is a directory")
        return OpenResult(next(self._handles), keep_cache=True)

    @_recorded("release")
    async def release(self, ctx: Context, inode: int, fh: int) -> None:
        return None

    def _chunk_index(self, node: RafsInode) -> tuple[list[ChunkInfo], list[int]]:
        cached = self._chunks.get(node.ino)
        if cached is not None:
            self._chunks.move_to_end(node.ino)
            return cached
        chunks = list(node.chunks())
        entry = (chunks, [c.file_offset for c in chunks])
        self._chunks[node.ino] = entry
        if len(self._chunks) > CHUNK_CACHE_INODES:
            self._chunks.popitem(last=False)
        return entry

    def iovec(self, node: RafsInode, offset: int, size: int) -> list[BlobIoDesc | int]:
        """The chunk slices covering ``[offset, offset+size)``; an int is a hole of that size."""
        end = min(node.size, offset + size)
        if offset >= end:
            return []
        chunks, starts = self._chunk_index(node)
        out: list[BlobIoDesc | int] = []
        pos = offset
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        while pos < end:
            chunk = chunks[i] if i < len(chunks) else None
            if chunk is None or chunk.file_offset > pos:
                hole_end = min(end, chunk.file_offset if chunk is not None else end)
                out.append(hole_end - pos)
                pos = hole_end
                continue
            chunk_end = chunk.file_offset + chunk.uncompressed_size
            if chunk_end <= pos:
                i += 1
                continue
            take = min(end, chunk_end) - pos
            blob = self.sup.blobs[chunk.blob_index]
            out.append(BlobIoDesc(blob, chunk, pos - chunk.file_offset, take))
            pos += take
            i += 1
        return out

    def _following(self, node: RafsInode, end: int) -> list[ChunkInfo]:
        """Up to ``READAHEAD_HINT_CHUNKS`` chunks of ``node`` that start at or after ``end``:
        what the cache may fetch along with a read that ends there."""
        chunks, starts = self._chunk_index(node)
        i = bisect.bisect_left(starts, end)
        return chunks[i : i + READAHEAD_HINT_CHUNKS]

    @_recorded("read")
    async def read(self, ctx: Context, inode: int, fh: int, offset: int, size: int) -> bytes:
        node = self._inode(inode)
        if not node.is_reg():
            raise OSError(errno.EISDIR if node.is_dir() else errno.EINVAL, "not a regular file")
        try:
            parts = self.iovec(node, offset, size)
        except FormatError as e:
            raise OSError(errno.EIO, f"inode {inode}: {e}") from e
        descs = [p for p in parts if isinstance(p, BlobIoDesc)]
        if not descs:
            return bytes(sum(p for p in parts if isinstance(p, int)))
        if self.device is None:
            raise OSError(errno.EIO, "the image has no data device")
        try:
            data = await self.device.read(descs, self._following(node, offset + size))
        except BackendError:
            raise
        except FormatError as e:
            raise OSError(errno.EIO, str(e)) from e
        if len(descs) == len(parts):
            return data
        # Holes (v5 images with HAS_HOLE) read as zeros between the chunk slices.
        out = bytearray()
        pos = 0
        for part in parts:
            if isinstance(part, int):
                out += bytes(part)
            else:
                out += data[pos : pos + part.size]
                pos += part.size
        return bytes(out)

    # --- directories --------------------------------------------------------------------------
    @_recorded("opendir")
    async def opendir(self, ctx: Context, inode: int) -> OpenResult:
        if not self._inode(inode).is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")
        return OpenResult(next(self._handles), keep_cache=True)

    async def releasedir(self, ctx: Context, inode: int, fh: int) -> None:
        return None

    def _entries(self, inode: int) -> list[tuple[bytes, int]]:
        node = self._inode(inode)
        if not node.is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")
        try:
            parent = self._to_fuse(node.parent)
            return [(b".", inode), (b"..", parent), *node.children()]
        except FormatError as e:
            raise OSError(errno.EIO, f"directory {inode}: {e}") from e

    async def readdir(
        self, ctx: Context, inode: int, fh: int, offset: int
    ) -> AsyncIterator[DirEntry]:
        self.stats.record("readdir", inode, ok=True, micros=0)
        entries = self._entries(inode)
        for index in range(offset, len(entries)):
            name, ino = entries[index]
            child = self.sup.inode(self._to_image(ino)) if name not in (b".", b"..") else None
            kind = _DT[stat.S_IFMT(child.mode)] if child is not None else 4
            yield DirEntry(self._to_fuse(ino), index + 1, kind, name)

    async def readdirplus(
        self, ctx: Context, inode: int, fh: int, offset: int
    ) -> AsyncIterator[tuple[DirEntry, Entry | None]]:
        self.stats.record("readdirplus", inode, ok=True, micros=0)
        entries = self._entries(inode)
        for index in range(offset, len(entries)):
            name, ino = entries[index]
            if name in (b".", b".."):
                yield DirEntry(self._to_fuse(ino), index + 1, 4, name), None
                continue
            child = self.sup.inode(ino)
            entry = self._entry(child)
            yield DirEntry(entry.ino, index + 1, _DT[stat.S_IFMT(child.mode)], name), entry

    # --- xattrs -------------------------------------------------------------------------------
    def _xattrs(self, inode: int) -> list[tuple[bytes, bytes]]:
        if not self.enable_xattr:
            raise OSError(errno.ENOSYS, "xattrs are disabled (enable_xattr)")
        try:
            return self._inode(inode).xattrs()
        except FormatError as e:
            raise OSError(errno.EIO, str(e)) from e

    @_recorded("getxattr")
    async def getxattr(self, ctx: Context, inode: int, name: bytes) -> bytes:
        for key, value in self._xattrs(inode):
            if key == name:
                return value
        raise OSError(errno.ENODATA, "no such attribute")

    @_recorded("listxattr")
    async def listxattr(self, ctx: Context, inode: int) -> list[bytes]:
        return [key for key, _ in self._xattrs(inode)]

    async def destroy(self) -> None:
        self._chunks.clear()
