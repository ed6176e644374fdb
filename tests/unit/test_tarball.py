"""The tarball source (``--type tar-rafs|targz-rafs``): tars written with ``tarfile``, built into
an image, read back with the RAFS reader and compared with what the tar holds."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydusfs.errors import BuildError
from nydusfs.rafs.builder import tarball
from nydusfs.rafs.builder.blob import BlobOptions, BlobWriter
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.rafs.builder.node import Node
from nydusfs.rafs.inode import RafsInode
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage import compress
from nydusfs.types import Compressor
from tests.fixtures_path import UPSTREAM

CHUNK = 0x1000
MTIME = 1_650_000_000


@dataclass
class Item:
    """One tar member to write: a ``TarInfo`` plus the data of a regular file."""

    info: tarfile.TarInfo
    data: bytes = b""


def _info(name: str | bytes, kind: bytes, **attrs: object) -> tarfile.TarInfo:
    if isinstance(name, bytes):
        name = os.fsdecode(name)  # tarfile writes it back with surrogateescape
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644
    info.mtime = MTIME
    info.uid = info.gid = 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def reg(name: str | bytes, data: bytes = b"", **attrs: object) -> Item:
    info = _info(name, tarfile.REGTYPE, **attrs)
    info.size = len(data)
    return Item(info, data)


def dir_(name: str | bytes, **attrs: object) -> Item:
    return Item(_info(name, tarfile.DIRTYPE, **{"mode": 0o755, **attrs}))


def link(
    name: str | bytes, target: str | bytes, kind: bytes = tarfile.LNKTYPE, **attrs: object
) -> Item:
    linkname = os.fsdecode(target) if isinstance(target, bytes) else target
    mode = 0o777 if kind == tarfile.SYMTYPE else 0o644
    return Item(_info(name, kind, **{"linkname": linkname, "mode": mode, **attrs}))


def dev(name: str, kind: bytes, major: int = 0, minor: int = 0) -> Item:
    return Item(_info(name, kind, devmajor=major, devminor=minor))


def write_tar(
    path: Path, items: list[Item], fmt: int = tarfile.PAX_FORMAT, gz: bool = False
) -> Path:
    mode = "w:gz" if gz else "w"
    with tarfile.open(path, mode, format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for item in items:
            tf.addfile(item.info, io.BytesIO(item.data) if item.data else None)
    return path


@dataclass
class Image:
    sup: RafsSuper
    blob_dir: Path
    tree: dict[bytes, RafsInode]

    def data(self, path: bytes) -> bytes:
        inode = self.tree[path]
        out = bytearray()
        for chunk in inode.chunks():
            blob = self.sup.blobs[chunk.blob_index]
            with open(self.blob_dir / blob.blob_id, "rb") as f:
                f.seek(chunk.compressed_offset)
                payload = f.read(chunk.compressed_size)
            if chunk.is_compressed:
                payload = compress.decompress(blob.compressor, payload, chunk.uncompressed_size)
            assert len(payload) == chunk.uncompressed_size
            assert chunk.file_offset == len(out)
            out += payload
        assert len(out) == inode.size
        return bytes(out)


def build_image(
    tmp_path: Path,
    tar: Path,
    source_type: str = "tar-rafs",
    compressor: Compressor = Compressor.ZSTD,
    **opts: object,
) -> Image:
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir(exist_ok=True)
    bootstrap = tmp_path / "bootstrap"
    options = BuildOptions(
        source=str(tar),
        source_type=source_type,
        bootstrap=str(bootstrap),
        blob_dir=str(blob_dir),
        compressor=compressor,
        chunk_size=CHUNK,
        threads=2,
    )
    for key, value in opts.items():
        setattr(options, key, value)
    build(options)
    sup = RafsSuper.load(bootstrap)
    return Image(sup, blob_dir, dict(sup.walk()))


def build_nodes(tar: Path) -> dict[bytes, Node]:
    """The builder's own tree, for what compact inodes cannot show (mtime)."""
    writer = BlobWriter(io.BytesIO(), BlobOptions(chunk_size=CHUNK, threads=1))
    root = tarball.build_tree(str(tar), writer, "oci", gzipped=False)
    writer.finish()
    return {node.path: node for node in root.walk()}


