"""``nydus-image check | inspect | stat | unpack`` and ``LocalBlobReader``.

Run against the upstream v6 and v5 fixtures, and against images built here from directories
covering every file type; ``unpack`` output is extracted with GNU tar and compared with the source.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydusfs.cli.nydus_image import main
from nydusfs.errors import DigestMismatch, FormatError, NydusError
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.rafs.inode import RafsInode
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.rafs.unpack import TarEntry, encode_header, pax_record
from nydusfs.storage.device import BlobInfo, ChunkInfo
from nydusfs.storage.localblob import LocalBlobReader
from nydusfs.types import BlobFeatures, ChunkFlags, Compressor, Digester
from tests.fixtures_path import UPSTREAM
from tests.helpers.image import file_bytes
from tests.helpers.tree import diff_snapshots, snapshot

V6_BOOT = UPSTREAM / "rafs-v6-2.2.boot"
V6_BLOBS = UPSTREAM / "blobs"
V6_BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
V5_DIR = UPSTREAM / "repeatable"
V5_BOOT = V5_DIR / "sha256-nocompress-repeatable"
V5_BLOBS = V5_DIR / "blobs"
V5_BLOB_ID = "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"
IS_ROOT = os.geteuid() == 0
HAVE_TAR = shutil.which("tar") is not None

needs_tar = pytest.mark.skipif(not HAVE_TAR, reason="GNU tar is needed to extract")


def run(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> tuple[int, str, str]:
    rc = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str) -> None:
    assert rc == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("nydus-image:")]
    assert len(lines) == 1, err


def extract(tar_path: Path, dest: Path) -> None:
    dest.mkdir()
    proc = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-xpf", str(tar_path), "-C", str(dest)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no warnings (e.g. unknown PAX keywords)


# --- the upstream v6 fixture --------------------------------------------------------------------


def test_check_v6_fixture_with_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_json = tmp_path / "check.json"
    rc, out, _ = run(capsys, "check", V6_BOOT, "-D", V6_BLOBS, "-J", out_json)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "RAFS filesystem metadata is valid, referenced data blobs: "
    assert lines[1] == (
        f"\t 0: {V6_BLOB_ID}, compressed size 14554, uncompressed size 36864, chunk size: "
        "1048576, chunk count: 2, features: aligned cap_toc chunk-digest tar-header toc"
    )
    assert lines[2] == "RAFS filesystem data is valid: 2 chunks, 30331 bytes in 1 blobs"
    result = json.loads(out_json.read_text())
    assert list(result) == [
        "version", "bootstrap", "blobs", "external_bootstrap", "external_blobs", "trace",
        "fs_version", "compressor",
    ]  # fmt: skip
    assert result["blobs"] == [V6_BLOB_ID]
    assert (result["fs_version"], result["compressor"]) == ("6", "zstd")
    assert result["bootstrap"] == str(V6_BOOT)


def test_check_deprecated_bootstrap_flag_and_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "check", "-B", V6_BOOT, "-v")
    assert rc == 0
    assert 'inode: file "/lib.rs": ino 133 i_nlink 1 i_size 16931' in out
    assert "\t chunk: id f7e2735f1c6ae9cde91e537416b09d8bb71b306a421d19cc1012a51f93a7fe69, " in out
    assert "RAFS filesystem data is valid" not in out  # no -D: metadata only


def test_check_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "check")
    assert_one_line_error(rc, err)
    assert "missing parameter" in err
    rc, _, err = run(capsys, "check", V6_BOOT, "-B", V6_BOOT)
    assert_one_line_error(rc, err)
    rc, _, err = run(capsys, "check", V6_BOOT, "-D", "/nonexistent/dir")
    assert_one_line_error(rc, err)


def test_inspect_requests_v6(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "inspect", V6_BOOT, "-R", "stats")
    assert (rc, out) == (0, '{"inodes_count":3}\n')
    rc, out, _ = run(capsys, "inspect", V6_BOOT, "-R", "blobs")
    assert json.loads(out) == [
        {
            "blob_id": V6_BLOB_ID,
            "compressed_size": 14554,
            "decompressed_size": 36864,
            "readahead_offset": 0,
            "readahead_size": 0,
        }
    ]
    assert out.index("compressed_size") < out.index("decompressed_size")  # sorted keys
    rc, out, _ = run(capsys, "inspect", V6_BOOT, "-R", "prefetch")
    assert out == "[]\n"
    rc, out, _ = run(capsys, "inspect", V6_BOOT, "-R", "ls")
    assert out == '-    133      "lib.rs"\n-    136      "sync_io.rs"\nnull\n'
    rc, out, _ = run(capsys, "inspect", V6_BOOT, "-R", "stat sync_io.rs")
    assert rc == 0
    assert '\nInode Number:       136\nName:               "sync_io.rs"\n' in out
    assert "Mode:               0x81A4\nPermissions:        100644\n" in out
    assert "        0 ->\n        file offset: 0, chunk index: 1\n" in out
    assert "        compressed offset: 4828, decompressed offset: 20480\n" in out
    for bad in ("bogus", "help", "chunk x", "stat nothere"):
        rc, _, err = run(capsys, "inspect", V6_BOOT, "-R", bad)
        assert_one_line_error(rc, err)


def test_inspect_prompt_reads_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = "stats\nblobs\nfoo\nstat .\ncd lib.rs\nexit\nls\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(commands))
    rc, out, _ = run(capsys, "inspect", V6_BOOT)
    assert rc == 0
    assert "    Version:                6\n    Inodes Count:           3\n" in out
    assert "    Chunk Size:             1024KB\n" in out
    flags = "HASH_BLAKE3 | EXPLICIT_UID_GID | COMPRESSION_ZSTD | INLINED_CHUNK_DIGEST"
    assert f"    Flags:                  {flags}\n" in out
    assert "    Blob table offset:      0x1000\n" in out
    assert "Compressed Data Size:   7802\n" in out
    assert (
        "Features:               ALIGNED | INLINED_CHUNK_DIGEST | HAS_TAR_HEADER | HAS_TOC" in out
    )
    assert "Digester:               Blake3\n" in out
    assert "Unsupported command: foo\n" in out
    assert 'Name:               "/"\n' in out
    assert "lib.rs is not a directory\n" in out
    assert "Inspecting RAFS" not in out  # no prompt when stdin is not a terminal
    assert '"lib.rs"' not in out  # "ls" came after "exit"


def test_unpack_v6_fixture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tar_path = tmp_path / "out.tar"
    rc, _, _ = run(capsys, "unpack", V6_BOOT, "--output", tar_path, "-D", V6_BLOBS)
    assert rc == 0
    sup = RafsSuper.load(V6_BOOT)
    expected = {
        os.fsdecode(p.lstrip(b"/")): hashlib.sha256(file_bytes(sup, i, V6_BLOBS)).hexdigest()
        for p, i in sup.walk()
        if i.is_reg()
    }
    with tarfile.open(tar_path) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["lib.rs", "sync_io.rs"]
        got = {}
        for m in members:
            f = tf.extractfile(m)
            assert f is not None
            got[m.name] = hashlib.sha256(f.read()).hexdigest()
            assert m.mode == 0o644 and int(m.mtime) == 1676819553
        # The inode's nanoseconds survive in a PAX mtime record (upstream drops them).
        assert members[0].pax_headers["mtime"] == "1676819553.628661334"
    assert got == expected
    sizes = {m.name: m.size for m in members}
    assert sizes == {"lib.rs": 16931, "sync_io.rs": 13400}


def test_unpack_with_single_blob_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blob = tmp_path / "renamed.blob"
    shutil.copy(V6_BLOBS / V6_BLOB_ID, blob)
    rc, _, _ = run(capsys, "unpack", V6_BOOT, "--output", tmp_path / "a.tar", "-b", blob)
    assert rc == 0
    with tarfile.open(tmp_path / "a.tar") as tf:
        assert tf.getnames() == ["lib.rs", "sync_io.rs"]
    rc, _, err = run(capsys, "unpack", V6_BOOT, "--output", tmp_path / "b.tar")
    assert_one_line_error(rc, err)
    assert "--blob, --blob-dir or --backend-type must be specified" in err
    assert not (tmp_path / "b.tar").exists()


def test_stat_v6_fixture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, _ = run(capsys, "stat", "-B", V6_BOOT)
    assert rc == 0
    assert "\n\nBase Image Statistics:\n\nDirectories:            1\n" in out
    assert "Files:                  2\n" in out
    assert "Padding Size:           6533\nUncompressed Size:      36864\n" in out
    assert "Compressed Size:        7802\n" in out
    assert "\n14:\t\t\t1\n15:\t\t\t1\n" in out  # bit lengths of 13400 and 16931
    assert f"\n{V6_BLOB_ID}\t2\t2\t2\n" in out
    out_json = tmp_path / "stat.json"
    rc, _, _ = run(capsys, "stat", "-B", V6_BOOT, "-J", out_json)
    data = json.loads(out_json.read_text())
    assert list(data) == ["dedup_enabled", "target_enabled", "base_image", "target_image"]
    base = data["base_image"]
    assert list(base)[:10] == [
        "dirs", "files", "symlinks", "chunks", "file_size", "comp_size", "uncomp_size",
        "padding_size", "chunk_sizes", "file_sizes",
    ]  # fmt: skip
    assert (base["dirs"], base["files"], base["chunks"], base["file_size"]) == (1, 2, 2, 30331)
    assert base["chunk_sizes"] == [5 + 4, 3 + 2, 2 + 1, 2, 2, 2, 2, 2, 2]
    assert len(base["file_sizes"]) == 45 and base["file_sizes"][14:16] == [1, 1]
    assert (base["own_chunks"], base["own_uncomp_size"]) == (2, 30331)
    assert base["blobs"][0]["referenced_chunks"] == 2


# --- the upstream v5 fixture --------------------------------------------------------------------


def parse_v5_result() -> dict[str, str]:
    text = (V5_DIR / "sha256-nocompress-repeatable.result").read_text()
    _, end = json.JSONDecoder().raw_decode(text)
    return {p.lstrip("/"): d for d, p in (line.split() for line in text[end:].splitlines() if line)}


def test_check_v5_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "check", V5_BOOT, "-D", V5_BLOBS)
    assert rc == 0
    assert f"\t 0: {V5_BLOB_ID}, compressed size 3508766, uncompressed size 3508766" in out
    assert "chunk count: 23, features: \n" in out
    assert "RAFS filesystem data is valid: 23 chunks, 3508766 bytes in 1 blobs" in out


def test_inspect_v5_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "inspect", V5_BOOT, "-R", "icheck 5")
    assert rc == 0
    # The three paths of the hard-linked inode 5, each with its parent directory.
    assert "/hardlink-test/foo\n" in out and "/normal-file-test/test.sh\n" in out
    assert out.count("Inode Number:       5\n") == 3
    assert "Parent:             3\n" in out
    rc, out, _ = run(capsys, "inspect", V5_BOOT, "-R", "stats")
    assert out == '{"inodes_count":51}\n'


@needs_tar
def test_unpack_v5_fixture_matches_result(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tar_path = tmp_path / "v5.tar"
    rc, _, _ = run(capsys, "unpack", V5_BOOT, "--output", tar_path, "--blob-dir", V5_BLOBS)
    assert rc == 0
    dest = tmp_path / "x"
    extract(tar_path, dest)
    md5s = {}
    for path in sorted(dest.rglob("*")):
        if path.is_file() and not path.is_symlink():
            md5s[str(path.relative_to(dest))] = hashlib.md5(path.read_bytes()).hexdigest()
    assert md5s == parse_v5_result()
    # Hard links across directories, and symlinks kept verbatim.
    ino = (dest / "hardlink-test/foo").stat().st_ino
    assert (dest / "hardlink-test/test.sh").stat().st_ino == ino
    assert (dest / "normal-file-test/test.sh").stat().st_ino == ino
    assert os.readlink(dest / "symlink-test/root-1") == "/////////////////"
    with tarfile.open(tar_path) as tf:
        links = [m for m in tf.getmembers() if m.islnk()]
    assert sorted(m.linkname for m in links) == ["hardlink-test/foo"] * 2


def test_stat_blob_dir_dedup(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, _ = run(capsys, "stat", "-D", V5_DIR, "--digester", "sha256")
    assert rc == 0
    assert "Directories:            24\n" in out
    assert "\n\nChunk Deduplication Statistics:\n" in out
    rows = out.split("Uncomp Image Size\n", 1)[1].splitlines()
    assert rows and rows[0].startswith("1" + " " * 23 + "0x17")  # 23 distinct chunks, 1 image
    # With the default digester (blake3) upstream's dictionary ignores sha256 images.
    rc, out, _ = run(capsys, "stat", "-D", V5_DIR)
    assert out.endswith("Uncomp Image Size\n")


# --- images built here --------------------------------------------------------------------------

NON_UTF8 = b"caf\xe9-\xff"
DEEP = b"d" * 120 + b"/" + b"e" * 120


def make_source(root: Path) -> bytes:
    """Every file type and naming corner unpack must carry; returns the root as bytes."""
    src = os.fsencode(root)
    os.makedirs(src + b"/dir/sub")
    os.makedirs(src + b"/empty-dir")
    os.makedirs(src + b"/" + DEEP)
    open(src + b"/empty", "wb").close()
    with open(src + b"/small", "wb") as f:
        f.write(b"hello\n")
    # Several 4 KiB chunks, two identical zero chunks (deduplicated), and a partial tail.
    with open(src + b"/dir/multi", "wb") as f:
        f.write(os.urandom(3 * 4096) + bytes(8192) + os.urandom(100))
    with open(src + b"/" + DEEP + b"/" + b"f" * 200, "wb") as f:
        f.write(b"deep file\n")
    with open(src + b"/" + NON_UTF8, "wb") as f:
        f.write(b"non-utf8 name\n")
    os.link(src + b"/dir/multi", src + b"/dir/sub/multi-link")
    os.link(src + b"/small", src + b"/small-link")
    os.link(src + b"/" + DEEP + b"/" + b"f" * 200, src + b"/deep-link")
    os.symlink(b"../small", src + b"/dir/sym")
    os.symlink(b"t" * 300, src + b"/long-sym")
    os.symlink(NON_UTF8, src + b"/sym-" + NON_UTF8)
    os.mkfifo(src + b"/fifo")
    os.setxattr(src + b"/small", b"user.foo", b"bar")
    os.setxattr(src + b"/dir", b"user.bin", b"\x00\xff\x10\n")
    os.setxattr(src + b"/" + NON_UTF8, b"user.k", b"v" * 300)
    with open(src + b"/ts.pyc", "wb") as f:  # .pyc gets an extended inode: mtime is kept
        f.write(b"pyc")
    os.utime(src + b"/ts.pyc", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    os.chmod(src + b"/dir/sub", 0o1750)
    if IS_ROOT:
        os.mknod(src + b"/chr", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(src + b"/blk", 0o660 | stat.S_IFBLK, os.makedev(7, 300))
        os.setxattr(src + b"/dir/multi", b"trusted.t", b"v")
        os.chown(src + b"/small", 1234, 5678)
        os.chown(src + b"/empty", 3_000_000, 3_000_001)  # beyond ustar's 7 octal digits
        os.chmod(src + b"/small", 0o4755)  # after chown, which clears setuid
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(os.fsdecode(src + b"/sock"))
    finally:
        sock.close()
    return src


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    base = tmp_path_factory.mktemp("built")
    source = base / "src"
    source.mkdir()
    make_source(source)
    blobs = base / "blobs"
    blobs.mkdir()
    boot = base / "boot"
    build(
        BuildOptions(
            source=str(source),
            bootstrap=str(boot),
            blob_dir=str(blobs),
            compressor=Compressor.ZSTD,
            chunk_size=0x1000,
        )
    )
    yield source, boot, blobs


def test_check_built_image(
    capsys: pytest.CaptureFixture[str], built: tuple[Path, Path, Path]
) -> None:
    _, boot, blobs = built
    rc, out, err = run(capsys, "check", boot, "--blob-dir", blobs)
    assert rc == 0, err
    assert "features: aligned cap_toc" in out
    assert "RAFS filesystem data is valid" in out


@pytest.mark.parametrize("compressor", [Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.ZSTD])
@pytest.mark.parametrize("digester", [Digester.BLAKE3, Digester.SHA256])
def test_check_built_image_with_toc(
    capsys: pytest.CaptureFixture[str],
    built: tuple[Path, Path, Path],
    tmp_path: Path,
    compressor: Compressor,
    digester: Digester,
) -> None:
    """Blobs with a ToC: CI array, digest table, sections and data digest all check out."""
    source, _, _ = built
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    opts = BuildOptions(
        source=str(source), bootstrap=str(tmp_path / "boot"), blob_dir=str(blobs),
        compressor=compressor, digester=digester, chunk_size=0x1000, blob_toc=True,
    )  # fmt: skip
    build(opts)
    rc, out, err = run(capsys, "check", tmp_path / "boot", "-D", blobs)
    assert rc == 0, err
    assert "features: aligned cap_toc chunk-digest tar-header toc\n" in out
    # A flipped byte anywhere in the chunk data area is caught (by a chunk or the ToC digest).
    [blob_path] = blobs.iterdir()
    data = bytearray(blob_path.read_bytes())
    data[len(data) // 3] ^= 1
    blob_path.write_bytes(data)
    rc, _, err = run(capsys, "check", tmp_path / "boot", "-D", blobs)
    assert_one_line_error(rc, err)


def test_inspect_prefetch_table(
    capsys: pytest.CaptureFixture[str], built: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    source, _, _ = built
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    opts = BuildOptions(
        source=str(source), bootstrap=str(tmp_path / "boot"), blob_dir=str(blobs),
        prefetch_policy="fs", prefetch_patterns=[b"/dir", b"/small"],
    )  # fmt: skip
    build(opts)
    rc, out, _ = run(capsys, "inspect", tmp_path / "boot", "-R", "prefetch")
    assert rc == 0
    entries = json.loads(out)
    assert [e["path"] for e in entries] == [["/dir"], ["/small", "/small-link"]]
    sup = RafsSuper.load(tmp_path / "boot")
    assert [e["inode"] for e in entries] == sup.prefetch_table
    rc, out, _ = run(capsys, "inspect", tmp_path / "boot", "-R", "ls")
    assert f'{os.fsdecode(b"caf")}\\xE9-\\xFF"\n' in out  # Rust's escapes for invalid UTF-8


@needs_tar
def test_unpack_built_image_roundtrip(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    built: tuple[Path, Path, Path],
    tmp_path: Path,
) -> None:
    source, boot, blobs = built
    tar_path = tmp_path / "out.tar"
    rc, _, err = run(capsys, "unpack", boot, "--output", tar_path, "-D", blobs)
    assert rc == 0, err
    assert any("skipping socket /sock" in r.getMessage() for r in caplog.records)
    dest = tmp_path / "x"
    extract(tar_path, dest)
    want, got = snapshot(source), snapshot(dest)
    del want[b"/sock"]  # sockets cannot be stored in a tar
    # The root itself is not in the tar (as upstream); its attributes are the extractor's.
    assert diff_snapshots(want, got, ignore_paths=[b"/"]) == []
    ts = os.lstat(os.fsencode(dest) + b"/ts.pyc")
    assert ts.st_mtime_ns == 1_700_000_000_123_456_789
    with tarfile.open(tar_path, encoding="utf-8", errors="surrogateescape") as tf:
        names = tf.getnames()
        member = tf.getmember(os.fsdecode(b"d" * 120 + b"/" + b"e" * 120 + b"/" + b"f" * 200))
        assert member.isfile() and member.size == 10
        assert tf.getmember("deep-link").islnk()
        assert tf.getmember("long-sym").linkname == "t" * 300
        assert tf.getmember("dir").pax_headers["SCHILY.xattr.user.bin"] == "\x00\udcff\x10\n"
    assert os.fsdecode(NON_UTF8) in names
    assert "sock" not in names and "" not in names and "/" not in names


@needs_tar
def test_unpack_generated_tree(
    capsys: pytest.CaptureFixture[str], small_tree: Path, tmp_path: Path
) -> None:
    """The shared test tree (255-byte names, sparse files, capabilities, ...) round-trips."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "boot"
    build(BuildOptions(source=str(small_tree), bootstrap=str(boot), blob_dir=str(blobs)))
    rc, _, err = run(capsys, "check", boot, "-D", blobs)
    assert rc == 0, err
    tar_path = tmp_path / "t.tar"
    rc, _, err = run(capsys, "unpack", boot, "--output", tar_path, "-D", blobs)
    assert rc == 0, err
    dest = tmp_path / "x"
    extract(tar_path, dest)
    want = snapshot(small_tree)
    sockets = [p for p, e in want.items() if e["type"] == "sock"]
    assert diff_snapshots(want, snapshot(dest), ignore_paths=[b"/", *sockets]) == []


