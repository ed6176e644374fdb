"""No request can reach outside the shared directory (PassthroughFs) or the upper directory
(OverlayFs), whatever names and symlinks it uses.

This is the daemon's boundary: the kernel (or a virtio-fs guest) sends names and inode numbers,
never paths. Random request sequences with hostile names (``..``, ``/``, NUL, absolute paths)
and symlinks to a canary directory beside the shared one must leave the canary untouched and
never return its secret. Then the fixed cases: every operation on a symlink inode acts on the
link, never its target, and a directory swapped for a symlink behind the daemon's back does
not redirect requests.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydusfs.filesystem import ROOT_INODE, SETATTR_MODE, SETATTR_SIZE, FileSystem
from nydusfs.overlay import OverlayFs
from nydusfs.passthrough import PassthroughFs
from tests.helpers.fsmodel import CTX
from tests.helpers.tree import diff_snapshots, snapshot

pytestmark = pytest.mark.root

SECRET = b"canary-secret-must-not-leak"

HOSTILE = [b"..", b".", b"../canary", b"/etc/passwd", b"a/b", b"x\0y", b"", b"../../.."]
hostile = st.sampled_from([*HOSTILE, b"canary", b"secret", b"sub", b"s", b"t", b"d"])
targets = st.sampled_from([b"../canary/secret", b"/", b"../../../../", b"../canary", b"/tmp"])
ops = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "lookup",
                "create",
                "mkdir",
                "symlink",
                "open",
                "setattr",
                "unlink",
                "rename",
                "link",
                "setxattr",
                "readlink",
                "readdir",
                "mknod",
            ]
        ),
        st.integers(0, 7),
        hostile,
        hostile,
        targets,
    ),
    min_size=1,
    max_size=25,
)


def _canary(base: Path) -> Path:
    canary = base / "canary"
    (canary / "sub").mkdir(parents=True)
    (canary / "secret").write_bytes(SECRET)
    (canary / "sub" / "s").write_bytes(SECRET)
    return canary


async def _drive(fs: FileSystem, steps: list[tuple[str, int, bytes, bytes, bytes]]) -> None:
    inodes = [ROOT_INODE]
    for op, pick, name, name2, target in steps:
        ino = inodes[-1 - pick % len(inodes)]  # 0: the inode the last step found
        try:
            if op == "lookup":
                inodes.append((await fs.lookup(CTX, ino, name)).ino)
            elif op == "create":
                h, e = await fs.create(CTX, ino, name, 0o644, os.O_RDWR | os.O_TRUNC, 0)
                await fs.write(CTX, e.ino, h.fh, 0, b"overwritten")
                await fs.release(CTX, e.ino, h.fh)
                inodes.append(e.ino)
            elif op == "mkdir":
                inodes.append((await fs.mkdir(CTX, ino, name, 0o755, 0)).ino)
            elif op == "symlink":
                inodes.append((await fs.symlink(CTX, ino, name, target)).ino)
            elif op == "mknod":
                inodes.append((await fs.mknod(CTX, ino, name, stat.S_IFREG | 0o644, 0, 0)).ino)
            elif op == "open":
                h = await fs.open(CTX, ino, os.O_RDWR | os.O_TRUNC)
                assert SECRET not in await fs.read(CTX, ino, h.fh, 0, 4096)
                await fs.write(CTX, ino, h.fh, 0, b"overwritten")
                await fs.release(CTX, ino, h.fh)
            elif op == "setattr":
                attr = await fs.getattr(CTX, ino)
                await fs.setattr(CTX, ino, attr._replace(mode=0o777, size=0),
                                 SETATTR_MODE | SETATTR_SIZE)  # fmt: skip
            elif op == "unlink":
                await fs.unlink(CTX, ino, name)
            elif op == "rename":
                await fs.rename(CTX, ino, name, inodes[-1], name2, 0)
            elif op == "link":
                inodes.append((await fs.link(CTX, inodes[-1], ino, name)).ino)
            elif op == "setxattr":
                await fs.setxattr(CTX, ino, b"user.x", b"v", 0)
            elif op == "readlink":
                await fs.readlink(CTX, ino)
            elif op == "readdir":
                h = await fs.opendir(CTX, ino)
                async for _entry, looked_up in fs.readdirplus(CTX, ino, h.fh, 0):
                    if looked_up is not None:
                        inodes.append(looked_up.ino)
                await fs.releasedir(CTX, ino, h.fh)
        except OSError:
            pass


def _check(make: Any, steps: list[tuple[str, int, bytes, bytes, bytes]]) -> None:
    base = Path(tempfile.mkdtemp(prefix="sec-"))
    try:
        canary = _canary(base)
        before = snapshot(canary)
        fs = make(base)

        async def run() -> None:
            try:
                await _drive(fs, steps)
            finally:
                await fs.destroy()

        trio.run(run)
        assert diff_snapshots(before, snapshot(canary)) == []
    finally:
        shutil.rmtree(base)


def _passthrough(base: Path) -> FileSystem:
    (base / "shared").mkdir()
    os.symlink("../canary", base / "shared" / "s")  # planted by the host: still not followed
    return PassthroughFs(str(base / "shared"))


def _overlay(base: Path) -> FileSystem:
    for d in ("lower", "upper", "work"):
        (base / d).mkdir()
    os.symlink("../canary/secret", base / "lower" / "t")
    os.symlink("/", base / "upper" / "s")
    lower = PassthroughFs(str(base / "lower"), writable=False)
    return OverlayFs([lower], str(base / "upper"), str(base / "work"))


_settings = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(steps=ops)
def test_passthrough_never_leaves_the_shared_dir(steps: list[Any]) -> None:
    _check(_passthrough, steps)


@_settings
@given(steps=ops)
def test_overlay_never_leaves_the_upper_dir(steps: list[Any]) -> None:
    _check(_overlay, steps)


@pytest.mark.parametrize("name", [b"..", b".", b"", b"a/b", b"../x", b"/etc", b"x\0"])
def test_hostile_names_are_refused(tmp_path: Path, name: bytes) -> None:
    fs = PassthroughFs(str(tmp_path))

    async def run() -> None:
        for call in (
            fs.lookup(CTX, ROOT_INODE, name),
            fs.mkdir(CTX, ROOT_INODE, name, 0o755, 0),
            fs.unlink(CTX, ROOT_INODE, name),
            fs.create(CTX, ROOT_INODE, name, 0o644, os.O_WRONLY, 0),
        ):
            with pytest.raises(OSError) as info:
                await call
            assert info.value.errno == errno.EINVAL

    trio.run(run)


def test_symlink_inodes_act_on_the_link(tmp_path: Path) -> None:
    canary = _canary(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.symlink(str(canary / "secret"), shared / "esc")
    os.symlink(str(canary), shared / "escdir")
    fs = PassthroughFs(str(shared))

    async def run() -> None:
        link = await fs.lookup(CTX, ROOT_INODE, b"esc")
        assert stat.S_ISLNK(link.attr.mode)
        assert await fs.readlink(CTX, link.ino) == str(canary / "secret").encode()
        for call, code in (
            (fs.open(CTX, link.ino, os.O_RDONLY), errno.EINVAL),
            (fs.create(CTX, ROOT_INODE, b"esc", 0o644, os.O_WRONLY, 0), errno.ELOOP),
            (fs.setattr(CTX, link.ino, link.attr._replace(mode=0o777), SETATTR_MODE),
             errno.EOPNOTSUPP),
            (fs.setattr(CTX, link.ino, link.attr._replace(size=0), SETATTR_SIZE), errno.EINVAL),
            (fs.setxattr(CTX, link.ino, b"user.x", b"1", 0), errno.EPERM),
            (fs.lookup(CTX, (await fs.lookup(CTX, ROOT_INODE, b"escdir")).ino, b"secret"),
             errno.ENOTDIR),
        ):  # fmt: skip
            with pytest.raises(OSError) as info:
                await call
            assert info.value.errno == code
        hard = await fs.link(CTX, link.ino, ROOT_INODE, b"hard")
        assert stat.S_ISLNK(hard.attr.mode)  # the link itself, not the secret file
        await fs.destroy()

    trio.run(run)
    assert (canary / "secret").read_bytes() == SECRET
    assert stat.S_IMODE(os.stat(canary / "secret").st_mode) == 0o644


def test_directory_swapped_for_a_symlink(tmp_path: Path) -> None:
    """A looked-up directory replaced (on the host) by a symlink to outside: requests on the
    old inode stay in the moved directory; a new lookup finds the symlink, not its target."""
    canary = _canary(tmp_path)
    shared = tmp_path / "shared"
    (shared / "d").mkdir(parents=True)
    fs = PassthroughFs(str(shared))

    async def run() -> None:
        d = await fs.lookup(CTX, ROOT_INODE, b"d")
        os.rename(shared / "d", tmp_path / "moved")
        os.symlink(str(canary / "sub"), shared / "d")
        h, e = await fs.create(CTX, d.ino, b"s", 0o644, os.O_WRONLY, 0)
        await fs.release(CTX, e.ino, h.fh)
        again = await fs.lookup(CTX, ROOT_INODE, b"d")
        assert stat.S_ISLNK(again.attr.mode)
        with pytest.raises(OSError) as info:
            await fs.lookup(CTX, again.ino, b"s")
        assert info.value.errno == errno.ENOTDIR
        await fs.destroy()

    trio.run(run)
    assert (tmp_path / "moved" / "s").exists()
    assert (canary / "sub" / "s").read_bytes() == SECRET
