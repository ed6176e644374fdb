"""The builder's in-memory tree: one ``Node`` per path of the image being built.

Sources (a directory, a tar stream) produce a tree of ``Node``; the blob writer fills each
regular file's ``chunks``; the bootstrap writer assigns inode numbers and on-disk offsets.
Children are kept sorted by name bytes, the order every later stage relies on (inode numbers,
data layout in the blob, dirent order).
"""

from __future__ import annotations

import bisect
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from nydusfs.errors import BuildError
from nydusfs.storage.device import ChunkInfo

OCI_WHITEOUT_PREFIX = b".wh."
OCI_WHITEOUT_OPAQUE = b".wh..wh..opq"
OVERLAYFS_OPAQUE_XATTR = b"trusted.overlay.opaque"
WHITEOUT_SPECS = ("oci", "overlayfs", "none")


@dataclass(eq=False, slots=True)
class Node:
    """One file of the image. ``path`` is absolute inside the image (``b"/"`` for the root)."""

    name: bytes
    path: bytes
    mode: int
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    symlink: bytes | None = None
    # Identity of the source inode; regular files sharing it become hard links.
    src_key: tuple[int, int, int] | None = None
    # Where the data comes from, for sources that read it after the tree is built.
    src_path: bytes | None = None
    children: list[Node] = field(default_factory=list)

    # --- filled while building ---
    nlink: int = 1
    index: int = 0  # position in inode order (root = 1)
    ino: int = 0  # inode number written to i_ino (hard links share the first one's)
    chunks: list[ChunkInfo] = field(default_factory=list)
    data_done: bool = False
    hardlink_of: Node | None = None
    # RAFS v6 layout
    v6_offset: int = 0
    v6_dirents_offset: int = 0
    v6_datalayout: int = 0
    v6_compact: bool = True

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def is_special(self) -> bool:
        return stat.S_IFMT(self.mode) in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)

    def child(self, name: bytes) -> Node | None:
        i = bisect.bisect_left(self.children, name, key=lambda n: n.name)
        if i < len(self.children) and self.children[i].name == name:
            return self.children[i]
        return None

    def insert(self, node: Node) -> Node:
        """Insert or replace the child with ``node.name``; returns the node now in the tree."""
        i = bisect.bisect_left(self.children, node.name, key=lambda n: n.name)
        if i < len(self.children) and self.children[i].name == node.name:
            old = self.children[i]
            if old.is_dir() and node.is_dir():
                node.children = old.children
            self.children[i] = node
        else:
            self.children.insert(i, node)
        return node

    def remove(self, name: bytes) -> Node | None:
        i = bisect.bisect_left(self.children, name, key=lambda n: n.name)
        if i < len(self.children) and self.children[i].name == name:
            return self.children.pop(i)
        return None

    def get_xattr(self, name: bytes) -> bytes | None:
        for key, value in self.xattrs:
            if key == name:
                return value
        return None

    def walk(self) -> Iterator[Node]:
        """Inode order: a directory's children together, then each sub-directory in turn.

        This is the order upstream numbers inodes and lays out file data, so it is ours too.
        """
        yield self
        stack = [self]
        while stack:
            dir_node = stack.pop()
            yield from dir_node.children
            stack.extend(reversed([c for c in dir_node.children if c.is_dir()]))

    def __repr__(self) -> str:
        return f"Node({self.path!r}, mode={self.mode:o})"


def whiteout_kind(node: Node, spec: str) -> str | None:
    """``"removal"``, ``"opaque"`` or None: how ``node`` acts as a whiteout under ``spec``."""
    if spec == "oci":
        if node.name == OCI_WHITEOUT_OPAQUE:
            return "opaque"
        if node.name.startswith(OCI_WHITEOUT_PREFIX):
            return "removal"
    elif spec == "overlayfs":
        if stat.S_ISCHR(node.mode) and node.rdev == 0:
            return "removal"
        if node.is_dir() and node.get_xattr(OVERLAYFS_OPAQUE_XATTR) == b"y":
            return "opaque"
    elif spec != "none":
        raise BuildError(f"unknown whiteout spec {spec!r} (expected oci, overlayfs or none)")
    return None


def split_path(path: bytes) -> list[bytes]:
    """Components of an image path, rejecting ``..`` so no entry escapes the root."""
    parts = [p for p in path.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise BuildError(f"path {path!r} contains '..'")
    return parts
