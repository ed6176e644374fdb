"""Loading a bootstrap: ``RafsSuper.load`` picks the v5 or v6 reader and validates the image.

Upstream's loader order is kept: the v5 magic at offset 0 first, then the EROFS magic at 1024.
The bootstrap is mapped read-only (or held as bytes); readers parse lazily from that buffer.
"""

from __future__ import annotations

import abc
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nydusfs.errors import FormatError
from nydusfs.rafs.inode import RafsInode
from nydusfs.storage.device import BlobInfo
from nydusfs.types import Compressor, Digester, SuperFlags

RAFS_V5_MAGIC = 0x5241_4653
EROFS_SUPER_MAGIC = 0xE0F5_E1E2
EROFS_SUPER_OFFSET = 1024
RAFS_MAX_METADATA_SIZE = 0x8000_0000
# A walk deeper than this is a cycle in a corrupt image, not a real tree.
MAX_TREE_DEPTH = 4096


@dataclass(slots=True)
class SuperMeta:
    """What both versions know about an image."""

    version: int  # 5 or 6
    flags: SuperFlags
    chunk_size: int
    inodes_count: int
    root_ino: int
    block_size: int  # v6 EROFS block size; v5: 4096

    @property
    def compressor(self) -> Compressor:
        return self.flags.compressor()

    @property
    def digester(self) -> Digester:
        return self.flags.digester()

    @property
    def explicit_uidgid(self) -> bool:
        return bool(self.flags & SuperFlags.EXPLICIT_UID_GID)

    @property
    def has_xattr(self) -> bool:
        return bool(self.flags & SuperFlags.HAS_XATTR)


class RafsSuper(abc.ABC):
    """A loaded bootstrap: superblock, blob table, prefetch table and inode views."""

    meta: SuperMeta
    blobs: list[BlobInfo]
    path: str | None = None

    @abc.abstractmethod
    def inode(self, ino: int) -> RafsInode:
        """The inode ``ino``; ``FormatError`` if no such inode exists."""

    @property
    @abc.abstractmethod
    def prefetch_table(self) -> list[int]:
        """Inos listed in the bootstrap's prefetch table (a directory means its subtree)."""

    @property
    def root(self) -> RafsInode:
        return self.inode(self.meta.root_ino)

    def lookup_path(self, path: str | bytes) -> RafsInode:
        """Resolve an absolute path inside the image (symlinks are not followed)."""
        raw = os.fsencode(path)
        node = self.root
        for part in raw.split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                node = self.inode(node.parent)
                continue
            if not node.is_dir():
                raise FileNotFoundError(f"{os.fsdecode(raw)}: not a directory")
            ino = node.lookup(part)
            if ino is None:
                raise FileNotFoundError(f"{os.fsdecode(raw)}: no such file in image")
            node = self.inode(ino)
        return node

    def walk(self) -> Iterator[tuple[bytes, RafsInode]]:
        """Depth-first ``(path, inode)`` pairs, root first as ``b"/"``, children by name.

        A directory reached twice (a cycle or a directory hard link in a corrupt image) raises
        ``FormatError``, so a walk visits each directory once and always ends.
        """
        root = self.root
        seen_dirs = {root.ino}
        stack: list[tuple[bytes, RafsInode, int]] = [(b"/", root, 0)]
        while stack:
            path, node, depth = stack.pop()
            yield path, node
            if not node.is_dir():
                continue
            if depth >= MAX_TREE_DEPTH:
                raise FormatError(f"directory tree deeper than {MAX_TREE_DEPTH} at {path!r}")
            prefix = path if path.endswith(b"/") else path + b"/"
            children = []
            for name, ino in node.children():
                child = self.inode(ino)
                if child.is_dir():
                    if ino in seen_dirs:
                        raise FormatError(f"directory inode {ino} appears twice in the tree")
                    seen_dirs.add(ino)
                children.append((prefix + name, child, depth + 1))
            stack.extend(reversed(children))

    def close(self) -> None:  # noqa: B027 - optional hook, most readers hold nothing
        """Release the mapping. Views must not be used afterwards."""

    def __enter__(self) -> RafsSuper:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- loading ----------------------------------------------------------------------------
    @staticmethod
    def load(source: str | os.PathLike[str] | bytes) -> RafsSuper:
        """Open a bootstrap file (or its bytes), detect its version and validate it."""
        from nydusfs.rafs import v5, v6

        mapping: mmap.mmap | None = None
        path: str | None = None
        if isinstance(source, bytes):
            buf: bytes | memoryview = source
        else:
            path = os.fspath(source)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise FormatError(f"cannot open bootstrap {path}: {e.strerror}") from e
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise FormatError(f"bootstrap {path} is not a regular file")
                if st.st_size == 0:
                    raise FormatError(f"bootstrap {path} is empty")
                if st.st_size > RAFS_MAX_METADATA_SIZE:
                    raise FormatError(f"bootstrap {path} is larger than 2 GiB")
                mapping = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            buf = memoryview(mapping)

        sup: RafsSuper
        if len(buf) >= 4 and struct.unpack_from("<I", buf, 0)[0] == RAFS_V5_MAGIC:
            sup = v5.RafsV5Super(buf, mapping)
        elif (
            len(buf) >= EROFS_SUPER_OFFSET + 4
            and struct.unpack_from("<I", buf, EROFS_SUPER_OFFSET)[0] == EROFS_SUPER_MAGIC
        ):
            sup = v6.RafsV6Super(buf, mapping)
        else:
            where = path or "bootstrap"
            raise FormatError(f"{where}: not a RAFS image (no v5 or v6 superblock magic)")
        sup.path = path
        return sup
