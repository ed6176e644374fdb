"""Write a RAFS v6 bootstrap from a built tree, byte for byte as upstream nydus-image does.

Two passes, as upstream: ``assign`` numbers inodes (root = 1, a directory's children together,
then each sub-directory) and places every inode in the meta area; later ``dump`` writes inodes,
xattrs, chunk addresses, dirents and symlink data at those offsets, then the chunk table, the
superblocks, the device slots and the blob table.

Placement follows upstream's allocator, including its reuse of the free tail of blocks left by
directories (``_SlotAllocator``), so the same tree gives the same bytes. Known deviations, both
fixes of upstream defects: device numbers are kept in compact inodes (upstream drops them), and
xattrs are written sorted by name (upstream writes them in hash-map order).
"""

from __future__ import annotations

import collections
import stat
from dataclasses import dataclass

from nydusfs.errors import BuildError
from nydusfs.rafs.builder.node import Node
from nydusfs.rafs.builder.prefetch import Prefetch
from nydusfs.rafs.layout import v6 as L
from nydusfs.rafs.layout.v5 import pack_chunk_info
from nydusfs.storage.device import BlobInfo, ChunkInfo
from nydusfs.types import BlobFeatures, Compressor, Digester, SuperFlags

BLOCK = L.EROFS_BLOCK_SIZE_4096
SLOT = L.EROFS_INODE_SLOT_SIZE


@dataclass(slots=True)
class V6Options:
    compressor: Compressor
    digester: Digester
    chunk_size: int
    explicit_uidgid: bool = True


