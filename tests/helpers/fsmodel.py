"""A model filesystem and uniform drivers for stateful tests of writable filesystems.

Every operation takes slash-separated relative paths and returns ``("ok", value)`` or
``("err", errno)``, so one test can apply the same step to the ``Model``, a ``FileSystem``
called directly (``FsTarget``, on a trio loop in a thread) and a mounted directory
(``PathTarget``: our FUSE mount, or the kernel's overlayfs) and compare the answers. Symlinks in
the tests are dangling (they point at ``ZZ``), so following one fails with ENOENT everywhere.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import Any

import trio

from nydusfs.filesystem import ROOT_INODE, SETATTR_MODE, SETATTR_SIZE, FileSystem
from nydusfs.passthrough import sys as psys
from nydusfs.types import Attr, Context

Result = tuple[str, Any]
DANGLING = "ZZ"
XATTR = "user.t"


def outcome(func: Callable[[], Any]) -> Result:
    try:
        return ("ok", func())
    except OSError as e:
        return ("err", e.errno)


# --- the model --------------------------------------------------------------------------------


class MFile:
    def __init__(self, data: bytes = b"", mode: int = 0o644) -> None:
        self.data = bytearray(data)
        self.mode = mode
        self.xattrs: dict[str, bytes] = {}


class MLink:
    def __init__(self, target: str) -> None:
        self.target = target


class MDir:
    def __init__(self, mode: int = 0o755) -> None:
        self.children: dict[str, MFile | MLink | MDir] = {}
        self.mode = mode
        self.xattrs: dict[str, bytes] = {}


MNode = MFile | MLink | MDir


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Model:
    """What POSIX says the operations do (Linux's errno choices)."""

    def __init__(self) -> None:
        self.root = MDir()

    @classmethod
    def from_tree(cls, root: str) -> Model:
        model = cls()

        def load(path: str, into: MDir) -> None:
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                st = os.lstat(full)
                node: MNode
                if stat.S_ISDIR(st.st_mode):
                    node = MDir(stat.S_IMODE(st.st_mode))
                    load(full, node)
                elif stat.S_ISLNK(st.st_mode):
                    node = MLink(os.readlink(full))
                else:
                    with open(full, "rb") as f:
                        node = MFile(f.read(), stat.S_IMODE(st.st_mode))
                if not isinstance(node, MLink):
                    node.xattrs = {
                        n: os.getxattr(full, n) for n in os.listxattr(full) if n.startswith("user.")
                    }
                into.children[name] = node

        load(root, model.root)
        return model

    def _walk(self, path: str) -> tuple[MDir, str]:
        parts = path.split("/")
        node: MNode = self.root
        for part in parts[:-1]:
            if not isinstance(node, MDir):
                raise _err(errno.ENOENT if isinstance(node, MLink) else errno.ENOTDIR)
            nxt = node.children.get(part)
            if nxt is None:
                raise _err(errno.ENOENT)
            node = nxt
        if not isinstance(node, MDir):
            raise _err(errno.ENOENT if isinstance(node, MLink) else errno.ENOTDIR)
        return node, parts[-1]

    def get(self, path: str, follow: bool = True) -> MNode:
        parent, name = self._walk(path)
        node = parent.children.get(name)
        if node is None or (follow and isinstance(node, MLink)):
            raise _err(errno.ENOENT)
        return node

    def _file(self, path: str) -> MFile:
        node = self.get(path)
        if isinstance(node, MDir):
            raise _err(errno.EISDIR)
        assert isinstance(node, MFile)
        return node

    def _new(self, path: str) -> tuple[MDir, str]:
        parent, name = self._walk(path)
        if name in parent.children:
            raise _err(errno.EEXIST)
        return parent, name

    # operations
    def create(self, path: str, data: bytes) -> None:
        parent, name = self._new(path)
        parent.children[name] = MFile(data)

    def write(self, path: str, offset: int, data: bytes) -> None:
        f = self._file(path)
        if not data:
            return  # a write of nothing does not extend the file
        if len(f.data) < offset:
            f.data.extend(bytes(offset - len(f.data)))
        f.data[offset : offset + len(data)] = data

    def append(self, path: str, data: bytes) -> None:
        self._file(path).data.extend(data)

    def truncate(self, path: str, size: int) -> None:
        f = self._file(path)
        del f.data[size:]
        f.data.extend(bytes(size - len(f.data)))

    def read(self, path: str) -> bytes:
        return bytes(self._file(path).data)

    def mkdir(self, path: str) -> None:
        parent, name = self._new(path)
        parent.children[name] = MDir()

    def symlink(self, path: str) -> None:
        parent, name = self._new(path)
        parent.children[name] = MLink(DANGLING)

    def link(self, src: str, dst: str) -> None:
        node = self.get(src, follow=False)
        parent, name = self._new(dst)
        if isinstance(node, MDir):
            raise _err(errno.EPERM)
        parent.children[name] = node

    def unlink(self, path: str) -> None:
        parent, name = self._walk(path)
        node = parent.children.get(name)
        if node is None:
            raise _err(errno.ENOENT)
        if isinstance(node, MDir):
            raise _err(errno.EISDIR)
        del parent.children[name]

    def rmdir(self, path: str) -> None:
        parent, name = self._walk(path)
        node = parent.children.get(name)
        if node is None:
            raise _err(errno.ENOENT)
        if not isinstance(node, MDir):
            raise _err(errno.ENOTDIR)
        if node.children:
            raise _err(errno.ENOTEMPTY)
        del parent.children[name]

    def rename(self, src: str, dst: str, flags: int) -> None:
        """Paths where neither is a prefix of the other (the tests never pick such pairs)."""
        sp, sname = self._walk(src)
        dp, dname = self._walk(dst)  # both parents first, as Linux does
        node = sp.children.get(sname)
        if node is None:
            raise _err(errno.ENOENT)
        other = dp.children.get(dname)
        if flags & psys.RENAME_NOREPLACE and other is not None:
            raise _err(errno.EEXIST)
        if flags & psys.RENAME_EXCHANGE:
            if other is None:
                raise _err(errno.ENOENT)
            sp.children[sname], dp.children[dname] = other, node
            return
        if other is node:
            return
        if other is not None:
            if isinstance(node, MDir) and not isinstance(other, MDir):
                raise _err(errno.ENOTDIR)
            if isinstance(other, MDir) and not isinstance(node, MDir):
                raise _err(errno.EISDIR)
            if isinstance(other, MDir) and other.children:
                raise _err(errno.ENOTEMPTY)
        del sp.children[sname]
        dp.children[dname] = node

    def chmod(self, path: str, mode: int) -> None:
        node = self.get(path)
        assert not isinstance(node, MLink)
        node.mode = mode

    def setxattr(self, path: str, value: bytes) -> None:
        node = self.get(path)
        assert not isinstance(node, MLink)
        node.xattrs[XATTR] = value

    def listdir(self, path: str) -> list[str]:
        node = self.root if path == "" else self.get(path)
        if not isinstance(node, MDir):
            raise _err(errno.ENOTDIR)
        return sorted(node.children)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        counts: dict[int, int] = {}

        def count(d: MDir) -> None:
            for child in d.children.values():
                counts[id(child)] = counts.get(id(child), 0) + 1
                if isinstance(child, MDir):
                    count(child)

        def walk(prefix: str, d: MDir) -> None:
            for name, child in d.children.items():
                path = prefix + name
                if isinstance(child, MDir):
                    out[path] = ("dir", child.mode, dict(child.xattrs))
                    walk(path + "/", child)
                elif isinstance(child, MLink):
                    out[path] = ("link", child.target)
                else:
                    out[path] = ("file", child.mode, bytes(child.data), dict(child.xattrs),
                                 counts[id(child)])  # fmt: skip

        count(self.root)
        walk("", self.root)
        return out


# --- a mounted directory ----------------------------------------------------------------------


class PathTarget:
    """The operations as system calls under ``root`` (a FUSE mount, a kernel overlay...)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def p(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def create(self, path: str, data: bytes) -> None:
        fd = os.open(self.p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _pwrite(self, path: str, flags: int, data: bytes, offset: int) -> None:
        fd = os.open(self.p(path), os.O_WRONLY | flags)
        try:
            os.pwrite(fd, data, offset) if not flags & os.O_APPEND else os.write(fd, data)
        finally:
            os.close(fd)

    def write(self, path: str, offset: int, data: bytes) -> None:
        self._pwrite(path, 0, data, offset)

    def append(self, path: str, data: bytes) -> None:
        self._pwrite(path, os.O_APPEND, data, 0)

    def truncate(self, path: str, size: int) -> None:
        os.truncate(self.p(path), size)

    def read(self, path: str) -> bytes:
        with open(self.p(path), "rb") as f:
            return f.read()

    def mkdir(self, path: str) -> None:
        os.mkdir(self.p(path), 0o755)

    def symlink(self, path: str) -> None:
        os.symlink(DANGLING, self.p(path))

    def link(self, src: str, dst: str) -> None:
        os.link(self.p(src), self.p(dst), follow_symlinks=False)

    def unlink(self, path: str) -> None:
        os.unlink(self.p(path))

    def rmdir(self, path: str) -> None:
        os.rmdir(self.p(path))

    def rename(self, src: str, dst: str, flags: int) -> None:
        psys.renameat2(-100, os.fsencode(self.p(src)), -100, os.fsencode(self.p(dst)), flags)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self.p(path), mode)

    def setxattr(self, path: str, value: bytes) -> None:
        os.setxattr(self.p(path), XATTR, value)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self.p(path)))

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dirpath, dirs, files in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            prefix = "" if rel == "." else rel + "/"
            for name in dirs + files:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    out[prefix + name] = ("link", os.readlink(full))
                    continue
                xattrs = {n: os.getxattr(full, n) for n in os.listxattr(full)
                          if n.startswith("user.")}  # fmt: skip
                if stat.S_ISDIR(st.st_mode):
                    out[prefix + name] = ("dir", mode, xattrs)
                else:
                    with open(full, "rb") as f:
                        out[prefix + name] = ("file", mode, f.read(), xattrs, st.st_nlink)
        return out


# --- a FileSystem called directly -------------------------------------------------------------

CTX = Context(0, 0, 1, 0o022)


class LoopThread:
    """A trio loop in a thread; ``call(afn, ...)`` runs a coroutine function there."""

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)
        self._thread.start()
        self._ready.wait()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        self._ready.set()
        await self._stop.wait()

    def call(self, afn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def close(self) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()


class FsTarget:
    """The operations as ``FileSystem`` calls (lookups walk each path, then forget)."""

    def __init__(self, fs: FileSystem, loop: LoopThread) -> None:
        self.fs = fs
        self.loop = loop

    def _run(self, afn: Callable[..., Any], *args: Any) -> Any:
        return self.loop.call(afn, *args)

    async def _walk(self, path: str, follow: bool) -> tuple[int, int, Attr | None]:
        """``(parent ino, ino or 0, attr)`` of ``path``; references are dropped at once (the
        tests keep the root's children alive through the filesystem's own tables)."""
        parts = path.split("/") if path else []
        parent = ROOT_INODE
        attr = await self.fs.getattr(CTX, ROOT_INODE)
        ino = ROOT_INODE
        for i, part in enumerate(parts):
            if not stat.S_ISDIR(attr.mode):
                raise _err(errno.ENOENT if stat.S_ISLNK(attr.mode) else errno.ENOTDIR)
            parent = ino
            try:
                entry = await self.fs.lookup(CTX, ino, part.encode())
            except FileNotFoundError:
                if i == len(parts) - 1:
                    return parent, 0, None
                raise
            ino, attr = entry.ino, entry.attr
            if i == len(parts) - 1 and follow and stat.S_ISLNK(attr.mode):
                raise _err(errno.ENOENT)
        return parent, ino, attr

    async def _existing(self, path: str, follow: bool = True) -> tuple[int, int, Attr]:
        parent, ino, attr = await self._walk(path, follow)
        if attr is None:
            raise _err(errno.ENOENT)
        return parent, ino, attr

    async def _new(self, path: str) -> tuple[int, bytes]:
        parent, ino, _ = await self._walk(path, False)
        if ino:
            raise _err(errno.EEXIST)
        return parent, path.rsplit("/", 1)[-1].encode()

    async def _create(self, path: str, data: bytes) -> None:
        parent, name = await self._new(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        handle, entry = await self.fs.create(CTX, parent, name, 0o100644, flags, 0o022)
        try:
            await self.fs.write(CTX, entry.ino, handle.fh, 0, data)
        finally:
            await self.fs.release(CTX, entry.ino, handle.fh)

    async def _file(self, path: str, flags: int) -> tuple[int, int, Attr]:
        _, ino, attr = await self._existing(path)
        if stat.S_ISDIR(attr.mode):
            raise _err(errno.EISDIR)
        return ino, (await self.fs.open(CTX, ino, flags)).fh, attr

    async def _write(self, path: str, offset: int | None, data: bytes) -> None:
        flags = os.O_WRONLY | (os.O_APPEND if offset is None else 0)
        ino, fh, attr = await self._file(path, flags)
        try:
            await self.fs.write(CTX, ino, fh, attr.size if offset is None else offset, data)
        finally:
            await self.fs.release(CTX, ino, fh)

    async def _read(self, path: str) -> bytes:
        ino, fh, attr = await self._file(path, os.O_RDONLY)
        try:
            return bytes(await self.fs.read(CTX, ino, fh, 0, attr.size + 1))
        finally:
            await self.fs.release(CTX, ino, fh)

    async def _setattr(self, path: str, valid: int, **fields: int) -> None:
        _, ino, attr = await self._existing(path)
        if valid & SETATTR_SIZE and stat.S_ISDIR(attr.mode):
            raise _err(errno.EISDIR)
        await self.fs.setattr(CTX, ino, attr._replace(**fields), valid)

    async def _listdir(self, path: str) -> list[str]:
        _, ino, attr = await self._existing(path)
        if not stat.S_ISDIR(attr.mode):
            raise _err(errno.ENOTDIR)
        handle = await self.fs.opendir(CTX, ino)
        try:
            names = [e.name.decode() async for e in self.fs.readdir(CTX, ino, handle.fh, 0)]
        finally:
            await self.fs.releasedir(CTX, ino, handle.fh)
        return sorted(n for n in names if n not in (".", ".."))

    async def _two(self, src: str, dst: str) -> tuple[int, int, int, bytes]:
        sp, sino, sattr = await self._walk(src, False)
        dp, _, _ = await self._walk(dst, False)
        if sattr is None:
            raise _err(errno.ENOENT)
        return sp, sino, dp, dst.rsplit("/", 1)[-1].encode()

    async def _rename(self, src: str, dst: str, flags: int) -> None:
        sp, _, dp, dname = await self._two(src, dst)
        await self.fs.rename(CTX, sp, src.rsplit("/", 1)[-1].encode(), dp, dname, flags)

    async def _link(self, src: str, dst: str) -> None:
        _, sino, attr = await self._existing(src, follow=False)
        dp, name = await self._new(dst)
        if stat.S_ISDIR(attr.mode):
            raise _err(errno.EPERM)
        await self.fs.link(CTX, sino, dp, name)

    async def _remove(self, path: str, is_dir: bool) -> None:
        parent, _, attr = await self._existing(path, follow=False)
        name = path.rsplit("/", 1)[-1].encode()
        if is_dir:
            if not stat.S_ISDIR(attr.mode):
                raise _err(errno.ENOTDIR)
            await self.fs.rmdir(CTX, parent, name)
        else:
            if stat.S_ISDIR(attr.mode):
                raise _err(errno.EISDIR)
            await self.fs.unlink(CTX, parent, name)

    async def _mk(self, path: str, kind: str) -> None:
        parent, name = await self._new(path)
        if kind == "dir":
            await self.fs.mkdir(CTX, parent, name, 0o755, 0o022)
        else:
            await self.fs.symlink(CTX, parent, name, DANGLING.encode())

    async def _setxattr(self, path: str, value: bytes) -> None:
        _, ino, _ = await self._existing(path)
        await self.fs.setxattr(CTX, ino, XATTR.encode(), value, 0)

    async def _snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}

        async def walk(prefix: str, ino: int) -> None:
            handle = await self.fs.opendir(CTX, ino)
            try:
                entries = [e async for e in self.fs.readdir(CTX, ino, handle.fh, 0)]
            finally:
                await self.fs.releasedir(CTX, ino, handle.fh)
            for e in entries:
                if e.name in (b".", b".."):
                    continue
                path = prefix + e.name.decode()
                entry = await self.fs.lookup(CTX, ino, e.name)
                a = entry.attr
                if stat.S_ISLNK(a.mode):
                    out[path] = ("link", (await self.fs.readlink(CTX, entry.ino)).decode())
                    continue
                names = await self.fs.listxattr(CTX, entry.ino)
                xattrs = {n.decode(): await self.fs.getxattr(CTX, entry.ino, n)
                          for n in names if n.startswith(b"user.")}  # fmt: skip
                if stat.S_ISDIR(a.mode):
                    out[path] = ("dir", stat.S_IMODE(a.mode), xattrs)
                    await walk(path + "/", entry.ino)
                else:
                    out[path] = ("file", stat.S_IMODE(a.mode), await self._read(path), xattrs,
                                 a.nlink)  # fmt: skip

        await walk("", ROOT_INODE)
        return out

    # the uniform, synchronous face
    def create(self, path: str, data: bytes) -> None:
        self._run(self._create, path, data)

    def write(self, path: str, offset: int, data: bytes) -> None:
        self._run(self._write, path, offset, data)

    def append(self, path: str, data: bytes) -> None:
        self._run(self._write, path, None, data)

    def truncate(self, path: str, size: int) -> None:
        self._run(lambda: self._setattr(path, SETATTR_SIZE, size=size))

    def read(self, path: str) -> bytes:
        return self._run(self._read, path)  # type: ignore[no-any-return]

    def mkdir(self, path: str) -> None:
        self._run(self._mk, path, "dir")

    def symlink(self, path: str) -> None:
        self._run(self._mk, path, "link")

    def link(self, src: str, dst: str) -> None:
        self._run(self._link, src, dst)

    def unlink(self, path: str) -> None:
        self._run(self._remove, path, False)

    def rmdir(self, path: str) -> None:
        self._run(self._remove, path, True)

    def rename(self, src: str, dst: str, flags: int) -> None:
        self._run(self._rename, src, dst, flags)

    def chmod(self, path: str, mode: int) -> None:
        self._run(lambda: self._setattr(path, SETATTR_MODE, mode=stat.S_IFREG | mode))

    def setxattr(self, path: str, value: bytes) -> None:
        self._run(self._setxattr, path, value)

    def listdir(self, path: str) -> list[str]:
        return self._run(self._listdir, path)  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, Any]:
        return self._run(self._snapshot)  # type: ignore[no-any-return]