def rand(n: int, seed: int) -> bytes:
    return (seed.to_bytes(4, "little") + os.urandom(60)) * (n // 64) + os.urandom(n % 64)


# --- every entry type ---------------------------------------------------------------------------
LONG = "d" * 60 + "/" + "e" * 70 + "/" + "long-file-name-" + "f" * 120  # > 100 and > 255 bytes
NON_UTF8 = b"caf\xe9/\xff\xfename"


def sample_items() -> list[Item]:
    big = rand(3 * CHUNK + 123, 1)
    return [
        dir_("./", mode=0o711, uid=7, gid=8, mtime=MTIME + 5),
        dir_("./etc", uid=1, gid=2),
        reg("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o600, uid=3, gid=4),
        reg("etc/empty", b""),
        reg("big.bin", big, mode=0o755),
        # Hard links share one inode; real tars repeat its attributes on every name.
        link("etc/passwd.link", "etc/passwd", mode=0o600, uid=3, gid=4),
        link("etc/sym", "../big.bin", tarfile.SYMTYPE),
        dev("dev/null", tarfile.CHRTYPE, 1, 3),
        dev("dev/sda", tarfile.BLKTYPE, 8, 0),
        dev("dev/big", tarfile.CHRTYPE, 4095, 0x12345),
        dev("run/fifo", tarfile.FIFOTYPE),
        reg(LONG, b"long name\n"),
        link("x/" + "l" * 150, LONG),
        link("x/long-symlink", "/" + "t" * 300, tarfile.SYMTYPE),
    ]


def expected_tree(items: list[Item]) -> dict[bytes, tuple[int, bytes | None]]:
    """path -> (mode, data or symlink target) as the tar describes it, implied parents included."""
    out: dict[bytes, tuple[int, bytes | None]] = {b"/": (stat.S_IFDIR | 0o755, None)}
    by_path: dict[bytes, bytes] = {}
    for item in items:
        info = item.info
        parts = [p for p in os.fsencode(info.name).split(b"/") if p not in (b"", b".")]
        for i in range(1, len(parts)):
            out.setdefault(b"/" + b"/".join(parts[:i]), (stat.S_IFDIR | 0o755, None))
        path = b"/" + b"/".join(parts)
        fmt = {
            tarfile.DIRTYPE: stat.S_IFDIR,
            tarfile.SYMTYPE: stat.S_IFLNK,
            tarfile.CHRTYPE: stat.S_IFCHR,
            tarfile.BLKTYPE: stat.S_IFBLK,
            tarfile.FIFOTYPE: stat.S_IFIFO,
        }.get(info.type, stat.S_IFREG)
        content: bytes | None = None
        if info.type == tarfile.SYMTYPE:
            content = os.fsencode(info.linkname)
        elif info.type == tarfile.LNKTYPE:
            content = by_path[b"/" + os.fsencode(info.linkname).lstrip(b"./")]
        elif info.isreg():
            content = item.data
            by_path[path] = item.data
        out[path] = (fmt | info.mode, content)
    return out


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize(
    ("source_type", "gz", "compressor"),
    [
        ("tar-rafs", False, Compressor.NONE),
        ("tar-rafs", False, Compressor.ZSTD),
        ("targz-rafs", True, Compressor.LZ4_BLOCK),
    ],
)
def test_every_entry_type(
    tmp_path: Path, fmt: int, source_type: str, gz: bool, compressor: Compressor
) -> None:
    items = sample_items()
    tar = write_tar(tmp_path / "layer.tar", items, fmt, gz)
    image = build_image(tmp_path, tar, source_type, compressor)
    want = expected_tree(items)
    assert sorted(image.tree) == sorted(want)
    for path, (mode, content) in want.items():
        inode = image.tree[path]
        assert inode.mode == mode, path
        if stat.S_ISREG(mode):
            assert image.data(path) == content, path
        elif stat.S_ISLNK(mode):
            assert inode.symlink() == content
            assert inode.size == len(content or b"")

    root = image.tree[b"/"]
    assert (root.mode, root.uid, root.gid) == (stat.S_IFDIR | 0o711, 7, 8)
    passwd, plink = image.tree[b"/etc/passwd"], image.tree[b"/etc/passwd.link"]
    assert (passwd.uid, passwd.gid) == (3, 4)
    assert passwd.ino == plink.ino and passwd.nlink == plink.nlink == 2
    assert list(passwd.chunks()) == list(plink.chunks())
    assert image.tree[b"/" + os.fsencode(LONG)].nlink == 2
    assert len(image.tree[b"/big.bin"].chunks()) == 4
    assert image.tree[b"/dev/null"].rdev == os.makedev(1, 3)
    assert image.tree[b"/dev/sda"].rdev == os.makedev(8, 0)
    assert image.tree[b"/dev/big"].rdev == os.makedev(4095, 0x12345) & 0xFFFF_FFFF
    assert (image.tree[b"/etc"].uid, image.tree[b"/etc"].gid) == (1, 2)
    assert (image.tree[b"/dev"].uid, image.tree[b"/dev"].mode) == (0, stat.S_IFDIR | 0o755)


def test_ustar_prefix_names(tmp_path: Path) -> None:
    # ustar stores names up to 255 bytes as prefix + "/" + name, without any extension.
    name = "p" * 90 + "/" + "q" * 90 + "/file"
    tar = write_tar(tmp_path / "l.tar", [reg(name, b"x")], tarfile.USTAR_FORMAT)
    image = build_image(tmp_path, tar)
    assert image.data(b"/" + name.encode()) == b"x"


def test_non_utf8_names(tmp_path: Path) -> None:
    items = [reg(NON_UTF8, b"bytes"), link(b"\x80link", NON_UTF8, tarfile.SYMTYPE)]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        tar = write_tar(tmp_path / f"{fmt}.tar", items, fmt)
        sub = tmp_path / f"out{fmt}"
        sub.mkdir()
        image = build_image(sub, tar)
        assert image.data(b"/" + NON_UTF8) == b"bytes"
        assert image.tree[b"/\x80link"].symlink() == NON_UTF8
        assert b"/caf\xe9" in image.tree


def test_file_data_in_tar_order(tmp_path: Path) -> None:
    # Upstream writes blob data in tar order, not in inode (name) order.
    items = [reg("z", rand(2 * CHUNK, 2)), reg("a", rand(CHUNK + 1, 3)), reg("m", rand(10, 4))]
    image = build_image(tmp_path, write_tar(tmp_path / "l.tar", items), compressor=Compressor.NONE)
    offsets = {p: [c.compressed_offset for c in image.tree[p].chunks()] for p in (b"/z", b"/a")}
    assert max(offsets[b"/z"]) < min(offsets[b"/a"])
    for item in items:
        assert image.data(b"/" + item.info.name.encode()) == item.data


def test_identical_files_share_chunks(tmp_path: Path) -> None:
    data = rand(2 * CHUNK, 5)
    items = [reg("one", data), reg("two", data)]
    image = build_image(tmp_path, write_tar(tmp_path / "l.tar", items))
    one, two = image.tree[b"/one"], image.tree[b"/two"]
    assert one.ino != two.ino
    assert [c.compressed_offset for c in one.chunks()] == [
        c.compressed_offset for c in two.chunks()
    ]
    assert image.data(b"/two") == data


# --- PAX ---------------------------------------------------------------------------------------
def test_pax_xattrs(tmp_path: Path) -> None:
    item = reg("f", b"data")
    item.info.pax_headers = {
        "SCHILY.xattr.user.comment": "hello",
        "SCHILY.xattr.security.capability": os.fsdecode(b"\x01\x00\x00\x02\xff\xfe"),
        "SCHILY.xattr.trusted.empty": "",
        "LIBARCHIVE.xattr.user.ignored": "aGVsbG8=",
    }
    d = dir_("d")
    d.info.pax_headers = {"SCHILY.xattr.trusted.overlay.opaque": "y"}
    tar = write_tar(tmp_path / "l.tar", [item, d, link("hl", "f")])
    image = build_image(tmp_path, tar)
    want = [
        (b"security.capability", b"\x01\x00\x00\x02\xff\xfe"),
        (b"trusted.empty", b""),
        (b"user.comment", b"hello"),
    ]
    assert sorted(image.tree[b"/f"].xattrs()) == want
    assert sorted(image.tree[b"/hl"].xattrs()) == want
    assert image.tree[b"/d"].xattrs() == [(b"trusted.overlay.opaque", b"y")]


def test_pax_xattr_with_unstorable_prefix(tmp_path: Path) -> None:
    item = reg("f")
    item.info.pax_headers = {"SCHILY.xattr.system.nfs4_acl": "x"}
    with pytest.raises(BuildError, match="prefix RAFS cannot store"):
        build_image(tmp_path, write_tar(tmp_path / "l.tar", [item]))


def test_pax_numbers(tmp_path: Path) -> None:
    # uid/gid beyond ustar's 7 octal digits live only in the PAX header; a fractional mtime
    # keeps upstream's whole seconds from the ustar field (tarfile rounds it there).
    big = reg("big.pyc", b"x", uid=3_000_000, gid=2_500_000, mtime=MTIME + 0.75)
    small = reg("frac", b"y", mtime=MTIME + 0.25)
    tar = write_tar(tmp_path / "l.tar", [big, small])
    nodes = build_nodes(tar)
    assert (nodes[b"/big.pyc"].uid, nodes[b"/big.pyc"].gid) == (3_000_000, 2_500_000)
    assert (nodes[b"/big.pyc"].mtime, nodes[b"/big.pyc"].mtime_nsec) == (MTIME + 1, 0)
    assert (nodes[b"/frac"].mtime, nodes[b"/frac"].mtime_nsec) == (MTIME, 0)
    image = build_image(tmp_path, tar)
    inode = image.tree[b"/big.pyc"]  # .pyc and a large uid force an extended inode
    assert (inode.uid, inode.gid, inode.mtime, inode.mtime_nsec) == (
        3_000_000,
        2_500_000,
        MTIME + 1,
        0,
    )


def test_pax_mtime_beyond_ustar(tmp_path: Path) -> None:
    # tarfile writes 0 into the ustar field when the time does not fit; the PAX value wins then.
    far = 8**11 + 5
    tar = write_tar(tmp_path / "l.tar", [reg("f", b"", mtime=far)])
    assert build_nodes(tar)[b"/f"].mtime == far


def test_pax_global_header(tmp_path: Path) -> None:
    # `git archive` starts with a global header; upstream rejects it, tar applies it.
    tar = tmp_path / "l.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "abc"}) as tf:
        info = _info("f", tarfile.REGTYPE)
        info.size = 2
        tf.addfile(info, io.BytesIO(b"ok"))
    image = build_image(tmp_path, tar)
    assert image.data(b"/f") == b"ok"


def pax_records(records: dict[bytes, bytes]) -> bytes:
    out = b""
    for key, value in records.items():
        body = b" " + key + b"=" + value + b"\n"
        digits = 1  # the length counts its own digits
        while len(str(len(body) + digits)) != digits:
            digits += 1
        out += str(len(body) + digits).encode() + body
    return out


def extended(kind: bytes, data: bytes) -> Item:
    """A raw GNU long name/link or PAX header member."""
    return Item(_info("././@Extended", kind, size=len(data)), data)


def test_pax_global_header_applies_and_unsets(tmp_path: Path) -> None:
    items = [
        extended(tarfile.XGLTYPE, pax_records({b"uid": b"5", b"gid": b"6"})),
        reg("a"),
        extended(tarfile.XGLTYPE, pax_records({b"uid": b""})),
        reg("b", uid=1),
    ]
    nodes = build_nodes(write_tar(tmp_path / "l.tar", items, tarfile.GNU_FORMAT))
    assert (nodes[b"/a"].uid, nodes[b"/a"].gid) == (5, 6)
    assert (nodes[b"/b"].uid, nodes[b"/b"].gid) == (1, 6)


def test_gnu_base256_numbers(tmp_path: Path) -> None:
    # The GNU format stores numbers too big for octal in base-256.
    items = [reg("f", b"x", uid=1 << 22, gid=(1 << 32) - 1, mtime=8**12)]
    nodes = build_nodes(write_tar(tmp_path / "l.tar", items, tarfile.GNU_FORMAT))
    assert (nodes[b"/f"].uid, nodes[b"/f"].gid, nodes[b"/f"].mtime) == (
        1 << 22,
        (1 << 32) - 1,
        8**12,
    )
    too_big = write_tar(tmp_path / "big.tar", [reg("f", uid=1 << 33)], tarfile.GNU_FORMAT)
    with pytest.raises(BuildError, match="out of range"):
        build_nodes(too_big)


def test_v7_directory(tmp_path: Path) -> None:
    # Old archives mark a directory by a trailing slash on a type '\0' member.
    items = [Item(_info("old/", tarfile.AREGTYPE, mode=0o700)), reg("old/f", b"1")]
    nodes = build_nodes(write_tar(tmp_path / "l.tar", items, tarfile.GNU_FORMAT))
    assert nodes[b"/old"].mode == stat.S_IFDIR | 0o700
    assert [c.name for c in nodes[b"/old"].children] == [b"f"]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([extended(tarfile.XHDTYPE, b"garbage\n"), reg("f")], "malformed PAX"),
        ([extended(tarfile.XHDTYPE, b"9 a=b\n"), reg("f")], "malformed PAX"),
        (
            [extended(tarfile.XHDTYPE, pax_records({b"GNU.sparse.major": b"1"})), reg("f")],
            "sparse files are not supported",
        ),
        ([Item(_info("s", tarfile.GNUTYPE_SPARSE))], "GNU sparse file"),
        ([reg("f"), extended(tarfile.GNUTYPE_LONGNAME, b"name\0")], "ends after an extended"),
        (
            [extended(b"L", b"a\0"), extended(b"L", b"b\0"), reg("f")],
            "two extended headers",
        ),
    ],
)
def test_bad_extended_headers(tmp_path: Path, items: list[Item], message: str) -> None:
    with pytest.raises(BuildError, match=message):
        build_nodes(write_tar(tmp_path / "l.tar", items, tarfile.GNU_FORMAT))


