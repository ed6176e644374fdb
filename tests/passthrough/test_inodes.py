"""The inode table: stable numbers, and inodes beyond ``max_open`` reopened by file handle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from nydusfs.filesystem import ROOT_INODE, SETATTR_MODE
from nydusfs.passthrough import PassthroughFs
from tests.helpers.fsmodel import CTX

pytestmark = pytest.mark.root


def test_inodes_beyond_max_open_are_reopened_by_handle(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"f{i}").write_bytes(b"%d" % i)
    fs = PassthroughFs(str(tmp_path), max_open=3)

    async def run() -> None:
        entries = [await fs.lookup(CTX, ROOT_INODE, b"f%d" % i) for i in range(40)]
        closed = [n for n in fs.inodes._by_ino.values() if n.path_fd < 0]
        assert len(closed) == 37  # only max_open files keep an fd
        await fs.unlink(CTX, ROOT_INODE, b"f0")  # still reachable: the kernel holds it
        for i, e in enumerate(entries):
            h = await fs.open(CTX, e.ino, os.O_RDWR)
            assert await fs.read(CTX, e.ino, h.fh, 0, 10) == b"%d" % i
            await fs.release(CTX, e.ino, h.fh)
            attr = await fs.setattr(CTX, e.ino, e.attr._replace(mode=0o600), SETATTR_MODE)
            assert attr.mode & 0o777 == 0o600 and attr.ino == e.ino
            await fs.setxattr(CTX, e.ino, b"user.n", b"%d" % i, 0)
        # the root, max_open files and the unlinked f0 (which no handle could reopen)
        assert len([n for n in fs.inodes._by_ino.values() if n.path_fd >= 0]) <= 5
        again = await fs.lookup(CTX, ROOT_INODE, b"f7")
        assert again.ino == entries[7].ino  # the same number
        for e in entries:
            await fs.forget(e.ino, 1)
        await fs.forget(again.ino, 1)
        assert len(fs.inodes) == 1  # the root
        assert (await fs.lookup(CTX, ROOT_INODE, b"f9")).ino == entries[9].ino
        await fs.destroy()

    trio.run(run)
    assert os.getxattr(tmp_path / "f39", "user.n") == b"39"
    assert not (tmp_path / "f0").exists()
