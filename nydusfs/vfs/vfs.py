"""``Vfs``: one ``FileSystem`` made of a pseudo root and filesystems mounted at sub-paths.

Inode numbers tell which filesystem owns them, as upstream's fuse-backend-rs Vfs does: the top
8 bits hold the mount index (1..255), the low 56 bits the mounted filesystem's own number; the
pseudo root's inodes have index 0. A mount's root is ``(index << 56) | ROOT_INODE``, except a
filesystem mounted at ``/``, whose root is the FUSE root itself.

Mount and umount happen at run time, between requests, without touching other mounts: a request
is routed when it starts, so requests already inside a filesystem finish there, while new ones
for an unmounted index fail with ENOENT (the kernel then drops the stale inodes). Indexes are
handed out round-robin, so a freed index is reused as late as possible and inode numbers the
kernel still holds for an unmounted filesystem do not reach its successor at once.

``replace`` (remount) puts a new filesystem at a mount point under a new index while the old
one stays routable for the inodes the kernel already holds ("draining"), so no lookup fails
during the swap; ``release_replaced`` drops the old one later. All routing state lives on the
event loop and changes without awaiting.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from nydusfs.filesystem import ROOT_INODE, FileSystem, OpenResult
from nydusfs.types import Attr, Context, DirEntry, Entry, StatVfs
from nydusfs.vfs.pseudo import PseudoFs

log = logging.getLogger(__name__)

MOUNT_SHIFT = 56
INNER_MASK = (1 << MOUNT_SHIFT) - 1
MAX_MOUNTS = 255
PSEUDO_TIMEOUT = 1.0  # pseudo directories change when mounts come and go


@dataclass(slots=True)
class Mount:
    index: int
    path: bytes
    fs: FileSystem
    pseudo_ino: int  # the pseudo directory it covers


def split_mountpoint(path: str | bytes) -> list[bytes]:
    """Components of an absolute mount path; ``..``, ``.`` and empty paths are refused."""
    raw = path.encode() if isinstance(path, str) else path
    if not raw.startswith(b"/"):
        raise ValueError(f"mountpoint {raw!r} is not an absolute path")
    parts = [p for p in raw.split(b"/") if p]
    if any(p in (b".", b"..") or b"\0" in p for p in parts):
        raise ValueError(f"mountpoint {raw!r} contains '.', '..' or NUL")
    return parts


class Vfs(FileSystem):
    """Routes every operation to the filesystem that owns its inode."""

    def __init__(self) -> None:
        self.pseudo = PseudoFs()
        self.mounts: dict[int, Mount] = {}
        self._by_path: dict[bytes, int] = {}
        self._by_pseudo: dict[int, int] = {}
        self._root_index: int | None = None
        self._last_index = 0

    # --- mount table --------------------------------------------------------------------------
    def mount(self, path: str | bytes, fs: FileSystem) -> int:
        """Attach ``fs`` at ``path`` and return its mount index. ``fs.init`` is the caller's."""
        parts = split_mountpoint(path)
        key = b"/" + b"/".join(parts)
        if key in self._by_path:
            raise FileExistsError(f"{key.decode(errors='replace')} is already mounted")
        for other in self._by_path:
            if other == b"/" or key.startswith(other + b"/"):
                raise ValueError(f"{key.decode(errors='replace')} lies inside another mount")
            if other.startswith(key + b"/") or key == b"/":
                raise ValueError(f"{key.decode(errors='replace')} would cover another mount")
        index = self._free_index()
        pseudo = self.pseudo.mkdirs(parts)
        self.mounts[index] = Mount(index, key, fs, pseudo.ino)
        self._by_path[key] = index
        self._by_pseudo[pseudo.ino] = index
        if not parts:
            self._root_index = index
        log.info("vfs: mounted %s as index %d", key.decode(errors="replace"), index)
        return index

    def umount(self, path: str | bytes) -> FileSystem:
        """Detach the filesystem at ``path``; the caller awaits its ``destroy``."""
        parts = split_mountpoint(path)
        key = b"/" + b"/".join(parts)
        index = self._by_path.pop(key, None)
        if index is None:
            raise FileNotFoundError(f"nothing is mounted at {key.decode(errors='replace')}")
        mount = self.mounts.pop(index)
        del self._by_pseudo[mount.pseudo_ino]
        if self._root_index == index:
            self._root_index = None
        log.info("vfs: unmounted %s (index %d)", key.decode(errors="replace"), index)
        return mount.fs

    def replace(self, path: str | bytes, fs: FileSystem) -> tuple[int, int]:
        """Put ``fs`` at the mounted ``path`` under a new index; return ``(old, new)`` indexes.

        New lookups reach ``fs``; inodes of the old filesystem keep reaching it until
        ``release_replaced(old)``, so requests in flight and handles already open are not broken.
        """
        key = b"/" + b"/".join(split_mountpoint(path))
        old_index = self._by_path.get(key)
        if old_index is None:
            raise FileNotFoundError(f"nothing is mounted at {key.decode(errors='replace')}")
        new_index = self._free_index()
        old = self.mounts[old_index]
        self.mounts[new_index] = Mount(new_index, key, fs, old.pseudo_ino)
        self._by_path[key] = new_index
        self._by_pseudo[old.pseudo_ino] = new_index
        if self._root_index == old_index:
            self._root_index = new_index
        log.info(
            "vfs: replaced %s: index %d -> %d", key.decode(errors="replace"), old_index, new_index
        )
        return old_index, new_index

    def release_replaced(self, index: int) -> FileSystem:
        """Forget the replaced (draining) filesystem at ``index``; the caller destroys it."""
        mount = self.mounts.get(index)
        if mount is None or self._by_path.get(mount.path) == index:
            raise ValueError(f"mount index {index} is not a replaced filesystem")
        del self.mounts[index]
        return mount.fs

    def entry_of(self, path: str | bytes) -> tuple[int, bytes] | None:
        """``(pseudo parent inode, name)`` of a mount point's directory entry (None for ``/``):
        what a frontend invalidates in the kernel's dentry cache when the mount changes."""
        parts = split_mountpoint(path)
        if not parts:
            return None
        index = self._by_path.get(b"/" + b"/".join(parts))
        if index is None:
            return None
        return self.pseudo.get(self.mounts[index].pseudo_ino).parent, parts[-1]

    def _free_index(self) -> int:
        for step in range(1, MAX_MOUNTS + 1):
            index = (self._last_index + step - 1) % MAX_MOUNTS + 1
            if index not in self.mounts:
                self._last_index = index
                return index
        raise OSError(errno.ENOSPC, f"at most {MAX_MOUNTS} mounts")

    def mount_at(self, path: str | bytes) -> FileSystem | None:
        parts = split_mountpoint(path)
        index = self._by_path.get(b"/" + b"/".join(parts))
        return self.mounts[index].fs if index is not None else None

    # --- inode routing ------------------------------------------------------------------------
    def _route(self, ino: int) -> tuple[Mount | None, int]:
        """The mount owning ``ino`` (None: the pseudo root) and the inner inode number."""
        index = ino >> MOUNT_SHIFT
        if index == 0:
            if ino == ROOT_INODE and self._root_index is not None:
                return self.mounts[self._root_index], ROOT_INODE
            covering = self._by_pseudo.get(ino)
            if covering is not None:
                return self.mounts[covering], ROOT_INODE
            return None, ino
        mount = self.mounts.get(index)
        if mount is None:
            raise OSError(errno.ENOENT, f"inode {ino} belongs to an unmounted filesystem")
        return mount, ino & INNER_MASK

    def _outer(self, mount: Mount, inner: int) -> int:
        if inner == ROOT_INODE and mount.index == self._root_index:
            return ROOT_INODE
        if inner > INNER_MASK:
            raise OSError(errno.EOVERFLOW, f"inode {inner} does not fit the mount's range")
        return mount.index << MOUNT_SHIFT | inner

    def _fs(self, ino: int) -> tuple[FileSystem, int, Mount]:
        mount, inner = self._route(ino)
        if mount is None:
            raise OSError(errno.EROFS, "the pseudo root is read-only")
        return mount.fs, inner, mount

    def _attr(self, mount: Mount, attr: Attr) -> Attr:
        return attr._replace(ino=self._outer(mount, attr.ino))

    def _entry(self, mount: Mount, entry: Entry) -> Entry:
        ino = self._outer(mount, entry.ino)
        return entry._replace(ino=ino, attr=entry.attr._replace(ino=ino))

    def _pseudo_entry(self, ino: int) -> Entry:
        return Entry(ino, self.pseudo.attr(ino), 0, PSEUDO_TIMEOUT, PSEUDO_TIMEOUT)

    # --- metadata -----------------------------------------------------------------------------
    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        mount, inner = self._route(parent)
        if mount is not None:
            return self._entry(mount, await mount.fs.lookup(ctx, inner, name))
        child = self.pseudo.lookup(inner, name)
        covering = self._by_pseudo.get(child)
        if covering is None:
            return self._pseudo_entry(child)
        sub = self.mounts[covering]
        attr = await sub.fs.getattr(ctx, ROOT_INODE)
        ino = self._outer(sub, ROOT_INODE)
        return Entry(ino, attr._replace(ino=ino), 0, PSEUDO_TIMEOUT, PSEUDO_TIMEOUT)

    async def forget(self, inode: int, nlookup: int) -> None:
        try:
            mount, inner = self._route(inode)
        except OSError:
            return  # the filesystem is gone; nothing to release
        if mount is not None:
            await mount.fs.forget(inner, nlookup)

    async def getattr(self, ctx: Context, inode: int, fh: int | None = None) -> Attr:
        mount, inner = self._route(inode)
        if mount is None:
            return self.pseudo.attr(inner)
        return self._attr(mount, await mount.fs.getattr(ctx, inner, fh))

    async def setattr(
        self, ctx: Context, inode: int, attr: Attr, valid: int, fh: int | None = None
    ) -> Attr:
        fs, inner, mount = self._fs(inode)
        return self._attr(mount, await fs.setattr(ctx, inner, attr, valid, fh))

    async def readlink(self, ctx: Context, inode: int) -> bytes:
        fs, inner, _ = self._fs(inode)
        return await fs.readlink(ctx, inner)

    async def access(self, ctx: Context, inode: int, mask: int) -> None:
        mount, inner = self._route(inode)
        if mount is not None:
            await mount.fs.access(ctx, inner, mask)
        elif mask & 2:  # W_OK
            raise OSError(errno.EROFS, "the pseudo root is read-only")

    async def statfs(self, ctx: Context, inode: int) -> StatVfs:
        mount, inner = self._route(inode)
        if mount is not None:
            return await mount.fs.statfs(ctx, inner)
        return StatVfs(4096, 4096, 0, 0, 0, 0, 0, 0, 0, 255)

    # --- namespace changes --------------------------------------------------------------------
    async def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        fs, inner, mount = self._fs(parent)
        return self._entry(mount, await fs.mknod(ctx, inner, name, mode, rdev, umask))

    async def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        fs, inner, mount = self._fs(parent)
        return self._entry(mount, await fs.mkdir(ctx, inner, name, mode, umask))

    async def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        fs, inner, mount = self._fs(parent)
        return self._entry(mount, await fs.symlink(ctx, inner, name, target))

    async def link(self, ctx: Context, inode: int, new_parent: int, new_name: bytes) -> Entry:
        fs, inner, mount = self._fs(inode)
        _, parent, mount2 = self._fs(new_parent)
        if mount2 is not mount:
            raise OSError(errno.EXDEV, "cross-mount link")
        return self._entry(mount, await fs.link(ctx, inner, parent, new_name))

    async def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        fs, inner, _ = self._fs(parent)
        await fs.unlink(ctx, inner, name)

    async def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        fs, inner, _ = self._fs(parent)
        await fs.rmdir(ctx, inner, name)

    async def rename(
        self, ctx: Context, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        fs, inner, mount = self._fs(parent)
        _, inner2, mount2 = self._fs(new_parent)
        if mount2 is not mount:
            raise OSError(errno.EXDEV, "cross-mount rename")
        await fs.rename(ctx, inner, name, inner2, new_name, flags)

    # --- files --------------------------------------------------------------------------------
    async def open(self, ctx: Context, inode: int, flags: int) -> OpenResult:
        fs, inner, _ = self._fs(inode)
        return await fs.open(ctx, inner, flags)

    async def create(
        self, ctx: Context, parent: int, name: bytes, mode: int, flags: int, umask: int
    ) -> tuple[OpenResult, Entry]:
        fs, inner, mount = self._fs(parent)
        handle, entry = await fs.create(ctx, inner, name, mode, flags, umask)
        return handle, self._entry(mount, entry)

    async def read(self, ctx: Context, inode: int, fh: int, offset: int, size: int) -> bytes:
        fs, inner, _ = self._fs(inode)
        return await fs.read(ctx, inner, fh, offset, size)

    async def write(self, ctx: Context, inode: int, fh: int, offset: int, data: bytes) -> int:
        fs, inner, _ = self._fs(inode)
        return await fs.write(ctx, inner, fh, offset, data)

    async def flush(self, ctx: Context, inode: int, fh: int) -> None:
        fs, inner, _ = self._fs(inode)
        await fs.flush(ctx, inner, fh)

    async def fsync(self, ctx: Context, inode: int, fh: int, datasync: bool) -> None:
        fs, inner, _ = self._fs(inode)
        await fs.fsync(ctx, inner, fh, datasync)

    async def release(self, ctx: Context, inode: int, fh: int) -> None:
        mount, inner = self._route(inode)
        if mount is not None:
            await mount.fs.release(ctx, inner, fh)

    # --- directories --------------------------------------------------------------------------
    async def opendir(self, ctx: Context, inode: int) -> OpenResult:
        mount, inner = self._route(inode)
        if mount is None:
            self.pseudo.get(inner)
            return OpenResult(0, keep_cache=False)
        return await mount.fs.opendir(ctx, inner)

    async def releasedir(self, ctx: Context, inode: int, fh: int) -> None:
        mount, inner = self._route(inode)
        if mount is not None:
            await mount.fs.releasedir(ctx, inner, fh)

    async def fsyncdir(self, ctx: Context, inode: int, fh: int, datasync: bool) -> None:
        mount, inner = self._route(inode)
        if mount is not None:
            await mount.fs.fsyncdir(ctx, inner, fh, datasync)

    def _fix_dirent(self, mount: Mount, inner: int, entry: DirEntry) -> DirEntry:
        if entry.name == b".." and inner == ROOT_INODE and mount.index != self._root_index:
            # The parent of a mount root is the pseudo directory holding the mount point.
            return entry._replace(ino=self.pseudo.get(mount.pseudo_ino).parent)
        return entry._replace(ino=self._outer(mount, entry.ino))

    async def readdir(
        self, ctx: Context, inode: int, fh: int, offset: int
    ) -> AsyncIterator[DirEntry]:
        mount, inner = self._route(inode)
        if mount is None:
            for entry in self.pseudo.entries(inner)[offset:]:
                yield self._covered(entry)
            return
        async for entry in mount.fs.readdir(ctx, inner, fh, offset):
            yield self._fix_dirent(mount, inner, entry)

    async def readdirplus(
        self, ctx: Context, inode: int, fh: int, offset: int
    ) -> AsyncIterator[tuple[DirEntry, Entry | None]]:
        mount, inner = self._route(inode)
        if mount is None:
            for entry in self.pseudo.entries(inner)[offset:]:
                entry = self._covered(entry)
                if entry.name in (b".", b".."):
                    yield entry, None
                else:
                    yield entry, await self.lookup(ctx, inode, entry.name)
            return
        async for entry, looked_up in mount.fs.readdirplus(ctx, inner, fh, offset):
            fixed = self._fix_dirent(mount, inner, entry)
            yield fixed, self._entry(mount, looked_up) if looked_up is not None else None

    def _covered(self, entry: DirEntry) -> DirEntry:
        """A pseudo entry whose directory is a mount point shows the mount's root."""
        index = self._by_pseudo.get(entry.ino)
        if index is None or entry.name in (b".", b".."):
            return entry
        return entry._replace(ino=self._outer(self.mounts[index], ROOT_INODE))

    # --- xattrs -------------------------------------------------------------------------------
    async def getxattr(self, ctx: Context, inode: int, name: bytes) -> bytes:
        mount, inner = self._route(inode)
        if mount is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return await mount.fs.getxattr(ctx, inner, name)

    async def listxattr(self, ctx: Context, inode: int) -> list[bytes]:
        mount, inner = self._route(inode)
        if mount is None:
            return []
        return await mount.fs.listxattr(ctx, inner)

    async def setxattr(
        self, ctx: Context, inode: int, name: bytes, value: bytes, flags: int
    ) -> None:
        fs, inner, _ = self._fs(inode)
        await fs.setxattr(ctx, inner, name, value, flags)

    async def removexattr(self, ctx: Context, inode: int, name: bytes) -> None:
        fs, inner, _ = self._fs(inode)
        await fs.removexattr(ctx, inner, name)

    async def batch_forget(self, items: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in items:
            await self.forget(inode, nlookup)

    async def destroy(self) -> None:
        for path in list(self._by_path):
            fs = self.umount(path)
            try:
                await fs.destroy()
            except Exception:  # one failing filesystem must not keep others alive
                log.exception("vfs: destroying %s failed", path.decode(errors="replace"))
        for index in list(self.mounts):  # replaced ones still draining
            try:
                await self.release_replaced(index).destroy()
            except Exception:
                log.exception("vfs: destroying replaced mount %d failed", index)
