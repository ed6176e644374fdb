"""nydusd serving images on real FUSE mounts, compared with their source trees."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nydusfs.rafs.blobview import write_uncompressed_blobs
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.types import Compressor, Digester
from tests.fixtures_path import UPSTREAM
from tests.helpers.erofs import mount_erofs
from tests.helpers.image import snapshot_image
from tests.helpers.tree import diff_snapshots, snapshot
from tests.mount.nydusd_proc import REPO, is_mounted, localfs_config, nydusd, write_config

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]
# Compact v6 inodes carry no mtime (upstream's layout), so mtimes are not compared.
IGNORED = ("mtime",)


def _image(src: Path, out: Path, **kw: object) -> Path:
    out.mkdir(parents=True)
    boot = out / "image.boot"
    build(BuildOptions(source=str(src), bootstrap=str(boot), blob_dir=str(out), **kw))  # type: ignore[arg-type]
    return boot


@pytest.mark.parametrize(
    ("compressor", "digester", "cache", "compressed"),
    [
        (Compressor.ZSTD, Digester.BLAKE3, "blobcache", False),
        (Compressor.ZSTD, Digester.SHA256, "blobcache", True),
        (Compressor.LZ4_BLOCK, Digester.BLAKE3, "dummycache", False),
        (Compressor.NONE, Digester.SHA256, "blobcache", False),
    ],
)
def test_mount_equals_source(
    small_tree: Path, tmp_path: Path, compressor: Compressor, digester: Digester, cache: str,
    compressed: bool,
) -> None:  # fmt: skip
    boot = _image(small_tree, tmp_path / "img", compressor=compressor, digester=digester)
    work = tmp_path / "cache"
    config = write_config(
        tmp_path / "config.json",
        localfs_config(tmp_path / "img", work, cache=cache, compressed=compressed, validate=True),
    )
    expected = snapshot(small_tree)
    with nydusd("--config", str(config), "--bootstrap", str(boot), mountpoint=tmp_path / "mnt"):
        assert diff_snapshots(expected, snapshot(tmp_path / "mnt"), ignore=IGNORED) == []
        # Warm: everything again from the cache.
        assert diff_snapshots(expected, snapshot(tmp_path / "mnt"), ignore=IGNORED) == []
    if cache == "blobcache":
        suffix = ".blob.raw" if compressed else ".blob.data"
        assert any(p.name.endswith(suffix) for p in work.iterdir())


def test_localfs_dir_shorthand_and_virtual_mountpoint(small_tree: Path, tmp_path: Path) -> None:
    boot = _image(small_tree, tmp_path / "img")
    mnt = tmp_path / "mnt"
    with nydusd("-B", str(boot), "-D", str(tmp_path / "img"), "-m", "/sub/image", mountpoint=mnt):
        assert sorted(os.listdir(mnt)) == ["sub"]
        seen = snapshot(mnt / "sub" / "image")
        # Without enable_xattr (the --localfs-dir config) xattrs are not served, as upstream.
        assert diff_snapshots(snapshot(small_tree), seen, ignore=(*IGNORED, "xattrs")) == []
        assert all(not e["xattrs"] for e in seen.values())


def test_kernel_and_nydusd_agree(small_tree: Path, tmp_path: Path) -> None:
    boot = _image(small_tree, tmp_path / "img", compressor=Compressor.ZSTD)
    views = write_uncompressed_blobs(boot, tmp_path / "img", tmp_path)
    config = write_config(tmp_path / "c.json", localfs_config(tmp_path / "img", tmp_path / "w"))
    with mount_erofs(boot, tmp_path / "kmnt", views) as kmnt:
        kernel = snapshot(kmnt, mtime=True)
        with nydusd("-C", str(config), "-B", str(boot), mountpoint=tmp_path / "mnt") as _:
            ours = snapshot(tmp_path / "mnt", mtime=True)
    # The kernel reports the superblock build time (0) for compact inodes; so do we.
    assert diff_snapshots(kernel, ours) == []


def test_upstream_v6_fixture(tmp_path: Path) -> None:
    boot = UPSTREAM / "rafs-v6-2.2.boot"
    config = write_config(tmp_path / "c.json", localfs_config(UPSTREAM / "blobs", tmp_path / "w"))
    expected = snapshot_image(boot, UPSTREAM / "blobs")
    with nydusd("-C", str(config), "-B", str(boot), mountpoint=tmp_path / "mnt"):
        seen = snapshot(tmp_path / "mnt")
    assert sorted(seen) == [b"/", b"/lib.rs", b"/sync_io.rs"]
    assert seen[b"/lib.rs"]["size"] == 16931 and seen[b"/sync_io.rs"]["size"] == 13400
    assert diff_snapshots(expected, seen) == []


def test_upstream_v5_fixture(tmp_path: Path) -> None:
    boot = UPSTREAM / "repeatable" / "sha256-nocompress-repeatable"
    blobs = UPSTREAM / "repeatable" / "blobs"
    config = write_config(tmp_path / "c.json", localfs_config(blobs, None, cache="dummycache"))
    expected = snapshot_image(boot, blobs)
    with nydusd("-C", str(config), "-B", str(boot), mountpoint=tmp_path / "mnt"):
        seen = snapshot(tmp_path / "mnt")
        links = [p for p, e in seen.items() if e.get("hardlink") is not None]
        assert len(links) == 3
    # The image has no EXPLICIT_UID_GID flag: every inode is the daemon's (root here).
    assert diff_snapshots(expected, seen, ignore=("uid", "gid")) == []


def test_parallel_readers_get_correct_bytes(tree_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tree_factory(files=300, total_bytes=24 << 20, seed=11)
    boot = _image(src, tmp_path / "img", chunk_size=0x10000)
    config = write_config(tmp_path / "c.json", localfs_config(tmp_path / "img", tmp_path / "w"))
    files = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
    digests = {p.relative_to(src): hashlib.sha256(p.read_bytes()).digest() for p in files}
    errors: list[str] = []
    reads = [0]
    with nydusd("-C", str(config), "-B", str(boot), mountpoint=tmp_path / "mnt"):
        mnt = tmp_path / "mnt"
        stop = time.monotonic() + 60  # the issue asks for a minute of parallel reads

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            rels = sorted(digests)
            while time.monotonic() < stop:
                rel = rng.choice(rels)
                try:
                    data = (mnt / rel).read_bytes()
                except OSError as e:
                    errors.append(f"{rel}: {e}")
                    return
                if hashlib.sha256(data).digest() != digests[rel]:
                    errors.append(f"{rel}: wrong bytes")
                reads[0] += 1

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and reads[0] > 100


def test_stale_mount_after_kill_is_recovered(small_tree: Path, tmp_path: Path) -> None:
    boot = _image(small_tree, tmp_path / "img")
    mnt = tmp_path / "mnt"
    args = ("-B", str(boot), "-D", str(tmp_path / "img"))
    with nydusd(*args, mountpoint=mnt) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The context manager cleaned the mount; make a real stale one by killing again, untidily.
    proc2 = subprocess.Popen(
        [sys.executable, "-m", "nydusfs.cli.nydusd", *args, "-M", str(mnt)], cwd=REPO
    )
    deadline = time.monotonic() + 20
    while not is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc2.kill()
    proc2.wait()
    with pytest.raises(OSError):
        os.listdir(mnt)  # ENOTCONN: the daemon behind the mount is gone
    with nydusd(*args, mountpoint=mnt):
        assert (
            diff_snapshots(snapshot(small_tree), snapshot(mnt), ignore=(*IGNORED, "xattrs")) == []
        )
    assert not is_mounted(mnt)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-C", "/nonexistent.json", "-B", "/x"], "cannot read config file /nonexistent.json"),
        (["-B", "/nonexistent.boot", "-D", "/tmp"], "cannot open bootstrap /nonexistent.boot"),
        (["--shared-dir", "/nonexistent"], "passthrough_fs source /nonexistent is not a direc"),
        (["--shared-dir", "/tmp", "-B", "/x"], "--shared-dir conflicts with --bootstrap"),
        (["--prefetch-files", "/tmp/x"], "--prefetch-files requires --bootstrap"),
    ],
)
def test_user_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "nydusfs.cli.nydusd", *args, "-M", str(mnt)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = [line for line in run.stderr.splitlines() if line.startswith("nydusd: ")]
    assert run.returncode == 1, run.stderr
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    assert not is_mounted(mnt)
