#!/usr/bin/env python3
"""NBD benchmark: the kernel's EROFS over ``nydusd nbd`` versus over the exported disk file.

The same generated tree (``_common.ensure_tree``) is built once into a RAFS v6 image (zstd by
default) and exported with ``nydus-image export --block``. Then, side by side in the same run:

* ``nbd``: ``nydusd nbd`` serves the image on a unix socket, ``nbdfuse`` exposes it as a file,
  the kernel mounts that file as EROFS through a loop device. Measured twice: ``cold`` (empty
  blob cache, page cache dropped: every byte is fetched, decompressed and cached by nydusd) and
  ``cached`` (blob cache full, page cache dropped: nydusd reads its cache file).
* ``loop``: the exported disk file mounted through a loop device, page cache dropped (the peer:
  the same bytes with no daemon in the path).

The workload is a sequential read of every regular file (each inode once, 1 MiB reads, in
directory walk order). Each cell is the median of ``--repeat`` runs; the ratio column divides by
``loop``. The bytes read are checked against the source (printed, never fatal).

Needs root (mount, losetup, drop_caches), ``libnbd-bin`` (nbdfuse) and ``fuse3``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, drop_caches, ensure_tree, print_rows, reuse_or_build, source_digest

from tests.helpers.erofs import mount_erofs
from tests.nbd.conftest import nbdfuse, nydusd_nbd, tool, uri

IO_SIZE = 1 << 20


def regular_files(root: Path) -> list[bytes]:
    """Relative paths of the regular files under ``root``, each inode once, in walk order."""
    base = os.fsencode(root)
    seen: set[tuple[int, int]] = set()
    out = []
    for dirpath, dirs, names in os.walk(base):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_mode & 0o170000 == 0o100000 and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                out.append(path[len(base) :])
    return out


def read_all(root: Path, files: list[bytes]) -> tuple[float, int]:
    """(seconds, bytes) of reading every file whole."""
    base = os.fsencode(root)
    buf = bytearray(IO_SIZE)
    total = 0
    started = time.perf_counter()
    for rel in files:
        fd = os.open(base + rel, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return time.perf_counter() - started, total


def build_image(out: Path, src: Path, compressor: str) -> tuple[Path, Path, Path]:
    boot, blobs, disk = out / "image.boot", out / "blobs", out / "image.disk"

    def make(out: Path) -> None:
        blobs.mkdir()
        print("bench: building the image and its block export ...", flush=True)
        create = ["create", "-B", str(boot), "-D", str(blobs), "--compressor", compressor]
        subprocess.run(tool("nydus-image", *create, str(src)), check=True, cwd=REPO)
        export = ["export", "--block", "-B", str(boot), "-D", str(blobs), "-O", str(disk)]
        subprocess.run(tool("nydus-image", *export), check=True, cwd=REPO)

    params = {"compressor": compressor, "src": str(src),
              "code": source_digest([REPO / "nydusfs"])}  # fmt: skip
    reuse_or_build(out, params, make)
    return boot, blobs, disk


@contextlib.contextmanager
def nbd_mount(boot: Path, blobs: Path, cache: Path, scratch: Path) -> Iterator[Path]:
    """``nydusd nbd`` (localfs backend, blob cache in ``cache``) -> nbdfuse -> loop -> EROFS."""
    config = scratch / "nydusd.json"
    config.write_text(json.dumps({
        "version": 2,
        "backend": {"type": "localfs", "localfs": {"dir": str(blobs)}},
        "cache": {"type": "blobcache", "filecache": {"work_dir": str(cache)}},
    }))  # fmt: skip
    sock = scratch / "nbd.sock"
    with (
        nydusd_nbd(sock, "-B", str(boot), "-C", str(config), "--threads", "8"),
        nbdfuse(scratch / "fuse", uri(sock)) as disk,
        mount_erofs(disk, scratch / "mnt", mode="loop") as mnt,
    ):
        yield mnt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The same defaults as the other benchmarks, so they share one generated tree.
    p.add_argument("--files", type=int, default=20_000, help="regular files in the tree")
    p.add_argument("--mbytes", type=int, default=500, help="MB (10^6) of file data")
    p.add_argument("--seed", type=int, default=1, help="tree generator seed")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/nydusfs-bench"))
    p.add_argument("--compressor", default="zstd", choices=["zstd", "lz4_block", "none"])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("nbdfuse") is None:
        raise SystemExit("bench: needs root and nbdfuse (libnbd-bin)")

    workdir: Path = args.workdir.resolve()
    src, n_files, n_bytes = ensure_tree(workdir, files=args.files, mbytes=args.mbytes,
                                        seed=args.seed)  # fmt: skip
    boot, blobs, disk = build_image(workdir / "nbd" / args.compressor, src, args.compressor)
    files = regular_files(src)
    times: dict[str, list[float]] = {"nbd cold": [], "nbd cached": [], "loop": []}
    checks: list[str] = []

    def record(name: str, seconds: float, got: int) -> None:
        times[name].append(seconds)
        if got != n_bytes:
            checks.append(f"{name}: read {got} bytes, the source has {n_bytes}")

    for rep in range(args.repeat):
        print(f"bench: round {rep + 1}/{args.repeat}", flush=True)
        with tempfile.TemporaryDirectory(prefix="nbd-", dir="/tmp") as tmp:
            scratch = Path(tmp)
            (cache := scratch / "cache").mkdir()
            with nbd_mount(boot, blobs, cache, scratch) as mnt:
                drop_caches()
                record("nbd cold", *read_all(mnt, files))
                drop_caches()
                record("nbd cached", *read_all(mnt, files))
            with mount_erofs(disk, scratch / "loop-mnt", mode="loop") as mnt:
                drop_caches()
                record("loop", *read_all(mnt, files))

    base = statistics.median(times["loop"])
    rows = []
    for name, values in times.items():
        med = statistics.median(values)
        rows.append([name, f"{med:.2f}", f"{n_bytes / 1e6 / med:.1f}", f"{med / base:.2f}x"])
    print(f"\nsequential read of {n_files} files, {n_bytes / 1e6:.1f} MB ({args.compressor} "
          f"image, median of {args.repeat}; page cache dropped before each read)\n")  # fmt: skip
    print_rows(["path", "seconds", "MB/s", "vs loop"], rows)
    print("\n'vs loop' = seconds / the loop-mounted export file's seconds (2.00x = twice as long)")
    for line in checks or ["check: every pass read the source's byte count"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
