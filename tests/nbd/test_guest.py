"""A QEMU guest mounts ``nydusd nbd``'s export as ``/dev/vda`` with its own kernel's EROFS.

QEMU's block-layer NBD client attaches the export (``-drive file=nbd+unix://...``), the guest
(Linux 6.12, TCG) mounts it and lists every entry with its mode, owner, size and md5; the list
must equal the source tree's. One boot takes about 5-15 s depending on the machine's load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.types import Compressor
from tests.nbd.conftest import nydusd_nbd, uri
from tests.nbd.guest import BUSYBOX, build_initramfs, fetch_kernel, run_guest, tree_listing

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def guest_tools() -> None:
    if shutil.which("qemu-system-x86_64") is None or not Path(BUSYBOX).exists():
        pytest.skip("qemu-system-x86 or busybox-static missing (make deps installs them)")


def test_guest_mounts_the_export(guest_tools: None, tree_factory, tmp_path: Path,
                                 short_tmp: Path) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    # ASCII and UTF-8 names only: the listing travels over the serial console.
    src = tree_factory(files=40, total_bytes=2 << 20, seed=11, with_special=False)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "image.boot"
    build(BuildOptions(source=str(src), bootstrap=str(boot), blob_dir=str(blobs),
                       compressor=Compressor.ZSTD))  # fmt: skip
    kernel = fetch_kernel()
    initramfs = build_initramfs(kernel, tmp_path / "initramfs.gz")
    sock = short_tmp / "nbd.sock"
    with nydusd_nbd(sock, "-B", str(boot), "-D", str(blobs)):
        console = run_guest(kernel, initramfs, uri(sock, "disk-default"), timeout=300)
    lines = console.splitlines()
    assert "GUEST-DONE" in lines, console[-3000:]
    errors = [line for line in lines if line.startswith("GUEST-ERROR")]
    assert not errors and "GUEST-MOUNTED" in lines, console[-3000:]
    seen = [line for line in lines if line.startswith("E|")]
    expected = tree_listing(src)
    assert len(expected) > 40
    assert seen == expected
