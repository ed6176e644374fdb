"""Validates the EROFS oracle harness against the real mkfs.erofs, independent of nydusfs:
an image built by erofs-utils from a generated tree, mounted by the host kernel through
``mount_erofs``, must snapshot exactly like its source."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from tests.helpers.erofs import (
    MountMode,
    fsck_erofs,
    kernel_has_erofs,
    mount_erofs,
    mount_source,
    requires_erofs_utils,
    requires_root,
)
from tests.helpers.tree import TreeFactory, diff_snapshots, snapshot

pytestmark = [
    pytest.mark.root,
    requires_root,
    requires_erofs_utils,
    pytest.mark.skipif(not kernel_has_erofs(), reason="kernel without erofs"),
]


@pytest.fixture(scope="module")
def source(tree_factory: TreeFactory) -> Path:
    # erofs-utils 1.5 truncates 255-byte names (mkfs fails with ENOENT), so 254 here.
    return tree_factory(files=150, total_bytes=4 << 20, seed=11, long_name=254)


def _mkfs(*args: str | Path) -> None:
    subprocess.run(["mkfs.erofs", "--quiet", *map(str, args)], check=True)


@pytest.fixture(scope="module")
def chunked(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A RAFS-v6-shaped image: metadata in meta.img, 4 KiB chunks in an extra blob device."""
    out = tmp_path_factory.mktemp("erofs-chunked")
    meta, blob = out / "meta.img", out / "blob.img"
    _mkfs("--chunksize=4096", f"--blobdev={blob}", meta, source)
    return meta, blob


@pytest.mark.parametrize("mode", ["auto", "file", "loop"])
def test_chunked_image_with_blob_device_mounts_like_its_source(
    source: Path, chunked: tuple[Path, Path], tmp_path: Path, mode: MountMode
) -> None:
    meta, blob = chunked
    try:
        with mount_erofs(meta, tmp_path / "mnt", [blob], mode=mode) as mnt:
            where = mount_source(mnt)
            got = snapshot(mnt, mtime=True)
    except OSError as e:
        if mode == "file" and e.errno == errno.ENOTBLK:
            pytest.skip("no file-backed erofs here (kernel < 6.12 or image on tmpfs)")
        raise
    if mode == "file":
        assert where == str(meta)
    elif mode == "loop":
        assert where is not None and where.startswith("/dev/loop")
    assert diff_snapshots(snapshot(source, mtime=True), got) == []
    assert mount_source(tmp_path / "mnt") is None  # unmounted on exit


def test_chunked_image_passes_fsck_only_with_its_device(chunked: tuple[Path, Path]) -> None:
    meta, blob = chunked
    ok = fsck_erofs(meta, [blob])
    assert ok.returncode == 0, ok.stderr
    assert fsck_erofs(meta).returncode != 0  # "extra devices don't match"


@pytest.mark.parametrize("compress", [[], ["-zlz4hc"]], ids=["plain", "lz4hc"])
def test_single_file_image_mounts_like_its_source(
    source: Path, tmp_path: Path, compress: list[str]
) -> None:
    image = tmp_path / "fs.img"
    _mkfs(*compress, image, source)
    with mount_erofs(image, tmp_path / "mnt") as mnt:
        got = snapshot(mnt, mtime=True)
    assert diff_snapshots(snapshot(source, mtime=True), got) == []


def test_mount_is_released_when_the_body_raises(chunked: tuple[Path, Path], tmp_path: Path) -> None:
    meta, blob = chunked
    with pytest.raises(RuntimeError), mount_erofs(meta, tmp_path / "mnt", [blob], mode="loop"):
        raise RuntimeError("boom")
    assert mount_source(tmp_path / "mnt") is None
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(meta) not in loops and str(blob) not in loops


def test_oracle_notices_a_difference(
    source: Path, chunked: tuple[Path, Path], tmp_path: Path
) -> None:
    meta, blob = chunked
    expected = snapshot(source)
    some_file = next(p for p, e in expected.items() if e["type"] == "reg" and e["size"] > 0)
    expected[some_file] = {**expected[some_file], "sha256": "0" * 64}
    with mount_erofs(meta, tmp_path / "mnt", [blob]) as mnt:
        diffs = diff_snapshots(expected, snapshot(mnt))
    assert len(diffs) == 1 and "sha256" in diffs[0]
