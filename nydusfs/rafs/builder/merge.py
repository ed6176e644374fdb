"""``nydus-image merge``: overlay per-layer bootstraps into one image bootstrap.

An OCI image is a stack of layers; the builder makes one RAFS bootstrap (and one blob) per
layer, and a runtime wants one bootstrap for the whole image, so it needs no overlayfs. Merging
applies the overlay rules upstream's ``Tree::merge_overaly`` applies, layer by layer, bottom to
top:

- In each directory of the upper layer, whiteouts go first: ``.wh.<name>`` removes ``<name>``
  from the lower tree, ``.wh..wh..opq`` empties the lower directory (with ``--whiteout-spec
  overlayfs``: a 0:0 character device removes, ``trusted.overlay.opaque=y`` empties, and the
  xattr is dropped). Whiteouts apply to lower layers only, so entries of the same layer survive.
- Then every other entry replaces the lower entry of the same name (a directory replacing a
  directory keeps the lower children and takes the upper attributes) or is added.
- The root takes the attributes of the top layer's root.

Chunks keep pointing at their layer's blob: the merged blob table lists the blobs still used,
in the order the merged tree first uses them (upstream's re-numbering after a merge), so a blob
whose files were all deleted is dropped. No data is read: a merge needs the bootstraps only.

Fixes of upstream, said here: whiteouts in the bottom layer are dropped (upstream keeps them as
ordinary files, visible in the image); a blob keeps the id its bootstrap records (upstream,
without ``--config``, takes it from the bootstrap's file name, which only suits nydusify's
naming) unless ``--original-blob-ids`` or ``--blob-digests`` give another.

Hard links are per layer: paths sharing an inode in one layer stay linked; ``nlink`` is
recounted over the paths left after the merge.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from nydusfs.atomicfile import atomic_write
from nydusfs.errors import BuildError, NydusError
from nydusfs.rafs.builder.node import (
    OCI_WHITEOUT_PREFIX,
    OVERLAYFS_OPAQUE_XATTR,
    WHITEOUT_SPECS,
    Node,
    whiteout_kind,
)
from nydusfs.rafs.builder.prefetch import Prefetch
from nydusfs.rafs.builder.v6 import V6Bootstrap, V6Options
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage.device import BlobInfo
from nydusfs.types import BlobFeatures

log = logging.getLogger(__name__)

MAX_LAYERS = 0xFFFF


class InconsistentFilesystemError(BuildError):
    """The layers cannot be merged (upstream's ``MergeError::InconsistentFilesystem``, exit 2)."""


@dataclass(slots=True)
class MergeOptions:
    """``sources`` are per-layer bootstraps, lowest layer first. The per-source lists, when
    given, must have one item per source (upstream's ``--blob-digests`` etc.)."""

    sources: list[str]
    bootstrap: str
    parent_bootstrap: str | None = None
    whiteout_spec: str = "oci"
    prefetch_policy: str = "none"
    prefetch_patterns: list[bytes] = field(default_factory=list)
    blob_digests: list[str] | None = None
    original_blob_ids: list[str] | None = None
    blob_sizes: list[int] | None = None
    blob_toc_digests: list[str] | None = None
    blob_toc_sizes: list[int] | None = None


@dataclass(slots=True)
class MergeResult:
    bootstrap: str
    blobs: list[BlobInfo]
    files: int
    seconds: float


def _check_lists(opts: MergeOptions) -> None:
    if not opts.sources:
        raise BuildError("source bootstrap list is empty, at least one bootstrap is required")
    if len(opts.sources) > MAX_LAYERS:
        raise BuildError(f"too many layers {len(opts.sources)}, limited to {MAX_LAYERS}")
    if opts.whiteout_spec not in WHITEOUT_SPECS:
        raise BuildError(f"invalid whiteout spec {opts.whiteout_spec!r}")
    lists: dict[str, Sequence[object] | None] = {
        "blob digest": opts.blob_digests,
        "original blob id": opts.original_blob_ids,
        "blob size": opts.blob_sizes,
        "toc digest": opts.blob_toc_digests,
        "toc size": opts.blob_toc_sizes,
    }
    for what, values in lists.items():
        if values is not None and len(values) != len(opts.sources):
            raise BuildError(
                f"number of {what} entries {len(values)} doesn't match "
                f"number of sources {len(opts.sources)}"
            )
    for what, digests in (("blob", opts.blob_digests), ("toc", opts.blob_toc_digests)):
        for d in digests or ():
            try:
                ok = len(bytes.fromhex(d)) == 32
            except ValueError:
                ok = False
            if not ok:
                raise BuildError(f"invalid {what} digest {d!r}: expected 64 hex digits")


class _Layers:
    """The merged blob table while layers are read: every distinct blob id gets a global index
    (first one wins), which chunks carry until ``renumber`` orders blobs by first use."""

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[int, BlobInfo]] = {}
        self.chunk_size: int | None = None

    def add(self, sup: RafsSuper, where: str, opts: MergeOptions, layer: int | None) -> list[int]:
        """Register ``sup``'s blobs; returns their global indexes in ``sup``'s blob order."""
        indexes = []
        for blob in sup.blobs:
            info = dataclasses.replace(blob, extra=dict(blob.extra))
            if self.chunk_size is None:
                self.chunk_size = info.chunk_size
            elif info.chunk_size != self.chunk_size:
                raise InconsistentFilesystemError(
                    f"can not merge bootstraps with inconsistent chunk size: {where} has "
                    f"{info.chunk_size:#x}, expected {self.chunk_size:#x}"
                )
            if layer is not None:
                _override(info, opts, layer, len(sup.blobs), where)
            entry = self.blobs.setdefault(info.blob_id, (len(self.blobs), info))
            indexes.append(entry[0])
        return indexes

    def renumber(self, tree: Node) -> list[BlobInfo]:
        """The blobs ``tree`` uses, in order of first use; its chunks are re-pointed at them."""
        by_global = {index: info for index, info in self.blobs.values()}
        order: dict[int, int] = {}
        for node in tree.walk():
            if node.is_reg() and node.chunks:
                node.chunks = [
                    dataclasses.replace(c, blob_index=order.setdefault(c.blob_index, len(order)))
                    for c in node.chunks
                ]
        return [
            dataclasses.replace(by_global[old], blob_index=new) for old, new in order.items()
        ]


