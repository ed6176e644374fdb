"""``FuseServer``: the FUSE wire protocol over a ``FileSystem``, sans-IO.

A transport (``nydusfs.fuse.fusedev`` for /dev/fuse, ``nydusfs.virtiofs.device`` for a guest's
virtqueues) hands each request's bytes to ``handle`` and sends back what it returns: the reply
as a list of buffers (out header first), or ``None`` for the requests FUSE never answers
(FORGET, BATCH_FORGET, INTERRUPT). The server parses and validates the request, calls the
filesystem and encodes the reply; it does no I/O of its own and imports no event loop.

The sender is not trusted (a virtio-fs guest is another machine): every length, name, offset
and handle is checked before use, and a malformed request gets an error reply (``EINVAL``,
``ENAMETOOLONG``, ``EBADF``, ...), never an exception out of ``handle``. ``OSError`` from the
filesystem is answered ``-errno``; any other exception is logged with its traceback and
answered ``EIO``, and serving goes on.

Session state (per FUSE INIT): the negotiated protocol, the open handles (the server issues its
own ``fh`` values and maps them to the filesystem's, so a forged ``fh`` is EBADF, not someone
else's file) and the lookup references the peer holds (FORGET can only drop references the
peer was given). ``end_session`` gives back everything the peer still holds; DESTROY, a new
INIT and the transport (on disconnect) call it.

Concurrency: ``handle`` may run concurrently for many requests (the transports start one task
per request) and they may complete in any order. State changes happen between awaits.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from nydusfs.filesystem import (
    SETATTR_ATIME,
    SETATTR_ATIME_NOW,
    SETATTR_CTIME,
    SETATTR_GID,
    SETATTR_MODE,
    SETATTR_MTIME,
    SETATTR_MTIME_NOW,
    SETATTR_SIZE,
    SETATTR_UID,
    FileSystem,
    OpenResult,
)
from nydusfs.fuse import abi
from nydusfs.fuse.abi import Opcode
from nydusfs.fuse.wire import (
    NO_ENTRY,
    Buffers,
    FuseInvalid,
    Request,
    dirent,
    encode_attr,
    encode_entry,
    error_reply,
    join_ns,
    out_header,
    split_timeout,
)
from nydusfs.metrics import InflightTracker
from nydusfs.types import Attr, Context, Entry

log = logging.getLogger(__name__)


_SETATTR_BITS = (
    SETATTR_MODE | SETATTR_UID | SETATTR_GID | SETATTR_SIZE | SETATTR_ATIME | SETATTR_MTIME
    | SETATTR_ATIME_NOW | SETATTR_MTIME_NOW | SETATTR_CTIME
)  # fmt: skip
_MAX_OFFSET = (1 << 63) - 1
MAX_READ = 1 << 20
# What the server asks of the kernel, when the kernel offers it.
WANTED_FLAGS = (
    abi.ASYNC_READ | abi.BIG_WRITES | abi.PARALLEL_DIROPS | abi.MAX_PAGES | abi.ASYNC_DIO
    | abi.DO_READDIRPLUS | abi.READDIRPLUS_AUTO
)  # fmt: skip


class Handle(NamedTuple):
    inode: int
    inner: int
    is_dir: bool


class FuseServer:
    """Answers FUSE requests from one peer (a kernel mount or a guest) with ``fs``."""

    def __init__(
        self,
        fs: FileSystem,
        *,
        attr_timeout: float = 1.0,
        max_write: int = MAX_READ,
        readdirplus: bool = True,
        inflight: InflightTracker | None = None,
    ) -> None:
        self.fs = fs
        self.attr_timeout = attr_timeout
        self.max_write_limit = max_write
        self.readdirplus = readdirplus
        self.inflight = inflight
        self.initialized = False
        self.minor = 0
        self.flags = 0
        self.max_write = 0
        self.max_readahead = 0
        self.handles: dict[int, Handle] = {}
        self.lookups: dict[int, int] = {}  # inode -> references the peer holds
        self._next_fh = itertools.count(1)
        self._ops: dict[int, Callable[[Request], Awaitable[Buffers]]] = {
            Opcode.LOOKUP: self._lookup, Opcode.GETATTR: self._getattr,
            Opcode.SETATTR: self._setattr, Opcode.READLINK: self._readlink,
            Opcode.SYMLINK: self._symlink, Opcode.MKNOD: self._mknod, Opcode.MKDIR: self._mkdir,
            Opcode.UNLINK: self._unlink, Opcode.RMDIR: self._rmdir, Opcode.RENAME: self._rename,
            Opcode.RENAME2: self._rename, Opcode.LINK: self._link, Opcode.OPEN: self._open,
            Opcode.READ: self._read, Opcode.WRITE: self._write, Opcode.STATFS: self._statfs,
            Opcode.RELEASE: self._release, Opcode.FSYNC: self._fsync,
            Opcode.SETXATTR: self._setxattr, Opcode.GETXATTR: self._getxattr,
            Opcode.LISTXATTR: self._listxattr, Opcode.REMOVEXATTR: self._removexattr,
            Opcode.FLUSH: self._flush, Opcode.OPENDIR: self._opendir,
            Opcode.READDIR: self._readdir, Opcode.READDIRPLUS: self._readdir,
            Opcode.RELEASEDIR: self._releasedir, Opcode.FSYNCDIR: self._fsync,
            Opcode.ACCESS: self._access, Opcode.CREATE: self._create,
            Opcode.DESTROY: self._destroy,
        }  # fmt: skip

    # --- entry point --------------------------------------------------------------------------
    async def handle(self, data: bytes | bytearray | memoryview) -> Buffers | None:
        """Serve one request; the reply buffers, or ``None`` when none is to be sent."""
        buf = memoryview(data).cast("B")
        if len(buf) < abi.IN_HEADER.size:
            log.warning("fuse: dropped a %d-byte request (shorter than its header)", len(buf))
            return None
        header = abi.IN_HEADER.unpack_from(buf)
        length, opcode, unique = header[0], header[1], header[2]
        if not abi.IN_HEADER.size <= length <= len(buf):
            return error_reply(unique, errno.EINVAL)
        req = Request(header, buf[abi.IN_HEADER.size : length])
        if opcode in abi.NO_REPLY or opcode == Opcode.NOTIFY_REPLY:
            await self._no_reply(req)
            return None
        token = None if self.inflight is None else self.inflight.begin(req.nodeid, _op_name(opcode))
        try:
            if opcode == Opcode.INIT:
                payload = await self._init(req)
            elif not self.initialized:
                raise FuseInvalid(errno.EIO, "request before INIT")
            else:
                op = self._ops.get(opcode)
                if op is None:
                    raise FuseInvalid(errno.ENOSYS, f"opcode {opcode}")
                payload = await op(req)
        except FuseInvalid as e:
            if e.errno != errno.ENOSYS:
                log.debug("fuse: %s refused: %s", _op_name(opcode), e)
            return error_reply(unique, e.errno)
        except OSError as e:
            return error_reply(unique, e.errno or errno.EIO)
        except Exception:
            log.exception("fuse: %s failed", _op_name(opcode))
            return error_reply(unique, errno.EIO)
        finally:
            if token is not None and self.inflight is not None:
                self.inflight.end(token)
        size = sum(len(b) for b in payload)
        return [out_header(unique, 0, size), *payload]

    async def _no_reply(self, req: Request) -> None:
        try:
            if req.opcode == Opcode.FORGET:
                (nlookup,) = req.take(abi.FORGET_IN)
                await self._forget([(req.nodeid, nlookup)])
            elif req.opcode == Opcode.BATCH_FORGET:
                count, _ = req.take(abi.BATCH_FORGET_IN)
                items = []
                for _ in range(count):  # bounded by the body: take() refuses past its end
                    nodeid, nlookup = req.take(abi.FORGET_ONE)
                    items.append((nodeid, nlookup))
                await self._forget(items)
            # INTERRUPT: requests run to completion (they are short); NOTIFY_REPLY: unused.
        except FuseInvalid as e:
            log.debug("fuse: %s refused: %s", _op_name(req.opcode), e)
        except Exception:
            log.exception("fuse: %s failed", _op_name(req.opcode))

    # --- session ------------------------------------------------------------------------------
    async def _init(self, req: Request) -> Buffers:
        major, minor, max_readahead, flags = req.take(abi.INIT_IN)
        if major < abi.KERNEL_VERSION or (
            major == abi.KERNEL_VERSION and minor < abi.MIN_MINOR_VERSION
        ):
            raise FuseInvalid(errno.EPROTO, f"unsupported FUSE protocol {major}.{minor}")
        if major > abi.KERNEL_VERSION:
            # Tell the kernel our major; it retries INIT with it.
            return [abi.INIT_OUT.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, *[0] * 9)[:8]]
        if self.initialized:
            await self.end_session()
        wanted = (
            WANTED_FLAGS
            if self.readdirplus
            else WANTED_FLAGS & ~(abi.DO_READDIRPLUS | abi.READDIRPLUS_AUTO)
        )
        self.flags = flags & wanted
        self.minor = min(minor, abi.KERNEL_MINOR_VERSION)
        self.max_readahead = max_readahead
        max_pages = 0
        if self.flags & abi.MAX_PAGES:
            max_pages = max(1, self.max_write_limit // 4096)
            self.max_write = self.max_write_limit
        else:
            self.max_write = min(self.max_write_limit, 128 * 1024)
        out = abi.INIT_OUT.pack(
            abi.KERNEL_VERSION, self.minor, max_readahead, self.flags, 64, 48, self.max_write, 1,
            max_pages, 0, 0,
        )  # fmt: skip
        if self.minor < 23:
            out = out[: abi.INIT_OUT_COMPAT_SIZE]
        self.initialized = True
        log.debug("fuse: INIT %d.%d flags %#x max_write %d", major, minor, flags, self.max_write)
        return [out]

    async def _destroy(self, req: Request) -> Buffers:
        await self.end_session()
        return []

    async def end_session(self) -> None:
        """Give back every handle and lookup reference the peer holds; INIT starts anew."""
        self.initialized = False
        handles, self.handles = self.handles, {}
        lookups, self.lookups = self.lookups, {}
        for h in handles.values():
            try:
                if h.is_dir:
                    await self.fs.releasedir(_ROOT_CTX, h.inode, h.inner)
                else:
                    await self.fs.release(_ROOT_CTX, h.inode, h.inner)
            except Exception as e:  # the session is over: log and go on releasing
                log.debug("fuse: releasing %d at session end: %s", h.inode, e)
        if lookups:
            try:
                await self.fs.batch_forget(list(lookups.items()))
            except Exception as e:
                log.debug("fuse: forgetting at session end: %s", e)

    # --- lookup references --------------------------------------------------------------------
    def _counted(self, entry: Entry) -> bytes:
        self.lookups[entry.ino] = self.lookups.get(entry.ino, 0) + 1
        return encode_entry(entry)

    async def _forget(self, items: list[tuple[int, int]]) -> None:
        held = []
        for nodeid, nlookup in items:
            have = self.lookups.get(nodeid, 0)
            n = min(have, nlookup)
            if n <= 0:
                continue  # the peer forgets what it was never given: ignore
            if n == have:
                del self.lookups[nodeid]
            else:
                self.lookups[nodeid] = have - n
            held.append((nodeid, n))
        if held:
            await self.fs.batch_forget(held)

    # --- handles ------------------------------------------------------------------------------
    def _new_handle(self, inode: int, result: OpenResult, is_dir: bool) -> int:
        fh = next(self._next_fh)
        self.handles[fh] = Handle(inode, result.fh, is_dir)
        return fh

    def _handle(self, fh: int, is_dir: bool) -> Handle:
        h = self.handles.get(fh)
        if h is None or h.is_dir != is_dir:
            raise FuseInvalid(errno.EBADF, f"unknown handle {fh}")
        return h

    def _open_out(self, fh: int, result: OpenResult) -> bytes:
        flags = (abi.FOPEN_KEEP_CACHE if result.keep_cache else 0) | (
            abi.FOPEN_DIRECT_IO if result.direct_io else 0
        )
        return abi.OPEN_OUT.pack(fh, flags, 0)

    def _attr_out(self, attr: Attr) -> Buffers:
        sec, nsec = split_timeout(self.attr_timeout)
        return [abi.ATTR_OUT_HEAD.pack(sec, nsec, 0), encode_attr(attr)]

    # --- metadata -----------------------------------------------------------------------------
    async def _lookup(self, req: Request) -> Buffers:
        name = req.name(dots=errno.ENOENT)  # no EXPORT_SUPPORT: the kernel resolves them
        return [self._counted(await self.fs.lookup(req.context(), req.nodeid, name))]

    async def _getattr(self, req: Request) -> Buffers:
        flags, _, fh = req.take(abi.GETATTR_IN)
        inner = None
        if flags & abi.GETATTR_FH:
            h = self.handles.get(fh)
            inner = h.inner if h is not None and not h.is_dir else None
        return self._attr_out(await self.fs.getattr(req.context(), req.nodeid, inner))

    async def _setattr(self, req: Request) -> Buffers:
        (valid, _, fh, size, _, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, _,
         uid, gid, _) = req.take(abi.SETATTR_IN)  # fmt: skip
        if size > _MAX_OFFSET or max(atimensec, mtimensec, ctimensec) >= 1_000_000_000:
            raise FuseInvalid(errno.EINVAL, "size or time out of range")
        inner = self._handle(fh, False).inner if valid & abi.FATTR_FH else None
        wanted = Attr(
            req.nodeid, mode, 0, uid, gid, 0, size, 0, 0, join_ns(atime, atimensec),
            join_ns(mtime, mtimensec), join_ns(ctime, ctimensec),
        )  # fmt: skip
        valid &= _SETATTR_BITS
        return self._attr_out(
            await self.fs.setattr(req.context(), req.nodeid, wanted, valid, inner)
        )

    async def _readlink(self, req: Request) -> Buffers:
        return [await self.fs.readlink(req.context(), req.nodeid)]

    async def _access(self, req: Request) -> Buffers:
        mask, _ = req.take(abi.ACCESS_IN)
        await self.fs.access(req.context(), req.nodeid, mask)
        return []

    async def _statfs(self, req: Request) -> Buffers:
        st = await self.fs.statfs(req.context(), req.nodeid)
        return [
            abi.KSTATFS.pack(
                st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.bsize, st.namemax,
                st.frsize, 0,
            )
        ]  # fmt: skip

    # --- namespace ----------------------------------------------------------------------------
    async def _mknod(self, req: Request) -> Buffers:
        mode, rdev, umask, _ = req.take(abi.MKNOD_IN)
        name = req.name()
        entry = await self.fs.mknod(req.context(umask), req.nodeid, name, mode, rdev, umask)
        return [self._counted(entry)]

    async def _mkdir(self, req: Request) -> Buffers:
        mode, umask = req.take(abi.MKDIR_IN)
        name = req.name()
        entry = await self.fs.mkdir(req.context(umask), req.nodeid, name, mode, umask)
        return [self._counted(entry)]

    async def _symlink(self, req: Request) -> Buffers:
        name = req.name()
        target = req.string()
        if not target:
            raise FuseInvalid(errno.ENOENT, "empty symlink target")
        if len(target) > abi.MAX_SYMLINK:
            raise FuseInvalid(errno.ENAMETOOLONG, "symlink target too long")
        return [self._counted(await self.fs.symlink(req.context(), req.nodeid, name, target))]

    async def _link(self, req: Request) -> Buffers:
        (old,) = req.take(abi.LINK_IN)
        name = req.name()
        return [self._counted(await self.fs.link(req.context(), old, req.nodeid, name))]

    async def _unlink(self, req: Request) -> Buffers:
        await self.fs.unlink(req.context(), req.nodeid, req.name())
        return []

    async def _rmdir(self, req: Request) -> Buffers:
        await self.fs.rmdir(req.context(), req.nodeid, req.name())
        return []

    async def _rename(self, req: Request) -> Buffers:
        if req.opcode == Opcode.RENAME2:
            new_dir, flags, _ = req.take(abi.RENAME2_IN)
        else:
            (new_dir,), flags = req.take(abi.RENAME_IN), 0
        name, new_name = req.name(), req.name()
        await self.fs.rename(req.context(), req.nodeid, name, new_dir, new_name, flags)
        return []

    # --- files --------------------------------------------------------------------------------
    async def _open(self, req: Request) -> Buffers:
        flags, _ = req.take(abi.OPEN_IN)
        result = await self.fs.open(req.context(), req.nodeid, flags)
        return [self._open_out(self._new_handle(req.nodeid, result, False), result)]

    async def _create(self, req: Request) -> Buffers:
        flags, mode, umask, _ = req.take(abi.CREATE_IN)
        name = req.name()
        result, entry = await self.fs.create(
            req.context(umask), req.nodeid, name, mode, flags, umask
        )
        fh = self._new_handle(entry.ino, result, False)
        return [self._counted(entry), self._open_out(fh, result)]

    async def _read(self, req: Request) -> Buffers:
        fh, offset, size, *_ = req.take(abi.READ_IN)
        if offset > _MAX_OFFSET or size > MAX_READ:
            raise FuseInvalid(errno.EINVAL, f"read of {size} at {offset}")
        h = self._handle(fh, False)
        data = await self.fs.read(req.context(), h.inode, h.inner, offset, size)
        return [data[:size] if len(data) > size else data]

    async def _write(self, req: Request) -> Buffers:
        fh, offset, size, *_ = req.take(abi.WRITE_IN)
        data = req.rest()
        if size != len(data) or size > self.max_write or offset > _MAX_OFFSET - size:
            raise FuseInvalid(errno.EINVAL, f"write of {size} at {offset} ({len(data)} sent)")
        h = self._handle(fh, False)
        written = await self.fs.write(req.context(), h.inode, h.inner, offset, bytes(data))
        if not 0 <= written <= size:
            raise FuseInvalid(errno.EIO, f"filesystem wrote {written} of {size} bytes")
        return [abi.WRITE_OUT.pack(written, 0)]

    async def _flush(self, req: Request) -> Buffers:
        fh, *_ = req.take(abi.FLUSH_IN)
        h = self._handle(fh, False)
        await self.fs.flush(req.context(), h.inode, h.inner)
        return []

    async def _fsync(self, req: Request) -> Buffers:
        fh, flags, _ = req.take(abi.FSYNC_IN)
        is_dir = req.opcode == Opcode.FSYNCDIR
        h = self._handle(fh, is_dir)
        datasync = bool(flags & abi.FSYNC_FDATASYNC)
        if is_dir:
            await self.fs.fsyncdir(req.context(), h.inode, h.inner, datasync)
        else:
            await self.fs.fsync(req.context(), h.inode, h.inner, datasync)
        return []

    async def _release(self, req: Request) -> Buffers:
        fh, *_ = req.take(abi.RELEASE_IN)
        h = self._handle(fh, False)
        del self.handles[fh]
        await self.fs.release(req.context(), h.inode, h.inner)
        return []

    # --- directories --------------------------------------------------------------------------
    async def _opendir(self, req: Request) -> Buffers:
        req.take(abi.OPEN_IN)
        result = await self.fs.opendir(req.context(), req.nodeid)
        return [self._open_out(self._new_handle(req.nodeid, result, True), result)]

    async def _releasedir(self, req: Request) -> Buffers:
        fh, *_ = req.take(abi.RELEASE_IN)
        h = self._handle(fh, True)
        del self.handles[fh]
        await self.fs.releasedir(req.context(), h.inode, h.inner)
        return []

    async def _readdir(self, req: Request) -> Buffers:
        fh, offset, size, *_ = req.take(abi.READ_IN)
        if offset > _MAX_OFFSET or size > MAX_READ:
            raise FuseInvalid(errno.EINVAL, f"readdir of {size} at {offset}")
        h = self._handle(fh, True)
        out: Buffers = []
        used = 0
        ctx = req.context()
        if req.opcode == Opcode.READDIR:
            listing = self.fs.readdir(ctx, h.inode, h.inner, offset)
            try:
                async for d in listing:
                    n = abi.dirent_size(len(d.name))
                    if used + n > size:
                        break
                    out.append(dirent(d.ino, d.offset, d.type, d.name, n))
                    used += n
            finally:
                await _aclose(listing)
            return out
        plus = self.fs.readdirplus(ctx, h.inode, h.inner, offset)
        try:
            async for d, entry in plus:
                n = abi.direntplus_size(len(d.name))
                if used + n > size:
                    if entry is not None:  # not sent: the peer holds no reference to it
                        await self.fs.forget(entry.ino, 1)
                    break
                out.append(self._counted(entry) if entry is not None else NO_ENTRY)
                out.append(dirent(d.ino, d.offset, d.type, d.name, n - abi.ENTRY_OUT_SIZE))
                used += n
        finally:
            await _aclose(plus)
        return out

    # --- xattrs -------------------------------------------------------------------------------
    async def _setxattr(self, req: Request) -> Buffers:
        if self.flags & abi.SETXATTR_EXT:
            size, flags, _, _ = req.take(abi.SETXATTR_IN_EXT)
        else:
            size, flags = req.take(abi.SETXATTR_IN)
        name = req.xattr_name()
        value = req.rest()
        if size > abi.MAX_XATTR_SIZE:
            raise FuseInvalid(errno.E2BIG, "xattr value too large")
        if size != len(value):
            raise FuseInvalid(errno.EINVAL, f"xattr value of {len(value)} bytes, {size} declared")
        await self.fs.setxattr(req.context(), req.nodeid, name, bytes(value), flags)
        return []

    async def _getxattr(self, req: Request) -> Buffers:
        size, _ = req.take(abi.GETXATTR_IN)
        name = req.xattr_name()
        value = await self.fs.getxattr(req.context(), req.nodeid, name)
        return _sized(value, size)

    async def _listxattr(self, req: Request) -> Buffers:
        size, _ = req.take(abi.GETXATTR_IN)
        names = await self.fs.listxattr(req.context(), req.nodeid)
        return _sized(b"".join(n + b"\0" for n in names), size)

    async def _removexattr(self, req: Request) -> Buffers:
        await self.fs.removexattr(req.context(), req.nodeid, req.xattr_name())
        return []


async def _aclose(it: object) -> None:
    """Close an async generator we stopped early (its ``finally`` runs now, not at GC)."""
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


def _sized(value: bytes, size: int) -> Buffers:
    """getxattr/listxattr: size 0 asks for the length, otherwise the value if it fits."""
    if size == 0:
        return [abi.GETXATTR_OUT.pack(len(value), 0)]
    if len(value) > size:
        raise FuseInvalid(errno.ERANGE, "xattr buffer too small")
    return [value]


def _op_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name.lower()
    except ValueError:
        return f"opcode{opcode}"


_ROOT_CTX = Context(0, 0, 0)
