"""``PseudoFs``: the read-only directory skeleton that holds the mount points of a ``Vfs``.

Mounting at ``/a/b`` creates pseudo directories ``/a`` and ``/a/b``; the ``Vfs`` then shows the
mounted filesystem's root in place of ``/a/b``. Pseudo directories are never removed while the
daemon runs (upstream behaves the same), so an inode number, once handed to the kernel, stays
valid. All state lives on the event loop; no method awaits.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from dataclasses import dataclass, field

from nydusfs.filesystem import ROOT_INODE
from nydusfs.types import Attr, DirEntry

DIR_MODE = stat.S_IFDIR | 0o755


@dataclass(slots=True)
class PseudoDir:
    ino: int
    parent: int
    children: dict[bytes, int] = field(default_factory=dict)


class PseudoFs:
    """Directories only; inode numbers start at ``ROOT_INODE`` and stay below ``1 << 56``."""

    def __init__(self) -> None:
        self._dirs: dict[int, PseudoDir] = {ROOT_INODE: PseudoDir(ROOT_INODE, ROOT_INODE)}
        self._next = itertools.count(ROOT_INODE + 1)
        self._uid, self._gid = os.geteuid(), os.getegid()
        self._time_ns = time.time_ns()

    def get(self, ino: int) -> PseudoDir:
        node = self._dirs.get(ino)
        if node is None:
            raise OSError(errno.ENOENT, f"no pseudo inode {ino}")
        return node

    def exists(self, ino: int) -> bool:
        return ino in self._dirs

    def mkdirs(self, parts: list[bytes]) -> PseudoDir:
        """The pseudo directory at ``parts`` under the root, created as needed."""
        node = self._dirs[ROOT_INODE]
        for part in parts:
            ino = node.children.get(part)
            if ino is None:
                ino = next(self._next)
                self._dirs[ino] = PseudoDir(ino, node.ino)
                node.children[part] = ino
            node = self._dirs[ino]
        return node

    def attr(self, ino: int) -> Attr:
        self.get(ino)
        t = self._time_ns
        return Attr(ino, DIR_MODE, 2, self._uid, self._gid, 0, 4096, 8, 4096, t, t, t)

    def lookup(self, parent: int, name: bytes) -> int:
        ino = self.get(parent).children.get(name)
        if ino is None:
            raise OSError(errno.ENOENT, "no such file")
        return ino

    def entries(self, ino: int) -> list[DirEntry]:
        """``.``, ``..`` and the children, with cookies 1..n."""
        node = self.get(ino)
        names = [(b".", node.ino), (b"..", node.parent), *sorted(node.children.items())]
        return [DirEntry(child, i + 1, 4, name) for i, (name, child) in enumerate(names)]
