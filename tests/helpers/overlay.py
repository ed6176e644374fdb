"""Overlay test helpers: the lower tree the overlay tests share, kernel overlayfs mounts, and a
mounted directory driver that treats the kernel's EXDEV for directory renames as ``mv`` does."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from nydusfs.passthrough import sys as psys
from tests.helpers.fsmodel import DANGLING, XATTR, PathTarget


def make_lower(root: Path) -> Path:
    """A small lower tree named from the state machines' alphabet (``abcd``), so random steps
    hit lower files, lower directories (merged and not), a symlink and an xattr."""
    (root / "a" / "c").mkdir(parents=True)
    (root / "d" / "b").mkdir(parents=True)
    (root / "a" / "b").write_bytes(b"lower a/b\n")
    (root / "a" / "c" / "d").write_bytes(b"deep lower file" * 7)
    os.setxattr(root / "a" / "c" / "d", XATTR, b"from-lower")
    (root / "b").write_bytes(b"lower b")
    os.chmod(root / "b", 0o600)
    os.symlink(DANGLING, root / "c")
    (root / "d" / "a").write_bytes(b"")
    os.chmod(root / "d" / "b", 0o700)
    return root


@contextlib.contextmanager
def kernel_overlay(lower: Path, upper: Path, work: Path, mnt: Path) -> Iterator[Path]:
    for d in (upper, work, mnt):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


class KernelOverlayTarget(PathTarget):
    """Without ``redirect_dir`` the kernel refuses to rename directories that have lower parts
    (EXDEV) and leaves it to ``mv``, which copies and deletes: so does this driver."""

    def rename(self, src: str, dst: str, flags: int) -> None:
        try:
            super().rename(src, dst, flags)
            return
        except OSError as e:
            if e.errno != errno.EXDEV or flags & psys.RENAME_EXCHANGE:
                raise
        s, d = self.p(src), self.p(dst)
        if os.path.lexists(d):
            if os.path.isdir(d) and not os.path.islink(d):
                if os.listdir(d):
                    raise OSError(errno.ENOTEMPTY, "directory not empty")
                os.rmdir(d)
            else:
                raise OSError(errno.ENOTDIR, "not a directory")
        subprocess.run(["cp", "-a", "--", s, d], check=True)
        shutil.rmtree(s)
