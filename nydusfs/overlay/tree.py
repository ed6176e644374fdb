"""The overlay's node tree: how a name resolves through the layers, and merged listings.

``OverlayTree`` holds what ``OverlayFs`` (``nydusfs.overlay.fs``, which has the semantics) and
``copyup`` share: the nodes by inode number, the upper layer and work directory, and the rules
of lookup (topmost layer wins; directories merge down to the first opaque one; whiteouts hide).
Everything runs on the event loop; lookups in the layers are awaited.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from nydusfs.filesystem import ROOT_INODE, FileSystem
from nydusfs.metrics import FsIoStats
from nydusfs.overlay import copyup
from nydusfs.overlay.layer import (
    OPAQUE_XATTR,
    Node,
    WorkDir,
    is_whiteout,
    is_whiteout_stat,
)
from nydusfs.passthrough import PassthroughFs
from nydusfs.passthrough.fs import dtype
from nydusfs.passthrough.inode import check_name
from nydusfs.types import Attr, Entry

TIMEOUT = 1.0
ROOT_CTX = copyup.ROOT_CTX
_WRITE_INTENT = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


@dataclass(slots=True)
class OverlayHandle:
    """An open file (``fs``/``inner``/``fh``: the layer's handle) or directory (``fh`` -1,
    ``entries``: the merged listing, taken when reading starts)."""

    node: Node
    fs: FileSystem
    inner: int
    fh: int
    entries: list[tuple[bytes, int, int]] | None = None


class OverlayTree:
    """The node tree and its resolution through the layers (``OverlayFs`` adds the operations)."""

    def __init__(
        self,
        lowers: Sequence[FileSystem],
        upper_dir: str | None = None,
        work_dir: str | None = None,
        *,
        writable: bool = True,
    ) -> None:
        if not lowers:
            raise ValueError("an overlay needs at least one lower layer")
        if upper_dir is not None and not work_dir:
            raise ValueError("an overlay with an upper_dir needs a work_dir")
        self.lowers = list(lowers)
        # The lower RAFS image's counters are the mount's (/api/v1/metrics).
        stats = getattr(self.lowers[0], "stats", None)
        self.stats = stats if isinstance(stats, FsIoStats) else FsIoStats()
        self.writable = writable and upper_dir is not None
        self.upper: PassthroughFs | None = None
        self.work: WorkDir
        if upper_dir is not None and work_dir is not None:
            self.work = WorkDir(work_dir, upper_dir)
            self.upper = PassthroughFs(upper_dir, writable=self.writable)
        self.root = Node(ROOT_INODE, None, b"", stat.S_IFDIR, nlookup=1 << 62)
        self.root.upper = ROOT_INODE if self.upper is not None else None
        self.root.lowers = [(i, ROOT_INODE) for i in range(len(self.lowers))]
        self._nodes: dict[int, Node] = {ROOT_INODE: self.root}
        self._by_upper: dict[int, Node] = {}  # upper inode of a non-directory -> its node
        self._next = itertools.count(ROOT_INODE + 1)
        self._handles: dict[int, OverlayHandle] = {}
        self._fh = itertools.count(1)
        self._locks: dict[int, trio.Lock] = {}

    # --- helpers used by copyup ---------------------------------------------------------------
    @property
    def upper_fs(self) -> PassthroughFs:
        if self.upper is None:
            raise OSError(errno.EROFS, "the overlay has no upper layer")
        return self.upper

    def upper_fd(self, node: Node) -> int:
        assert node.upper is not None
        return self.upper_fs.inode(node.upper).fd

    def copy_lock(self, node: Node) -> trio.Lock:
        return self._locks.setdefault(node.ino, trio.Lock())

    async def set_upper(self, node: Node, inner: int) -> None:
        node.upper = inner
        if not node.is_dir:
            await self.drop_lowers(node)
            self._by_upper[inner] = node

    async def drop_lowers(self, node: Node) -> None:
        lowers, node.lowers = node.lowers, []
        for layer, inner in lowers:
            await self.lowers[layer].forget(inner, 1)

    def _node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise OSError(errno.ESTALE, f"inode {ino} is not known")
        return node

    def _dir(self, ino: int) -> Node:
        node = self._node(ino)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return node

    def _check_writable(self) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "read-only filesystem")

    async def _opaque(self, fs: FileSystem, inner: int) -> bool:
        try:
            return await fs.getxattr(ROOT_CTX, inner, OPAQUE_XATTR) == b"y"
        except OSError:
            return False

    async def _find(self, fs: FileSystem, parent: int, name: bytes) -> Entry | None:
        try:
            return await fs.lookup(ROOT_CTX, parent, name)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    # --- resolution ---------------------------------------------------------------------------
    async def child(self, parent: Node, name: bytes) -> Node | None:
        """The node ``name`` in ``parent`` shows, resolved through the layers (None: none)."""
        node = parent.children.get(name)
        if node is not None:
            return node
        check_name(name)
        upper: Entry | None = None
        opaque = False
        if parent.upper is not None and self.upper is not None:
            upper = await self._find(self.upper, parent.upper, name)
            if upper is not None and is_whiteout(upper.attr):
                await self.upper.forget(upper.ino, 1)
                parent.lower_names.add(name)
                return None
            if upper is not None and stat.S_ISDIR(upper.attr.mode):
                opaque = await self._opaque(self.upper, upper.ino)
        kind = stat.S_IFMT(upper.attr.mode) if upper is not None else 0
        stop = upper is not None and (kind != stat.S_IFDIR or opaque)
        lowers: list[tuple[int, int]] = []
        in_lower = False
        for layer, inner in parent.lowers:
            fs = self.lowers[layer]
            found = await self._find(fs, inner, name)
            if found is None:
                continue
            if is_whiteout(found.attr):
                await fs.forget(found.ino, 1)
                break
            in_lower = True
            is_dir = stat.S_ISDIR(found.attr.mode)
            if stop or (kind and (kind != stat.S_IFDIR or not is_dir)):
                await fs.forget(found.ino, 1)
                break
            lowers.append((layer, found.ino))
            if not kind:
                kind = stat.S_IFMT(found.attr.mode)
            if not is_dir or await self._opaque(fs, found.ino):
                break
        if in_lower:
            parent.lower_names.add(name)
        if not kind:
            return None
        if upper is not None and kind != stat.S_IFDIR and upper.ino in self._by_upper:
            node = self._by_upper[upper.ino]  # another name of a hard-linked upper file
            await self.upper_fs.forget(upper.ino, 1)
            node.names += 1
        else:
            node = Node(next(self._next), parent, name, kind, opaque=opaque, lowers=lowers)
            self._nodes[node.ino] = node
            if upper is not None:
                await self.set_upper(node, upper.ino)
        parent.children[name] = node
        return node

    def _layer_of(self, node: Node) -> tuple[FileSystem, int]:
        if node.upper is not None:
            return self.upper_fs, node.upper
        layer, inner = node.lowers[0]
        return self.lowers[layer], inner

    async def _attr(self, node: Node) -> Attr:
        fs, inner = self._layer_of(node)
        attr = (await fs.getattr(ROOT_CTX, inner))._replace(ino=node.ino)
        return attr._replace(nlink=1) if node.merged else attr

    async def _entry(self, node: Node, count: bool = True) -> Entry:
        attr = await self._attr(node)
        if count:
            node.nlookup += 1
        return Entry(node.ino, attr, 0, TIMEOUT, TIMEOUT)

    async def merged_entries(self, node: Node) -> list[tuple[bytes, int]]:
        """``(name, DT_*)`` of what the directory shows: upper first, then lower layers, without
        whiteouts and what they hide."""
        names: dict[bytes, int] = {}
        hidden: set[bytes] = set()
        if node.upper is not None:
            with os.scandir(self.upper_fs.inode(node.upper).proc_path) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    name = os.fsencode(e.name)
                    if is_whiteout_stat(st):
                        hidden.add(name)
                    else:
                        names[name] = dtype(st.st_mode)
        for layer, inner in node.lowers:
            for name, kind in await self._list_lower(self.lowers[layer], inner):
                if name in names or name in hidden:
                    continue
                if kind == 2:  # DT_CHR: maybe a whiteout in this lower layer
                    found = await self._find(self.lowers[layer], inner, name)
                    if found is not None:
                        await self.lowers[layer].forget(found.ino, 1)
                        if is_whiteout(found.attr):
                            hidden.add(name)
                            continue
                names[name] = kind
        return list(names.items())

    async def _list_lower(self, fs: FileSystem, inner: int) -> list[tuple[bytes, int]]:
        handle = await fs.opendir(ROOT_CTX, inner)
        try:
            return [
                (e.name, e.type)
                async for e in fs.readdir(ROOT_CTX, inner, handle.fh, 0)
                if e.name not in (b".", b"..")
            ]
        finally:
            await fs.releasedir(ROOT_CTX, inner, handle.fh)

    async def detach(self, parent: Node, name: bytes) -> None:
        """``name`` no longer leads to its node (removed, or replaced by a rename)."""
        node = parent.children.pop(name, None)
        if node is None:
            return
        node.names -= 1
        if node.names <= 0:
            node.parent = None
            await self.maybe_free(node)

    async def maybe_free(self, node: Node) -> None:
        """Release a node nothing refers to any more: no name, no kernel reference, no handle."""
        if node.names > 0 or node.nlookup > 0 or node.opened > 0 or node is self.root:
            return
        self._nodes.pop(node.ino, None)
        self._locks.pop(node.ino, None)
        await self.drop_lowers(node)
        if node.upper is not None:
            if self._by_upper.get(node.upper) is node:
                del self._by_upper[node.upper]
            await self.upper_fs.forget(node.upper, 1)
            node.upper = None
        for child_name in list(node.children):
            await self.detach(node, child_name)
