"""Overlay building blocks: the node tree, the kernel's on-disk conventions, the work directory.

On-disk format is the kernel overlayfs's, so an upper directory written here mounts under the
kernel and the other way round: a *whiteout* is a character device 0/0 named like the entry it
hides; an *opaque* directory has the xattr ``trusted.overlay.opaque = "y"`` and hides everything
below it in lower layers. ``trusted.overlay.*`` names are the overlay's own and never shown.

``WorkDir`` is ``work_dir/work`` (the kernel's place too): objects are built there under a
temporary name, completed (data, owner, mode, xattrs, times) and then renamed into the upper
directory in one step, so a crash never leaves a half-made file visible. It must be on the
upper directory's filesystem. Leftovers of a crash are removed at mount. Host syscalls only,
inline on the event loop (metadata; see ``PassthroughFs`` for the measurements).
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
from dataclasses import dataclass, field

from nydusfs.passthrough import sys as psys
from nydusfs.types import Attr

OPAQUE_XATTR = b"trusted.overlay.opaque"
PRIVATE_PREFIX = b"trusted.overlay."
WHITEOUT_MODE = stat.S_IFCHR  # mode 0000, device 0/0, as the kernel makes them


def is_whiteout(attr: Attr) -> bool:
    return stat.S_ISCHR(attr.mode) and attr.rdev == 0


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_private_xattr(name: bytes) -> bool:
    return name.startswith(PRIVATE_PREFIX)


@dataclass(slots=True, eq=False)
class Node:
    """One overlay inode: which layers hold it and (for directories) its known children.

    ``upper`` and ``lowers`` each hold one lookup reference in their layer. A directory merges
    ``upper`` with every entry of ``lowers`` (stopping at an opaque one); anything else shows its
    topmost layer only. ``lower_names`` are names of this directory that some lower layer has
    (so removing or moving them needs a whiteout). ``names`` counts the directory entries that
    lead to the node (hard links of an upper file share one node).
    """

    ino: int
    parent: Node | None
    name: bytes
    kind: int
    upper: int | None = None
    lowers: list[tuple[int, int]] = field(default_factory=list)
    opaque: bool = False
    children: dict[bytes, Node] = field(default_factory=dict)
    lower_names: set[bytes] = field(default_factory=set)
    names: int = 1
    nlookup: int = 0
    opened: int = 0

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def merged(self) -> bool:
        return self.is_dir and len(self.lowers) + (self.upper is not None) > 1


class WorkDir:
    """The work directory: temporary objects, completed, then renamed into the upper layer."""

    def __init__(self, work_dir: str, upper_dir: str) -> None:
        path = os.path.join(work_dir, "work")
        os.makedirs(path, exist_ok=True)
        if os.stat(path).st_dev != os.stat(upper_dir).st_dev:
            raise OSError(errno.EXDEV, f"work_dir {work_dir} is not on upper_dir's filesystem")
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._names = (f"#nydus{os.getpid()}_{n:x}".encode() for n in itertools.count())
        for name in os.listdir(path):  # a crash's leftovers
            full = os.path.join(path, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.unlink(full)

    def tmp_name(self) -> bytes:
        return next(self._names)

    def path(self, name: bytes) -> bytes:
        """A path to ``name`` in the work directory through the fd (for calls without dir_fd)."""
        return f"/proc/self/fd/{self.fd}/".encode() + name

    def finish(self, name: bytes, attr: Attr, xattrs: list[tuple[bytes, bytes]]) -> None:
        """Give the temporary ``name`` the owner, mode, xattrs and times of ``attr``."""
        os.chown(name, attr.uid, attr.gid, dir_fd=self.fd, follow_symlinks=False)
        if not stat.S_ISLNK(attr.mode):
            os.chmod(name, stat.S_IMODE(attr.mode), dir_fd=self.fd)
        path = self.path(name)
        for key, value in xattrs:
            os.setxattr(path, key, value, follow_symlinks=False)
        os.utime(name, ns=(attr.atime_ns, attr.mtime_ns), dir_fd=self.fd, follow_symlinks=False)

    def make(self, name: bytes, mode: int, rdev: int = 0, target: bytes = b"") -> int | None:
        """Create a temporary object of ``mode``'s type; a regular file is returned open."""
        kind = stat.S_IFMT(mode)
        perm = stat.S_IMODE(mode)
        if kind == stat.S_IFDIR:
            os.mkdir(name, 0o700, dir_fd=self.fd)
        elif kind == stat.S_IFLNK:
            os.symlink(target, name, dir_fd=self.fd)
        elif kind == stat.S_IFREG:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            return os.open(name, flags, 0o600, dir_fd=self.fd)
        else:
            os.mknod(name, kind | (perm & 0o600), rdev, dir_fd=self.fd)
        return None

    def install(self, name: bytes, parent_fd: int, target: bytes, *, exchange: bool) -> None:
        """Move the temporary ``name`` to ``target`` in the upper directory ``parent_fd``.

        With ``exchange`` the target exists (a whiteout): the two swap places atomically and
        the whiteout, now in the work directory, is removed. Otherwise the target must not exist.
        """
        if exchange:
            psys.renameat2(self.fd, name, parent_fd, target, psys.RENAME_EXCHANGE)
            self.remove(name)
        else:
            psys.renameat2(self.fd, name, parent_fd, target, psys.RENAME_NOREPLACE)

    def whiteout_away(self, parent_fd: int, name: bytes) -> None:
        """Replace ``name`` in an upper directory by a whiteout in one step (the kernel's
        ``RENAME_WHITEOUT``) and delete what was there, whole trees included."""
        tmp = self.tmp_name()
        psys.renameat2(parent_fd, name, self.fd, tmp, psys.RENAME_WHITEOUT)
        self.remove(tmp)

    def remove(self, name: bytes) -> None:
        st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(self.path(name))
        else:
            os.unlink(name, dir_fd=self.fd)

    def close(self) -> None:
        os.close(self.fd)


def clear_whiteouts(dir_fd_path: str) -> None:
    """Delete the whiteouts in an upper directory (before it is removed or replaced: the merged
    directory is empty, so whiteouts are all it holds)."""
    with os.scandir(dir_fd_path) as it:
        for e in it:
            if not e.is_dir(follow_symlinks=False) and is_whiteout_stat(
                e.stat(follow_symlinks=False)
            ):
                os.unlink(os.path.join(dir_fd_path, e.name))
