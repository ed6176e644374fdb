"""The pyfuse3 frontend: serves a ``FileSystem`` on a kernel FUSE mount.

The only module that imports pyfuse3. It translates pyfuse3's ``Operations`` calls into
``FileSystem`` calls: pyfuse3 hands file operations only a handle, so the frontend issues its
own handles and remembers which inode and inner handle each stands for. ``OSError`` from a
filesystem becomes ``FUSEError(errno)``; any other exception is logged with its traceback and
answered EIO, and serving goes on.

Every request is recorded in an ``InflightTracker`` while it runs (``/api/v1/metrics/inflight``,
upstream's hang detection). ``KernelNotifier`` drops entries from the kernel's dentry cache when
the VFS changes under a live session (umount, remount).

Runs inside ``trio`` (pyfuse3's main loop is trio-based), so filesystem coroutines run on the
same loop as the FUSE request workers; pyfuse3 starts up to ``max_tasks`` workers, which is
our request concurrency. Kernel notifications block (the kernel may wait for requests we are
serving), so they run in a worker thread, and the session is not closed under them.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from nydusfs.filesystem import (
    SETATTR_ATIME,
    SETATTR_CTIME,
    SETATTR_GID,
    SETATTR_MODE,
    SETATTR_MTIME,
    SETATTR_SIZE,
    SETATTR_UID,
    FileSystem,
    OpenResult,
)
from nydusfs.fuse.bdi import set_readahead
from nydusfs.metrics import InflightTracker
from nydusfs.types import Attr, Context, Entry

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Operations whose first argument is one of our file handles rather than an inode.
_HANDLE_OPS = frozenset(
    {"read", "write", "flush", "fsync", "release", "readdir", "releasedir", "fsyncdir"}
)


def _errors(func: F) -> F:
    """OSError -> FUSEError(errno); anything else is a bug: log it, answer EIO, keep serving.
    The request is listed in the in-flight tracker while it runs."""
    name = func.__name__

    @functools.wraps(func)
    async def wrapper(self: Pyfuse3Operations, *args: Any, **kwargs: Any) -> Any:
        if self.readahead_pending is not None:
            # The first request comes after the kernel applied the INIT reply, which resets
            # the read-ahead: only now does raising it stick.
            mountpoint, self.readahead_pending = self.readahead_pending, None
            set_readahead(mountpoint)
        unique = self.inflight.begin(self._inode_of(name, args), name)
        try:
            return await func(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("fuse: %s failed", name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.inflight.end(unique)

    return cast(F, wrapper)


def _ctx(ctx: Any) -> Context:
    return Context(ctx.uid, ctx.gid, ctx.pid, ctx.umask)


def _attributes(attr: Attr, entry: Entry | None = None) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = attr.ino
    out.st_mode = attr.mode
    out.st_nlink = attr.nlink
    out.st_uid = attr.uid
    out.st_gid = attr.gid
    out.st_rdev = attr.rdev
    out.st_size = attr.size
    out.st_blksize = attr.blksize
    out.st_blocks = attr.blocks
    out.st_atime_ns = attr.atime_ns
    out.st_mtime_ns = attr.mtime_ns
    out.st_ctime_ns = attr.ctime_ns
    if entry is not None:
        out.generation = entry.generation
        out.entry_timeout = entry.entry_timeout
        out.attr_timeout = entry.attr_timeout
    return out


class Pyfuse3Operations(pyfuse3.Operations):
    """pyfuse3 ``Operations`` over a ``FileSystem``."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self, fs: FileSystem, *, attr_timeout: float = 1.0, inflight: InflightTracker | None = None
    ) -> None:
        super().__init__()
        self.fs = fs
        self.attr_timeout = attr_timeout
        self.inflight = inflight if inflight is not None else InflightTracker()
        self._handles: dict[int, tuple[int, int]] = {}  # our fh -> (inode, inner fh)
        self._next = itertools.count(1)
        self.readahead_pending: str | None = None  # mount point whose read-ahead to raise

    def _inode_of(self, op: str, args: tuple[Any, ...]) -> int:
        """The inode a request is about, for the in-flight list."""
        if op in _HANDLE_OPS:
            return self._handles.get(args[0], (0, 0))[0] if args else 0
        if op == "statfs":
            return int(pyfuse3.ROOT_INODE)
        first = args[0] if args else 0
        return first if isinstance(first, int) else 0

    def _new_handle(self, inode: int, inner: OpenResult) -> int:
        fh = next(self._next)
        self._handles[fh] = (inode, inner.fh)
        return fh

    def _handle(self, fh: int) -> tuple[int, int]:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _file_info(self, inode: int, result: OpenResult) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(
            fh=self._new_handle(inode, result),
            keep_cache=result.keep_cache,
            direct_io=result.direct_io,
        )

    def _attr_out(self, attr: Attr) -> pyfuse3.EntryAttributes:
        out = _attributes(attr)
        out.attr_timeout = self.attr_timeout
        return out

    # --- metadata -----------------------------------------------------------------------------
    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        entry = await self.fs.lookup(_ctx(ctx), parent_inode, name)
        return _attributes(entry.attr, entry)

    @_errors
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        await self.fs.batch_forget(list(inode_list))

    @_errors
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._attr_out(await self.fs.getattr(_ctx(ctx), inode))

    @_errors
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        valid = 0
        for flag, bit in (
            (fields.update_mode, SETATTR_MODE),
            (fields.update_uid, SETATTR_UID),
            (fields.update_gid, SETATTR_GID),
            (fields.update_size, SETATTR_SIZE),
            (fields.update_atime, SETATTR_ATIME),
            (fields.update_mtime, SETATTR_MTIME),
            (fields.update_ctime, SETATTR_CTIME),
        ):
            if flag:
                valid |= bit
        wanted = Attr(
            inode, attr.st_mode, 0, attr.st_uid, attr.st_gid, 0, attr.st_size, 0, 0,
            attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns,
        )  # fmt: skip
        inner_fh = self._handle(fh)[1] if fh is not None else None
        return self._attr_out(await self.fs.setattr(_ctx(ctx), inode, wanted, valid, inner_fh))

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.fs.readlink(_ctx(ctx), inode)

    @_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        await self.fs.access(_ctx(ctx), inode, mode)
        return True

    @_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = await self.fs.statfs(_ctx(ctx), pyfuse3.ROOT_INODE)
        out = pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize = st.bsize, st.frsize
        out.f_blocks, out.f_bfree, out.f_bavail = st.blocks, st.bfree, st.bavail
        out.f_files, out.f_ffree, out.f_favail = st.files, st.ffree, st.favail
        out.f_namemax = st.namemax
        return out

    # --- namespace ----------------------------------------------------------------------------
    @_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        c = _ctx(ctx)
        entry = await self.fs.mknod(c, parent_inode, name, mode, rdev, c.umask)
        return _attributes(entry.attr, entry)

    @_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        c = _ctx(ctx)
        entry = await self.fs.mkdir(c, parent_inode, name, mode, c.umask)
        return _attributes(entry.attr, entry)

    @_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        entry = await self.fs.symlink(_ctx(ctx), parent_inode, name, target)
        return _attributes(entry.attr, entry)

    @_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        entry = await self.fs.link(_ctx(ctx), inode, new_parent_inode, new_name)
        return _attributes(entry.attr, entry)

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(_ctx(ctx), parent_inode, name)

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(_ctx(ctx), parent_inode, name)

    @_errors
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
        flags: int, ctx: Any,
    ) -> None:  # fmt: skip
        await self.fs.rename(
            _ctx(ctx), parent_inode_old, name_old, parent_inode_new, name_new, flags
        )

    # --- files --------------------------------------------------------------------------------
    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return self._file_info(inode, await self.fs.open(_ctx(ctx), inode, flags))

    @_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        c = _ctx(ctx)
        result, entry = await self.fs.create(c, parent_inode, name, mode, flags, c.umask)
        return self._file_info(entry.ino, result), _attributes(entry.attr, entry)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        inode, inner = self._handle(fh)
        data = await self.fs.read(_NO_CTX, inode, inner, off, size)
        return bytes(data) if isinstance(data, memoryview) else data

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        inode, inner = self._handle(fh)
        return await self.fs.write(_NO_CTX, inode, inner, off, buf)

    @_errors
    async def flush(self, fh: int) -> None:
        inode, inner = self._handle(fh)
        await self.fs.flush(_NO_CTX, inode, inner)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        inode, inner = self._handle(fh)
        await self.fs.fsync(_NO_CTX, inode, inner, datasync)

    @_errors
    async def release(self, fh: int) -> None:
        inode, inner = self._handles.pop(fh, (0, 0))
        if inode:
            await self.fs.release(_NO_CTX, inode, inner)

    # --- directories --------------------------------------------------------------------------
    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        return self._new_handle(inode, await self.fs.opendir(_ctx(ctx), inode))

    @_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        inode, inner = self._handle(fh)
        async for entry, looked_up in self.fs.readdirplus(_NO_CTX, inode, inner, start_id):
            if looked_up is not None:
                attrs = _attributes(looked_up.attr, looked_up)
            else:
                attrs = self._attr_out(await self.fs.getattr(_NO_CTX, entry.ino))
            if not pyfuse3.readdir_reply(token, entry.name, attrs, entry.offset):
                if looked_up is not None:
                    # Not sent, so the kernel will not count it: give the reference back.
                    await self.fs.forget(looked_up.ino, 1)
                break

    @_errors
    async def releasedir(self, fh: int) -> None:
        inode, inner = self._handles.pop(fh, (0, 0))
        if inode:
            await self.fs.releasedir(_NO_CTX, inode, inner)

    @_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode, inner = self._handle(fh)
        await self.fs.fsyncdir(_NO_CTX, inode, inner, datasync)

    # --- xattrs -------------------------------------------------------------------------------
    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.fs.getxattr(_ctx(ctx), inode, name)

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self.fs.listxattr(_ctx(ctx), inode)

    @_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.fs.setxattr(_ctx(ctx), inode, name, value, 0)

    @_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.removexattr(_ctx(ctx), inode, name)


