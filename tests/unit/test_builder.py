"""Builder behaviour users notice: prefetch, determinism, whiteouts, big files, bad input."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from nydusfs.cli.nydus_image import main as nydus_image
from nydusfs.errors import BuildError
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.rafs.layout import v6 as L
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.rafs.v6 import RafsV6Inode
from nydusfs.storage import compress
from nydusfs.types import Compressor, SuperFlags
from tests.helpers.image import file_bytes


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc/passwd").write_bytes(b"root:x:0:0\n" * 100)
    (root / "usr/bin/sh").write_bytes(os.urandom(300_000))
    (root / "usr/bin/ls").write_bytes(os.urandom(5000))
    (root / "big").write_bytes(os.urandom(70_000))
    (root / "empty").write_bytes(b"")
    return root


def _build(src: Path, out: Path, **kw: object) -> tuple[Path, RafsSuper]:
    out.mkdir(exist_ok=True)
    boot = out / "boot"
    build(BuildOptions(source=str(src), bootstrap=str(boot), blob_dir=str(out), **kw))  # type: ignore[arg-type]
    return boot, RafsSuper.load(boot)


def test_prefetch_table_and_data_order(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    patterns = [b"/usr/bin", b"/etc/passwd", b"/usr/bin/ls", b"relative", b"/missing"]
    _, sup = _build(
        src, tmp_path / "out", prefetch_policy="fs", prefetch_patterns=patterns, chunk_size=0x1000
    )
    # Exact matches only, in pattern order; /usr/bin/ls is covered by /usr/bin.
    usr_bin = sup.lookup_path("/usr/bin").ino
    passwd = sup.lookup_path("/etc/passwd").ino
    assert sup.prefetch_table == [usr_bin, passwd]
    # Prefetched files come first in the blob, in pattern order, then the rest in inode order.
    first = {
        p: min(c.compressed_offset for c in sup.lookup_path(p).chunks())
        for p in ("/usr/bin/ls", "/usr/bin/sh", "/etc/passwd", "/big")
    }
    assert first["/usr/bin/ls"] < first["/usr/bin/sh"] < first["/etc/passwd"] < first["/big"]


def test_builds_are_deterministic(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    a, _ = _build(src, tmp_path / "a", blob_toc=True)
    b, _ = _build(src, tmp_path / "b", blob_toc=True, threads=1)
    assert a.read_bytes() == b.read_bytes()
    blobs_a = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != "boot")
    blobs_b = sorted(p.name for p in (tmp_path / "b").iterdir() if p.name != "boot")
    assert blobs_a == blobs_b
    assert (tmp_path / "a" / blobs_a[0]).read_bytes() == (tmp_path / "b" / blobs_b[0]).read_bytes()


def test_repeatable_drops_owners(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    if os.geteuid() == 0:
        os.chown(src / "big", 1234, 5678)
    _, sup = _build(src, tmp_path / "out", repeatable=True)
    assert not sup.meta.flags & SuperFlags.EXPLICIT_UID_GID
    assert {(i.uid, i.gid) for _, i in sup.walk()} == {(0, 0)}


@pytest.mark.parametrize("spec", ["oci", "overlayfs", "none"])
def test_whiteouts_in_a_single_layer(tmp_path: Path, spec: str) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / ".wh.gone").write_bytes(b"")
    (src / "d/.wh..wh..opq").write_bytes(b"")
    (src / "keep").write_bytes(b"x")
    if os.geteuid() == 0:
        os.mknod(src / "cdev-whiteout", stat.S_IFCHR | 0o600, 0)
        os.setxattr(src / "d", "trusted.overlay.opaque", b"y")
    _, sup = _build(src, tmp_path / "out", whiteout_spec=spec)
    names = {p for p, _ in sup.walk()}
    assert b"/keep" in names
    assert (b"/.wh.gone" in names) == (spec != "oci")
    assert (b"/d/.wh..wh..opq" in names) == (spec != "oci")
    if os.geteuid() == 0:
        assert (b"/cdev-whiteout" in names) == (spec != "overlayfs")
        # An overlayfs opaque directory keeps the xattr that makes it opaque.
        assert sup.lookup_path("/d").get_xattr(b"trusted.overlay.opaque") == b"y"


def test_file_larger_than_4gib(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = (4 << 30) + 4097
    with open(src / "huge", "wb") as f:
        f.truncate(size)
        f.seek(size - 5)
        f.write(b"tail!")
    _, sup = _build(src, tmp_path / "out", compressor=Compressor.ZSTD)
    inode = sup.lookup_path("/huge")
    assert isinstance(inode, RafsV6Inode)
    assert inode.size == size
    assert inode.inode_size == L.INODE_EXTENDED.size  # compact inodes hold 32-bit sizes
    chunks = inode.chunks()
    assert len(chunks) == -(-size // 0x100000)
    # Zero chunks deduplicate to one stored chunk plus the distinct tail.
    assert sup.blobs[0].chunk_count == 2
    last = chunks[-1]
    assert last.file_offset == (len(chunks) - 1) * 0x100000
    assert last.uncompressed_size == size - last.file_offset
    blob = sup.blobs[0]
    with open(tmp_path / "out" / blob.blob_id, "rb") as f:
        payload = os.pread(f.fileno(), last.compressed_size, last.compressed_offset)
    data = compress.decompress(blob.compressor, payload, last.uncompressed_size)
    assert data.endswith(b"tail!") and data.count(0) == len(data) - 5


def test_file_bytes_of_sparse_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(3 * 0x1000 + 10)
        f.write(b"end")
    _, sup = _build(src, tmp_path / "out", chunk_size=0x1000)
    inode = sup.lookup_path("/sparse")
    assert file_bytes(sup, inode, tmp_path / "out") == (src / "sparse").read_bytes()


def test_image_without_data_has_no_blob(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "e").write_bytes(b"")
    os.symlink("d", src / "l")
    _, sup = _build(src, tmp_path / "out")
    assert sup.blobs == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["boot"]
    assert sup.meta.root_ino == 128  # upstream's root nid with an empty blob table
    assert {p for p, _ in sup.walk()} == {b"/", b"/d", b"/e", b"/l"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0x1001}, "invalid chunk size"),
        ({"chunk_size": 0x800}, "invalid chunk size"),
        ({"fs_version": 5}, "fs-version 6"),
        ({"source_type": "estargz-ref"}, "unsupported source type"),
        ({"whiteout_spec": "aufs"}, "whiteout spec"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path: Path, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    src = _tree(tmp_path / "src")
    with pytest.raises(BuildError, match=message):
        build(
            BuildOptions(
                source=str(src), bootstrap=str(tmp_path / "b"), blob_dir=str(tmp_path), **kwargs
            )
        )
    assert not (tmp_path / "b").exists()


def test_cli_create_with_output_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _tree(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    rc = nydus_image(
        [
            "create", str(src), "--bootstrap", str(out / "boot"), "--blob-dir", str(out),
            "--compressor", "lz4_block", "--digester", "sha256", "--chunk-size", "0x10000",
            "--features", "blob-toc", "-J", str(tmp_path / "out.json"),
        ]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["bootstrap"] == str(out / "boot")
    assert result["fs_version"] == "6" and result["compressor"] == "lz4_block"
    assert len(result["blobs"]) == 1 and (out / result["blobs"][0]).is_file()
    sup = RafsSuper.load(out / "boot")
    assert sup.meta.chunk_size == 0x10000
    assert sup.blobs[0].blob_id == result["blobs"][0]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = nydus_image(
        ["create", str(tmp_path / "nope"), "-B", str(tmp_path / "b"), "-D", str(tmp_path)]
    )
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nydus-image: ") and "nope" in err[0]
