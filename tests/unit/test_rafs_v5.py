"""RAFS v5 reader: the upstream repeatable fixture, synthetic images, and corrupt bootstraps."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydusfs.errors import FormatError
from nydusfs.rafs.inode import RafsInode
from nydusfs.rafs.layout import v5 as layout
from nydusfs.rafs.layout.v5 import RafsV5InodeFlags, RafsV5InodeRecord
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.rafs.v5 import RafsV5Inode, RafsV5Super
from nydusfs.storage.device import ChunkInfo
from nydusfs.types import BlobFeatures, ChunkFlags, Compressor, Digester, SuperFlags
from tests.fixtures_path import UPSTREAM

REPEATABLE = UPSTREAM / "repeatable"
BOOTSTRAP = REPEATABLE / "sha256-nocompress-repeatable"
RESULT = REPEATABLE / "sha256-nocompress-repeatable.result"
BLOB_ID = "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"
BLOB = REPEATABLE / "blobs" / BLOB_ID
BOOT_BYTES = BOOTSTRAP.read_bytes()


@pytest.fixture(scope="module")
def sup() -> Iterator[RafsSuper]:
    with RafsSuper.load(BOOTSTRAP) as s:
        yield s


def load_v5(data: bytes) -> RafsV5Super:
    return RafsV5Super(data, None)


# --- the upstream fixture ------------------------------------------------------------------------


def parse_result() -> tuple[list[Any], dict[str, str]]:
    """The ``.result`` file: a ``tree -J`` listing followed by ``md5sum`` lines."""
    text = RESULT.read_text()
    listing, end = json.JSONDecoder().raw_decode(text)
    md5s = {}
    for line in text[end:].splitlines():
        if line.strip():
            digest, path = line.split(maxsplit=1)
            md5s[path] = digest
    return listing, md5s


def tree_entry(sup: RafsSuper, name: bytes, node: RafsInode) -> dict[str, Any]:
    """Our view of one entry, shaped like ``tree -J`` output."""
    if node.is_dir():
        return {
            "type": "directory",
            "name": name.decode(),
            "contents": [tree_entry(sup, n, sup.inode(i)) for n, i in node.children()],
        }
    if node.is_symlink():
        return {"type": "link", "name": name.decode(), "target": node.symlink().decode()}
    return {"type": "file", "name": name.decode()}


def strip_link_contents(entry: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in entry.items() if not (entry["type"] == "link" and k == "contents")}
    if "contents" in out:
        out["contents"] = [strip_link_contents(e) for e in out["contents"]]
    return out


def resolve(sup: RafsSuper, path: str) -> RafsInode | None:
    """Resolve ``path`` inside the image following symlinks, as ``tree`` did on the mount."""
    stack = [sup.root]
    parts = [p for p in path.split("/") if p not in ("", ".")]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if len(stack) > 1:
                stack.pop()
            continue
        if not stack[-1].is_dir():
            return None
        ino = stack[-1].lookup(part.encode())
        if ino is None:
            return None
        child = sup.inode(ino)
        if child.is_symlink():
            hops += 1
            if hops > 16:
                return None
            target = child.symlink().decode()
            if target.startswith("/"):
                stack = [sup.root]
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        stack.append(child)
    return stack[-1]


def file_content(sup: RafsSuper, node: RafsInode, blob: bytes) -> bytes:
    out = bytearray(node.size)
    for c in node.chunks():
        data = blob[c.compressed_offset : c.compressed_offset + c.compressed_size]
        out[c.file_offset : c.file_offset + len(data)] = data
    return bytes(out)


def test_superblock_meta_and_blobs(sup: RafsSuper) -> None:
    assert isinstance(sup, RafsV5Super)
    m = sup.meta
    assert (m.version, m.chunk_size, m.root_ino, m.block_size) == (5, 0x100000, 1, 4096)
    assert m.flags == SuperFlags.COMPRESSION_NONE | SuperFlags.HASH_SHA256
    assert m.compressor is Compressor.NONE and m.digester is Digester.SHA256
    assert not m.explicit_uidgid and not m.has_xattr
    assert m.inodes_count == 51
    assert sup.prefetch_table == []
    [blob] = sup.blobs
    assert blob.blob_id == BLOB_ID and blob.blob_index == 0
    assert blob.chunk_count == 23 and blob.chunk_size == 0x100000
    assert blob.compressed_size == blob.uncompressed_size == BLOB.stat().st_size
    assert blob.compressor is Compressor.NONE and blob.digester is Digester.SHA256
    assert blob.features == BlobFeatures(0)
    assert (blob.prefetch_offset, blob.prefetch_size) == (0, 0)


def test_tree_matches_result_listing(sup: RafsSuper) -> None:
    listing, _ = parse_result()
    tree, report = listing
    ours = tree_entry(sup, b"", sup.root)
    assert ours == strip_link_contents(tree)
    # tree counts symlinks by what they resolve to on the mounted image.
    dirs = files = 0
    for path, node in sup.walk():
        if node.ino == 1:
            continue
        if node.is_symlink():
            target = resolve(sup, path.decode())
            is_dir = target is not None and target.is_dir()
        else:
            is_dir = node.is_dir()
        dirs += is_dir
        files += not is_dir
    assert report == {"type": "report", "directories": dirs, "files": files}


def test_file_contents_and_chunk_digests(sup: RafsSuper) -> None:
    _, md5s = parse_result()
    blob = BLOB.read_bytes()
    seen = {}
    for path, node in sup.walk():
        if not node.is_reg():
            assert node.chunks() == []
            continue
        chunks = node.chunks()
        assert [c.file_offset for c in chunks] == sorted(c.file_offset for c in chunks)
        for c in chunks:
            assert not c.is_compressed and c.flags == ChunkFlags(0)
            assert c.compressed_size == c.uncompressed_size
            assert c.compressed_offset == c.uncompressed_offset
            data = blob[c.compressed_offset : c.compressed_offset + c.compressed_size]
            assert len(data) == c.uncompressed_size
            assert hashlib.sha256(data).digest() == c.digest
        assert sum(c.uncompressed_size for c in chunks) == node.size
        content = file_content(sup, node, blob)
        seen[path.decode()] = hashlib.md5(content).hexdigest()
    assert seen == md5s


def test_hardlinks_share_ino(sup: RafsSuper) -> None:
    paths = ["/hardlink-test/foo", "/hardlink-test/test.sh", "/normal-file-test/test.sh"]
    nodes = [sup.lookup_path(p) for p in paths]
    assert {n.ino for n in nodes} == {5}
    assert all(n.nlink == 3 and n.is_hardlink() for n in nodes)
    # The HARDLINK flag is not set by this builder; nlink alone makes a hardlink.
    assert all(isinstance(n, RafsV5Inode) for n in nodes)
    assert all(not n.flags & RafsV5InodeFlags.HARDLINK for n in nodes if isinstance(n, RafsV5Inode))
    links = [(p, n) for p, n in sup.walk() if n.ino == 5]
    assert [p for p, _ in links] == [p.encode() for p in paths]
    # Every other ino appears once.
    inos = [n.ino for _, n in sup.walk() if n.ino != 5]
    assert len(inos) == len(set(inos))


def test_attributes(sup: RafsSuper) -> None:
    root = sup.root
    assert (root.ino, root.parent, root.mode, root.nlink) == (1, 1, 0o40755, 5)
    assert isinstance(root, RafsV5Inode) and root.name == b"/"
    shadow = sup.lookup_path(
        "/normal-file-test/busybox/"
        "1f777dbdd68d1c4d554bc0d20e027bfef9ed2dfe2d8d5f029e958552a0e12475/etc/shadow"
    )
    assert (shadow.mode, shadow.size, shadow.uid, shadow.gid) == (0o100600, 243, 0, 0)
    assert (shadow.mtime, shadow.mtime_nsec, shadow.rdev) == (1668232305, 0, 0)
    layer = sup.lookup_path(
        "/normal-file-test/busybox/1f777dbdd68d1c4d554bc0d20e027bfef9ed2dfe2d8d5f029e958552a0e12475/layer.tar"
    )
    assert layer.size == 1415680 and layer.blocks == 2765 and len(layer.chunks()) == 2
    link = sup.lookup_path("/symlink-test/test.sh")
    assert link.is_symlink() and link.symlink() == b"../normal-file-test/test.sh"
    assert link.size == len(link.symlink()) and link.mode == 0o120777
    assert sup.lookup_path("/symlink-test/..").ino == 1
    assert sup.lookup_path("/normal-file-test/holefiles").parent == 3
    for _, node in sup.walk():
        assert node.xattrs() == [] and node.get_xattr(b"user.x") is None
        if not node.is_symlink():
            with pytest.raises(FormatError):
                node.symlink()


def test_lookup(sup: RafsSuper) -> None:
    d = sup.lookup_path("/normal-file-test/holefiles")
    names = [n for n, _ in d.children()]
    assert names == sorted(names) and len(names) == 10
    for name, ino in d.children():
        assert d.lookup(name) == ino
    for missing in (b"", b"a", b"chsum0", b"zzz", b"mid-non-hole-2048"):
        assert d.lookup(missing) is None
    assert sup.lookup_path("/hardlink-test/foo").lookup(b"x") is None
    with pytest.raises(FileNotFoundError):
        sup.lookup_path("/nope")
    with pytest.raises(FormatError):
        sup.inode(0)
    with pytest.raises(FormatError):
        sup.inode(55)
    with pytest.raises(FormatError):  # table index 6 is a second link of ino 5
        sup.inode(6)


def test_load_paths_agree() -> None:
    with RafsSuper.load(BOOT_BYTES) as a, RafsSuper.load(BOOTSTRAP) as b:
        assert [(p, n.ino, n.mode) for p, n in a.walk()] == [
            (p, n.ino, n.mode) for p, n in b.walk()
        ]
    s = RafsSuper.load(BOOTSTRAP)
    s.close()
    s.close()


# --- synthetic images --------------------------------------------------------------------------


@dataclass
class Spec:
    name: bytes
    mode: int
    children: list[Spec] = field(default_factory=list)
    data: bytes = b""
    target: bytes = b""
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    link: str | None = None  # hardlink group
    rdev: int = 0
    flags: int = 0


@dataclass
class Built:
    image: bytes
    blob: bytes
    offsets: dict[int, int]  # table index -> record offset
    records: dict[int, RafsV5InodeRecord]


def build(
    root: Spec,
    *,
    chunk_size: int = 4096,
    flags: int = SuperFlags.COMPRESSION_NONE | SuperFlags.HASH_SHA256,
    ext: bool = True,
    prefetch: tuple[int, ...] = (),
) -> Built:
    """A v5 bootstrap laid out the way nydus-image does (same index and ino assignment)."""
    order: list[tuple[int, Spec, int, int]] = []  # (index, spec, ino, parent ino)
    groups: dict[str, list[int]] = {}
    child_index: dict[int, int] = {}
    counter = [1]

    def assign(node: Spec, ino: int) -> None:
        child_index[ino] = counter[0] + 1
        dirs = []
        for child in sorted(node.children, key=lambda c: c.name):
            counter[0] += 1
            index = counter[0]
            cino = index
            if child.link is not None:
                group = groups.setdefault(child.link, [])
                cino = group[0] if group else index
                group.append(index)
            order.append((index, child, cino, ino))
            if stat.S_ISDIR(child.mode):
                dirs.append((child, cino))
        for d, dino in dirs:
            assign(d, dino)

    order.append((1, root, 1, 0))
    assign(root, 1)
    entries = counter[0]
    blob = bytearray()
    chunk_no = 0
    payloads: dict[int, tuple[RafsV5InodeRecord, Spec, list[ChunkInfo]]] = {}
    chunk_cache: dict[str, list[ChunkInfo]] = {}
    for index, spec, ino, parent in order:
        chunks: list[ChunkInfo] = []
        if stat.S_ISREG(spec.mode):
            key = spec.link or f"#{index}"
            if key in chunk_cache:
                chunks = chunk_cache[key]
            else:
                for off in range(0, len(spec.data), chunk_size):
                    piece = spec.data[off : off + chunk_size]
                    chunks.append(
                        ChunkInfo(
                            digest=hashlib.sha256(piece).digest(),
                            blob_index=0,
                            flags=ChunkFlags(0),
                            compressed_offset=len(blob),
                            compressed_size=len(piece),
                            uncompressed_offset=len(blob),
                            uncompressed_size=len(piece),
                            file_offset=off,
                            index=chunk_no,
                        )
                    )
                    blob += piece
                    chunk_no += 1
                chunk_cache[key] = chunks
        nlink = len(groups[spec.link]) if spec.link else 1
        flag = spec.flags | (RafsV5InodeFlags.XATTR if spec.xattrs else 0)
        flag |= RafsV5InodeFlags.SYMLINK if stat.S_ISLNK(spec.mode) else 0
        size = len(spec.data) if stat.S_ISREG(spec.mode) else len(spec.target) or 4096
        rec = RafsV5InodeRecord(
            parent=parent,
            ino=ino,
            uid=1000 + index,
            gid=2000 + index,
            mode=spec.mode,
            size=size,
            blocks=(size + 511) // 512,
            flags=flag,
            nlink=nlink,
            child_index=child_index.get(ino, 0) if stat.S_ISDIR(spec.mode) else 0,
            child_count=len(spec.children) if stat.S_ISDIR(spec.mode) else len(chunks),
            name_size=len(spec.name),
            symlink_size=len(spec.target),
            rdev=spec.rdev,
            mtime_nsec=index,
            mtime=1_700_000_000 + index,
        )
        payloads[index] = (rec, spec, chunks)

    table_size = layout.align8(4 * entries)
    prefetch_off = layout.RAFSV5_SUPERBLOCK_SIZE + table_size
    blob_off = prefetch_off + layout.align8(4 * len(prefetch))
    blob_table = layout.pack_blob_table([layout.RafsV5BlobEntry("b" * 64)])
    ext_off = blob_off + len(blob_table)
    ext_table = layout.RafsV5ExtBlobEntry(chunk_no, 0, len(blob), len(blob)).pack() if ext else b""
    pos = ext_off + len(ext_table)
    offsets: dict[int, int] = {}
    records = b""
    for index in sorted(payloads):
        rec, spec, chunks = payloads[index]
        offsets[index] = pos
        raw = layout.pack_inode(rec, spec.name, spec.target, spec.xattrs, chunks)
        records += raw
        pos += len(raw)
    sb = layout.RafsV5SuperBlock(
        block_size=chunk_size,
        flags=flags,
        inodes_count=len({ino for _, _, ino, _ in order}),
        inode_table_offset=layout.RAFSV5_SUPERBLOCK_SIZE,
        prefetch_table_offset=prefetch_off,
        blob_table_offset=blob_off,
        inode_table_entries=entries,
        prefetch_table_entries=len(prefetch),
        blob_table_size=len(blob_table),
        extended_blob_table_entries=1 if ext else 0,
        extended_blob_table_offset=ext_off if ext else 0,
    )
    table = layout.pack_u32_table([offsets[i] >> 3 for i in range(1, entries + 1)])
    image = sb.pack() + table + layout.pack_u32_table(prefetch) + blob_table + ext_table + records
    return Built(image, bytes(blob), offsets, {i: p[0] for i, p in payloads.items()})


def sample_tree() -> Spec:
    data = bytes(range(256)) * 40  # 10240 bytes: 3 chunks of 4 KiB
    return Spec(
        b"/",
        0o40755,
        [
            Spec(b"a", 0o100644, data=data, link="h", xattrs=[(b"user.k", b"v")]),
            Spec(
                b"dir",
                0o40700,
                [
                    Spec(b"b", 0o100644, data=data, link="h", xattrs=[(b"user.k", b"v")]),
                    Spec(b"dev", 0o20600, rdev=0x0501),
                    Spec(b"empty", 0o100600),
                    Spec(b"sub", 0o40755, [Spec(b"fifo", 0o10644)]),
                ],
                xattrs=[
                    (b"security.selinux", b"label\0"),
                    (b"trusted.overlay.opaque", b"y"),
                    (b"system.posix_acl_access", b"\x02\x00\x00\x00"),
                ],
            ),
            Spec(b"l", 0o120777, target=b"dir/b"),
        ],
    )


def test_synthetic_image() -> None:
    built = build(sample_tree(), prefetch=(2, 3))
    sup = load_v5(built.image)
    assert sup.prefetch_table == [2, 3]
    assert [p for p, _ in sup.walk()] == [
        b"/", b"/a", b"/dir", b"/dir/b", b"/dir/dev", b"/dir/empty", b"/dir/sub",
        b"/dir/sub/fifo", b"/l",
    ]  # fmt: skip
    a, b = sup.lookup_path("/a"), sup.lookup_path("/dir/b")
    assert a.ino == b.ino == 2 and a.nlink == b.nlink == 2
    assert a.xattrs() == [(b"user.k", b"v")] and a.get_xattr(b"user.k") == b"v"
    assert [c.file_offset for c in a.chunks()] == [0, 4096, 8192]
    assert file_content(sup, b, built.blob) == bytes(range(256)) * 40
    d = sup.lookup_path("/dir")
    assert d.xattrs()[0] == (b"security.selinux", b"label\0")
    assert (d.uid, d.gid, d.mode) == (1003, 2003, 0o40700)
    dev = sup.lookup_path("/dir/dev")
    assert stat.S_ISCHR(dev.mode) and dev.rdev == 0x0501 and dev.chunks() == []
    assert sup.lookup_path("/dir/empty").chunks() == []
    assert sup.lookup_path("/dir/sub/fifo").parent == sup.lookup_path("/dir/sub").ino
    assert sup.lookup_path("/l").symlink() == b"dir/b"
    assert sup.blobs[0].features == BlobFeatures(0) and sup.blobs[0].chunk_count == 3


def test_without_extended_blob_table_and_explicit_uidgid() -> None:
    flags = SuperFlags.COMPRESSION_ZSTD | SuperFlags.EXPLICIT_UID_GID | SuperFlags.HAS_XATTR
    sup = load_v5(build(sample_tree(), ext=False, flags=flags).image)
    [blob] = sup.blobs
    assert blob.features == BlobFeatures.V5_NO_EXT_BLOB_TABLE and blob.chunk_count == 0
    assert blob.compressor is Compressor.ZSTD and blob.digester is Digester.BLAKE3
    assert sup.meta.explicit_uidgid and sup.meta.has_xattr
    assert sup.lookup_path("/dir/sub").uid == 1008  # on-disk values whatever the flag says


def test_has_hole_chunks_map_by_file_offset() -> None:
    root = Spec(b"/", 0o40755, [Spec(b"f", 0o100644, data=b"x" * 8192)])
    built = build(root)
    rec = built.records[2]
    off = built.offsets[2]
    img = bytearray(built.image)
    # Drop the first chunk: the second now starts the list at file offset 4096.
    chunk_off = off + rec.fixed_size
    del img[chunk_off : chunk_off + 80]
    rec.child_count = 1
    img[off : off + 128] = rec.pack()
    img += bytes(80)  # keep the size a multiple of 8 and every offset in place
    with pytest.raises(FormatError, match="expected 0"):
        load_v5(bytes(img)).inode(2).chunks()
    rec.flags |= RafsV5InodeFlags.HAS_HOLE
    img[off : off + 128] = rec.pack()
    [chunk] = load_v5(bytes(img)).inode(2).chunks()
    assert chunk.file_offset == 4096


def patch_record(built: Built, index: int, **changes: int) -> bytes:
    rec = built.records[index]
    for k, v in changes.items():
        setattr(rec, k, v)
    img = bytearray(built.image)
    img[built.offsets[index] : built.offsets[index] + 128] = rec.pack()
    return bytes(img)


@pytest.mark.parametrize(
    ("index", "changes", "message"),
    [
        (1, {"mode": 0o20644}, "not a directory"),
        (3, {"child_index": 3}, "children"),
        (3, {"child_count": 40}, "children"),
        (5, {"child_count": 5}, "chunks for"),
        (4, {"symlink_size": 0}, "empty target"),
        (4, {"name_size": 0}, "name size"),
        (4, {"nlink": 0}, "nlink"),
        (4, {"parent": 0}, "no parent"),
        (4, {"parent": 9}, "not below"),
        (4, {"ino": 99}, "out of range"),
        (4, {"mode": 0o170644}, "file type"),
        (2, {"flags": 0}, "chunk 0"),  # chunks are read where the xattr table is
    ],
)
def test_corrupt_records(index: int, changes: dict[str, int], message: str) -> None:
    built = build(sample_tree())
    img = patch_record(built, index, **changes)
    with pytest.raises(FormatError, match=message):
        walk_everything(RafsSuper.load(img))


def test_directory_cannot_contain_itself() -> None:
    built = build(sample_tree())
    img = bytearray(built.image)
    # /dir/sub (table index 8) points at /dir's own record: a cycle in a naive reader.
    table = layout.RAFSV5_SUPERBLOCK_SIZE
    img[table + 4 * 7 : table + 4 * 8] = (built.offsets[3] >> 3).to_bytes(4, "little")
    with pytest.raises(FormatError, match=r"is not a hardlink|names parent"):
        walk_everything(load_v5(bytes(img)))
    # A "hardlink" entry in /dir whose ino is /dir itself.
    img = patch_record(build(sample_tree()), 5, ino=3)
    with pytest.raises(FormatError, match="not a hardlinked file"):
        walk_everything(load_v5(img))
    # A child range that reaches back to the directory itself.
    with pytest.raises(FormatError, match="children"):
        walk_everything(load_v5(patch_record(build(sample_tree()), 3, child_index=2)))


def test_corrupt_tables() -> None:
    built = build(sample_tree(), prefetch=(2,))

    def with_sb(**changes: int) -> bytes:
        sb = layout.RafsV5SuperBlock.unpack_from(built.image)
        for k, v in changes.items():
            setattr(sb, k, v)
        return sb.pack() + built.image[8192:]

    cases = {
        "version": with_sb(fs_version=0x400),
        "superblock size": with_sb(sb_size=4096),
        "chunk size": with_sb(block_size=0x3000),
        "unknown flags": with_sb(flags=0x400),
        "inode table": with_sb(inode_table_entries=1 << 30),
        "inodes count": with_sb(inodes_count=100),
        "blob table": with_sb(blob_table_offset=8192),
        "aligned": with_sb(blob_table_offset=8193 + 4),
        "extended blob table": with_sb(extended_blob_table_offset=8192),
        "prefetch table": with_sb(prefetch_table_offset=8192),
    }
    for message, image in cases.items():
        with pytest.raises(FormatError, match=message):
            load_v5(image)
    with pytest.raises(FormatError, match="beyond"):
        img = bytearray(built.image)
        at = layout.RafsV5SuperBlock.unpack_from(built.image).prefetch_table_offset
        img[at : at + 4] = (77).to_bytes(4, "little")
        _ = load_v5(bytes(img)).prefetch_table
    with pytest.raises(FormatError, match="multiple of 8"):
        load_v5(built.image + b"\0")


# --- layout helpers ----------------------------------------------------------------------------


def test_layout_round_trips() -> None:
    chunk = ChunkInfo(bytes(range(32)), 3, ChunkFlags.COMPRESSED | ChunkFlags.HAS_CRC32,
                      10, 20, 30, 40, 50, 60, 0xDEADBEEF)  # fmt: skip
    raw = layout.pack_chunk_info(chunk)
    assert len(raw) == layout.CHUNK_INFO_V5.size == 80
    assert layout.unpack_chunk_info(b"\0" * 8 + raw, 8) == chunk
    chunk.flags = ChunkFlags.COMPRESSED  # crc32 only counts with HAS_CRC32
    assert layout.unpack_chunk_info(layout.pack_chunk_info(chunk), 0).crc32 == 0
    with pytest.raises(FormatError):
        layout.unpack_chunk_info(raw, 8)
    with pytest.raises(FormatError, match="unknown flags"):
        layout.unpack_chunk_info(raw[:36] + b"\x00\x01\x00\x00" + raw[40:], 0)

    entries = [layout.RafsV5BlobEntry("a" * 64, 1, 2), layout.RafsV5BlobEntry("b" * 3, 3, 4)]
    table = layout.pack_blob_table(entries)
    assert len(table) % 8 == 0 and table.count(b"\0" + b"\x03") == 1
    assert layout.unpack_blob_table(table) == entries
    assert layout.pack_blob_table([]) == b"" and layout.unpack_blob_table(b"") == []
    with pytest.raises(FormatError, match="UTF-8"):
        layout.unpack_blob_table(b"\0" * 8 + b"\xff")

    pairs = [(b"user.a", b""), (b"trusted.b", b"\0\1")]
    packed = layout.pack_xattrs(pairs)
    size, total = layout.xattr_table_extent(packed, 0)
    assert size == layout.xattrs_content_size(pairs) == 4 + 7 + 4 + 12 and total == len(packed)
    assert layout.unpack_xattrs(packed[8 : 8 + size]) == pairs
    assert layout.pack_xattrs([]) == b""
    for bad in (b"\x03\0\0\0ab", b"\x09\0\0\0user.a\0v", b"\x02\0\0\0x\0", b"\x01\0"):
        with pytest.raises(FormatError):
            layout.unpack_xattrs(bad)
    with pytest.raises(FormatError, match="prefix"):
        layout.pack_xattrs([(b"other.x", b"")])
    with pytest.raises(FormatError, match="64 KiB"):
        layout.pack_xattrs([(b"user.x", bytes(0x10001))])

    sb = layout.RafsV5SuperBlock(flags=9, inodes_count=3, extended_blob_table_offset=1 << 40)
    assert layout.RafsV5SuperBlock.unpack_from(sb.pack()) == sb
    rec = RafsV5InodeRecord(digest=b"d" * 32, ino=7, mode=0o100644, name_size=3, mtime=1 << 40)
    assert RafsV5InodeRecord.unpack_from(rec.pack(), 0) == rec
    assert rec.fixed_size == 136
    with pytest.raises(FormatError):
        RafsV5InodeRecord(ino=-1).pack()


# --- corruption --------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Turn a hang into a test failure (hypothesis' deadline only measures finished runs)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def walk_everything(sup: RafsSuper) -> int:
    """Touch every attribute, listing, xattr and chunk list the reader offers."""
    touched = len(sup.blobs) + len(sup.prefetch_table) + sup.meta.chunk_size
    for _, node in sup.walk():
        touched += node.mode + node.uid + node.gid + node.nlink + node.size + node.rdev
        touched += node.mtime + node.mtime_nsec + node.blocks + node.parent + node.ino
        if node.is_symlink():
            touched += len(node.symlink())
        touched += sum(len(k) + len(v) for k, v in node.xattrs())
        touched += sum(c.uncompressed_size for c in node.chunks())
        for name, ino in node.children():
            touched += ino
            node.lookup(name)
        node.lookup(b"\xff")
    return touched


def load_and_walk(data: bytes) -> None:
    with time_limit(10):
        try:
            sup = RafsSuper.load(data)
            walk_everything(sup)
            sup.close()
        except FormatError as e:
            # The walk's depth guard firing means the reader let a directory contain itself.
            assert "deeper than" not in str(e)


def test_walk_everything_on_fixture() -> None:
    assert walk_everything(RafsSuper.load(BOOT_BYTES)) > 0


_flips = st.lists(
    st.tuples(
        st.one_of(
            st.integers(0, 79),  # superblock fields
            st.integers(8192, len(BOOT_BYTES) - 1),  # tables and records
            st.integers(0, len(BOOT_BYTES) - 1),
        ),
        st.integers(1, 255),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(_flips)
def test_random_byte_flips(flips: list[tuple[int, int]]) -> None:
    data = bytearray(BOOT_BYTES)
    for pos, mask in flips:
        data[pos] ^= mask
    load_and_walk(bytes(data))


@settings(max_examples=200, deadline=2000)
@given(st.data())
def test_random_values_in_fields(data: st.DataObject) -> None:
    """Overwrite whole u32/u64 words with edge values (flips rarely reach those)."""
    img = bytearray(BOOT_BYTES)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(img) // 4 - 2)) * 4
        width = data.draw(st.sampled_from([4, 8]))
        value = data.draw(
            st.one_of(
                st.sampled_from([0, 1, 2, 7, 8, 0x7F, 0xFFFF, 2**31, 2**32 - 1]),
                st.integers(0, 2 ** (8 * width) - 1),
            )
        )
        img[pos : pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    load_and_walk(bytes(img))


_RECORD_FIELDS = {  # name: (offset in the 128-byte header, struct code)
    "parent": (32, "Q"),
    "ino": (40, "Q"),
    "mode": (60, "I"),
    "flags": (80, "Q"),
    "nlink": (88, "I"),
    "child_index": (92, "I"),
    "child_count": (96, "I"),
}


@settings(max_examples=800, deadline=2000)
@given(st.sampled_from(["fixture", "synthetic"]), st.data())
def test_structural_mutations(which: str, data: st.DataObject) -> None:
    """Rewire the tree with plausible values: table entries, inos, parents, child ranges, types.

    Byte flips rarely produce a consistent-looking cycle; these mutations aim at one. Whatever
    loads must walk without visiting a directory twice.
    """
    image = BOOT_BYTES if which == "fixture" else build(sample_tree(), prefetch=(2, 3)).image
    img = bytearray(image)
    sb = layout.RafsV5SuperBlock.unpack_from(img)
    n = sb.inode_table_entries
    table = layout.unpack_u32_table(img, sb.inode_table_offset, n)
    for _ in range(data.draw(st.integers(1, 5))):
        if data.draw(st.booleans()):
            i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
            struct.pack_into("<I", img, sb.inode_table_offset + 4 * i, table[j])
            continue
        record = table[data.draw(st.integers(0, n - 1))] << 3
        name = data.draw(st.sampled_from(sorted(_RECORD_FIELDS)))
        at, code = _RECORD_FIELDS[name]
        if name == "mode":
            value = data.draw(st.sampled_from([0o40755, 0o100644, 0o120777, 0o20644]))
        elif name == "flags":
            value = data.draw(st.integers(0, 15))
        else:
            # Often reuse one of the record's own numbers: that is how a forged link or range
            # points back at an ancestor.
            rec = RafsV5InodeRecord.unpack_from(img, record)
            value = data.draw(
                st.one_of(
                    st.sampled_from([rec.parent, rec.ino, rec.child_index]),
                    st.integers(0, n + 2),
                )
            )
        struct.pack_into("<" + code, img, record + at, value)
    with time_limit(10):
        try:
            sup = RafsSuper.load(bytes(img))
            walk_everything(sup)
        except FormatError as e:
            assert "deeper than" not in str(e)
            return
    dirs = [node.ino for _, node in sup.walk() if node.is_dir()]
    assert len(dirs) == len(set(dirs))


@settings(max_examples=200, deadline=2000)
@given(st.integers(0, len(BOOT_BYTES) - 1))
def test_truncation_raises(cut: int) -> None:
    with time_limit(10), pytest.raises(FormatError):
        walk_everything(RafsSuper.load(BOOT_BYTES[:cut]))


def test_truncation_at_every_aligned_point() -> None:
    for cut in range(0, len(BOOT_BYTES), 8):
        with pytest.raises(FormatError):
            walk_everything(RafsSuper.load(BOOT_BYTES[:cut]))


def test_synthetic_corruption_is_bounded() -> None:
    """Flip every byte of a small synthetic image (with xattrs and hardlinks) once."""
    image = build(sample_tree(), prefetch=(2, 3)).image
    for pos in [*range(80), *range(8192, len(image))]:
        for mask in (0x01, 0x80, 0xFF):
            data = bytearray(image)
            data[pos] ^= mask
            load_and_walk(bytes(data))


def test_bootstrap_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "boot"
    path.write_bytes(build(sample_tree()).image)
    with RafsSuper.load(path) as sup:
        assert sup.path == str(path)
        assert sup.lookup_path("/dir/sub/fifo").is_dir() is False
