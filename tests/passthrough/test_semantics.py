"""POSIX corners the state machines do not reach, on PassthroughFs and on OverlayFs (over a
lower file, so copy-up is involved): open-unlinked files, O_TRUNC, O_APPEND, sparse files,
special files, fsync and statfs, and the owner of new files."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from nydusfs.filesystem import ROOT_INODE, FileSystem
from nydusfs.overlay import OverlayFs
from nydusfs.passthrough import PassthroughFs
from nydusfs.types import Context
from tests.helpers.fsmodel import CTX

pytestmark = pytest.mark.root


def _passthrough(tmp: Path) -> tuple[FileSystem, Path]:
    (tmp / "shared").mkdir()
    (tmp / "shared" / "f").write_bytes(b"0123456789")
    return PassthroughFs(str(tmp / "shared")), tmp / "shared"


def _overlay(tmp: Path) -> tuple[FileSystem, Path]:
    for d in ("lower", "upper", "work"):
        (tmp / d).mkdir()
    (tmp / "lower" / "f").write_bytes(b"0123456789")
    lower = PassthroughFs(str(tmp / "lower"), writable=False)
    return OverlayFs([lower], str(tmp / "upper"), str(tmp / "work")), tmp / "upper"


@pytest.fixture(params=[_passthrough, _overlay], ids=["passthrough", "overlay"])
def make(request: pytest.FixtureRequest) -> Callable[[Path], tuple[FileSystem, Path]]:
    return request.param  # type: ignore[no-any-return]


def test_open_unlinked_file(tmp_path: Path, make: Callable[..., tuple[FileSystem, Path]]) -> None:
    fs, _ = make(tmp_path)

    async def run() -> None:
        e = await fs.lookup(CTX, ROOT_INODE, b"f")
        h = await fs.open(CTX, e.ino, os.O_RDWR)
        await fs.unlink(CTX, ROOT_INODE, b"f")
        with pytest.raises(FileNotFoundError):
            await fs.lookup(CTX, ROOT_INODE, b"f")
        assert await fs.write(CTX, e.ino, h.fh, 10, b"ab") == 2
        assert await fs.read(CTX, e.ino, h.fh, 0, 100) == b"0123456789ab"
        assert (await fs.getattr(CTX, e.ino, h.fh)).size == 12
        await fs.release(CTX, e.ino, h.fh)
        await fs.forget(e.ino, 1)
        await fs.destroy()

    trio.run(run)


def test_trunc_append_sparse(tmp_path: Path, make: Callable[..., tuple[FileSystem, Path]]) -> None:
    fs, top = make(tmp_path)

    async def run() -> None:
        e = await fs.lookup(CTX, ROOT_INODE, b"f")
        h = await fs.open(CTX, e.ino, os.O_WRONLY | os.O_TRUNC)
        assert (await fs.getattr(CTX, e.ino)).size == 0
        await fs.write(CTX, e.ino, h.fh, 1 << 20, b"end")  # a hole before it
        await fs.release(CTX, e.ino, h.fh)
        h = await fs.open(CTX, e.ino, os.O_WRONLY | os.O_APPEND)
        await fs.write(CTX, e.ino, h.fh, 0, b"+")  # O_APPEND: the offset does not matter
        await fs.fsync(CTX, e.ino, h.fh, False)
        await fs.release(CTX, e.ino, h.fh)
        st = await fs.statfs(CTX, ROOT_INODE)
        assert st.bsize > 0 and st.namemax >= 255
        await fs.destroy()

    trio.run(run)
    data = (top / "f").read_bytes()
    assert data == bytes(1 << 20) + b"end+"
    assert os.stat(top / "f").st_blocks * 512 < 1 << 20  # sparse


def test_special_files_and_owner(
    tmp_path: Path, make: Callable[..., tuple[FileSystem, Path]]
) -> None:
    fs, top = make(tmp_path)
    user = Context(1234, 5678, 1, 0o022)

    async def run() -> None:
        fifo = await fs.mknod(user, ROOT_INODE, b"fifo", stat.S_IFIFO | 0o640, 0, 0o022)
        assert stat.S_ISFIFO(fifo.attr.mode) and (fifo.attr.uid, fifo.attr.gid) == (1234, 5678)
        d = await fs.mkdir(user, ROOT_INODE, b"d", 0o777, 0o022)
        assert stat.S_IMODE(d.attr.mode) == 0o755 and d.attr.uid == 1234
        h, f = await fs.create(user, d.ino, b"x", 0o666, os.O_WRONLY, 0o002)
        await fs.release(user, f.ino, h.fh)
        assert stat.S_IMODE(f.attr.mode) == 0o664 and f.attr.gid == 5678
        link = await fs.symlink(user, d.ino, b"l", b"x")
        assert link.attr.uid == 1234
        await fs.destroy()

    trio.run(run)
    assert stat.S_ISFIFO(os.lstat(top / "fifo").st_mode)
    assert os.lstat(top / "d" / "l").st_uid == 1234