# --- tree shape ----------------------------------------------------------------------------------
def test_implicit_parents_and_root(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "l.tar", [reg("a/b/c/file", b"x", uid=5)])
    nodes = build_nodes(tar)
    for path in (b"/", b"/a", b"/a/b", b"/a/b/c"):
        node = nodes[path]
        assert (node.mode, node.uid, node.gid, node.mtime) == (stat.S_IFDIR | 0o755, 0, 0, 0)
    assert nodes[b"/a/b/c/file"].uid == 5
    assert nodes[b"/a/b/c/file"].mtime == MTIME


def test_root_entry_updates_root(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "l.tar", [reg("f"), dir_(".", mode=0o700, uid=9, mtime=MTIME)])
    nodes = build_nodes(tar)
    root = nodes[b"/"]
    assert (root.mode, root.uid, root.mtime, root.name) == (stat.S_IFDIR | 0o700, 9, MTIME, b"/")
    assert [c.name for c in root.children] == [b"f"]


def test_dir_entry_after_its_children(tmp_path: Path) -> None:
    items = [reg("d/sub/f", b"1"), reg("d/g", b"2"), dir_("d/", mode=0o750, uid=4, gid=6)]
    image = build_image(tmp_path, write_tar(tmp_path / "l.tar", items))
    d = image.tree[b"/d"]
    assert (d.mode, d.uid, d.gid) == (stat.S_IFDIR | 0o750, 4, 6)
    assert image.data(b"/d/sub/f") == b"1" and image.data(b"/d/g") == b"2"


