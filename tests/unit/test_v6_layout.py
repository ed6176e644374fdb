"""Placement of inodes in the v6 meta area must match upstream's allocator exactly.

The expected offsets are the ones upstream's own unit test (builder/src/core/v6.rs,
``test_set_v6_offset``) asserts for the same sequence of placements.
"""

from __future__ import annotations

import stat

from nydusfs.rafs.builder.node import Node
from nydusfs.rafs.builder.prefetch import Prefetch
from nydusfs.rafs.builder.v6 import V6Bootstrap, V6Options
from nydusfs.rafs.layout import v6 as L
from nydusfs.types import Compressor, Digester


def _bootstrap() -> V6Bootstrap:
    root = Node(name=b"/", path=b"/", mode=stat.S_IFDIR | 0o755)
    boot = V6Bootstrap(root, V6Options(Compressor.ZSTD, Digester.BLAKE3, 0x100000), Prefetch())
    boot.alloc.offset = 0
    return boot


def _dir() -> Node:
    return Node(name=b"d", path=b"/d", mode=stat.S_IFDIR | 0o755)


def test_allocator_matches_upstream_sequence() -> None:
    boot = _bootstrap()
    reg = Node(name=b"f", path=b"/f", mode=stat.S_IFREG | 0o644)
    boot._place_other(reg, None)
    assert (reg.v6_offset, reg.v6_datalayout, boot.alloc.offset) == (
        0,
        L.EROFS_INODE_CHUNK_BASED,
        32,
    )

    d = _dir()
    expected = [
        # d_size, layout, inode offset, dirents offset (None: not asserted), allocator offset
        (4064, L.EROFS_INODE_FLAT_INLINE, 4096, None, 8192),
        (4096, L.EROFS_INODE_FLAT_PLAIN, 32, 8192, 8192 + 4096),
        (8160, L.EROFS_INODE_FLAT_INLINE, 8192 + 4096, 8192 + 4096 + 4096, 8192 + 4096 + 8192),
        (8161, L.EROFS_INODE_FLAT_PLAIN, 64, 8192 + 4096 + 8192, 8192 + 4096 + 8192 + 8192),
        (4096 + 3968, L.EROFS_INODE_FLAT_INLINE, 96, 8192 + 4096 + 8192 + 8192,
         8192 + 4096 + 8192 + 8192 + 4096),
        (4096 + 2048, L.EROFS_INODE_FLAT_INLINE, 8192 + 4096 + 8192 + 8192 + 4096,
         8192 + 4096 + 8192 + 8192 + 4096 + 4096, 8192 + 4096 + 8192 + 8192 + 4096 + 8192),
    ]  # fmt: skip
    for d_size, layout, offset, dirents, after in expected:
        boot._place_with_tail(d, d_size)
        boot.alloc.align(L.EROFS_INODE_SLOT_SIZE)
        assert d.v6_datalayout == layout, d_size
        assert d.v6_offset == offset, d_size
        if dirents is not None:
            assert d.v6_dirents_offset == dirents, d_size
        assert boot.alloc.offset == after, d_size

    base = 8192 + 4096 + 8192 + 8192 + 4096 + 8192
    boot._place_with_tail(d, 1985)
    assert d.v6_datalayout == L.EROFS_INODE_FLAT_INLINE
    assert d.v6_offset == base
    assert boot.alloc.offset == base + 32 + 1985
    boot.alloc.align(L.EROFS_INODE_SLOT_SIZE)

    boot._place_with_tail(d, 1984)
    assert d.v6_datalayout == L.EROFS_INODE_FLAT_INLINE
    assert d.v6_offset == 8192 + 4096 + 8192 + 8192 + 4096 + 2048 + 32
    assert boot.alloc.offset == base + L.align(32 + 1985, 32)


def test_chunk_addr_roundtrip() -> None:
    for blob, index, blk in [(0, 0, 0), (3, 0x12345, 77), (253, (1 << 24) - 1, 2**32 - 1)]:
        raw = L.ChunkAddr(blob, index, blk).pack()
        assert L.ChunkAddr.unpack_from(raw, 0) == L.ChunkAddr(blob, index, blk)


def test_xattr_body_roundtrip() -> None:
    pairs = [(b"security.capability", b"\x01" * 20), (b"trusted.x", b""), (b"user.a", b"v" * 7)]
    body = L.pack_xattrs(pairs)
    assert len(body) == L.xattr_body_size(pairs)
    assert L.xattr_body_from_icount(L.xattr_icount(pairs)) == len(body)
    assert L.unpack_xattrs(body) == pairs