def test_unpack_streams_file_data(tmp_path: Path) -> None:
    """A 24 MiB file is unpacked chunk by chunk, never held whole in memory."""
    from nydusfs.rafs.unpack import unpack_to_path

    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(1 << 20) * 24
    (src / "big").write_bytes(big)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    build(BuildOptions(source=str(src), bootstrap=str(tmp_path / "boot"), blob_dir=str(blobs)))
    del big
    with RafsSuper.load(tmp_path / "boot") as sup, LocalBlobReader(blobs, blobs=sup.blobs) as r:
        tracemalloc.start()
        try:
            unpack_to_path(sup, r, str(tmp_path / "big.tar"))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 8 << 20
    with tarfile.open(tmp_path / "big.tar") as tf:
        assert tf.getmember("big").size == 24 << 20


def test_stat_target_and_dedup(
    capsys: pytest.CaptureFixture[str], built: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, boot, _ = built
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(boot, images / "a")
    shutil.copy(boot, images / "b")
    out_json = tmp_path / "s.json"
    rc, _, _ = run(capsys, "stat", "-D", images, "-T", boot, "-J", out_json)
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert data["dedup_enabled"] and data["target_enabled"]
    target, base = data["target_image"], data["base_image"]
    # Every chunk of the target is already in the base images.
    assert target["own_chunks"] == 0 and target["ref_chunks"] == base["own_chunks"] // 2
    assert base["dedup_chunks"] == base["own_chunks"] // 2
    assert base["files"] == 2 * target["files"]
    assert target["dedup_ratio"] > 1  # the two zero chunks of dir/multi share one


# --- corrupt input ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, 1024, 4096, 8192, 16384])
def test_check_truncated_bootstrap(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, size: int
) -> None:
    boot = tmp_path / "boot"
    boot.write_bytes(V6_BOOT.read_bytes()[:size])
    rc, _, err = run(capsys, "check", boot, "-D", V6_BLOBS)
    assert_one_line_error(rc, err)
    assert "failed to check bootstrap" in err or "bootstrap" in err


def test_check_truncated_v5_bootstrap(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.write_bytes(V5_BOOT.read_bytes()[:12000])
    rc, _, err = run(capsys, "check", boot)
    assert_one_line_error(rc, err)


@pytest.mark.parametrize("offset", [0, 100, 4900, 7801])
def test_check_blob_with_flipped_byte(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, offset: int
) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    data = bytearray((V6_BLOBS / V6_BLOB_ID).read_bytes())
    data[offset] ^= 0x40
    (blobs / V6_BLOB_ID).write_bytes(data)
    rc, _, err = run(capsys, "check", V6_BOOT, "-D", blobs)
    assert_one_line_error(rc, err)
    assert V6_BLOB_ID in err and "chunk" in err


def test_check_blob_with_flipped_byte_in_uncompressed_v5_data(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    data = bytearray((V5_BLOBS / V5_BLOB_ID).read_bytes())
    data[2734] ^= 1  # inside VERSION's chunk
    (blobs / V5_BLOB_ID).write_bytes(data)
    rc, _, err = run(capsys, "check", V5_BOOT, "-D", blobs)
    assert_one_line_error(rc, err)
    assert "sha256 digest mismatch" in err and "at compressed offset 0xaae" in err


def test_check_blob_of_wrong_size_or_missing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    rc, _, err = run(capsys, "check", V6_BOOT, "-D", blobs)
    assert_one_line_error(rc, err)
    assert "not found" in err
    (blobs / V6_BLOB_ID).write_bytes((V6_BLOBS / V6_BLOB_ID).read_bytes() + b"x")
    rc, _, err = run(capsys, "check", V6_BOOT, "-D", blobs)
    assert_one_line_error(rc, err)
    assert "14555 bytes" in err


def test_unpack_corrupt_blob_leaves_no_output(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    data = bytearray((V6_BLOBS / V6_BLOB_ID).read_bytes())
    data[10] ^= 0xFF
    (blobs / V6_BLOB_ID).write_bytes(data)
    out = tmp_path / "out.tar"
    rc, _, err = run(capsys, "unpack", V6_BOOT, "--output", out, "-D", blobs)
    assert_one_line_error(rc, err)
    assert not out.exists() and os.listdir(tmp_path) == ["blobs"]


def test_cli_subprocess_check_error_and_success(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "nydusfs.cli.nydus_image", "check", str(V6_BOOT), "-D"]
    ok = subprocess.run([*cmd, str(V6_BLOBS)], capture_output=True, text=True, env=env, cwd=repo)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("RAFS filesystem metadata is valid, referenced data blobs: \n")
    boot = tmp_path / "boot"
    boot.write_bytes(V6_BOOT.read_bytes()[:5000])
    bad = [sys.executable, "-m", "nydusfs.cli.nydus_image", "check", str(boot)]
    proc = subprocess.run(bad, capture_output=True, text=True, env=env, cwd=repo)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("nydus-image: ")


# --- tar encoding -------------------------------------------------------------------------------


def test_pax_record_length_counts_itself() -> None:
    for n in range(0, 2000, 7):
        rec = pax_record(b"k", b"v" * n)
        length, rest = rec.split(b" ", 1)
        assert int(length) == len(rec) and rest == b"k=" + b"v" * n + b"\n"


@needs_tar
def test_header_for_file_over_8_gib(tmp_path: Path) -> None:
    """Sizes of 8 GiB and more go to a PAX ``size`` record (the data here is a sparse hole)."""
    size = (9 << 30) + 5
    entry = TarEntry(name=b"huge", type=ord("0"), mode=0o600, size=size, mtime=1, uname=b"")
    path = tmp_path / "huge.tar"
    with open(path, "wb") as f:
        f.write(encode_header(entry))
        f.seek(size + (-size % 512), os.SEEK_CUR)
        f.write(bytes(1024))
    with tarfile.open(path) as tf:
        [member] = tf.getmembers()
        assert (member.name, member.size) == ("huge", size)
    listing = subprocess.run(["tar", "tvf", str(path)], capture_output=True, text=True)
    assert listing.returncode == 0 and str(size) in listing.stdout


# --- LocalBlobReader ----------------------------------------------------------------------------


class FakeInode(RafsInode):
    """A regular file made of given chunks (holes between them), for ``read_file``."""

    def __init__(self, size: int, chunks: list[ChunkInfo]) -> None:
        self.ino = 7
        self._size, self._chunks = size, chunks

    @property
    def mode(self) -> int:
        return stat.S_IFREG | 0o644

    @property
    def uid(self) -> int:
        return 0

    @property
    def gid(self) -> int:
        return 0

    @property
    def rdev(self) -> int:
        return 0

    @property
    def mtime(self) -> int:
        return 0

    @property
    def mtime_nsec(self) -> int:
        return 0

    @property
    def nlink(self) -> int:
        return 1

    @property
    def size(self) -> int:
        return self._size

    @property
    def parent(self) -> int:
        return 1

    def symlink(self) -> bytes:
        raise FormatError("not a symlink")

    def xattrs(self) -> list[tuple[bytes, bytes]]:
        return []

    def children(self) -> list[tuple[bytes, int]]:
        return []

    def lookup(self, name: bytes) -> int | None:
        return None

    def chunks(self) -> list[ChunkInfo]:
        return self._chunks


def raw_blob(tmp_path: Path, payload: bytes) -> tuple[BlobInfo, Path]:
    blob = BlobInfo(
        blob_index=0, blob_id="ab" * 32, chunk_size=4096, chunk_count=2,
        compressor=Compressor.NONE, digester=Digester.SHA256, features=BlobFeatures(0),
        compressed_size=len(payload), uncompressed_size=len(payload),
    )  # fmt: skip
    path = tmp_path / blob.blob_id
    path.write_bytes(payload)
    return blob, path


def chunk(data: bytes, offset: int, file_offset: int, index: int) -> ChunkInfo:
    return ChunkInfo(
        digest=hashlib.sha256(data).digest(), blob_index=0, flags=ChunkFlags(0),
        compressed_offset=offset, compressed_size=len(data), uncompressed_offset=offset,
        uncompressed_size=len(data), file_offset=file_offset, index=index,
    )  # fmt: skip


def test_read_file_fills_holes(tmp_path: Path) -> None:
    blob, _ = raw_blob(tmp_path, b"A" * 100 + b"B" * 50)
    chunks = [chunk(b"A" * 100, 0, 4096, 0), chunk(b"B" * 50, 100, 3 * 4096, 1)]
    inode = FakeInode(5 * 4096, chunks)
    with LocalBlobReader(tmp_path, blobs=[blob]) as reader:
        data = b"".join(reader.read_file(inode, validate=True))
        assert reader._fds  # descriptors are cached while open
    assert reader._fds == {}
    expected = bytes(4096) + b"A" * 100 + bytes(2 * 4096 - 100) + b"B" * 50
    assert data == expected + bytes(5 * 4096 - len(expected))


def test_read_chunk_errors_name_blob_chunk_and_offset(tmp_path: Path) -> None:
    blob, path = raw_blob(tmp_path, b"A" * 100)
    good = chunk(b"A" * 100, 0, 0, 0)
    bad_digest = chunk(b"A" * 100, 0, 0, 3)
    bad_digest.digest = bytes(32)
    past_end = chunk(b"A" * 100, 50, 0, 4)
    reader = LocalBlobReader(paths={blob.blob_id: path})
    assert reader.read_chunk(blob, good, validate=True) == b"A" * 100
    reader.read_chunk(blob, bad_digest, validate=False)  # no check asked, no error
    with pytest.raises(
        DigestMismatch, match=f"blob {blob.blob_id} chunk 3 at compressed offset 0x0"
    ):
        reader.read_chunk(blob, bad_digest, validate=True)
    with pytest.raises(FormatError, match=r"chunk 4 at compressed offset 0x32.*ends at 0x64"):
        reader.read_chunk(blob, past_end, validate=False)
    with pytest.raises(NydusError, match="not found"):
        LocalBlobReader(tmp_path / "nowhere").read_chunk(blob, good, validate=False)
    with pytest.raises(FormatError, match="runs past the file size"):
        list(reader.read_file(FakeInode(10, [good]), blobs=[blob]))
    reader.close()