def test_duplicate_entries_last_wins(tmp_path: Path) -> None:
    items = [
        reg("f", b"first"),
        link("keep", "f"),
        reg("f", b"second!", mode=0o600),
        reg("d/child", b"c"),
        reg("d", b"now a file"),
        reg("s", b"file"),
        link("s", "f", tarfile.SYMTYPE),
        dir_("x"),
        reg("x/y", b"y"),
        dir_("x", mode=0o700),
    ]
    image = build_image(tmp_path, write_tar(tmp_path / "l.tar", items))
    assert image.data(b"/f") == b"second!"
    assert image.tree[b"/f"].mode == stat.S_IFREG | 0o600
    assert image.data(b"/keep") == b"first"  # the link keeps the inode it was made to
    assert image.tree[b"/keep"].nlink == 1
    assert image.data(b"/d") == b"now a file" and b"/d/child" not in image.tree
    assert image.tree[b"/s"].symlink() == b"f"
    assert image.tree[b"/x"].mode == stat.S_IFDIR | 0o700 and image.data(b"/x/y") == b"y"


def test_path_normalisation(tmp_path: Path) -> None:
    items = [reg("./a//b/./c", b"1"), reg("/abs/file", b"2"), dir_("dir///")]
    image = build_image(tmp_path, write_tar(tmp_path / "l.tar", items, tarfile.GNU_FORMAT))
    assert image.data(b"/a/b/c") == b"1" and image.data(b"/abs/file") == b"2"
    assert image.tree[b"/dir"].is_dir()


