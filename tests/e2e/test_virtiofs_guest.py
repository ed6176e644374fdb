"""End to end: a QEMU guest mounts ``nydusd virtiofs`` with ``-t virtiofs`` and checks the tree.

One boot (TCG, ~10 s) covers the whole path: the guest walks a RAFS image (listing, sha256 of
every file, symlinks, devices, hard links, xattrs, modes and owners) with ``vfswalk``; then,
while it runs, the test adds two more images through the HTTP API and the guest walks those
pseudo mounts too; then the guest resets the device (driver unbind and bind: QEMU stops and
restarts the rings, a new FUSE session begins) and walks one again. Every walk must equal the
snapshot of the image's source tree, and the daemon must outlive the guest.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from nydusfs.api.client import NydusdClient
from tests.api.daemon import make_image, mount_config
from tests.e2e.guest import Guest, build_initramfs, missing_tools, parse_walk, virtiofs_daemon
from tests.helpers.tree import TreeFactory, diff_snapshots, snapshot
from tests.mount.nydusd_proc import localfs_config, write_config

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]
# Compact v6 inodes carry no mtime (upstream's layout), so mtimes are not compared.
IGNORED = ("mtime",)

SCRIPT = """
mount -t virtiofs nydus /mnt || exit 1
echo "HARNESS: mounted"
walk() { vfswalk "$2" > /tmp/walk; echo "WALK $1 rc=$?"; sed "s/^/$1 /" /tmp/walk; }
walk BASE /mnt/base
ls /mnt | sed 's/^/ROOT /'
echo "HARNESS: need-mounts"
i=0
while [ ! -d /mnt/m1 ] || [ ! -d /mnt/m2 ]; do
    i=$((i + 1)); [ $i -gt 600 ] && { echo "HARNESS: mounts never appeared"; exit 1; }
    sleep 0.1
done
walk M1 /mnt/m1
walk M2 /mnt/m2
cat /mnt/base/no-such-file 2>/dev/null || echo "HARNESS: enoent ok"
umount /mnt && echo "HARNESS: unmounted"
# A device reset: unbind and rebind the driver (QEMU stops and restarts the vhost rings).
drv=/sys/bus/virtio/drivers/virtiofs
dev=$(basename $drv/virtio*)
echo $dev > $drv/unbind && echo $dev > $drv/bind && echo "HARNESS: rebound $dev"
mount -t virtiofs nydus /mnt && walk AGAIN /mnt/m2 && umount /mnt
"""


@pytest.fixture(scope="session")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing: {', '.join(missing)}")
    return build_initramfs(tmp_path_factory.mktemp("guest") / "initramfs.cpio", SCRIPT)


def test_guest_reads_image_and_live_pseudo_mounts(
    initramfs: Path, small_tree: Path, tree_factory: TreeFactory, tmp_path: Path
) -> None:
    trees = [tree_factory(files=12, total_bytes=200_000, seed=s) for s in (21, 22)]
    boot = make_image(small_tree, tmp_path / "base")
    extra = [make_image(t, tmp_path / f"m{i}") for i, t in enumerate(trees, 1)]
    config = write_config(
        tmp_path / "config.json", localfs_config(tmp_path / "base", tmp_path / "cache")
    )
    sock, api = tmp_path / "vfs.sock", tmp_path / "api.sock"
    mounted = threading.Event()
    errors: list[BaseException] = []

    def on_line(line: str) -> None:
        if "HARNESS: need-mounts" not in line:
            return
        try:
            with NydusdClient(str(api)) as client:
                for i, image in enumerate(extra, 1):
                    client.mount(f"/m{i}", str(image), mount_config(tmp_path / f"m{i}"))
            mounted.set()
        except BaseException as e:  # reported by the test thread below
            errors.append(e)

    args = ["--config", str(config), "--bootstrap", str(boot), "--virtual-mountpoint", "/base"]
    with virtiofs_daemon(sock, *args, apisock=api) as proc:
        guest = Guest(initramfs, [(str(sock), "nydus")], on_line=on_line)
        lines = guest.run()
        assert proc.poll() is None, "the daemon must outlive its guest"
    assert proc.returncode == 0
    assert not errors, errors
    assert mounted.is_set()
    output = "\n".join(lines)
    for marker in ("HARNESS: mounted", "HARNESS: enoent ok", "HARNESS: unmounted", "WALK AGAIN"):
        assert marker in output, guest.tail()
    assert sorted(line[5:] for line in lines if line.startswith("ROOT ")) == ["base"]
    walks = (("BASE", small_tree), ("M1", trees[0]), ("M2", trees[1]), ("AGAIN", trees[1]))
    for prefix, source in walks:
        assert f"WALK {prefix} rc=0" in output, guest.tail()
        seen = parse_walk(lines, prefix)
        assert len(seen) > 10
        assert diff_snapshots(snapshot(source), seen, ignore=IGNORED) == [], prefix
        if prefix == "BASE":  # the special cases really were compared
            kinds = {e["type"] for e in seen.values()}
            assert {"reg", "dir", "lnk", "chr"} <= kinds
            assert any(e["xattrs"] for e in seen.values())
            assert any("hardlink" in e for e in seen.values())