def _override(info: BlobInfo, opts: MergeOptions, layer: int, count: int, where: str) -> None:
    """Apply the per-source lists to a layer's data blob (upstream: at most one per layer)."""
    given = any(
        v is not None
        for v in (opts.original_blob_ids, opts.blob_digests, opts.blob_sizes,
                  opts.blob_toc_digests, opts.blob_toc_sizes)
    )  # fmt: skip
    if not given:
        return
    if count > 1:
        raise BuildError(f"{where}: invalid per layer bootstrap, having multiple data blobs")
    separate = info.has(BlobFeatures.SEPARATE)
    if opts.original_blob_ids is not None:
        info.blob_id = opts.original_blob_ids[layer]
    if opts.blob_digests is not None:
        if separate:
            info.blob_meta_digest = bytes.fromhex(opts.blob_digests[layer])
        else:
            info.blob_id = opts.blob_digests[layer]
    if opts.blob_sizes is not None:
        if separate:
            info.blob_meta_size = opts.blob_sizes[layer]
        else:
            info.compressed_size = opts.blob_sizes[layer]
    if opts.blob_toc_digests is not None:
        info.blob_toc_digest = bytes.fromhex(opts.blob_toc_digests[layer])
    if opts.blob_toc_sizes is not None:
        info.blob_toc_size = opts.blob_toc_sizes[layer]


def tree_from_bootstrap(sup: RafsSuper, layer: int, blob_indexes: Sequence[int]) -> Node:
    """The builder tree of a loaded bootstrap. Every chunk is a copy whose ``blob_index`` is
    mapped through ``blob_indexes``; paths sharing an inode get one ``src_key``."""
    nodes: dict[bytes, Node] = {}
    root: Node | None = None
    for path, inode in sup.walk():
        name = path.rsplit(b"/", 1)[1] if path != b"/" else b"/"
        node = Node(
            name=name,
            path=path,
            mode=inode.mode,
            uid=inode.uid,
            gid=inode.gid,
            rdev=inode.rdev,
            size=inode.size if not inode.is_dir() else 0,
            mtime=inode.mtime,
            mtime_nsec=inode.mtime_nsec,
            xattrs=list(inode.xattrs()),
            data_done=True,
        )
        if inode.is_symlink():
            node.symlink = inode.symlink()
        elif inode.is_reg():
            node.src_key = (layer, 0, inode.ino)
            chunks = []
            for chunk in inode.chunks():
                if not 0 <= chunk.blob_index < len(blob_indexes):
                    raise InconsistentFilesystemError(
                        f"{os.fsdecode(path)} has a chunk in blob {chunk.blob_index}, which "
                        f"is not in the blob table of its bootstrap"
                    )
                chunks.append(dataclasses.replace(chunk, blob_index=blob_indexes[chunk.blob_index]))
            node.chunks = chunks
        if path == b"/":
            root = node
        else:
            # The walk yields a directory before its children, and children sorted by name.
            nodes[path.rsplit(b"/", 1)[0] or b"/"].children.append(node)
        if inode.is_dir():
            nodes[path] = node
    assert root is not None
    return root


