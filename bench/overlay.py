#!/usr/bin/env python3
"""Writable overlay benchmark: ``nydusd --writable`` against fuse-overlayfs and the kernel overlay.

The lower layer is the same generated tree for all three (``_common.ensure_tree``, default ~20k
files / 200 MB): a RAFS image of it for nydusd (uncompressed, built untimed once and kept while
the tree and the builder code are unchanged), the directory itself for fuse-overlayfs and the
kernel's overlayfs. Every run starts from a fresh mount with an empty upper directory. Each tool
in turn, ``--repeat`` times (medians):

* untar: ``tar -xf`` of the tree's tarball into a new directory of the mount (20k creates and
  writes, all in the upper layer).
* metadata: ``stat``, ``chmod`` and ``rename`` (into one other directory) of every untarred
  file (Python loop).
* read back: page cache dropped, every untarred file read whole.
* copy-up: ``chmod`` of every file of the lower tree (each copies a file up, data included).

Sanity checks (printed, never fatal): the untarred tree's file count and bytes match the source.
Ratios are nydusd's time over each peer's. Needs root, ``fuse-overlayfs``, ``fuse3``, ``tar``.
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
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    drop_caches,
    ensure_tree,
    print_rows,
    reuse_or_build,
    source_digest,
    tree_bytes,
)

from tests.mount.nydusd_proc import is_mounted, nydusd

TOOLS = ("nydusd", "fuse-overlayfs", "kernel")
OPS = ("untar", "metadata", "read back", "copy-up")


# fuse-overlayfs refuses names close to NAME_MAX (it needs room for its own), so entries with
# a longer component are left out of the workload for every tool.
MAX_NAME = 200


def short_names(src: Path) -> list[str]:
    """Relative paths under ``src`` whose every component is at most ``MAX_NAME`` bytes."""
    out = []
    for dirpath, dirs, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        dirs[:] = [d for d in dirs if len(os.fsencode(d)) <= MAX_NAME]
        for name in dirs + files:
            if len(os.fsencode(name)) <= MAX_NAME:
                out.append(name if rel == "." else os.path.join(rel, name))
    return out


def build_inputs(src: Path, out: Path) -> None:
    """The tarball of the tree (short names only) and an uncompressed RAFS image of it."""
    (out / "list").write_bytes(b"".join(os.fsencode(p) + b"\n" for p in short_names(src)))
    subprocess.run(["tar", "-cf", str(out / "tree.tar"), "-C", str(src), "--no-recursion",
                    "-T", str(out / "list")], check=True)  # fmt: skip
    argv = [sys.executable, "-m", "nydusfs.cli.nydus_image", "create", str(src),
            "--bootstrap", str(out / "image.boot"), "--blob-dir", str(out / "blobs"),
            "--compressor", "none"]  # fmt: skip
    (out / "blobs").mkdir()
    subprocess.run(argv, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   stdout=subprocess.DEVNULL)  # fmt: skip


@contextlib.contextmanager
def mounted(tool: str, inputs: Path, src: Path, run: Path, threads: int) -> Iterator[Path]:
    shutil.rmtree(run, ignore_errors=True)
    upper, work, mnt = run / "upper", run / "work", run / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    if tool == "nydusd":
        config = {
            "version": 2,
            "backend": {"type": "localfs", "localfs": {"dir": str(inputs / "blobs")}},
            "cache": {"type": "dummycache"},
            "rafs": {"enable_xattr": True},
            "overlay": {"upper_dir": str(upper), "work_dir": str(work)},
        }
        (run / "config.json").write_text(json.dumps(config))
        args = ["--bootstrap", str(inputs / "image.boot"), "--config", str(run / "config.json"),
                "--writable", "--fuse-threads", str(threads), "--log-level", "warn"]  # fmt: skip
        with nydusd(*args, mountpoint=mnt, timeout=60):
            yield mnt
        return
    opts = f"lowerdir={src},upperdir={upper},workdir={work}"
    if tool == "fuse-overlayfs":
        subprocess.run(["fuse-overlayfs", "-o", opts, str(mnt)], check=True,
                       stderr=subprocess.DEVNULL)  # fmt: skip
    else:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def files_of(root: Path) -> list[str]:
    """The regular files of the workload (taken on the source, untimed)."""
    return [rel for rel in short_names(root) if os.path.isfile(root / rel)
            and not os.path.islink(root / rel)]  # fmt: skip


def timed(func: Callable[[], object]) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def session(mnt: Path, inputs: Path, files: list[str]) -> tuple[dict[str, float], str]:
    target, renamed = mnt / "untarred", mnt / "renamed"
    target.mkdir()
    renamed.mkdir()
    times: dict[str, float] = {}
    untar = ["tar", "--warning=no-timestamp", "-xf", str(inputs / "tree.tar"), "-C", str(target)]
    times["untar"] = timed(lambda: subprocess.run(untar, check=True))

    def metadata() -> None:
        for i, rel in enumerate(files):
            p = os.path.join(target, rel)
            os.stat(p)
            os.chmod(p, 0o640)
            os.rename(p, os.path.join(renamed, str(i)))

    times["metadata"] = timed(metadata)
    count, size = tree_bytes(renamed)
    drop_caches()

    def read_back() -> None:
        buf = bytearray(1 << 20)
        for i in range(len(files)):
            with open(os.path.join(renamed, str(i)), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

    times["read back"] = timed(read_back)

    def copy_up() -> None:
        for rel in files:
            os.chmod(os.path.join(mnt, rel), 0o600)

    times["copy-up"] = timed(copy_up)
    return times, f"{count} files, {size / 1e6:.1f} MB untarred"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000, help="regular files in the tree")
    ap.add_argument("--mbytes", type=int, default=200, help="MB (10^6) of file data")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/nydusfs-bench-overlay"))
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (medians)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of " + ", ".join(TOOLS))
    ap.add_argument("--fuse-threads", type=int, default=4, help="nydusd --fuse-threads")
    args = ap.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not set(tools) <= set(TOOLS):
        ap.error(f"--tools: from {', '.join(TOOLS)}")
    if os.geteuid() != 0:
        ap.error("needs root (mount, drop_caches)")
    if "fuse-overlayfs" in tools and shutil.which("fuse-overlayfs") is None:
        ap.error("fuse-overlayfs not found (apt-get install fuse-overlayfs)")

    workdir: Path = args.workdir.resolve()
    src, n_files, n_bytes = ensure_tree(workdir, files=args.files, mbytes=args.mbytes,
                                        seed=args.seed)  # fmt: skip
    print(f"bench: tree {src}: {n_files} regular files, {n_bytes / 1e6:.1f} MB", flush=True)
    base = workdir / "overlay"
    inputs = base / "inputs"
    params = {
        "tree": json.loads((workdir / "tree.json").read_text()),
        "code": source_digest([REPO / "nydusfs" / "rafs"]),
    }
    if reuse_or_build(inputs, params, lambda out: build_inputs(src, out)):
        print("bench: built the tarball and the RAFS image", flush=True)
    files = files_of(src)

    results: dict[str, dict[str, list[float]]] = {t: {op: [] for op in OPS} for t in tools}
    for rep in range(args.repeat):
        for tool in tools:
            with mounted(tool, inputs, src, base / "run", args.fuse_threads) as mnt:
                times, check = session(mnt, inputs, files)
            for op, seconds in times.items():
                results[tool][op].append(seconds)
            print(f"bench: {tool} run {rep + 1}: {check}, "
                  + ", ".join(f"{op} {s:.2f}s" for op, s in times.items()), flush=True)  # fmt: skip
    shutil.rmtree(base / "run", ignore_errors=True)

    med = {t: {op: statistics.median(v) for op, v in ops.items()} for t, ops in results.items()}
    peers = [t for t in tools if t != "nydusd"]
    cols = ["operation", *(f"{t} s" for t in tools)]
    if "nydusd" in tools:
        cols += [f"nydusd/{p}" for p in peers]
    rows = []
    for op in OPS:
        row = [op, *(f"{med[t][op]:.2f}" for t in tools)]
        if "nydusd" in tools:
            row += [f"{med['nydusd'][op] / med[p][op]:.2f}x" for p in peers]
        rows.append(row)
    print()
    print_rows(cols, rows)
    print(f"\n({len(files)} files; medians of {args.repeat} run(s); target: within 2x "
          "fuse-overlayfs on each operation)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