@pytest.mark.parametrize(
    "items",
    [
        [reg("../escape", b"x")],
        [reg("a/../../escape", b"x")],
        [reg("ok"), link("l", "../ok")],
    ],
)
def test_dotdot_is_rejected(tmp_path: Path, items: list[Item]) -> None:
    with pytest.raises(BuildError, match=r"\.\."):
        build_image(tmp_path, write_tar(tmp_path / "l.tar", items))


def test_whiteouts_stay_in_the_tree(tmp_path: Path) -> None:
    items = [reg("d/.wh..wh..opq"), reg(".wh.gone"), dev("ovl", tarfile.CHRTYPE), reg("d/f")]
    image = build_image(tmp_path, write_tar(tmp_path / "l.tar", items))
    for path in (b"/d/.wh..wh..opq", b"/.wh.gone", b"/ovl", b"/d/f"):
        assert path in image.tree


def test_stargz_special_files_are_skipped(tmp_path: Path) -> None:
    items = [
        reg("stargz.index.json", b"{}"),
        reg(".prefetch.landmark", b"x"),
        reg("d/.prefetch.landmark"),
    ]
    image = build_image(tmp_path, write_tar(tmp_path / "l.tar", items))
    assert sorted(image.tree) == [b"/", b"/d", b"/d/.prefetch.landmark"]


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([link("l", "missing")], "not earlier in the tar"),
        ([dir_("d"), link("l", "d")], "not a regular file"),
        ([reg("a"), link("l", "a/b")], "not earlier in the tar"),
        ([link("s", "x", tarfile.SYMTYPE), link("l", "s")], "not a regular file"),
        ([reg("f"), reg("f/g")], "is not a directory"),
        ([reg("x" * 256)], "longer than 255"),
        ([Item(_info("v", b"V"))], "volume label"),
        ([Item(_info("q", b"Q"))], "unsupported tar entry"),
        ([link("s", "", tarfile.SYMTYPE)], "symlink target"),
        ([reg("f"), dir_("."), reg(".", b"")], "root of the image"),
    ],
)
def test_bad_entries(tmp_path: Path, items: list[Item], message: str) -> None:
    with pytest.raises(BuildError, match=message):
        build_image(tmp_path, write_tar(tmp_path / "l.tar", items, tarfile.GNU_FORMAT))


