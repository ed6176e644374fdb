"""The read-only view of one RAFS inode, shared by the v5 and v6 readers.

Contract:
- Views are cheap objects over the mapped bootstrap; creating one parses only its fixed header.
- Names are ``bytes``. ``children()`` is sorted by name bytes and never contains ``.``/``..``.
- ``ino`` is the number a filesystem reports: the on-disk ``i_ino`` for v5 (root = 1) and the
  nid for v6, as upstream nydusd does. Hard links share one ``ino``.
- Every accessor validates what it reads and raises ``FormatError`` on a malformed image; none
  allocates more than the bootstrap's size or loops without bound.
"""

from __future__ import annotations

import abc
import stat
from collections.abc import Sequence

from nydusfs.storage.device import ChunkInfo


class RafsInode(abc.ABC):
    """One inode of a mounted bootstrap."""

    ino: int

    # --- attributes -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def mode(self) -> int: ...

    @property
    @abc.abstractmethod
    def uid(self) -> int: ...

    @property
    @abc.abstractmethod
    def gid(self) -> int: ...

    @property
    @abc.abstractmethod
    def nlink(self) -> int: ...

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @property
    @abc.abstractmethod
    def rdev(self) -> int: ...

    @property
    @abc.abstractmethod
    def mtime(self) -> int:
        """Seconds since the epoch."""

    @property
    @abc.abstractmethod
    def mtime_nsec(self) -> int: ...

    @property
    def blocks(self) -> int:
        """512-byte blocks, as ``stat`` reports them."""
        return (self.size + 511) // 512

    # --- type helpers ----------------------------------------------------------------------
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def is_hardlink(self) -> bool:
        return self.is_reg() and self.nlink > 1

    # --- content ---------------------------------------------------------------------------
    @abc.abstractmethod
    def symlink(self) -> bytes:
        """The target of a symlink; ``FormatError`` if this is not one."""

    @abc.abstractmethod
    def xattrs(self) -> list[tuple[bytes, bytes]]:
        """Full xattr names (with their prefix) and values, in on-disk order."""

    def get_xattr(self, name: bytes) -> bytes | None:
        for key, value in self.xattrs():
            if key == name:
                return value
        return None

    @abc.abstractmethod
    def children(self) -> Sequence[tuple[bytes, int]]:
        """``(name, ino)`` of a directory's entries, sorted by name, without ``.`` and ``..``."""

    @abc.abstractmethod
    def lookup(self, name: bytes) -> int | None:
        """The ino of the child called ``name``, or None."""

    @property
    @abc.abstractmethod
    def parent(self) -> int:
        """The ino of the parent directory (the root is its own parent)."""

    @abc.abstractmethod
    def chunks(self) -> Sequence[ChunkInfo]:
        """A regular file's chunks ordered by ``file_offset``; empty for other types."""
