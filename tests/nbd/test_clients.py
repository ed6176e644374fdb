"""``nydusd nbd`` against real NBD clients, and the host kernel's EROFS on what they see.

For each blob compressor: nbdinfo describes the export; nbdcopy and ``qemu-img convert`` copy it
byte-identical to ``nydus-image export --block``; nbdfuse exposes it as a file that the kernel
mounts as EROFS, and the mounted tree equals the source tree. The same with blobs served by a
registry (Debian's docker-registry on 127.0.0.1) through the registry backend and a blob cache,
and with the export file mounted through a loop device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from nydusfs.types import Compressor
from tests.fixtures_path import UPSTREAM
from tests.helpers.erofs import kernel_has_erofs, mount_erofs
from tests.helpers.image import snapshot_image
from tests.helpers.registry_servers import REGISTRY_BIN, DockerRegistry
from tests.helpers.servers import free_port, running
from tests.helpers.tree import diff_snapshots, snapshot
from tests.nbd.conftest import (
    Image,
    export_block,
    nbdfuse,
    nydusd_nbd,
    require_clients,
    run_client,
    same_file,
    tool,
    uri,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not kernel_has_erofs(), reason="kernel without EROFS"),
]

COMPRESSORS = [Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE]
IGNORED = ("mtime",)  # compact inodes carry no mtime (upstream's choice)


@pytest.fixture(autouse=True)
def _clients() -> None:
    require_clients()


def _mount_and_compare(disk: Path, mnt: Path, source: Path) -> None:
    with mount_erofs(disk, mnt) as mounted:
        seen = snapshot(mounted)
    assert diff_snapshots(snapshot(source), seen, ignore=IGNORED) == []


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=lambda c: c.label)
def test_clients_read_the_export(
    nbd_image, small_tree: Path, short_tmp: Path, tmp_path: Path, compressor: Compressor
) -> None:  # type: ignore[no-untyped-def]
    image: Image = nbd_image(compressor)
    sock = short_tmp / "nbd.sock"
    # A fresh cache directory: every byte comes through the backend and the decompressor.
    config = tmp_path / "entry.json"
    config.write_text(json.dumps({
        "type": "bootstrap", "id": "t", "config_v2": {
            "version": 2, "metadata_path": str(image.bootstrap),
            "backend": {"type": "localfs", "localfs": {"dir": str(image.blob_dir)}},
            "cache": {"type": "blobcache", "filecache": {"work_dir": str(tmp_path / "cache")}},
        },
    }))  # fmt: skip
    with nydusd_nbd(sock, "--config", str(config), "--threads", "8"):
        info = json.loads(run_client("nbdinfo", "--json", uri(sock)).stdout)
        (export,) = info["exports"]
        assert export["export-size"] == image.disk.stat().st_size
        assert export["is_read_only"] is True
        assert export["can_multi_conn"] is True
        assert export["export-name"] == "disk-default"  # the canonical name of the default
        listed = json.loads(run_client("nbdinfo", "--json", "--list", uri(sock)).stdout)
        assert [e["export-name"] for e in listed["exports"]] == ["disk-default"]
        # base:allocation: the runs tile the disk, and what is reported as a hole is zeros.
        extents = json.loads(run_client("nbdinfo", "--map", "--json", uri(sock)).stdout)
        data = image.disk.read_bytes()
        ends = [0] + [e["offset"] + e["length"] for e in extents]
        assert [e["offset"] for e in extents] == ends[:-1] and ends[-1] == len(data)
        holes = [e for e in extents if e["type"] == 3]
        assert holes, extents  # at least the gap before the blob's mapped block address
        for e in holes:
            assert data[e["offset"] : e["offset"] + e["length"]].count(0) == e["length"]

        copy = tmp_path / "nbdcopy.img"
        run_client("nbdcopy", uri(sock), str(copy))
        assert same_file(copy, image.disk)
        converted = tmp_path / "qemu.img"
        run_client("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(sock, "disk-default"),
                   str(converted))  # fmt: skip
        assert same_file(converted, image.disk)

        with nbdfuse(short_tmp / "fuse", uri(sock)) as disk:
            _mount_and_compare(disk, tmp_path / "mnt", small_tree)


def test_export_file_mounts_through_a_loop_device(
    nbd_image, small_tree: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    image: Image = nbd_image(Compressor.ZSTD)
    with mount_erofs(image.disk, tmp_path / "mnt", mode="loop") as mounted:
        seen = snapshot(mounted)
    assert diff_snapshots(snapshot(small_tree), seen, ignore=IGNORED) == []


def test_tcp_listener_and_default_output_name(nbd_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image: Image = nbd_image(Compressor.LZ4_BLOCK)
    # Without -O the export goes to <localfs-dir>/<bootstrap name>.disk, as upstream.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for blob in image.blob_dir.iterdir():
        if len(blob.name) == 64:
            (blobs / blob.name).symlink_to(blob)
    boot = tmp_path / "img.boot"
    boot.write_bytes(image.bootstrap.read_bytes())
    export_cmd = tool("nydus-image", "export", "--block", "-B", str(boot), "-D", str(blobs))
    subprocess.run(export_cmd, check=True, capture_output=True)
    assert same_file(blobs / "img.boot.disk", image.disk)

    port = free_port()
    argv = tool("nydusd", "nbd", "-B", str(boot), "-D", str(blobs), "--port", str(port))
    with running(argv, port=port, timeout=30):
        copy = tmp_path / "copy.img"
        run_client("nbdcopy", f"nbd://127.0.0.1:{port}/disk-default", str(copy))
        assert same_file(copy, image.disk)


@pytest.mark.skipif(not Path(REGISTRY_BIN).exists(), reason="docker-registry not installed")
def test_registry_backend(nbd_image, small_tree: Path, short_tmp: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image: Image = nbd_image(Compressor.ZSTD)
    (workdir := tmp_path / "registry").mkdir()
    registry = DockerRegistry(workdir)
    try:
        for blob in image.blob_dir.iterdir():
            if len(blob.name) == 64:  # the blob itself, not the cache files next to it
                assert registry.push_blob("nydus/test", blob.read_bytes()) == blob.name
        config = tmp_path / "nydusd.json"
        config.write_text(json.dumps({
            "version": 2,
            "backend": {"type": "registry", "registry": {
                "scheme": "http", "host": registry.host, "repo": "nydus/test"}},
            "cache": {"type": "blobcache", "filecache": {"work_dir": str(tmp_path / "cache")}},
        }))  # fmt: skip
        sock = short_tmp / "nbd.sock"
        with nydusd_nbd(sock, "-B", str(image.bootstrap), "-C", str(config)):
            with nbdfuse(short_tmp / "fuse", uri(sock)) as disk:
                _mount_and_compare(disk, tmp_path / "mnt", small_tree)
            copy = tmp_path / "copy.img"
            run_client("nbdcopy", uri(sock), str(copy))
            assert same_file(copy, image.disk)
    finally:
        registry.close()


def test_upstream_image_exports_as_upstream_lays_it_out(short_tmp: Path, tmp_path: Path) -> None:
    """An image built by upstream nydus-image (upstream's own block device test fixture): the
    export has the size upstream's ``block_device.rs`` test expects (0x209 blocks), the kernel
    mounts it and sees what our RAFS reader sees, and nydusd nbd serves the same bytes."""
    boot = UPSTREAM / "rafs-v6-2.2.boot"
    blobs = tmp_path / "blobs"  # a writable copy: the localfs shorthand puts the cache there
    shutil.copytree(UPSTREAM / "blobs", blobs)
    disk = tmp_path / "upstream.disk"
    export_block(boot, disk, "-D", str(blobs))
    data = disk.read_bytes()
    assert len(data) == 0x209 * 4096
    assert data[:1024] == bytes(1024) and data[1024:1028] == b"\xe2\xe1\xf5\xe0"
    with mount_erofs(disk, tmp_path / "mnt", mode="loop") as mounted:
        seen = snapshot(mounted)
    expected = snapshot_image(boot, UPSTREAM / "blobs")
    assert len(expected) > 1
    assert diff_snapshots(expected, seen) == []
    sock = short_tmp / "nbd.sock"
    with nydusd_nbd(sock, "-B", str(boot), "-D", str(blobs)):
        copy = tmp_path / "copy.img"
        run_client("nbdcopy", uri(sock), str(copy))
        assert same_file(copy, disk)