class _SlotAllocator:
    """Upstream's ``BootstrapContext`` offset bookkeeping for the meta area."""

    def __init__(self) -> None:
        self.offset = BLOCK
        # Blocks with free space at their end, bucketed by free 32-byte slots.
        self.available: list[collections.deque[int]] = [
            collections.deque() for _ in range(BLOCK // SLOT)
        ]

    def align(self, size: int) -> None:
        self.offset = L.align(self.offset, size)

    def reuse(self, size: int) -> int:
        """An offset with ``size`` free bytes in an already used block, or 0."""
        if size >= BLOCK:
            return 0
        min_idx = -(-size // SLOT)
        for idx in range(min_idx, BLOCK // SLOT):
            blocks = self.available[idx]
            if blocks:
                offset = blocks.popleft() + BLOCK - idx * SLOT
                self.release(offset + min_idx * SLOT)
                return offset
        return 0

    def release(self, offset: int) -> None:
        """Record that the block holding ``offset`` is free from ``offset`` to its end."""
        if offset % BLOCK:
            free = BLOCK - offset % BLOCK
            self.available[free // SLOT].append(offset - offset % BLOCK)


def _dirent_size(names: list[bytes]) -> int:
    size = 0
    for name in sorted([b".", b"..", *names]):
        length = len(name) + L.DIRENT.size
        if size % BLOCK + length > BLOCK:
            size = L.align(size, BLOCK)
        size += length
    return size


class V6Bootstrap:
    """Lays out and serialises one tree."""

    def __init__(self, root: Node, options: V6Options, prefetch: Prefetch) -> None:
        self.root = root
        self.opts = options
        self.prefetch = prefetch
        self.alloc = _SlotAllocator()
        self.next_index = 1
        self.has_xattr = False
        self.nodes: list[Node] = []  # inode order, hard links included
        self._parent: dict[int, Node] = {}  # id(child) -> its directory

    # --- pass 1: numbering and placement ---------------------------------------------------------
    def assign(self) -> None:
        root = self.root
        if not root.is_dir():
            raise BuildError("the image root must be a directory")
        root.index = root.ino = self._take_index()
        self.prefetch.insert(root)
        self.nodes.append(root)
        hardlinks: dict[tuple[int, int, int], list[Node]] = {}
        stack = [root]
        while stack:
            parent = stack.pop()
            self._place_dir(parent)
            subdirs = []
            for child in parent.children:
                child.index = self._take_index()
                self.nodes.append(child)
                self._parent[id(child)] = parent
                first: Node | None = None
                if child.is_reg() and child.src_key is not None:
                    group = hardlinks.setdefault(child.src_key, [])
                    if group:
                        first = group[0]
                    group.append(child)
                    for member in group:
                        member.nlink = len(group)
                else:
                    child.nlink = 1
                if first is not None:
                    child.ino = first.ino
                    child.hardlink_of = first
                    child.v6_compact = first.v6_compact  # they share one inode record
                else:
                    child.ino = child.index
                    child.v6_compact = self._compact(child)
                if not child.is_dir():
                    self._place_other(child, first)
                self.prefetch.insert(child)
                if child.is_dir():
                    subdirs.append(child)
            parent.nlink = 2 + len(subdirs)
            stack.extend(reversed(subdirs))

    def _take_index(self) -> int:
        index = self.next_index
        self.next_index += 1
        return index

    def _compact(self, node: Node) -> bool:
        return not (
            node.uid > 0xFFFF
            or node.gid > 0xFFFF
            or node.nlink > 0xFFFF
            or node.size > 0xFFFF_FFFF
            or _extension(node.name) == b"pyc"
            or (node.is_dir() and sum(c.is_dir() for c in node.children) + 2 > 0xFFFF)
        )

    def _inode_size(self, node: Node) -> int:
        base = L.INODE_COMPACT.size if node.v6_compact else L.INODE_EXTENDED.size
        return base + L.xattr_body_size(node.xattrs)

    def _place_dir(self, node: Node) -> None:
        node.v6_compact = self._compact(node)
        node.size = _dirent_size([c.name for c in node.children])
        self._place_with_tail(node, node.size)
        self.alloc.align(SLOT)

    def _place_other(self, node: Node, hardlink_of: Node | None) -> None:
        alloc = self.alloc
        if node.is_reg():
            if hardlink_of is not None:
                node.v6_offset = hardlink_of.v6_offset
            else:
                chunks = -(-node.size // self.opts.chunk_size)
                total = L.align(self._inode_size(node), L.CHUNK_ADDR.size) + chunks * 8
                node.v6_offset = alloc.reuse(total)
                if node.v6_offset == 0:
                    node.v6_offset = alloc.offset
                    alloc.offset += total
            node.v6_datalayout = L.EROFS_INODE_CHUNK_BASED
        elif node.is_symlink():
            assert node.symlink is not None
            if not 0 < len(node.symlink) <= BLOCK:
                raise BuildError(f"symlink {node.path!r} target must be 1..4096 bytes")
            self._place_with_tail(node, len(node.symlink))
        else:
            node.v6_offset = alloc.offset
            alloc.offset += self._inode_size(node)
        alloc.align(SLOT)

    def _place_with_tail(self, node: Node, d_size: int) -> None:
        alloc = self.alloc
        inode_size = self._inode_size(node)
        tail = d_size % BLOCK
        if tail and inode_size + tail <= BLOCK:
            node.v6_offset = alloc.reuse(inode_size + tail)
            if node.v6_offset == 0:
                if BLOCK - alloc.offset % BLOCK < inode_size + tail:
                    alloc.release(alloc.offset)
                    alloc.align(BLOCK)
                node.v6_offset = alloc.offset
                alloc.offset += inode_size + tail
            if d_size != tail:
                alloc.release(alloc.offset)
                alloc.align(BLOCK)
            node.v6_dirents_offset = alloc.offset
            alloc.offset += d_size - tail
            node.v6_datalayout = L.EROFS_INODE_FLAT_INLINE
        else:
            node.v6_offset = alloc.reuse(inode_size)
            if node.v6_offset == 0:
                node.v6_offset = alloc.offset
                alloc.offset += inode_size
            alloc.release(alloc.offset)
            alloc.align(BLOCK)
            node.v6_dirents_offset = alloc.offset
            alloc.offset += d_size
            alloc.align(BLOCK)
            node.v6_datalayout = L.EROFS_INODE_FLAT_PLAIN

    # --- pass 2: serialisation --------------------------------------------------------------------
    def dump(self, blobs: list[BlobInfo]) -> bytes:
        devtable_len = len(blobs) * L.DEVICE.size
        if len(blobs) >= 255:
            raise BuildError("RAFS v6 supports at most 254 blobs")
        blob_table_offset = L.align(L.EROFS_DEVTABLE_OFFSET + devtable_len, BLOCK)
        blob_table_size = len(blobs) * L.BLOB.size
        prefetch_nodes = self.prefetch.table_nodes()
        prefetch_size = 4 * len(prefetch_nodes) if blob_table_size else 0
        prefetch_offset = blob_table_offset + blob_table_size if prefetch_size else 0

        # The meta area starts one block before the root so that the root's nid is never 0.
        orig_meta_addr = self.root.v6_offset - BLOCK
        if blob_table_size:
            meta_addr = L.align(blob_table_offset + blob_table_size + prefetch_size, BLOCK)
        else:
            meta_addr = orig_meta_addr
        shift = meta_addr - orig_meta_addr

        out = bytearray(meta_addr)
        chunk_records: dict[tuple[bytes, int], ChunkInfo] = {}
        for node in self.nodes:
            self._dump_node(out, node, shift, meta_addr, chunk_records)
        out += bytes(-len(out) % BLOCK)

        chunk_table_offset = len(out)
        for key in sorted(chunk_records):
            out += pack_chunk_info(chunk_records[key])
        chunk_table_size = len(out) - chunk_table_offset
        out += bytes(-len(out) % BLOCK)

        if prefetch_size:
            nids = [L.nid_of(n.v6_offset + shift, meta_addr) for n in prefetch_nodes]
            out[prefetch_offset : prefetch_offset + prefetch_size] = b"".join(
                nid.to_bytes(4, "little") for nid in nids
            )

        # Device slots: each blob's place in the flat view that `export --block` writes.
        pos = len(out)
        total_blocks = 0
        slots = bytearray()
        for blob in blobs:
            count = blob.uncompressed_size // BLOCK
            mapped = L.mapped_blkaddr(pos, BLOCK)
            pos = (mapped + count) * BLOCK
            total_blocks += count
            blob.mapped_blkaddr = mapped
            slots += L.DEVICE.pack(blob.blob_id.encode(), count, mapped, bytes(56))
        if total_blocks > 0xFFFF_FFFF:
            raise BuildError("too many data blocks for a RAFS v6 image")

        flags = (
            SuperFlags.for_compressor(self.opts.compressor)
            | SuperFlags.for_digester(self.opts.digester)
            | SuperFlags.ENCRYPTION_NONE
        )
        if self.opts.explicit_uidgid:
            flags |= SuperFlags.EXPLICIT_UID_GID
        if self.has_xattr:
            flags |= SuperFlags.HAS_XATTR
        if blobs and all(b.has(BlobFeatures.INLINED_CHUNK_DIGEST) for b in blobs):
            flags |= SuperFlags.INLINED_CHUNK_DIGEST
        root_nid = L.nid_of(self.root.v6_offset + shift, meta_addr)
        if root_nid > 0xFFFF:
            raise BuildError("root inode lies beyond what the superblock can address")
        L.SUPER.pack_into(
            out,
            L.EROFS_SUPER_OFFSET,
            L.EROFS_SUPER_MAGIC,
            0,
            L.EROFS_FEATURE_COMPAT_RAFS_V6,
            L.EROFS_BLOCK_BITS_12,
            0,
            root_nid,
            self.next_index - 1,
            0,
            0,
            total_blocks,
            meta_addr // BLOCK,
            0,
            bytes(16),
            bytes(16),
            L.EROFS_FEATURE_INCOMPAT_RAFS_V6,
            0,
            len(blobs),
            L.EROFS_DEVTABLE_OFFSET // L.DEVICE.size,
            bytes(38),
        )
        L.EXT_SUPER.pack_into(
            out,
            L.EROFS_SUPER_OFFSET + L.EROFS_SUPER_BLOCK_SIZE,
            int(flags),
            blob_table_offset,
            blob_table_size,
            self.opts.chunk_size,
            chunk_table_offset,
            chunk_table_size,
            prefetch_offset,
            prefetch_size,
            0,
            bytes(200),
        )
        out[L.EROFS_DEVTABLE_OFFSET : L.EROFS_DEVTABLE_OFFSET + devtable_len] = slots
        for blob in blobs:
            _put(out, blob_table_offset + blob.blob_index * L.BLOB.size, pack_blob(blob))
        return bytes(out)

    def _dump_node(
        self,
        out: bytearray,
        node: Node,
        shift: int,
        meta_addr: int,
        chunk_records: dict[tuple[bytes, int], ChunkInfo],
    ) -> None:
        offset = node.v6_offset + shift
        dirents_offset = node.v6_dirents_offset + shift
        if node.is_dir():
            u = dirents_offset // BLOCK
        elif node.is_reg():
            u = self._chunk_u(node)
        elif node.is_symlink():
            u = dirents_offset // BLOCK
        elif node.is_special():
            u = node.rdev & 0xFFFF_FFFF
        else:
            u = 0
        fmt = (0 if node.v6_compact else 1) | node.v6_datalayout << 1
        icount = L.xattr_icount(node.xattrs)
        if node.v6_compact:
            inode = L.INODE_COMPACT.pack(
                fmt, icount, node.mode & 0xFFFF, node.nlink, node.size, 0, u,
                node.ino, node.uid, node.gid, bytes(4),
            )  # fmt: skip
        else:
            inode = L.INODE_EXTENDED.pack(
                fmt, icount, node.mode & 0xFFFF, 0, node.size, u, node.ino, node.uid,
                node.gid, node.mtime, node.mtime_nsec, node.nlink, bytes(16),
            )  # fmt: skip
        body = inode + L.pack_xattrs(node.xattrs)
        if node.xattrs:
            self.has_xattr = True
        _put(out, offset, body)
        end = offset + len(body)
        if node.is_dir():
            self._dump_dirents(out, node, end, dirents_offset, shift, meta_addr)
        elif node.is_symlink():
            assert node.symlink is not None
            where = end if node.v6_datalayout == L.EROFS_INODE_FLAT_INLINE else dirents_offset
            _put(out, where, node.symlink)
        elif node.is_reg():
            addrs = bytearray()
            for chunk in node.chunks:
                addrs += L.ChunkAddr(
                    chunk.blob_index, chunk.index, chunk.uncompressed_offset // BLOCK
                ).pack()
                # Later files win, as in upstream's map: the record keeps their file offset.
                chunk_records[(chunk.digest, chunk.blob_index + 1)] = chunk
            _put(out, L.align(end, L.CHUNK_ADDR.size), bytes(addrs))

    def _chunk_u(self, node: Node) -> int:
        chunk_size = self.opts.chunk_size
        contiguous = True
        prev: ChunkInfo | None = None
        for chunk in node.chunks:
            if prev is not None and (
                prev.uncompressed_offset + chunk_size != chunk.uncompressed_offset
                or prev.blob_index != chunk.blob_index
            ):
                contiguous = False
                break
            prev = chunk
        if contiguous and node.size > chunk_size:
            # One big chunk lets the kernel share page cache for the whole file.
            chunk_size = 1 << (node.size - 1).bit_length()
        return L.chunk_format(chunk_size, L.EROFS_BLOCK_BITS_12)

    def _dump_dirents(
        self, out: bytearray, node: Node, inline_at: int, blocks_at: int, shift: int, meta: int
    ) -> None:
        parent = self._parent.get(id(node), node)  # the root is its own parent
        parent_offset = parent.v6_offset
        entries = [(b".", node.v6_offset, stat.S_IFDIR), (b"..", parent_offset, stat.S_IFDIR)]
        entries += [(c.name, c.v6_offset, c.mode) for c in node.children]
        entries.sort(key=lambda e: e[0])
        blocks: list[list[tuple[bytes, int, int]]] = [[]]
        used = 0
        for entry in entries:
            length = len(entry[0]) + L.DIRENT.size
            if used + length > BLOCK:
                blocks.append([])
                used = 0
            blocks[-1].append(entry)
            used += length
        for i, block in enumerate(blocks):
            data = bytearray()
            nameoff = len(block) * L.DIRENT.size
            for name, off, mode in block:
                data += L.DIRENT.pack(L.nid_of(off + shift, meta), nameoff, L.file_type(mode), 0)
                nameoff += len(name)
            for name, _, _ in block:
                data += name
            last = i == len(blocks) - 1
            if last and node.v6_datalayout == L.EROFS_INODE_FLAT_INLINE:
                _put(out, inline_at, bytes(data))
            else:
                _put(out, blocks_at + i * BLOCK, bytes(data))


def _extension(name: bytes) -> bytes | None:
    """What Rust's ``Path::extension`` gives: none for ``.pyc`` itself, ``pyc`` for ``a.pyc``."""
    dot = name.rfind(b".")
    return name[dot + 1 :] if dot > 0 else None


def _put(out: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(out):
        out += bytes(end - len(out))
    out[offset:end] = data


def pack_blob(blob: BlobInfo) -> bytes:
    """A ``RafsV6Blob`` blob table entry."""
    return L.BLOB.pack(
        blob.blob_id.encode(),
        blob.blob_index,
        blob.chunk_size,
        blob.chunk_count,
        int(blob.compressor),
        int(blob.digester),
        int(blob.features),
        blob.compressed_size,
        blob.uncompressed_size,
        blob.blob_toc_size,
        int(blob.ci_compressor),
        blob.ci_offset,
        blob.ci_compressed_size,
        blob.ci_uncompressed_size,
        blob.blob_toc_digest,
        blob.blob_meta_digest,
        blob.blob_meta_size,
        blob.cipher_iv,
        int(blob.cipher),
        bytes(36),
    )
