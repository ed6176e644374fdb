"""``OverlayFs``: one writable upper layer over one or more read-only lower layers.

Semantics are the kernel overlayfs's (the tests use it as the oracle): the upper layer is a
``PassthroughFs`` over ``upper_dir``; lower layers are any ``FileSystem`` (a RAFS image, or a
plain directory through ``PassthroughFs``), the first one topmost. A name resolves to the
topmost layer that has it; directories merge down to the first opaque one; whiteouts hide.
The first change to a lower file copies it up (``copyup``); removing a name a lower layer has
leaves a whiteout; a directory made where a lower one was hidden is opaque. Renaming a
directory that has lower parts copies its whole tree up first (the kernel, without
``redirect_dir``, answers EXDEV there and lets ``mv`` do the copy). Hard links of lower files
are separate files once one is copied up (as in the kernel without ``index``).

Inode numbers are the overlay's own, handed out on first lookup and kept for the life of the
mount (``Node``; hard links made here share one). Without an upper layer, or with
``writable=False``, the overlay is read-only (EROFS).

Concurrency: runs on the event loop; the layers' coroutines are awaited. Operations on the tree
of nodes happen between awaits, and copy-ups of one node are serialised by a lock.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator

import trio

from nydusfs.filesystem import ROOT_INODE, SETATTR_SIZE, FileSystem, OpenResult
from nydusfs.overlay.copyup import ROOT_CTX, attr_for, copy_up, copy_up_tree
from nydusfs.overlay.layer import (
    OPAQUE_XATTR,
    WHITEOUT_MODE,
    Node,
    clear_whiteouts,
    is_private_xattr,
    is_whiteout_stat,
)
from nydusfs.overlay.tree import OverlayHandle, OverlayTree
from nydusfs.passthrough import sys as psys
from nydusfs.passthrough.fs import check_access
from nydusfs.passthrough.inode import check_name
from nydusfs.types import Attr, Context, DirEntry, Entry, StatVfs

_WRITE_INTENT = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
_CREATE_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC


class OverlayFs(OverlayTree, FileSystem):
    """``upper_dir`` (with ``work_dir``) over ``lowers`` (topmost first)."""

    # --- shared steps -------------------------------------------------------------------------
    async def _existing(self, parent: int, name: bytes) -> tuple[Node, Node]:
        p = self._dir(parent)
        node = await self.child(p, name)
        if node is None:
            raise OSError(errno.ENOENT, "no such file or directory")
        return p, node

    async def _prepare_new(self, p: Node, name: bytes) -> bool:
        """Get ``p`` ready for a new entry ``name``; True when a whiteout sits there (the new
        entry then replaces it in one step, and a directory made there is opaque)."""
        self._check_writable()
        if await self.child(p, name) is not None:
            raise OSError(errno.EEXIST, "file exists")
        await copy_up(self, p)
        try:
            st = os.stat(name, dir_fd=self.upper_fd(p), follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not is_whiteout_stat(st):
            raise OSError(errno.EEXIST, "file exists in the upper layer")
        p.lower_names.add(name)
        return True

    async def _built(self, ctx: Context, p: Node, name: bytes, attr: Attr, target: bytes = b"",
                     link_from: Node | None = None) -> Node:  # fmt: skip
        """Make ``name`` in the work directory and swap it with the whiteout at ``name``."""
        work = self.work
        tmp = work.tmp_name()
        try:
            if link_from is not None:
                os.link(self.upper_fs.inode(link_from.upper or 0).proc_path, tmp,
                        dst_dir_fd=work.fd, follow_symlinks=True)  # fmt: skip
            else:
                fd = work.make(tmp, attr.mode, attr.rdev, target)
                if fd is not None:
                    os.close(fd)
                if stat.S_ISDIR(attr.mode):
                    os.setxattr(work.path(tmp), OPAQUE_XATTR, b"y")
                work.finish(tmp, attr, [])
            work.install(tmp, self.upper_fd(p), name, exchange=True)
        except BaseException:
            if os.path.lexists(work.path(tmp)):
                work.remove(tmp)
            raise
        p.children.pop(name, None)
        node = await self.child(p, name)
        if node is None:
            raise OSError(errno.EIO, "the new entry vanished")
        return node

    async def _added(self, p: Node, name: bytes, entry: Entry) -> Node:
        """Record an entry just made in the upper layer (``entry`` holds an upper reference)."""
        kind = stat.S_IFMT(entry.attr.mode)
        if kind != stat.S_IFDIR and entry.ino in self._by_upper:
            node = self._by_upper[entry.ino]
            await self.upper_fs.forget(entry.ino, 1)
            node.names += 1
        else:
            node = Node(next(self._next), p, name, kind)
            self._nodes[node.ino] = node
            await self.set_upper(node, entry.ino)
        p.children[name] = node
        return node

    async def _is_empty(self, node: Node) -> bool:
        return not await self.merged_entries(node)

    # --- metadata -----------------------------------------------------------------------------
    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        _, node = await self._existing(parent, name)
        return await self._entry(node)

    async def forget(self, inode: int, nlookup: int) -> None:
        node = self._nodes.get(inode)
        if node is None or node is self.root:
            return
        node.nlookup = max(0, node.nlookup - nlookup)
        await self.maybe_free(node)

    async def getattr(self, ctx: Context, inode: int, fh: int | None = None) -> Attr:
        node = self._node(inode)
        h = self._handles.get(fh) if fh is not None else None
        if h is not None and h.fs is self.upper:
            return (await h.fs.getattr(ctx, h.inner, h.fh))._replace(ino=inode)
        return await self._attr(node)

    async def setattr(
        self, ctx: Context, inode: int, attr: Attr, valid: int, fh: int | None = None
    ) -> Attr:
        self._check_writable()
        node = self._node(inode)
        await copy_up(self, node, data=not (valid & SETATTR_SIZE and attr.size == 0))
        assert node.upper is not None
        h = self._handles.get(fh) if fh is not None else None
        inner_fh = h.fh if h is not None and h.fs is self.upper else None
        await self.upper_fs.setattr(ctx, node.upper, attr, valid, inner_fh)
        return await self._attr(node)

    async def readlink(self, ctx: Context, inode: int) -> bytes:
        fs, inner = self._layer_of(self._node(inode))
        return await fs.readlink(ctx, inner)

    async def access(self, ctx: Context, inode: int, mask: int) -> None:
        if mask & os.W_OK and not self.writable:
            raise OSError(errno.EROFS, "read-only filesystem")
        check_access(await self._attr(self._node(inode)), ctx, mask)

    async def statfs(self, ctx: Context, inode: int) -> StatVfs:
        if self.upper is not None:
            return await self.upper.statfs(ctx, ROOT_INODE)
        return await self.lowers[0].statfs(ctx, ROOT_INODE)

    # --- namespace changes --------------------------------------------------------------------
    async def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        p = self._dir(parent)
        if await self._prepare_new(p, name):
            kind = stat.S_IFMT(mode) or stat.S_IFREG
            wanted = attr_for(kind, mode & ~umask, ctx)._replace(rdev=rdev)
            return await self._entry(await self._built(ctx, p, name, wanted))
        assert p.upper is not None
        entry = await self.upper_fs.mknod(ctx, p.upper, name, mode, rdev, umask)
        return await self._entry(await self._added(p, name, entry))

    async def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        p = self._dir(parent)
        if await self._prepare_new(p, name):
            wanted = attr_for(stat.S_IFDIR, mode & ~umask, ctx)
            return await self._entry(await self._built(ctx, p, name, wanted))
        assert p.upper is not None
        entry = await self.upper_fs.mkdir(ctx, p.upper, name, mode, umask)
        return await self._entry(await self._added(p, name, entry))

    async def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        p = self._dir(parent)
        if await self._prepare_new(p, name):
            wanted = attr_for(stat.S_IFLNK, 0o777, ctx)
            return await self._entry(await self._built(ctx, p, name, wanted, target))
        assert p.upper is not None
        entry = await self.upper_fs.symlink(ctx, p.upper, name, target)
        return await self._entry(await self._added(p, name, entry))

    async def link(self, ctx: Context, inode: int, new_parent: int, new_name: bytes) -> Entry:
        node, p = self._node(inode), self._dir(new_parent)
        if node.is_dir:
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        whiteout = await self._prepare_new(p, new_name)
        await copy_up(self, node)
        assert node.upper is not None and p.upper is not None
        if whiteout:
            linked = await self._built(ctx, p, new_name, await self._attr(node), link_from=node)
            return await self._entry(linked)
        entry = await self.upper_fs.link(ctx, node.upper, p.upper, new_name)
        return await self._entry(await self._added(p, new_name, entry))

    async def _remove(self, p: Node, name: bytes, node: Node) -> None:
        """Take ``name`` away from ``p``: delete its upper part, whiteout what lower layers have."""
        if node.upper is not None:
            parent_fd = self.upper_fd(p)
            if node.is_dir:
                clear_whiteouts(self.upper_fs.inode(node.upper).proc_path)
            if name in p.lower_names:
                self.work.whiteout_away(parent_fd, name)
            elif node.is_dir:
                os.rmdir(name, dir_fd=parent_fd)
            else:
                os.unlink(name, dir_fd=parent_fd)
        else:
            await copy_up(self, p)
            os.mknod(name, WHITEOUT_MODE, 0, dir_fd=self.upper_fd(p))
        await self.detach(p, name)

    async def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self._check_writable()
        p, node = await self._existing(parent, name)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        await self._remove(p, name, node)

    async def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._check_writable()
        p, node = await self._existing(parent, name)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if not await self._is_empty(node):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        await self._remove(p, name, node)

    async def _self_contained(self, node: Node) -> None:
        if node.is_dir:
            await copy_up_tree(self, node)
        else:
            await copy_up(self, node)

    async def _make_opaque(self, node: Node) -> None:
        if node.is_dir and not node.opaque and node.upper is not None:
            await self.upper_fs.setxattr(ROOT_CTX, node.upper, OPAQUE_XATTR, b"y", 0)
            node.opaque = True

    async def rename(
        self, ctx: Context, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._check_writable()
        exchange = bool(flags & psys.RENAME_EXCHANGE)
        if flags & ~(psys.RENAME_NOREPLACE | psys.RENAME_EXCHANGE) or (
            exchange and flags & psys.RENAME_NOREPLACE
        ):
            raise OSError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
        p, src = await self._existing(parent, name)
        np = self._dir(new_parent)
        check_name(new_name)
        dst = await self.child(np, new_name)
        if dst is src:
            return  # the same entry, or two names of one file: nothing to do
        if dst is not None and flags & psys.RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "file exists")
        if dst is None and exchange:
            raise OSError(errno.ENOENT, "no such file or directory")
        for moved, into in ((src, np), (dst, p) if exchange else (None, p)):
            if moved is not None and moved.is_dir and self._inside(into, moved):
                raise OSError(errno.EINVAL, "cannot move a directory into itself")
        if dst is not None and not exchange:
            if src.is_dir and not dst.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            if dst.is_dir and not src.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            if dst.is_dir and not await self._is_empty(dst):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
        await self._self_contained(src)
        if exchange and dst is not None:
            await self._self_contained(dst)
        await copy_up(self, np)
        if new_name in np.lower_names:
            await self._make_opaque(src)
        if exchange and dst is not None and name in p.lower_names:
            await self._make_opaque(dst)
        old_fd, new_fd = self.upper_fd(p), self.upper_fd(np)
        upper_flags = psys.RENAME_EXCHANGE if exchange else 0
        if not exchange:
            if name in p.lower_names:
                upper_flags |= psys.RENAME_WHITEOUT
            if dst is not None and dst.is_dir and dst.upper is not None:
                clear_whiteouts(self.upper_fs.inode(dst.upper).proc_path)
            if dst is None and src.is_dir:
                # A whiteout may hold the name; a directory cannot replace a device, so the
                # whiteout goes first (the new directory is opaque, nothing shows through).
                try:
                    st = os.stat(new_name, dir_fd=new_fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    if is_whiteout_stat(st):
                        await self._make_opaque(src)
                        os.unlink(new_name, dir_fd=new_fd)
        psys.renameat2(old_fd, name, new_fd, new_name, upper_flags)
        if exchange and dst is not None:
            p.children[name], np.children[new_name] = dst, src
            dst.parent, dst.name = p, name
        else:
            p.children.pop(name, None)
            await self.detach(np, new_name)
            np.children[new_name] = src
        src.parent, src.name = np, new_name

    def _inside(self, node: Node | None, ancestor: Node) -> bool:
        while node is not None:
            if node is ancestor:
                return True
            node = node.parent
        return False

    # --- files --------------------------------------------------------------------------------
    async def _open_node(self, ctx: Context, node: Node, flags: int) -> OpenResult:
        if flags & _WRITE_INTENT:
            self._check_writable()
            await copy_up(self, node, data=not flags & os.O_TRUNC)
        fs, inner = self._layer_of(node)
        result = await fs.open(ctx, inner, flags)
        fh = next(self._fh)
        self._handles[fh] = OverlayHandle(node, fs, inner, result.fh)
        node.opened += 1
        return OpenResult(fh, keep_cache=False, direct_io=result.direct_io)

    async def open(self, ctx: Context, inode: int, flags: int) -> OpenResult:
        return await self._open_node(ctx, self._node(inode), flags)

    async def create(
        self, ctx: Context, parent: int, name: bytes, mode: int, flags: int, umask: int
    ) -> tuple[OpenResult, Entry]:
        p = self._dir(parent)
        existing = await self.child(p, name)
        if existing is not None:
            if flags & os.O_EXCL:
                raise OSError(errno.EEXIST, "file exists")
            result = await self._open_node(ctx, existing, flags)
            return result, await self._entry(existing)
        if await self._prepare_new(p, name):
            wanted = attr_for(stat.S_IFREG, mode & ~umask, ctx)
            node = await self._built(ctx, p, name, wanted)
            result = await self._open_node(ctx, node, flags & ~_CREATE_DROP)
            return result, await self._entry(node)
        assert p.upper is not None
        inner_result, entry = await self.upper_fs.create(ctx, p.upper, name, mode, flags, umask)
        node = await self._added(p, name, entry)
        fh = next(self._fh)
        self._handles[fh] = OverlayHandle(node, self.upper_fs, node.upper or 0, inner_result.fh)
        node.opened += 1
        return OpenResult(fh), await self._entry(node)

    def _h(self, fh: int) -> OverlayHandle:
        h = self._handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, f"no open handle {fh}")
        return h

    async def read(self, ctx: Context, inode: int, fh: int, offset: int, size: int) -> bytes:
        h = self._h(fh)
        return await h.fs.read(ctx, h.inner, h.fh, offset, size)

    async def write(self, ctx: Context, inode: int, fh: int, offset: int, data: bytes) -> int:
        h = self._h(fh)
        return await h.fs.write(ctx, h.inner, h.fh, offset, data)

    async def flush(self, ctx: Context, inode: int, fh: int) -> None:
        h = self._h(fh)
        try:
            await h.fs.flush(ctx, h.inner, h.fh)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise

    async def fsync(self, ctx: Context, inode: int, fh: int, datasync: bool) -> None:
        h = self._h(fh)
        if h.fs is self.upper:
            await h.fs.fsync(ctx, h.inner, h.fh, datasync)

    async def release(self, ctx: Context, inode: int, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        h.node.opened -= 1
        try:
            if h.fh >= 0:
                await h.fs.release(ctx, h.inner, h.fh)
        finally:
            await self.maybe_free(h.node)

    # --- directories --------------------------------------------------------------------------
    async def opendir(self, ctx: Context, inode: int) -> OpenResult:
        node = self._dir(inode)
        fh = next(self._fh)
        self._handles[fh] = OverlayHandle(node, self, inode, -1)
        node.opened += 1
        return OpenResult(fh)

    async def _listing(self, h: OverlayHandle, offset: int) -> list[tuple[bytes, int, int]]:
        if h.entries is None or offset == 0:
            node = h.node
            parent = node.parent.ino if node.parent is not None else node.ino
            entries = [(b".", node.ino, 4), (b"..", parent, 4)]
            for name, kind in await self.merged_entries(node):
                child = await self.child(node, name)
                if child is not None:
                    entries.append((name, child.ino, kind))
            h.entries = entries
        return h.entries

    async def readdir(
        self, ctx: Context, inode: int, fh: int, offset: int
    ) -> AsyncIterator[DirEntry]:
        entries = await self._listing(self._h(fh), offset)
        for i in range(offset, len(entries)):
            name, ino, kind = entries[i]
            yield DirEntry(ino, i + 1, kind, name)

    async def readdirplus(
        self, ctx: Context, inode: int, fh: int, offset: int
    ) -> AsyncIterator[tuple[DirEntry, Entry | None]]:
        h = self._h(fh)
        entries = await self._listing(h, offset)
        for i in range(offset, len(entries)):
            name, ino, kind = entries[i]
            if name in (b".", b".."):
                yield DirEntry(ino, i + 1, kind, name), None
                continue
            node = await self.child(h.node, name)
            if node is None:
                continue  # removed since the listing
            yield DirEntry(node.ino, i + 1, kind, name), await self._entry(node)

    async def releasedir(self, ctx: Context, inode: int, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            h.node.opened -= 1
            await self.maybe_free(h.node)

    async def fsyncdir(self, ctx: Context, inode: int, fh: int, datasync: bool) -> None:
        node = self._h(fh).node
        if node.upper is not None:
            fd = os.open(self.upper_fs.inode(node.upper).proc_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
            finally:
                os.close(fd)

    # --- xattrs -------------------------------------------------------------------------------
    async def getxattr(self, ctx: Context, inode: int, name: bytes) -> bytes:
        if is_private_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute")
        fs, inner = self._layer_of(self._node(inode))
        return await fs.getxattr(ctx, inner, name)

    async def listxattr(self, ctx: Context, inode: int) -> list[bytes]:
        fs, inner = self._layer_of(self._node(inode))
        try:
            names = await fs.listxattr(ctx, inner)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                return []
            raise
        return [n for n in names if not is_private_xattr(n)]

    async def setxattr(
        self, ctx: Context, inode: int, name: bytes, value: bytes, flags: int
    ) -> None:
        self._check_writable()
        if is_private_xattr(name):
            raise OSError(errno.EPERM, "trusted.overlay.* belongs to the overlay")
        node = self._node(inode)
        await copy_up(self, node)
        assert node.upper is not None
        await self.upper_fs.setxattr(ctx, node.upper, name, value, flags)

    async def removexattr(self, ctx: Context, inode: int, name: bytes) -> None:
        self._check_writable()
        if is_private_xattr(name):
            raise OSError(errno.EPERM, "trusted.overlay.* belongs to the overlay")
        node = self._node(inode)
        await copy_up(self, node)
        assert node.upper is not None
        await self.upper_fs.removexattr(ctx, node.upper, name)

    async def init(self) -> None:
        for fs in self.lowers:
            await fs.init()

    async def destroy(self) -> None:
        for h in list(self._handles.values()):
            if h.fs is not self and h.fh >= 0:
                await h.fs.release(ROOT_CTX, h.inner, h.fh)
        self._handles.clear()
        if self.upper is not None:
            await self.upper.destroy()
            self.work.close()
        for fs in self.lowers:
            await fs.destroy()
