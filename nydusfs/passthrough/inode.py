"""The inode table of ``PassthroughFs``: one ``O_PATH`` fd per inode the kernel knows.

Host inodes are keyed by ``(st_dev, st_ino)``, so two names of one file (hard links) are one
inode here too. The number handed out for a key is remembered for the life of the table, even
after the last ``forget`` closed the fd, so ``stat`` shows the same inode number for a file
however often the kernel drops and looks it up again (and ``readdir`` can report numbers before
any lookup). Numbers start after ``ROOT_INODE`` and stay far below ``1 << 56`` (the ``Vfs``
range). All state lives on the event loop; nothing here awaits.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from dataclasses import dataclass

from nydusfs.filesystem import ROOT_INODE
from nydusfs.types import Attr

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
BLOCK_SIZE = 4096


@dataclass(slots=True, eq=False)
class Inode:
    ino: int
    key: tuple[int, int]
    fd: int  # O_PATH | O_NOFOLLOW: names nothing, so no later path walk can be redirected
    kind: int  # S_IFMT bits
    nlookup: int = 0

    @property
    def proc_path(self) -> str:
        """The magic link that reopens this inode (``open``, ``chmod``, xattrs)."""
        return f"/proc/self/fd/{self.fd}"


def check_name(name: bytes) -> None:
    """A single path component: anything else would let a request walk out of its directory."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise OSError(errno.EINVAL, f"invalid name {name!r}")
    if len(name) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")


def attr_of(ino: int, st: os.stat_result) -> Attr:
    return Attr(
        ino=ino,
        mode=st.st_mode,
        nlink=st.st_nlink,
        uid=st.st_uid,
        gid=st.st_gid,
        rdev=st.st_rdev,
        size=st.st_size,
        blocks=st.st_blocks,
        blksize=BLOCK_SIZE,
        atime_ns=st.st_atime_ns,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
    )


class InodeTable:
    """``ino -> Inode`` for live inodes, plus every ``(dev, ino) -> number`` ever handed out."""

    def __init__(self, root_fd: int) -> None:
        st = os.fstat(root_fd)
        key = (st.st_dev, st.st_ino)
        self.root = Inode(ROOT_INODE, key, root_fd, stat.S_IFDIR, 1 << 62)
        self._by_ino: dict[int, Inode] = {ROOT_INODE: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {key: self.root}
        self._numbers: dict[tuple[int, int], int] = {key: ROOT_INODE}
        self._next = itertools.count(ROOT_INODE + 1)

    def get(self, ino: int) -> Inode:
        node = self._by_ino.get(ino)
        if node is None:
            raise OSError(errno.ESTALE, f"inode {ino} is not known (forgotten or never looked up)")
        return node

    def number(self, key: tuple[int, int]) -> int:
        """The number of a host inode, allocated on first sight and kept."""
        ino = self._numbers.get(key)
        if ino is None:
            ino = self._numbers[key] = next(self._next)
        return ino

    def known(self, key: tuple[int, int]) -> Inode | None:
        return self._by_key.get(key)

    def add(self, fd: int, st: os.stat_result) -> Inode:
        """Count one lookup of the inode behind ``fd`` (an ``O_PATH`` fd this call takes over:
        closed at once when the inode is already open)."""
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is not None:
            os.close(fd)
        else:
            node = Inode(self.number(key), key, fd, stat.S_IFMT(st.st_mode))
            self._by_ino[node.ino] = node
            self._by_key[key] = node
        node.nlookup += 1
        return node

    def forget(self, ino: int, nlookup: int) -> None:
        node = self._by_ino.get(ino)
        if node is None or node is self.root:
            return
        node.nlookup -= nlookup
        if node.nlookup <= 0:
            del self._by_ino[ino]
            del self._by_key[node.key]
            os.close(node.fd)

    def __len__(self) -> int:
        return len(self._by_ino)

    def close(self) -> None:
        for node in self._by_ino.values():
            os.close(node.fd)
        self._by_ino.clear()
        self._by_key.clear()
