"""The inode table of ``PassthroughFs``: one ``O_PATH`` fd per inode the kernel knows.

Host inodes are keyed by ``(st_dev, st_ino)``, so two names of one file (hard links) are one
inode here too. The number handed out for a key is remembered for the life of the table, even
after the last ``forget`` closed the fd, so ``stat`` shows the same inode number for a file
however often the kernel drops and looks it up again (and ``readdir`` can report numbers before
any lookup). Numbers start after ``ROOT_INODE`` and stay far below ``1 << 56`` (the ``Vfs``
range). All state lives on the event loop; nothing here awaits.

The kernel keeps every inode it has seen until memory runs short, so a table of fds would hit
``RLIMIT_NOFILE`` after some ten thousand files. At most ``max_open`` non-directories keep
their fd; beyond that the least recently used are closed and remembered by their file handle
(``name_to_handle_at``), which reopens the very same inode on the next use
(``open_by_handle_at``): a handle names an inode, never a path, so this keeps the "no path walk"
property. Directories (the ``*at`` anchors) and inodes of filesystems without file handles
keep their fd.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import stat
from collections import OrderedDict
from dataclasses import dataclass, field

from nydusfs.filesystem import ROOT_INODE
from nydusfs.passthrough import sys as psys
from nydusfs.types import Attr

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
BLOCK_SIZE = 4096


@dataclass(slots=True, eq=False)
class Inode:
    ino: int
    key: tuple[int, int]
    path_fd: int  # O_PATH | O_NOFOLLOW (no later walk can be redirected); -1 when closed
    kind: int  # S_IFMT bits
    table: InodeTable = field(repr=False)
    nlookup: int = 0
    handle: bytes | None = None  # to reopen after the fd was closed

    @property
    def fd(self) -> int:
        """The ``O_PATH`` fd, reopened from the file handle when it was closed."""
        if self.path_fd < 0:
            self.table.reopen(self)
        else:
            self.table.touch(self)
        return self.path_fd

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

    def __init__(self, root_fd: int, max_open: int | None = None) -> None:
        st = os.fstat(root_fd)
        key = (st.st_dev, st.st_ino)
        if max_open is None:
            max_open = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        self.max_open = max_open
        self._lru: OrderedDict[int, Inode] = OrderedDict()  # non-directories holding an fd
        # open_by_handle_at wants a real (not O_PATH) fd on the same mount.
        self._mount_fd = os.open(f"/proc/self/fd/{root_fd}", os.O_RDONLY | os.O_DIRECTORY)
        found = psys.file_handle(root_fd)
        self._mount_id = found[1] if found is not None else None
        self.root = Inode(ROOT_INODE, key, root_fd, stat.S_IFDIR, self, 1 << 62)
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
        if node is not None and node.path_fd < 0:
            node.path_fd = fd  # closed earlier: this fresh fd saves a reopen
            self._lru[node.ino] = node
            self._trim(keep=node)
        elif node is not None:
            os.close(fd)
        else:
            node = Inode(self.number(key), key, fd, stat.S_IFMT(st.st_mode), self)
            self._by_ino[node.ino] = node
            self._by_key[key] = node
            if node.kind != stat.S_IFDIR:
                self._lru[node.ino] = node
                self._trim()
        node.nlookup += 1
        return node

    def touch(self, node: Inode) -> None:
        if node.ino in self._lru:
            self._lru.move_to_end(node.ino)

    def reopen(self, node: Inode) -> None:
        assert node.handle is not None
        node.path_fd = psys.open_handle(self._mount_fd, node.handle, O_PATH_FLAGS)
        self._lru[node.ino] = node
        self._trim(keep=node)

    def _trim(self, keep: Inode | None = None) -> None:
        while len(self._lru) > self.max_open:
            ino, node = self._lru.popitem(last=False)
            if node is keep:
                self._lru[ino] = node
                continue
            if os.fstat(node.path_fd).st_nlink == 0:
                continue  # unlinked: no handle could reopen it, so it keeps its fd
            if node.handle is None:
                found = psys.file_handle(node.path_fd)
                if found is None or found[1] != self._mount_id:
                    continue  # cannot be reopened later: keeps its fd, out of the LRU
                node.handle = found[0]
            os.close(node.path_fd)
            node.path_fd = -1

    def forget(self, ino: int, nlookup: int) -> None:
        node = self._by_ino.get(ino)
        if node is None or node is self.root:
            return
        node.nlookup -= nlookup
        if node.nlookup <= 0:
            del self._by_ino[ino]
            del self._by_key[node.key]
            self._lru.pop(ino, None)
            if node.path_fd >= 0:
                os.close(node.path_fd)

    def __len__(self) -> int:
        return len(self._by_ino)

    def close(self) -> None:
        for node in self._by_ino.values():
            if node.path_fd >= 0:
                os.close(node.path_fd)
        os.close(self._mount_fd)
        self._by_ino.clear()
        self._by_key.clear()
        self._lru.clear()