def drop_whiteouts(dir_node: Node, spec: str) -> None:
    """Remove whiteouts from a bottom layer: they hide nothing and are not image content."""
    kept = []
    for child in dir_node.children:
        kind = whiteout_kind(child, spec)
        if kind == "removal" or (kind == "opaque" and spec == "oci"):
            continue
        if kind == "opaque":
            child.xattrs = [x for x in child.xattrs if x[0] != OVERLAYFS_OPAQUE_XATTR]
        kept.append(child)
    dir_node.children = kept
    for child in kept:
        if child.is_dir():
            drop_whiteouts(child, spec)


def merge_children(lower: Node, upper_children: list[Node], spec: str) -> None:
    """Overlay ``upper_children`` (one upper directory's entries) onto directory ``lower``."""
    modified = []
    for u in upper_children:
        kind = whiteout_kind(u, spec)
        if kind == "removal":
            lower.remove(u.name[len(OCI_WHITEOUT_PREFIX) :] if spec == "oci" else u.name)
        elif kind == "opaque" and spec == "oci":
            lower.children = []
        elif kind == "opaque":
            existing = lower.child(u.name)
            if existing is not None:
                existing.children = []
            u.xattrs = [x for x in u.xattrs if x[0] != OVERLAYFS_OPAQUE_XATTR]
            modified.append(u)
        else:
            modified.append(u)
    subdirs = []
    for u in modified:
        u_children, u.children = u.children, []
        # Node.insert keeps the lower children when a directory replaces a directory.
        lower.insert(u)
        if u.is_dir():
            subdirs.append((u, u_children))
    for merged, u_children in subdirs:
        merge_children(merged, u_children, spec)


def merge(opts: MergeOptions) -> MergeResult:
    """Merge ``opts.sources`` into ``opts.bootstrap``; ``BuildError`` on bad input (its
    subclass ``InconsistentFilesystemError`` when the layers do not fit together)."""
    started = time.monotonic()
    _check_lists(opts)
    layers = _Layers()
    tree: Node | None = None
    last: RafsSuper | None = None
    stack: list[tuple[str, int | None]] = []
    if opts.parent_bootstrap:
        stack.append((opts.parent_bootstrap, None))
    stack += [(path, i) for i, path in enumerate(opts.sources)]
    for n, (path, layer) in enumerate(stack):
        try:
            sup = RafsSuper.load(path)
        except NydusError as e:
            raise BuildError(f"load bootstrap {path}: {e}") from e
        with sup:
            if last is not None and sup.meta.digester != last.meta.digester:
                raise InconsistentFilesystemError(
                    f"{path}: digester {sup.meta.digester.label} differs from "
                    f"the lower layers' {last.meta.digester.label}"
                )
            indexes = layers.add(sup, path, opts, layer)
            upper = tree_from_bootstrap(sup, n, indexes)
            last = sup
        if tree is None:
            if layer is not None:  # a parent bootstrap is merged already
                drop_whiteouts(upper, opts.whiteout_spec)
            tree = upper
        else:
            # The root takes the upper root's attributes and keeps the merged children.
            upper_children, upper.children = upper.children, tree.children
            tree = upper
            merge_children(tree, upper_children, opts.whiteout_spec)
    assert tree is not None and last is not None
    blobs = layers.renumber(tree)
    _fix_paths(tree, b"/")
    boot = V6Bootstrap(
        tree,
        V6Options(
            compressor=last.meta.compressor,
            digester=last.meta.digester,
            chunk_size=layers.chunk_size or last.meta.chunk_size,
            explicit_uidgid=last.meta.explicit_uidgid,
        ),
        Prefetch(opts.prefetch_policy, opts.prefetch_patterns),
    )
    boot.assign()
    data = boot.dump(blobs)
    with atomic_write(opts.bootstrap) as f:
        f.write(data)
    files = sum(1 for n in boot.nodes if n.is_reg())
    log.info("merged %d bootstraps into %s: %d blobs, %d files", len(stack), opts.bootstrap,
             len(blobs), files)  # fmt: skip
    return MergeResult(opts.bootstrap, blobs, files, time.monotonic() - started)


def _fix_paths(node: Node, path: bytes) -> None:
    """Paths after the merge (a moved subtree keeps its names, only prefixes can differ)."""
    node.path = path
    prefix = path if path.endswith(b"/") else path + b"/"
    for child in node.children:
        if child.is_dir():
            _fix_paths(child, prefix + child.name)
        else:
            child.path = prefix + child.name
