"""``PassthroughFs``: a host directory shared through the ``FileSystem`` interface.

Every inode the kernel knows is held as an ``O_PATH | O_NOFOLLOW`` fd (``InodeTable``) and every
operation is a ``*at`` syscall relative to such an fd with a single, checked name component, or
a syscall on the fd itself (``AT_EMPTY_PATH``, or reopening the inode through its
``/proc/self/fd`` magic link). No path is ever walked from the shared directory down, so a
symlink, a ``..`` or a rename racing with a lookup cannot lead a request outside the shared
directory: the walk never happens, and the last component is never followed (``O_NOFOLLOW``).

Objects are created as the daemon's user and then given to the caller's uid/gid (``ctx``), so a
container sees its own files. Permission checks are the kernel's (the FUSE mount uses
``default_permissions``).

Concurrency: metadata syscalls (lookup, stat, create, rename, chmod, xattrs...) run inline on
the event loop. They cost a few microseconds on a local filesystem, while a hop to a worker
thread costs far more on this project's machines (measured: 10k ``fstatat`` inline 0.07 s,
through ``trio.to_thread.run_sync`` 0.88 s), and they are the bulk of the requests. Data
transfers of ``THREAD_IO_BYTES`` or more, ``fsync`` and ``fsyncdir`` run in worker threads under
a ``CapacityLimiter`` of ``io_threads``: these are the calls that wait for a disk.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from nydusfs.filesystem import (
    SETATTR_ATIME,
    SETATTR_ATIME_NOW,
    SETATTR_GID,
    SETATTR_MODE,
    SETATTR_MTIME,
    SETATTR_MTIME_NOW,
    SETATTR_SIZE,
    SETATTR_UID,
    FileSystem,
    OpenResult,
)
from nydusfs.metrics import FsIoStats
from nydusfs.passthrough import sys as psys
from nydusfs.passthrough.inode import O_PATH_FLAGS, Inode, InodeTable, attr_of, check_name
from nydusfs.types import Attr, Context, DirEntry, Entry, StatVfs

T = TypeVar("T")
THREAD_IO_BYTES = 64 * 1024
DEFAULT_TIMEOUT = 1.0
RENAME_FLAGS = psys.RENAME_NOREPLACE | psys.RENAME_EXCHANGE | psys.RENAME_WHITEOUT
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW
_DT = {stat.S_IFREG: 8, stat.S_IFDIR: 4, stat.S_IFLNK: 10, stat.S_IFCHR: 2, stat.S_IFBLK: 6,
       stat.S_IFIFO: 1, stat.S_IFSOCK: 12}  # fmt: skip


def dtype(mode: int) -> int:
    """The ``DT_*`` value of a ``st_mode``."""
    return _DT.get(stat.S_IFMT(mode), 0)


def check_access(attr: Attr, ctx: Context, mask: int) -> None:
    """``access(2)`` against mode bits: root may read and write anything and execute anything
    with an x bit (or a directory); others get the owner, group or other bits."""
    if ctx.uid == 0:
        if mask & os.X_OK and not (attr.mode & 0o111 or stat.S_ISDIR(attr.mode)):
            raise OSError(errno.EACCES, "permission denied")
        return
    shift = 6 if attr.uid == ctx.uid else 3 if attr.gid == ctx.gid else 0
    if (mask & 7) & ~((attr.mode >> shift) & 7):
        raise OSError(errno.EACCES, "permission denied")


@dataclass(slots=True, eq=False)
class Handle:
    fd: int
    ino: int
    entries: list[tuple[bytes, int, int]] | None = field(default=None)  # dirs: name, ino, type


class PassthroughFs(FileSystem):
    """``source`` (a host directory) as a ``FileSystem``."""

    def __init__(
        self,
        source: str | bytes,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        writable: bool = True,
        io_threads: int = 4,
        max_open: int | None = None,
    ) -> None:
        """``max_open``: non-directory inodes that keep an fd (the rest are reopened by file
        handle); by default a quarter of ``RLIMIT_NOFILE``."""
        root_fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.source = os.fsdecode(source)
        self.inodes = InodeTable(root_fd, max_open)
        self.timeout = timeout
        self.writable = writable
        self.stats = FsIoStats()  # upstream's passthroughfs keeps no fop counters either
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        self._limiter = trio.CapacityLimiter(io_threads)
        # The daemon's umask would narrow the modes callers ask for: undone with a chmod.
        self._umask = os.umask(0o022)
        os.umask(self._umask)

    # --- helpers ------------------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        return self.inodes.get(ino)

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, f"no open handle {fh}")
        return h

    def _check_writable(self) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "read-only filesystem")

    def _entry(self, node: Inode, st: os.stat_result) -> Entry:
        return Entry(node.ino, attr_of(node.ino, st), 0, self.timeout, self.timeout)

    def _lookup(self, parent: Inode, name: bytes) -> Entry:
        check_name(name)
        fd = os.open(name, O_PATH_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._entry(self.inodes.add(fd, st), st)

    def _adopt(self, ctx: Context, parent: Inode, name: bytes, mode: int | None) -> Entry:
        """Look up what was just created, fix its mode for the daemon's umask and give it to
        the caller. On failure the new object is removed again."""
        entry = self._lookup(parent, name)
        try:
            node = self.inodes.get(entry.ino)
            if mode is not None and mode & self._umask and not stat.S_ISLNK(entry.attr.mode):
                os.chmod(node.proc_path, mode & 0o7777)
            if (ctx.uid, ctx.gid) != (entry.attr.uid, entry.attr.gid):
                psys.fchown_path_fd(node.fd, ctx.uid, ctx.gid)
            return self._entry(node, os.fstat(node.fd))
        except OSError:
            self.inodes.forget(entry.ino, 1)
            if stat.S_ISDIR(entry.attr.mode):
                os.rmdir(name, dir_fd=parent.fd)
            else:
                os.unlink(name, dir_fd=parent.fd)
            raise

    async def _io(self, size: int, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)``: inline for small transfers, in a worker thread for large ones."""
        if size < THREAD_IO_BYTES:
            return func(*args)
        return await trio.to_thread.run_sync(func, *args, limiter=self._limiter)

    # --- metadata -----------------------------------------------------------------------------
    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        return self._lookup(self.inode(parent), name)

    async def forget(self, inode: int, nlookup: int) -> None:
        self.inodes.forget(inode, nlookup)

    async def getattr(self, ctx: Context, inode: int, fh: int | None = None) -> Attr:
        h = self._handles.get(fh) if fh is not None else None
        fd = h.fd if h is not None else self.inode(inode).fd
        return attr_of(inode, os.fstat(fd))

    async def setattr(
        self, ctx: Context, inode: int, attr: Attr, valid: int, fh: int | None = None
    ) -> Attr:
        self._check_writable()
        node = self.inode(inode)
        h = self._handles.get(fh) if fh is not None else None
        if valid & SETATTR_MODE:
            if node.kind == stat.S_IFLNK:
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode of their own")
            if h is not None:
                os.fchmod(h.fd, attr.mode & 0o7777)
            else:
                os.chmod(node.proc_path, attr.mode & 0o7777)
        if valid & (SETATTR_UID | SETATTR_GID):
            uid = attr.uid if valid & SETATTR_UID else -1
            gid = attr.gid if valid & SETATTR_GID else -1
            psys.fchown_path_fd(node.fd, uid, gid)
        if valid & SETATTR_SIZE:
            if node.kind != stat.S_IFREG:
                raise OSError(errno.EISDIR if node.kind == stat.S_IFDIR else errno.EINVAL, "size")
            try:
                if h is None:
                    raise OSError(errno.EBADF, "no handle")
                os.ftruncate(h.fd, attr.size)
            except OSError as e:
                if e.errno not in (errno.EBADF, errno.EINVAL):
                    raise
                os.truncate(node.proc_path, attr.size)  # no handle, or one opened read-only
        if valid & (SETATTR_ATIME | SETATTR_MTIME | SETATTR_ATIME_NOW | SETATTR_MTIME_NOW):
            atime = _time(valid, SETATTR_ATIME, SETATTR_ATIME_NOW, attr.atime_ns)
            mtime = _time(valid, SETATTR_MTIME, SETATTR_MTIME_NOW, attr.mtime_ns)
            psys.utimens_path_fd(node.fd, atime, mtime)
        return attr_of(inode, os.fstat(h.fd if h is not None else node.fd))

    async def readlink(self, ctx: Context, inode: int) -> bytes:
        node = self.inode(inode)
        if node.kind != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        return os.readlink(b"", dir_fd=node.fd)

    async def access(self, ctx: Context, inode: int, mask: int) -> None:
        if mask & os.W_OK and not self.writable:
            raise OSError(errno.EROFS, "read-only filesystem")
        check_access(await self.getattr(ctx, inode), ctx, mask)

    async def statfs(self, ctx: Context, inode: int) -> StatVfs:
        st = os.fstatvfs(self.inode(inode).fd)
        return StatVfs(st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail,
                       st.f_files, st.f_ffree, st.f_favail, 0, st.f_namemax)  # fmt: skip

    # --- namespace changes --------------------------------------------------------------------
    async def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        self._check_writable()
        p = self.inode(parent)
        check_name(name)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        mode = kind | (mode & ~umask & 0o7777)
        os.mknod(name, mode, rdev, dir_fd=p.fd)
        return self._adopt(ctx, p, name, mode)

    async def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        self._check_writable()
        p = self.inode(parent)
        check_name(name)
        mode = mode & ~umask & 0o7777
        os.mkdir(name, mode, dir_fd=p.fd)
        return self._adopt(ctx, p, name, mode)

    async def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        self._check_writable()
        p = self.inode(parent)
        check_name(name)
        if not target or b"\0" in target:
            raise OSError(errno.EINVAL, "invalid symlink target")
        os.symlink(target, name, dir_fd=p.fd)
        return self._adopt(ctx, p, name, None)

    async def link(self, ctx: Context, inode: int, new_parent: int, new_name: bytes) -> Entry:
        self._check_writable()
        node, p = self.inode(inode), self.inode(new_parent)
        check_name(new_name)
        if node.kind == stat.S_IFDIR:
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        # linkat(AT_FDCWD, "/proc/self/fd/N", ..., AT_SYMLINK_FOLLOW) links the inode itself.
        os.link(node.proc_path, new_name, dst_dir_fd=p.fd, follow_symlinks=True)
        return self._lookup(p, new_name)

    def _pin(self, parent_fd: int, name: bytes) -> None:
        """Give a known inode whose fd was closed its fd back before its last name may go: a
        file handle cannot reopen an unlinked inode, and the kernel may still use it."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except OSError:
            return
        node = self.inodes.known((st.st_dev, st.st_ino))
        if node is not None and node.path_fd < 0:
            node.fd  # noqa: B018 (reopens)

    async def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self._check_writable()
        check_name(name)
        parent_fd = self.inode(parent).fd
        self._pin(parent_fd, name)
        os.unlink(name, dir_fd=parent_fd)

    async def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._check_writable()
        check_name(name)
        os.rmdir(name, dir_fd=self.inode(parent).fd)

    async def rename(
        self, ctx: Context, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._check_writable()
        if flags & ~RENAME_FLAGS:
            raise OSError(errno.EINVAL, f"unknown rename flags {flags:#x}")
        check_name(name)
        check_name(new_name)
        old_fd, new_fd = self.inode(parent).fd, self.inode(new_parent).fd
        if not flags & (psys.RENAME_NOREPLACE | psys.RENAME_EXCHANGE):
            self._pin(new_fd, new_name)  # about to be replaced
        psys.renameat2(old_fd, name, new_fd, new_name, flags)

    # --- files --------------------------------------------------------------------------------
    def _new_handle(self, fd: int, ino: int) -> OpenResult:
        fh = next(self._fh)
        self._handles[fh] = Handle(fd, ino)
        return OpenResult(fh)

    async def open(self, ctx: Context, inode: int, flags: int) -> OpenResult:
        node = self.inode(inode)
        if node.kind != stat.S_IFREG:
            # Devices and FIFOs are opened by the kernel itself; a FIFO would block us here.
            raise OSError(errno.EISDIR if node.kind == stat.S_IFDIR else errno.EINVAL, "open")
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._check_writable()
        fd = os.open(node.proc_path, (flags & ~_OPEN_DROP) | os.O_CLOEXEC)
        return self._new_handle(fd, inode)

    async def create(
        self, ctx: Context, parent: int, name: bytes, mode: int, flags: int, umask: int
    ) -> tuple[OpenResult, Entry]:
        self._check_writable()
        p = self.inode(parent)
        check_name(name)
        mode = mode & ~umask & 0o7777
        base = (flags & ~_OPEN_DROP) | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(name, base | os.O_CREAT | os.O_EXCL, mode, dir_fd=p.fd)
            created = True
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd = os.open(name, base, dir_fd=p.fd)  # an existing symlink fails: ELOOP
            created = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EISDIR, "not a regular file")
            # Reopen the created file itself as O_PATH (no O_NOFOLLOW: that would open the
            # magic link, not the file it stands for).
            path_fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
            node = self.inodes.add(path_fd, st)
            try:
                if created and mode & self._umask:
                    os.fchmod(fd, mode)
                if created and (ctx.uid, ctx.gid) != (st.st_uid, st.st_gid):
                    os.fchown(fd, ctx.uid, ctx.gid)
                entry = self._entry(node, os.fstat(fd))
            except BaseException:
                self.inodes.forget(node.ino, 1)
                raise
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(name, dir_fd=p.fd)
            raise
        return self._new_handle(fd, node.ino), entry

    async def read(self, ctx: Context, inode: int, fh: int, offset: int, size: int) -> bytes:
        fd = self._handle(fh).fd
        return await self._io(size, os.pread, fd, size, offset)

    async def write(self, ctx: Context, inode: int, fh: int, offset: int, data: bytes) -> int:
        fd = self._handle(fh).fd
        return await self._io(len(data), os.pwrite, fd, data, offset)

    async def flush(self, ctx: Context, inode: int, fh: int) -> None:
        # What close(2) of one of several descriptors does: drop POSIX locks, report
        # delayed write errors, while the handle itself stays open.
        os.close(os.dup(self._handle(fh).fd))

    async def fsync(self, ctx: Context, inode: int, fh: int, datasync: bool) -> None:
        fd = self._handle(fh).fd
        await trio.to_thread.run_sync(
            os.fdatasync if datasync else os.fsync, fd, limiter=self._limiter
        )

    async def release(self, ctx: Context, inode: int, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            os.close(h.fd)

    # --- directories --------------------------------------------------------------------------
    async def opendir(self, ctx: Context, inode: int) -> OpenResult:
        node = self.inode(inode)
        if node.kind != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, "not a directory")
        fd = os.open(node.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._new_handle(fd, inode)

    def _list(self, h: Handle) -> list[tuple[bytes, int, int]]:
        """A snapshot of the directory (taken at the first read, as a stable cookie space)."""
        node = self.inode(h.ino)
        dev = node.key[0]
        entries = [(b".", h.ino, 4), (b"..", self._parent_number(node), 4)]
        with os.scandir(h.fd) as it:
            for e in it:
                name = os.fsencode(e.name)
                if e.is_dir(follow_symlinks=False):
                    kind = 4
                elif e.is_symlink():
                    kind = 10
                elif e.is_file(follow_symlinks=False):
                    kind = 8
                else:
                    try:
                        kind = dtype(e.stat(follow_symlinks=False).st_mode)
                    except OSError:
                        continue  # gone meanwhile
                entries.append((name, self.inodes.number((dev, e.inode())), kind))
        return entries

    def _parent_number(self, node: Inode) -> int:
        """The number of ``..`` when the kernel knows it (for ``d_ino`` only), else the node's
        own (the shared directory's parent is never looked at past its number)."""
        if node is self.inodes.root:
            return node.ino
        try:
            st = os.stat(b"..", dir_fd=node.fd, follow_symlinks=False)
        except OSError:
            return node.ino
        known = self.inodes.known((st.st_dev, st.st_ino))
        return known.ino if known is not None else node.ino

    def _entries(self, h: Handle, offset: int) -> list[tuple[bytes, int, int]]:
        if h.entries is None or offset == 0:
            h.entries = self._list(h)
        return h.entries

    async def readdir(
        self, ctx: Context, inode: int, fh: int, offset: int
    ) -> AsyncIterator[DirEntry]:
        h = self._handle(fh)
        entries = self._entries(h, offset)
        for i in range(offset, len(entries)):
            name, ino, kind = entries[i]
            yield DirEntry(ino, i + 1, kind, name)

    async def readdirplus(
        self, ctx: Context, inode: int, fh: int, offset: int
    ) -> AsyncIterator[tuple[DirEntry, Entry | None]]:
        h = self._handle(fh)
        parent = self.inode(inode)
        entries = self._entries(h, offset)
        for i in range(offset, len(entries)):
            name, ino, kind = entries[i]
            if name in (b".", b".."):
                yield DirEntry(ino, i + 1, kind, name), None
                continue
            try:
                entry = self._lookup(parent, name)
            except FileNotFoundError:
                continue  # removed since the snapshot
            yield DirEntry(entry.ino, i + 1, dtype(entry.attr.mode), name), entry

    async def releasedir(self, ctx: Context, inode: int, fh: int) -> None:
        await self.release(ctx, inode, fh)

    async def fsyncdir(self, ctx: Context, inode: int, fh: int, datasync: bool) -> None:
        await self.fsync(ctx, inode, fh, datasync)

    # --- xattrs -------------------------------------------------------------------------------
    def _xattr_path(self, inode: int) -> str:
        node = self.inode(inode)
        if node.kind == stat.S_IFLNK:
            # The magic link of a symlink cannot be followed to the symlink for xattr calls.
            raise OSError(errno.EPERM, "no extended attributes on symlinks here")
        return node.proc_path

    async def getxattr(self, ctx: Context, inode: int, name: bytes) -> bytes:
        node = self.inode(inode)
        if node.kind == stat.S_IFLNK:
            raise OSError(errno.ENODATA, "no such attribute")
        return os.getxattr(node.proc_path, name)

    async def listxattr(self, ctx: Context, inode: int) -> list[bytes]:
        node = self.inode(inode)
        if node.kind == stat.S_IFLNK:
            return []
        return [os.fsencode(n) for n in os.listxattr(node.proc_path)]

    async def setxattr(
        self, ctx: Context, inode: int, name: bytes, value: bytes, flags: int
    ) -> None:
        self._check_writable()
        os.setxattr(self._xattr_path(inode), name, value, flags)

    async def removexattr(self, ctx: Context, inode: int, name: bytes) -> None:
        self._check_writable()
        os.removexattr(self._xattr_path(inode), name)

    async def destroy(self) -> None:
        for h in self._handles.values():
            os.close(h.fd)
        self._handles.clear()
        self.inodes.close()


def _time(valid: int, bit: int, now_bit: int, value: int) -> int | None:
    """The time to set: the caller's, now, or None (left alone)."""
    if valid & now_bit:
        return time.time_ns()
    return value if valid & bit else None
