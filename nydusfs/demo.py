"""The project's main job, end to end on one machine: ``python3 -m nydusfs.demo``.

Generates a small sample root filesystem, builds it into a RAFS v6 image with ``nydus-image
create`` (zstd chunks in one blob), validates it with ``check``, lists it with ``inspect``,
unpacks it to a tar and compares the result with the source. Then (as root) ``nydusd`` mounts
the image over FUSE with the localfs backend and a blob cache, the demo lists and reads it and
compares every file with the source, and SIGTERM unmounts it. With EROFS in the kernel, the
kernel's driver mounts the same image too. Prints what it does; exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from nydusfs.cli.nydus_image import main as nydus_image
from nydusfs.rafs.blobview import write_uncompressed_blobs

SAMPLE = {
    "etc/hostname": b"nydusfs-demo\n",
    "etc/os-release": b'NAME="nydusfs demo"\nID=demo\n',
    "usr/bin/hello": b"#!/bin/sh\necho hello from a RAFS image\n",
    "usr/share/doc/README": b"RAFS keeps metadata in a bootstrap and data in blobs.\n" * 2000,
    "var/lib/data.bin": bytes(range(256)) * 8192,
}


def make_sample(root: Path) -> None:
    for rel, data in SAMPLE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.chmod(root / "usr/bin/hello", 0o755)
    (root / "var/empty").mkdir(parents=True)
    os.symlink("../usr/share/doc/README", root / "etc/motd")
    os.link(root / "etc/hostname", root / "etc/hostname.bak")
    rng = hashlib.sha256(b"seed")
    big = bytearray()
    while len(big) < 3 << 20:  # incompressible data spanning several 1 MiB chunks
        rng.update(b"x")
        big += rng.digest() * 2
    (root / "opt/blob.dat").parent.mkdir(parents=True)
    (root / "opt/blob.dat").write_bytes(bytes(big))


def digest_tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def nydusd_mount_check(work: Path, boot: Path, blob_dir: Path, expected: dict[str, str]) -> bool:
    """Run ``nydusd`` on the image, show and compare what it serves, stop it with SIGTERM."""
    mnt = work / "nydusd-mnt"
    cache = work / "cache"
    mnt.mkdir()
    config = work / "nydusd.json"
    config.write_text(
        json.dumps(
            {
                "version": 2,
                "backend": {"type": "localfs", "localfs": {"dir": str(blob_dir)}},
                "cache": {"type": "blobcache", "filecache": {"work_dir": str(cache)}},
                "rafs": {"enable_xattr": True},
            }
        )
    )
    cmd = [sys.executable, "-m", "nydusfs.cli.nydusd", "--config", str(config),
           "--bootstrap", str(boot), "--mountpoint", str(mnt)]  # fmt: skip
    print("$", " ".join(cmd))
    daemon = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if daemon.poll() is not None or time.monotonic() > deadline:
                print("nydusd did not come up", file=sys.stderr)
                return False
            time.sleep(0.05)
        subprocess.run(["ls", "-l", str(mnt), str(mnt / "etc")], check=True)
        print("$ cat etc/os-release")
        print((mnt / "etc/os-release").read_text(), end="")
        seen = digest_tree(mnt)
        fetched = sorted(p.name for p in cache.iterdir())
        print(f"blob cache after the reads: {', '.join(fetched)}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    if seen != expected:
        print("nydusd's view differs from the source tree", file=sys.stderr)
        return False
    print(f"nydusd served the source tree exactly ({len(seen)} files); unmounted on SIGTERM")
    return True


def kernel_mount_check(work: Path, boot: Path, blob_dir: Path, expected: dict[str, str]) -> None:
    """Mount the image with the kernel's EROFS driver, file-backed, blobs as devices."""
    devices = write_uncompressed_blobs(boot, blob_dir, work)
    mnt = work / "mnt"
    mnt.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    opts = ",".join(f"device={d}" for d in devices).encode()
    if libc.mount(str(boot).encode(), str(mnt).encode(), b"erofs", 1, opts) != 0:
        print(f"kernel mount not possible here: {os.strerror(ctypes.get_errno())}")
        return
    try:
        subprocess.run(["ls", "-lR", str(mnt)], check=True)
        seen = digest_tree(mnt)
    finally:
        libc.umount(str(mnt).encode())
    if seen != expected:
        raise SystemExit("kernel EROFS view differs from the source tree")
    print(f"kernel EROFS mount matches the source ({len(seen)} files)")


def run(work: Path) -> int:
    src = work / "rootfs"
    make_sample(src)
    expected = digest_tree(src)

    step("nydus-image create (zstd, blob-toc)")
    out = work / "image"
    out.mkdir()
    boot = out / "image.boot"
    args = ["create", str(src), "--bootstrap", str(boot), "--blob-dir", str(out)]
    if nydus_image([*args, "--features", "blob-toc"]) != 0:
        return 1
    for entry in sorted(out.iterdir()):
        print(f"  {entry.name}  {entry.stat().st_size} bytes")

    step("nydus-image check")
    if nydus_image(["check", str(boot), "--blob-dir", str(out)]) != 0:
        return 1

    step("nydus-image inspect: stats and root listing")
    for request in ("stats", "ls"):
        if nydus_image(["inspect", str(boot), "--request", request]) != 0:
            return 1

    step("nydus-image unpack, then compare with the source")
    tar_path = work / "unpacked.tar"
    if nydus_image(["unpack", str(boot), "--blob-dir", str(out), "--output", str(tar_path)]) != 0:
        return 1
    extracted = work / "extracted"
    with tarfile.open(tar_path) as tar:
        tar.extractall(extracted, filter="fully_trusted")
    if digest_tree(extracted) != expected:
        print("unpacked tree differs from the source", file=sys.stderr)
        return 1
    print(f"unpacked tree matches the source ({len(expected)} files)")

    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        print("\nnot root or no /dev/fuse: skipping the mounts")
        return 0
    step("nydusd: mount the image lazily (localfs backend, blob cache), list it, read it")
    if not nydusd_mount_check(work, boot, out, expected):
        return 1

    if Path("/sys/fs/erofs").exists():
        step("kernel EROFS mount of the same image (the blob's uncompressed view as its device)")
        kernel_mount_check(work, boot, out, expected)
    print("\ndemo finished: the image round-trips")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nydusfs-demo-", dir="/var/tmp"))
    try:
        return run(work)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