# pyfuse3 gives no request context to handle operations; the filesystem does not need one.
_NO_CTX = Context(os.geteuid(), os.getegid(), 0)

# How long closing the session waits for kernel notifications still running in threads.
NOTIFY_CLOSE_TIMEOUT = 2.0


class KernelNotifier:
    """Invalidates kernel dentries of the live session (``pyfuse3.invalidate_entry``).

    pyfuse3's own ``invalidate_entry_async`` queue outlives the session (its thread may still
    run after ``close``), so this runs each batch in a trio worker thread instead and ``serve``
    waits for running batches before it closes the session.
    """

    def __init__(self) -> None:
        self.live = False
        self._running = 0

    async def invalidate(self, entries: list[tuple[int, bytes]]) -> None:
        if not self.live or not entries:
            return
        self._running += 1
        try:
            await trio.to_thread.run_sync(_invalidate_entries, entries)
        finally:
            self._running -= 1

    async def close(self) -> None:
        self.live = False
        with trio.move_on_after(NOTIFY_CLOSE_TIMEOUT):
            while self._running:
                await trio.sleep(0.01)


def _invalidate_entries(entries: list[tuple[int, bytes]]) -> None:
    for parent, name in entries:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except FileNotFoundError:
            pass  # the kernel never looked it up: nothing cached
        except OSError as e:
            log.debug("fuse: invalidating %r in %d: %s", name, parent, e)