def test_truncated_and_corrupt(tmp_path: Path) -> None:
    raw = write_tar(tmp_path / "l.tar", [reg("a", rand(3 * CHUNK, 6)), reg("b", b"b")]).read_bytes()
    cases = {
        "data": raw[: 512 + CHUNK],  # inside a's data
        "header": raw[: 512 + 3 * CHUNK + 100],  # inside b's header
        "checksum": raw[:148] + b"9" + raw[149:],
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.tar"
        bad.write_bytes(blob)
        sub = tmp_path / name
        sub.mkdir()
        with pytest.raises(BuildError, match=r"truncated|checksum"):
            build_image(sub, bad)
    gz = tmp_path / "cut.tar.gz"
    gz.write_bytes(gzip.compress(raw)[:-100])
    sub = tmp_path / "gz"
    sub.mkdir()
    with pytest.raises(BuildError, match=r"cannot read tarball|truncated"):
        build_image(sub, gz, "targz-rafs")
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(BuildError, match="empty"):
        build_image(tmp_path, empty)


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="cannot open tarball"):
        build_image(tmp_path, tmp_path / "nope.tar")


# --- input shapes -----------------------------------------------------------------------------
def test_gzip_is_detected_by_magic(tmp_path: Path) -> None:
    items = [reg("f", b"hello")]
    plain = write_tar(tmp_path / "l.tar", items)
    packed = write_tar(tmp_path / "l.tar.gz", items, gz=True)
    for i, (tar, kind) in enumerate([(plain, "targz-rafs"), (packed, "tar-rafs")]):
        sub = tmp_path / str(i)
        sub.mkdir()
        assert build_image(sub, tar, kind).data(b"/f") == b"hello"


