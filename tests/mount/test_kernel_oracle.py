"""The Linux kernel's EROFS driver as an independent reader of the v6 images we build.

The bootstrap is mounted with one ``device=`` per blob. The kernel cannot decompress nydus
chunks, so each blob device is the blob's uncompressed view (every chunk at its uncompressed
offset, what a ``.blob.data`` cache file holds); that keeps every compressor testable.
``fsck.erofs`` from erofs-utils checks the same images.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nydusfs.rafs.blobview import write_uncompressed_blobs
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.types import Compressor, Digester
from tests.helpers.erofs import fsck_erofs, kernel_has_erofs, mount_erofs
from tests.helpers.image import snapshot_image
from tests.helpers.tree import diff_snapshots, snapshot

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not kernel_has_erofs(), reason="kernel without EROFS"),
]

# Compact inodes carry no mtime (upstream's choice), so mtimes are compared elsewhere.
IGNORED = ("mtime",)


def _build(src: Path, out: Path, **kw: object) -> tuple[Path, Path]:
    out.mkdir()
    boot = out / "bootstrap"
    build(BuildOptions(source=str(src), bootstrap=str(boot), blob_dir=str(out), **kw))  # type: ignore[arg-type]
    return boot, out


@pytest.mark.parametrize(
    ("compressor", "digester", "chunk_size", "blob_toc"),
    [
        (Compressor.NONE, Digester.BLAKE3, 0x100000, False),
        (Compressor.ZSTD, Digester.SHA256, 0x100000, True),
        (Compressor.LZ4_BLOCK, Digester.BLAKE3, 0x1000, False),
        (Compressor.ZSTD, Digester.BLAKE3, 0x10000, True),
    ],
)
def test_kernel_reads_what_we_built(
    small_tree: Path,
    tmp_path: Path,
    compressor: Compressor,
    digester: Digester,
    chunk_size: int,
    blob_toc: bool,
) -> None:
    boot, blobs = _build(
        small_tree,
        tmp_path / "img",
        compressor=compressor,
        digester=digester,
        chunk_size=chunk_size,
        blob_toc=blob_toc,
    )
    views = write_uncompressed_blobs(boot, blobs, tmp_path)
    expected = snapshot(small_tree)
    with mount_erofs(boot, tmp_path / "mnt", views) as mnt:
        seen = snapshot(mnt)
    assert diff_snapshots(expected, seen, ignore=IGNORED) == []
    # Our own reader agrees with the source too (and validates every chunk digest).
    assert diff_snapshots(expected, snapshot_image(boot, blobs), ignore=IGNORED) == []


def test_fsck_erofs_accepts_and_extracts(tree_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # erofs-utils 1.5 mishandles 255-byte names, so this tree stops at 254.
    src = tree_factory(files=60, total_bytes=1 << 20, seed=7, long_name=254)
    boot, blobs = _build(src, tmp_path / "img", compressor=Compressor.NONE)
    views = write_uncompressed_blobs(boot, blobs, tmp_path)
    check = fsck_erofs(boot, views)
    assert check.returncode == 0, check.stderr
    out = tmp_path / "extract"
    extracted = fsck_erofs(boot, views, extract=out)
    assert extracted.returncode == 0, extracted.stderr
    # fsck.erofs 1.5 extracts content, types and permission bits, but neither hard links nor
    # set-id bits, owners or xattrs; the mount test covers those.
    expected, seen = snapshot(src), snapshot(out)
    for snap in (expected, seen):
        for entry in snap.values():
            entry["mode"] &= 0o1777
    ignored = (*IGNORED, "uid", "gid", "xattrs", "hardlink")
    assert diff_snapshots(expected, seen, ignore=ignored) == []