async def serve(
    fs: FileSystem,
    mountpoint: str,
    *,
    fsname: str = "nydusfs",
    read_only: bool = True,
    allow_other: bool = True,
    max_tasks: int = 16,
    inflight: InflightTracker | None = None,
    notifier: KernelNotifier | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve it until cancelled; always unmounts.

    ``task_status.started()`` is called once the kernel mount exists. The caller owns ``fs``:
    this calls ``fs.init()`` but not ``fs.destroy()``. ``inflight`` receives the requests being
    served; ``notifier`` is live while the session is.
    """
    options = set(pyfuse3.default_options)
    options.add(f"fsname={fsname}")
    options.add("subtype=nydusfs")
    if read_only:
        options.add("ro")
    if allow_other:
        options.add("allow_other")
    await fs.init()
    operations = Pyfuse3Operations(fs, inflight=inflight)
    operations.readahead_pending = mountpoint  # 1 MiB read requests instead of 128 KiB
    pyfuse3.init(operations, mountpoint, options)
    try:
        if notifier is not None:
            notifier.live = True
        task_status.started()
        await pyfuse3.main(min_tasks=2, max_tasks=max_tasks)
    finally:
        if notifier is not None:
            with trio.CancelScope(shield=True):
                await notifier.close()
        pyfuse3.close(unmount=True)