def test_concatenated_archives(tmp_path: Path) -> None:
    # Upstream reads past zero blocks (ignore_zeros), so `cat a.tar b.tar` holds both.
    first = write_tar(tmp_path / "1.tar", [reg("a", b"1")]).read_bytes()
    second = write_tar(tmp_path / "2.tar", [reg("b", b"2")]).read_bytes()
    both = tmp_path / "both.tar"
    both.write_bytes(first + second)
    image = build_image(tmp_path, both)
    assert image.data(b"/a") == b"1" and image.data(b"/b") == b"2"


def test_streams_from_a_fifo(tmp_path: Path) -> None:
    data = rand(5 * CHUNK + 7, 7)
    packed = write_tar(tmp_path / "l.tar.gz", [reg("f", data)], gz=True).read_bytes()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            for i in range(0, len(packed), 1000):
                f.write(packed[i : i + 1000])

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        image = build_image(tmp_path, fifo, "targz-rafs")
    finally:
        feeder.join()
    assert image.data(b"/f") == data


def test_only_directories_make_no_blob(tmp_path: Path) -> None:
    image = build_image(tmp_path, write_tar(tmp_path / "l.tar", [dir_("a"), reg("a/empty")]))
    assert image.sup.blobs == []
    assert image.tree[b"/a/empty"].size == 0


# --- the upstream fixture -------------------------------------------------------------------------
def _tar_listing(path: Path) -> Iterator[tarfile.TarInfo]:
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
        yield from tf.getmembers()


def test_upstream_all_entry_type_tar(tmp_path: Path) -> None:
    source = UPSTREAM / "all-entry-type.tar"
    image = build_image(tmp_path, source, compressor=Compressor.NONE)
    members = list(_tar_listing(source))
    want: dict[bytes, tarfile.TarInfo] = {}
    for info in members:
        want[b"/" + os.fsencode(info.name).strip(b"/")] = info
    assert sorted(image.tree) == sorted([b"/", *want])
    contents: dict[bytes, bytes] = {}
    with tarfile.open(source) as tf:
        for info in members:
            if info.isreg():
                f = tf.extractfile(info)
                assert f is not None
                contents[b"/" + os.fsencode(info.name)] = f.read()
    for path, info in want.items():
        inode = image.tree[path]
        assert stat.S_IMODE(inode.mode) == info.mode & 0o7777, path
        assert (inode.uid, inode.gid) == (info.uid, info.gid)
        if info.isdir():
            assert inode.is_dir()
        elif info.issym():
            assert inode.symlink() == os.fsencode(info.linkname)
        elif info.islnk():
            target = image.tree[b"/" + os.fsencode(info.linkname)]
            assert inode.ino == target.ino and inode.nlink == 4
            assert image.data(path) == contents[b"/" + os.fsencode(info.linkname)]
        else:
            assert info.isreg() and image.data(path) == contents[path]
