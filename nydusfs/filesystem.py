"""``FileSystem``: the one interface between filesystems and the frontends that serve them.

Shaped by the FUSE wire protocol (as pyfuse3's ``Operations`` and fuse-backend-rs's
``FileSystem``). ``RafsFs``, ``PassthroughFs`` and ``OverlayFs`` implement it; ``Vfs``
implements it by routing to the filesystem mounted under each part of its pseudo root; every
frontend (pyfuse3, raw /dev/fuse, virtio-fs) drives it; tests call it directly.

Contract:
- Every method is ``async`` and runs on the daemon's trio event loop. Code between awaits is
  atomic; a method that blocks (disk or network I/O, decompression) awaits
  ``trio.to_thread.run_sync`` instead of blocking the loop.
- Names are ``bytes`` end to end. Inode numbers are ints; ``ROOT_INODE`` (1) is the root.
- Handle operations receive both the inode and the handle (``fh``) returned by
  ``open``/``opendir``/``create``.
- A filesystem raises only ``OSError`` with an errno. Frontends answer ``-errno``; any other
  exception is a bug: frontends log it with its traceback, answer ``EIO`` and keep serving.
- Unimplemented methods raise ``ENOSYS`` (the defaults below), which the kernel remembers for
  some operations and stops asking.
- ``read`` may return ``bytes`` or a ``memoryview`` (zero-copy paths need no interface change).
- ``lookup`` counts a reference on the returned inode; ``forget``/``batch_forget`` drop them.
  ``lookup`` of ``.`` and ``..`` is the frontend's job, not the filesystem's.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Sequence

from nydusfs.types import Attr, Context, DirEntry, Entry, StatVfs

ROOT_INODE = 1

# setattr "valid" bits (FATTR_* in the FUSE protocol)
SETATTR_MODE = 1 << 0
SETATTR_UID = 1 << 1
SETATTR_GID = 1 << 2
SETATTR_SIZE = 1 << 3
SETATTR_ATIME = 1 << 4
SETATTR_MTIME = 1 << 5
SETATTR_FH = 1 << 6
SETATTR_ATIME_NOW = 1 << 7
SETATTR_MTIME_NOW = 1 << 8
SETATTR_CTIME = 1 << 10


class OpenResult:
    """What ``open``/``create``/``opendir`` hand back: the handle and the caching policy."""

    __slots__ = ("direct_io", "fh", "keep_cache")

    def __init__(self, fh: int, *, keep_cache: bool = False, direct_io: bool = False) -> None:
        self.fh = fh
        self.keep_cache = keep_cache  # the kernel may keep the page cache across opens
        self.direct_io = direct_io

    def __repr__(self) -> str:
        return f"OpenResult(fh={self.fh}, keep_cache={self.keep_cache})"


def _enosys() -> OSError:
    return OSError(errno.ENOSYS, "operation not supported by this filesystem")


class FileSystem:
    """Base class: every operation raises ENOSYS until a filesystem implements it."""

    # --- lifecycle ----------------------------------------------------------------------------
    async def init(self) -> None:
        """Called once before the first request (FUSE INIT)."""

    async def destroy(self) -> None:
        """Called once after the last request (unmount); release every resource."""

    # --- names and attributes -----------------------------------------------------------------
    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        raise _enosys()

    async def forget(self, inode: int, nlookup: int) -> None:
        """Drop ``nlookup`` references taken by ``lookup``/``create``/... (never answered)."""

    async def batch_forget(self, items: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in items:
            await self.forget(inode, nlookup)

    async def getattr(self, ctx: Context, inode: int, fh: int | None = None) -> Attr:
        raise _enosys()

    async def setattr(
        self, ctx: Context, inode: int, attr: Attr, valid: int, fh: int | None = None
    ) -> Attr:
        """Change the fields of ``attr`` selected by ``valid`` (``SETATTR_*`` bits)."""
        raise _enosys()

    async def readlink(self, ctx: Context, inode: int) -> bytes:
        raise _enosys()

    async def access(self, ctx: Context, inode: int, mask: int) -> None:
        raise _enosys()

    async def statfs(self, ctx: Context, inode: int) -> StatVfs:
        raise _enosys()

    # --- namespace changes --------------------------------------------------------------------
    async def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        raise _enosys()

    async def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        raise _enosys()

    async def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        raise _enosys()

    async def link(self, ctx: Context, inode: int, new_parent: int, new_name: bytes) -> Entry:
        raise _enosys()

    async def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _enosys()

    async def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _enosys()

    async def rename(
        self,
        ctx: Context,
        parent: int,
        name: bytes,
        new_parent: int,
        new_name: bytes,
        flags: int,
    ) -> None:
        """``flags``: ``RENAME_NOREPLACE`` (1) or ``RENAME_EXCHANGE`` (2) or 0."""
        raise _enosys()

    # --- files --------------------------------------------------------------------------------
    async def open(self, ctx: Context, inode: int, flags: int) -> OpenResult:
        raise _enosys()

    async def create(
        self, ctx: Context, parent: int, name: bytes, mode: int, flags: int, umask: int
    ) -> tuple[OpenResult, Entry]:
        raise _enosys()

    async def read(self, ctx: Context, inode: int, fh: int, offset: int, size: int) -> bytes:
        """At most ``size`` bytes at ``offset``; fewer only at end of file."""
        raise _enosys()

    async def write(self, ctx: Context, inode: int, fh: int, offset: int, data: bytes) -> int:
        raise _enosys()

    async def flush(self, ctx: Context, inode: int, fh: int) -> None:
        raise _enosys()

    async def fsync(self, ctx: Context, inode: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    async def release(self, ctx: Context, inode: int, fh: int) -> None:
        raise _enosys()

    # --- directories --------------------------------------------------------------------------
    async def opendir(self, ctx: Context, inode: int) -> OpenResult:
        raise _enosys()

    def readdir(self, ctx: Context, inode: int, fh: int, offset: int) -> AsyncIterator[DirEntry]:
        """Entries after the cookie ``offset`` (0 = from the start), each with its own cookie.

        Includes ``.`` and ``..`` when the filesystem has them. The frontend stops iterating
        when its reply buffer is full and resumes later from the last cookie it sent.
        """
        raise _enosys()

    def readdirplus(
        self, ctx: Context, inode: int, fh: int, offset: int
    ) -> AsyncIterator[tuple[DirEntry, Entry | None]]:
        """As ``readdir`` with each entry's lookup result (counting a lookup reference).

        ``None`` for ``.`` and ``..``, which take no reference.
        """
        raise _enosys()

    async def releasedir(self, ctx: Context, inode: int, fh: int) -> None:
        raise _enosys()

    async def fsyncdir(self, ctx: Context, inode: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    # --- extended attributes ------------------------------------------------------------------
    async def getxattr(self, ctx: Context, inode: int, name: bytes) -> bytes:
        raise _enosys()

    async def listxattr(self, ctx: Context, inode: int) -> list[bytes]:
        raise _enosys()

    async def setxattr(
        self, ctx: Context, inode: int, name: bytes, value: bytes, flags: int
    ) -> None:
        raise _enosys()

    async def removexattr(self, ctx: Context, inode: int, name: bytes) -> None:
        raise _enosys()
