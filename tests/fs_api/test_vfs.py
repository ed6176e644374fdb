"""Vfs routing: a pseudo root, mounts at sub-paths, inode ranges, run-time mount/umount."""

from __future__ import annotations

import errno
import stat

import pytest
import trio

from nydusfs.filesystem import ROOT_INODE, FileSystem, OpenResult
from nydusfs.types import Attr, Context, DirEntry, Entry
from nydusfs.vfs import MOUNT_SHIFT, Vfs

CTX = Context(0, 0, 0)


class TinyFs(FileSystem):
    """Root (1) holding one file ``f`` (inode 2) whose content is the fs's name."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.destroyed = False
        self.forgotten: list[tuple[int, int]] = []

    def _attr(self, ino: int) -> Attr:
        mode = stat.S_IFDIR | 0o755 if ino == ROOT_INODE else stat.S_IFREG | 0o644
        return Attr(ino, mode, 1, 0, 0, 0, len(self.name), 0, 4096, 0, 0, 0)

    async def getattr(self, ctx: Context, inode: int, fh: int | None = None) -> Attr:
        if inode not in (1, 2):
            raise OSError(errno.ENOENT, "no")
        return self._attr(inode)

    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        if parent != ROOT_INODE or name != b"f":
            raise OSError(errno.ENOENT, "no")
        return Entry(2, self._attr(2), 0, 10.0, 10.0)

    async def forget(self, inode: int, nlookup: int) -> None:
        self.forgotten.append((inode, nlookup))

    async def open(self, ctx: Context, inode: int, flags: int) -> OpenResult:
        return OpenResult(7)

    async def read(self, ctx: Context, inode: int, fh: int, offset: int, size: int) -> bytes:
        assert (inode, fh) == (2, 7)
        return self.name[offset : offset + size]

    async def readdir(self, ctx: Context, inode: int, fh: int, offset: int):  # type: ignore[no-untyped-def,override]
        entries = [DirEntry(1, 1, 4, b"."), DirEntry(1, 2, 4, b".."), DirEntry(2, 3, 8, b"f")]
        for entry in entries[offset:]:
            yield entry

    async def destroy(self) -> None:
        self.destroyed = True


def run(coro_fn):  # type: ignore[no-untyped-def]
    return trio.run(coro_fn)


def test_pseudo_root_and_sub_mounts() -> None:
    async def main() -> None:
        vfs = Vfs()
        a, b = TinyFs(b"aaa"), TinyFs(b"bbbb")
        ia = vfs.mount("/images/a", a)
        ib = vfs.mount(b"/images/b", b)
        assert (ia, ib) == (1, 2)
        images = await vfs.lookup(CTX, ROOT_INODE, b"images")
        assert stat.S_ISDIR(images.attr.mode) and images.ino >> MOUNT_SHIFT == 0
        root_a = await vfs.lookup(CTX, images.ino, b"a")
        assert root_a.ino == (1 << MOUNT_SHIFT) | ROOT_INODE
        f_b = await vfs.lookup(CTX, (await vfs.lookup(CTX, images.ino, b"b")).ino, b"f")
        assert f_b.ino == (2 << MOUNT_SHIFT) | 2 and f_b.attr.ino == f_b.ino
        fh = await vfs.open(CTX, f_b.ino, 0)
        assert await vfs.read(CTX, f_b.ino, fh.fh, 0, 100) == b"bbbb"
        names = [e.name async for e in vfs.readdir(CTX, images.ino, 0, 0)]
        assert names == [b".", b"..", b"a", b"b"]
        listed = {e.name: e.ino async for e in vfs.readdir(CTX, images.ino, 0, 0)}
        assert listed[b"a"] == root_a.ino  # a mount point shows its filesystem's root
        inside = [e async for e in vfs.readdir(CTX, root_a.ino, 0, 0)]
        assert inside[1].name == b".." and inside[1].ino == images.ino
        assert inside[2].ino == (1 << MOUNT_SHIFT) | 2
        await vfs.forget(f_b.ino, 3)
        assert b.forgotten == [(2, 3)]

        # Umount one; the other keeps serving, the gone one's inodes are stale.
        assert vfs.umount("/images/a") is a
        with pytest.raises(OSError) as e:
            await vfs.getattr(CTX, root_a.ino)
        assert e.value.errno == errno.ENOENT
        assert await vfs.read(CTX, f_b.ino, fh.fh, 1, 2) == b"bb"
        # Indexes go round-robin (as fuse-backend-rs' next_super): the freed index 1 is not
        # handed out again at once, so stale kernel inodes of "a" cannot reach "c".
        assert vfs.mount("/images/c", TinyFs(b"c")) == 3
        await vfs.destroy()
        assert b.destroyed

    run(main)


def test_mount_at_root_owns_the_fuse_root() -> None:
    async def main() -> None:
        vfs = Vfs()
        fs = TinyFs(b"root")
        vfs.mount("/", fs)
        attr = await vfs.getattr(CTX, ROOT_INODE)
        assert stat.S_ISDIR(attr.mode) and attr.ino == ROOT_INODE
        entry = await vfs.lookup(CTX, ROOT_INODE, b"f")
        assert entry.ino == (1 << MOUNT_SHIFT) | 2
        with pytest.raises(ValueError, match="inside another mount"):
            vfs.mount("/x", TinyFs(b"x"))

    run(main)


@pytest.mark.parametrize(
    ("path", "error"),
    [("relative", ValueError), ("/a/../b", ValueError), ("/a/./b", ValueError)],
)
def test_bad_mountpoints(path: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        Vfs().mount(path, TinyFs(b"x"))


def test_duplicate_and_nested_mounts() -> None:
    vfs = Vfs()
    vfs.mount("/a", TinyFs(b"x"))
    with pytest.raises(FileExistsError):
        vfs.mount("/a", TinyFs(b"y"))
    with pytest.raises(ValueError, match="inside another mount"):
        vfs.mount("/a/b", TinyFs(b"y"))
    with pytest.raises(FileNotFoundError):
        vfs.umount("/nope")


def test_pseudo_root_is_read_only() -> None:
    async def main() -> None:
        vfs = Vfs()
        with pytest.raises(OSError) as e:
            await vfs.mkdir(CTX, ROOT_INODE, b"x", 0o755, 0)
        assert e.value.errno == errno.EROFS
        st = await vfs.statfs(CTX, ROOT_INODE)
        assert st.namemax == 255

    run(main)
