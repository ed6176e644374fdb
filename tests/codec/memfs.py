"""``MemFs``: a small writable in-memory ``FileSystem`` for driving the FUSE codec in tests.

Deterministic (fixed times, inode numbers from 2 up) so replies can be compared byte for byte.
It counts lookup references so tests can check FORGET and the end of a session.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from nydusfs.filesystem import (
    ROOT_INODE,
    SETATTR_GID,
    SETATTR_MODE,
    SETATTR_SIZE,
    SETATTR_UID,
    FileSystem,
    OpenResult,
)
from nydusfs.types import Attr, Context, DirEntry, Entry, StatVfs

TIME_NS = 1_600_000_000_123_456_789


@dataclass
class Node:
    ino: int
    mode: int
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0


def _err(code: int) -> OSError:
    return OSError(code, "memfs")


class MemFs(FileSystem):
    def __init__(self) -> None:
        self.nodes = {ROOT_INODE: Node(ROOT_INODE, stat.S_IFDIR | 0o755, nlink=2)}
        self.lookups: dict[int, int] = {}
        self.open_handles: dict[int, int] = {}  # fh -> ino
        self.calls: list[str] = []
        self._next_ino = 2
        self._next_fh = 100

    # --- helpers ------------------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise _err(errno.ENOENT) from None

    def attr(self, n: Node) -> Attr:
        size = len(n.data) if stat.S_ISREG(n.mode) else len(n.target)
        return Attr(n.ino, n.mode, n.nlink, n.uid, n.gid, n.rdev, size, (size + 511) // 512,
                    4096, TIME_NS, TIME_NS, TIME_NS)  # fmt: skip

    def entry(self, n: Node) -> Entry:
        self.lookups[n.ino] = self.lookups.get(n.ino, 0) + 1
        return Entry(n.ino, self.attr(n), 0, 1.5, 2.25)

    def _dir(self, ino: int) -> Node:
        n = self.node(ino)
        if not stat.S_ISDIR(n.mode):
            raise _err(errno.ENOTDIR)
        return n

    def _new(self, parent: int, name: bytes, mode: int, ctx: Context) -> Node:
        d = self._dir(parent)
        if name in d.children:
            raise _err(errno.EEXIST)
        n = Node(self._next_ino, mode, uid=ctx.uid, gid=ctx.gid)
        self._next_ino += 1
        self.nodes[n.ino] = n
        d.children[name] = n.ino
        return n

    def _handle(self, fh: int) -> int:
        self.calls.append(f"fh{fh}")
        if fh not in self.open_handles:
            raise _err(errno.EBADF)
        return self.open_handles[fh]

    def _open(self, ino: int) -> OpenResult:
        self._next_fh += 1
        self.open_handles[self._next_fh] = ino
        return OpenResult(self._next_fh, keep_cache=True)

    # --- FileSystem ---------------------------------------------------------------------------
    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        d = self._dir(parent)
        if name not in d.children:
            raise _err(errno.ENOENT)
        return self.entry(self.nodes[d.children[name]])

    async def forget(self, inode: int, nlookup: int) -> None:
        self.calls.append(f"forget {inode} {nlookup}")
        # Negative means over-forgotten: tests check that this never happens.
        self.lookups[inode] = self.lookups.get(inode, 0) - nlookup

    async def batch_forget(self, items: Sequence[tuple[int, int]]) -> None:
        for inode, n in items:
            await self.forget(inode, n)

    async def getattr(self, ctx: Context, inode: int, fh: int | None = None) -> Attr:
        return self.attr(self.node(inode))

    async def setattr(
        self, ctx: Context, inode: int, attr: Attr, valid: int, fh: int | None = None
    ) -> Attr:
        n = self.node(inode)
        if valid & SETATTR_MODE:
            n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(attr.mode)
        if valid & SETATTR_UID:
            n.uid = attr.uid
        if valid & SETATTR_GID:
            n.gid = attr.gid
        if valid & SETATTR_SIZE:
            n.data = n.data[: attr.size].ljust(attr.size, b"\0")
        return self.attr(n)

    async def readlink(self, ctx: Context, inode: int) -> bytes:
        n = self.node(inode)
        if not stat.S_ISLNK(n.mode):
            raise _err(errno.EINVAL)
        return n.target

    async def access(self, ctx: Context, inode: int, mask: int) -> None:
        if mask & 2 and ctx.uid != 0:
            raise _err(errno.EACCES)

    async def statfs(self, ctx: Context, inode: int) -> StatVfs:
        return StatVfs(4096, 4096, 1000, 500, 400, 100, 50, 50, 0, 255)

    async def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int,
                    umask: int) -> Entry:  # fmt: skip
        n = self._new(parent, name, mode & ~umask, ctx)
        n.rdev = rdev
        return self.entry(n)

    async def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        n = self._new(parent, name, stat.S_IFDIR | (mode & ~umask & 0o7777), ctx)
        n.nlink = 2
        return self.entry(n)

    async def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        n = self._new(parent, name, stat.S_IFLNK | 0o777, ctx)
        n.target = target
        return self.entry(n)

    async def link(self, ctx: Context, inode: int, new_parent: int, new_name: bytes) -> Entry:
        n = self.node(inode)
        d = self._dir(new_parent)
        if new_name in d.children:
            raise _err(errno.EEXIST)
        d.children[new_name] = inode
        n.nlink += 1
        return self.entry(n)

    async def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        d = self._dir(parent)
        if name not in d.children:
            raise _err(errno.ENOENT)
        self.nodes[d.children.pop(name)].nlink -= 1

    async def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        d = self._dir(parent)
        child = self._dir(d.children.get(name, 0))
        if child.children:
            raise _err(errno.ENOTEMPTY)
        del d.children[name]

    async def rename(self, ctx: Context, parent: int, name: bytes, new_parent: int,
                     new_name: bytes, flags: int) -> None:  # fmt: skip
        d, nd = self._dir(parent), self._dir(new_parent)
        if name not in d.children:
            raise _err(errno.ENOENT)
        if flags & 1 and new_name in nd.children:
            raise _err(errno.EEXIST)
        nd.children[new_name] = d.children.pop(name)

    async def open(self, ctx: Context, inode: int, flags: int) -> OpenResult:
        self.node(inode)
        return self._open(inode)

    async def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
                     umask: int) -> tuple[OpenResult, Entry]:  # fmt: skip
        n = self._new(parent, name, stat.S_IFREG | (mode & ~umask & 0o7777), ctx)
        return self._open(n.ino), self.entry(n)

    async def read(self, ctx: Context, inode: int, fh: int, offset: int, size: int) -> bytes:
        return bytes(self.node(self._handle(fh)).data[offset : offset + size])

    async def write(self, ctx: Context, inode: int, fh: int, offset: int, data: bytes) -> int:
        n = self.node(self._handle(fh))
        if len(n.data) < offset:
            n.data.extend(bytes(offset - len(n.data)))
        n.data[offset : offset + len(data)] = data
        return len(data)

    async def flush(self, ctx: Context, inode: int, fh: int) -> None:
        self._handle(fh)

    async def fsync(self, ctx: Context, inode: int, fh: int, datasync: bool) -> None:
        self._handle(fh)
        self.calls.append(f"fsync {datasync}")

    async def release(self, ctx: Context, inode: int, fh: int) -> None:
        self._handle(fh)
        del self.open_handles[fh]

    async def opendir(self, ctx: Context, inode: int) -> OpenResult:
        self._dir(inode)
        return self._open(inode)

    async def readdir(self, ctx: Context, inode: int, fh: int, offset: int
                      ) -> AsyncIterator[DirEntry]:  # fmt: skip
        d = self._dir(self._handle(fh))
        names = [(b".", d.ino), (b"..", ROOT_INODE), *sorted(d.children.items())]
        for i, (name, ino) in enumerate(names[offset:], offset + 1):
            yield DirEntry(ino, i, stat.S_IFMT(self.nodes[ino].mode) >> 12, name)

    async def readdirplus(self, ctx: Context, inode: int, fh: int, offset: int
                          ) -> AsyncIterator[tuple[DirEntry, Entry | None]]:  # fmt: skip
        async for d in self.readdir(ctx, inode, fh, offset):
            yield d, None if d.name in (b".", b"..") else self.entry(self.nodes[d.ino])

    async def releasedir(self, ctx: Context, inode: int, fh: int) -> None:
        self._handle(fh)
        del self.open_handles[fh]

    async def fsyncdir(self, ctx: Context, inode: int, fh: int, datasync: bool) -> None:
        self._handle(fh)

    async def getxattr(self, ctx: Context, inode: int, name: bytes) -> bytes:
        try:
            return self.node(inode).xattrs[name]
        except KeyError:
            raise _err(errno.ENODATA) from None

    async def listxattr(self, ctx: Context, inode: int) -> list[bytes]:
        return sorted(self.node(inode).xattrs)

    async def setxattr(self, ctx: Context, inode: int, name: bytes, value: bytes,
                       flags: int) -> None:  # fmt: skip
        self.node(inode).xattrs[name] = value

    async def removexattr(self, ctx: Context, inode: int, name: bytes) -> None:
        if self.node(inode).xattrs.pop(name, None) is None:
            raise _err(errno.ENODATA)
