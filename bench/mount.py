#!/usr/bin/env python3
"""Mount benchmark: nydusd against squashfuse and the kernel's erofs, on the same tree.

``nydusd`` (FUSE, zstd RAFS v6 image, blob cache) runs side by side with ``squashfuse`` (and
``squashfuse_ll``) and the kernel's erofs (lz4hc and plain, loop mounts) in the same run on the
same generated tree (``_common.ensure_tree``, default ~20k files / 500 MB).

Images are built untimed once and kept under ``<workdir>/mount/images`` while the tree, the
builder code (nydus) and the tool versions (peers) are unchanged.

Operations, each for every file system in turn (so that one operation's numbers are taken close
together in time), ``--repeat`` times, reporting medians:

* mount + list the root: cold (page, dentry and inode caches dropped; for nydusd a fresh, empty
  blob cache work dir), from starting the mount command until ``os.listdir`` of the root returns.
* find + stat: ``os.scandir`` recursion with an ``os.lstat`` of every entry, on a fresh cold
  mount, then again (warm: kernel dentry/attribute caches populated).
* sequential read: every regular file (each inode once) read whole with 1 MiB ``readinto``, on
  a fresh cold mount, then again (warm page cache). The daemon's peak RSS (``VmHWM``) is read
  after this session.
* 4 KiB random reads: ``--random-reads`` seeded (file, 4 KiB-aligned offset) preads over files of
  at least 1 MiB (offsets uniform over their bytes), files opened untimed beforehand, on a fresh
  cold mount, then the same reads again (warm).

Sanity checks (printed, never fatal): every walk counts the entries of the source tree, every
sequential read returns the source's byte count, and the random reads' CRC equals the source's.
Nothing here is a pass/fail test: the targets at the end are informational.

Needs root (mount, drop_caches), ``squashfs-tools``, ``squashfuse``, ``erofs-utils``, ``fuse3``.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    drop_caches,
    du,
    ensure_tree,
    print_rows,
    proc_status_kib,
    reuse_or_build,
    source_digest,
    tool_version,
)

from tests.mount.nydusd_proc import is_mounted, nydusd

IO_SIZE = 1 << 20  # bytes per read() in the sequential pass
RANDOM_SIZE = 4096
BIG_FILE = 1 << 20  # random reads go to files at least this big
MOUNT_POLL = 0.05  # tests.mount.nydusd_proc polls for the mount every 50 ms


# --- the tree as the workload sees it ------------------------------------------------------------


@dataclass
class Workload:
    entries: int  # what a walk of the root counts (root excluded)
    files: list[tuple[bytes, int]]  # (relative path, size): regular files, each inode once
    total: int  # bytes in files
    reads: list[tuple[bytes, int]]  # (relative path, offset) for the random pass
    reads_crc: int  # zlib.crc32 of the random reads' data, in order, from the source


def scan_source(src: Path, n_reads: int, seed: int) -> Workload:
    root = os.fsencode(src)
    entries = 0
    seen: set[tuple[int, int]] = set()
    files: list[tuple[bytes, int]] = []
    for dirpath, dirs, names in os.walk(root):
        dirs.sort()
        entries += len(dirs)
        for name in sorted(names):
            entries += 1
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                files.append((path[len(root) :], st.st_size))
    big = [(rel, size) for rel, size in files if size >= BIG_FILE]
    if not big:  # a tiny tree: fall back to its largest tenth
        big = sorted(files, key=lambda f: f[1])[-max(1, len(files) // 10) :]
    rng = random.Random(seed)
    weights = list(itertools.accumulate(size for _, size in big))
    reads: list[tuple[bytes, int]] = []
    for rel, size in rng.choices(big, cum_weights=weights, k=n_reads):
        blocks = max(1, size // RANDOM_SIZE)
        reads.append((rel, rng.randrange(blocks) * RANDOM_SIZE))
    crc = 0
    fds = {rel: os.open(root + rel, os.O_RDONLY) for rel in {rel for rel, _ in reads}}
    try:
        for rel, offset in reads:
            crc = zlib.crc32(os.pread(fds[rel], RANDOM_SIZE, offset), crc)
    finally:
        for fd in fds.values():
            os.close(fd)
    return Workload(entries, files, sum(size for _, size in files), reads, crc)


# --- the timed operations ------------------------------------------------------------------------


def walk(root: bytes) -> int:
    """find + stat: every entry under ``root`` gets an lstat; returns how many."""
    count = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = os.lstat(entry.path)
                count += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return count


def read_all(root: bytes, files: list[tuple[bytes, int]]) -> int:
    buf = bytearray(IO_SIZE)
    total = 0
    for rel, _size in files:
        with open(root + rel, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def read_random(fds: dict[bytes, int], reads: list[tuple[bytes, int]]) -> list[bytes]:
    return [os.pread(fds[rel], RANDOM_SIZE, offset) for rel, offset in reads]


T = TypeVar("T")


def timed(func: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    value = func()
    return time.perf_counter() - started, value


# --- the file systems ----------------------------------------------------------------------------


@dataclass
class Mounted:
    seconds: float  # mount + list the root
    pid: int | None  # the serving daemon, if any


class Tool(abc.ABC):
    """One file system under test: how to build its image and how to mount it."""

    name = ""

    def __init__(self, images: Path, scratch: Path, src: Path) -> None:
        self.image_dir = images / self.name
        self.scratch = scratch
        self.src = src

    @abc.abstractmethod
    def params(self) -> dict[str, object]:
        """What the image depends on: a change rebuilds it."""

    @abc.abstractmethod
    def build(self, out: Path) -> None:
        """Build the image into ``out``."""

    def image_bytes(self) -> int:
        return du([p for p in self.image_dir.iterdir() if p.name != "stamp.json"])

    @abc.abstractmethod
    def mount(self, mnt: Path) -> contextlib.AbstractContextManager[Mounted]:
        """Mount the image at ``mnt`` for the duration of the context."""


def _run(argv: list[str]) -> None:
    out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if out.returncode != 0:
        tail = " | ".join((out.stdout + out.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(argv)}: exit {out.returncode}: {tail}")


def _unmount(mnt: Path, *argv: str) -> None:
    """Unmount with ``argv`` (default ``umount``); lazily if that fails; never raises."""
    if not is_mounted(mnt):
        return
    subprocess.run([*(argv or ("umount",)), str(mnt)], check=False, capture_output=True)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def _daemon_pid(argv: list[str]) -> int | None:
    """The pid of the process whose command line is exactly ``argv`` (a daemonised FUSE
    server we started: it forked away from its parent)."""
    want = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read() == want:
                        return int(entry)
            except OSError:
                continue
    return None


class Nydus(Tool):
    name = "nydusfs"

    def __init__(self, images: Path, scratch: Path, src: Path, threads: int) -> None:
        super().__init__(images, scratch, src)
        self.threads = threads
        self._runs = itertools.count()

    def params(self) -> dict[str, object]:
        code = [REPO / "nydusfs" / "rafs" / "builder", REPO / "nydusfs" / "rafs" / "layout"]
        return {"compressor": "zstd", "fs_version": 6, "builder": source_digest(code)}

    def build(self, out: Path) -> None:
        (out / "blobs").mkdir()
        argv = [sys.executable, "-m", "nydusfs.cli.nydus_image", "create", str(self.src)]
        argv += ["--bootstrap", str(out / "image.boot"), "--blob-dir", str(out / "blobs")]
        argv += ["--compressor", "zstd", "--fs-version", "6"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        out_ = subprocess.run(argv, env=env, capture_output=True, text=True)
        if out_.returncode != 0:
            raise RuntimeError(f"nydus-image create: exit {out_.returncode}: {out_.stderr[-500:]}")

    @contextlib.contextmanager
    def mount(self, mnt: Path) -> Iterator[Mounted]:
        work = self.scratch / f"nydus-cache-{next(self._runs)}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        config = {
            "version": 2,
            "backend": {"type": "localfs", "localfs": {"dir": str(self.image_dir / "blobs")}},
            "cache": {"type": "blobcache", "filecache": {"work_dir": str(work)}},
            "rafs": {"enable_xattr": False},
        }
        conf = self.scratch / "nydusd.json"
        conf.write_text(json.dumps(config))
        argv = ["--config", str(conf), "--bootstrap", str(self.image_dir / "image.boot")]
        argv += ["--fuse-threads", str(self.threads), "--log-level", "warn"]
        try:
            drop_caches()
            started = time.perf_counter()
            with nydusd(*argv, mountpoint=mnt, timeout=60) as proc:
                # nydusd() returns once os.listdir of the root succeeds (polled every 50 ms).
                yield Mounted(time.perf_counter() - started, proc.pid)
        finally:
            shutil.rmtree(work, ignore_errors=True)


class Squashfuse(Tool):
    name = "squashfuse"
    binary = "squashfuse"

    def params(self) -> dict[str, object]:
        return {"version": tool_version(["mksquashfs", "-version"]), "comp": "zstd"}

    def build(self, out: Path) -> None:
        image = str(out / "image.sqfs")
        _run(["mksquashfs", str(self.src), image, "-noappend", "-quiet", "-comp", "zstd"])

    @contextlib.contextmanager
    def mount(self, mnt: Path) -> Iterator[Mounted]:
        mnt.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, str(self.image_dir / "image.sqfs"), str(mnt)]
        try:
            drop_caches()
            started = time.perf_counter()
            _run(argv)  # daemonises once mounted
            os.listdir(mnt)
            seconds = time.perf_counter() - started
            yield Mounted(seconds, _daemon_pid(argv))
        finally:
            _unmount(mnt, "fusermount3", "-u")


class SquashfuseLl(Squashfuse):
    """The low-level-API variant from the same package (long entry/attr timeouts)."""

    name = "squashfuse_ll"
    binary = "squashfuse_ll"

    def __init__(self, images: Path, scratch: Path, src: Path) -> None:
        super().__init__(images, scratch, src)
        self.image_dir = images / Squashfuse.name  # the same image


class Erofs(Tool):
    name = "erofs"
    options: tuple[str, ...] = ()

    def params(self) -> dict[str, object]:
        return {"version": tool_version(["mkfs.erofs", "--help"]), "options": list(self.options)}

    def build(self, out: Path) -> None:
        _run(["mkfs.erofs", "--quiet", *self.options, str(out / "image.erofs"), str(self.src)])

    @contextlib.contextmanager
    def mount(self, mnt: Path) -> Iterator[Mounted]:
        mnt.mkdir(parents=True, exist_ok=True)
        try:
            drop_caches()
            started = time.perf_counter()
            # util-linux sets up an autoclear loop device, detached again by umount
            image = str(self.image_dir / "image.erofs")
            _run(["mount", "-t", "erofs", "-o", "ro,loop", image, str(mnt)])
            os.listdir(mnt)
            yield Mounted(time.perf_counter() - started, None)
        finally:
            _unmount(mnt)


class ErofsLz4hc(Erofs):
    name = "erofs-lz4hc"
    options = ("-zlz4hc",)


TOOL_NAMES = ["nydusfs", "squashfuse", "squashfuse_ll", "erofs-lz4hc", "erofs"]


def make_tools(
    names: list[str], images: Path, scratch: Path, src: Path, threads: int
) -> list[Tool]:
    classes: dict[str, Callable[[], Tool]] = {
        "nydusfs": lambda: Nydus(images, scratch, src, threads),
        "squashfuse": lambda: Squashfuse(images, scratch, src),
        "squashfuse_ll": lambda: SquashfuseLl(images, scratch, src),
        "erofs-lz4hc": lambda: ErofsLz4hc(images, scratch, src),
        "erofs": lambda: Erofs(images, scratch, src),
    }
    return [classes[n]() for n in names]


# --- results -------------------------------------------------------------------------------------

OPS = [
    ("mount", "cold", "mount + ls /"),
    ("walk", "cold", "find + stat"),
    ("walk", "warm", "find + stat"),
    ("seq", "cold", "seq read"),
    ("seq", "warm", "seq read"),
    ("rand", "cold", "4K random"),
    ("rand", "warm", "4K random"),
]


@dataclass
class Results:
    seconds: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)  # op,cache,tool
    hwm_kib: dict[str, int] = field(default_factory=dict)  # daemon VmHWM after the seq session
    problems: list[str] = field(default_factory=list)

    def add(self, op: str, cache: str, tool: str, seconds: float) -> None:
        self.seconds.setdefault((op, cache, tool), []).append(seconds)

    def median(self, op: str, cache: str, tool: str) -> float | None:
        values = self.seconds.get((op, cache, tool))
        return statistics.median(values) if values else None

    def check(self, what: str, tool: str, got: int, want: int) -> None:
        if got != want:
            self.problems.append(f"{tool}: {what}: got {got}, expected {want}")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def seconds_cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def print_results(res: Results, tools: list[str], load: Workload, repeat: int) -> None:
    peers = [t for t in tools if t != "nydusfs"]
    cols = ["operation", "cache", *tools]
    if "nydusfs" in tools:
        cols += [f"vs {p}" for p in peers]
    rows: list[list[str]] = []
    for op, cache, label in OPS:
        row = [label, cache] + [seconds_cell(res.median(op, cache, t)) for t in tools]
        if "nydusfs" in tools:
            ours = res.median(op, cache, "nydusfs")
            row += [ratio(ours, res.median(op, cache, p)) for p in peers]
        rows.append(row)
    print(f"\nseconds (median of {repeat} run(s)); 'vs X' = nydusfs seconds / X seconds")
    print_rows(cols, rows)

    rate_rows: list[list[str]] = []
    units = {
        "walk": ("us/entry", load.entries, 1e6),
        "seq": ("MB/s", load.total, 1e-6),
        "rand": ("us/read", len(load.reads), 1e6),
    }
    for op, cache, label in OPS[1:]:
        unit, n, scale = units[op]
        cells = []
        for t in tools:
            s = res.median(op, cache, t)
            if s is None or not s or not n:
                cells.append("-")
            elif op == "seq":
                cells.append(f"{n * scale / s:.0f}")
            else:
                cells.append(f"{s / n * scale:.1f}")
        rate_rows.append([label, cache, unit, *cells])
    print()
    print_rows(["operation", "cache", "unit", *tools], rate_rows)

    if res.hwm_kib:
        print()
        print_rows(
            ["daemon", "peak RSS (VmHWM) MB, after the seq-read session"],
            [[t, f"{kib / 1024:.1f}"] for t, kib in res.hwm_kib.items()],
        )
    print(
        "\nlegend: cold = page/dentry/inode caches dropped (drop_caches 3) and a fresh mount;"
        "\nfor nydusfs also an empty blob cache work dir. warm = the same pass again on that"
        "\nmount (kernel caches populated). mount + ls / = from the mount command until"
        "\nos.listdir(root) returns (nydusfs: polled every"
        f" {MOUNT_POLL * 1000:.0f} ms, so up to that much too long)."
        f"\nfind + stat = scandir recursion + lstat of {load.entries} entries."
        f"\nseq read = {len(load.files)} files, {load.total / 1e6:.1f} MB, read whole in"
        f" {IO_SIZE >> 10} KiB read() calls."
        f"\n4K random = {len(load.reads)} preads of {RANDOM_SIZE} B at 4 KiB-aligned offsets in"
        f" files >= {BIG_FILE >> 20} MiB (opened untimed)."
        "\nsquashfuse = libfuse high-level API (1 s entry/attr timeouts, path-based open: a warm"
        "\npass still sends LOOKUP and OPEN per file); squashfuse_ll = the same package's"
        "\nlow-level API; erofs* = kernel erofs on a loop device (the page-cache floor for warm"
        "\npasses); nydusfs = nydusd over pyfuse3, zstd RAFS v6, localfs backend + blobcache."
    )


def print_targets(res: Results) -> None:
    def line(what: str, op: str, cache: str, peer: str, limit: float) -> None:
        ours, theirs = res.median(op, cache, "nydusfs"), res.median(op, cache, peer)
        if ours is None or not theirs:
            print(f"target: {what}: not measured")
            return
        r = ours / theirs
        verdict = "met" if r <= limit else "NOT MET"
        also = ""
        if cache == "warm" and op != "walk" and res.median(op, cache, "erofs"):
            # a FUSE warm pass still pays round trips per file opened; the kernel's does not
            also = f"  (vs erofs: {ratio(ours, res.median(op, cache, 'erofs'))})"
        print(f"target: {what} (<= {limit:.2f}x {peer}): {r:.2f}x  {verdict}{also}")

    print()
    line("metadata walk, cold", "walk", "cold", "squashfuse", 2.0)
    line("metadata walk, warm", "walk", "warm", "squashfuse", 2.0)
    line("cold sequential read", "seq", "cold", "squashfuse", 1.5)
    # "equal": within 10 % (being faster counts as equal)
    line("warm page-cache sequential read equal", "seq", "warm", "squashfuse", 1.1)
    line("warm page-cache random reads equal", "rand", "warm", "squashfuse", 1.1)
    hwm = res.hwm_kib.get("nydusfs")
    if hwm:
        verdict = "met" if hwm < 100 * 1024 else "NOT MET"
        print(f"target: daemon RSS < 100 MB: {hwm / 1024:.1f} MB  {verdict}")
    print("(targets are informational; nothing here passes or fails)")


# --- the run -------------------------------------------------------------------------------------


def session(op: str, tool: Tool, mnt: Path, load: Workload, res: Results, rep: int) -> None:
    root = os.fsencode(mnt)
    with tool.mount(mnt) as mounted:
        res.add("mount", "cold", tool.name, mounted.seconds)
        done = [f"mount {mounted.seconds:.3f}s"]
        if op == "walk":
            for cache in ("cold", "warm"):
                seconds, count = timed(lambda: walk(root))
                res.add("walk", cache, tool.name, seconds)
                res.check(f"walk ({cache}) entries", tool.name, count, load.entries)
                done.append(f"walk {cache} {seconds:.3f}s")
        elif op == "seq":
            for cache in ("cold", "warm"):
                seconds, total = timed(lambda: read_all(root, load.files))
                res.add("seq", cache, tool.name, seconds)
                res.check(f"seq read ({cache}) bytes", tool.name, total, load.total)
                done.append(f"seq {cache} {seconds:.3f}s")
            if mounted.pid is not None:
                hwm = proc_status_kib(mounted.pid, "VmHWM")
                res.hwm_kib[tool.name] = max(res.hwm_kib.get(tool.name, 0), hwm)
                done.append(f"VmHWM {hwm / 1024:.1f} MB")
        else:
            fds = {rel: os.open(root + rel, os.O_RDONLY) for rel in {r for r, _ in load.reads}}
            try:
                for cache in ("cold", "warm"):
                    seconds, data = timed(lambda: read_random(fds, load.reads))
                    res.add("rand", cache, tool.name, seconds)
                    crc = 0
                    for block in data:
                        crc = zlib.crc32(block, crc)
                    res.check(f"random reads ({cache}) crc32", tool.name, crc, load.reads_crc)
                    done.append(f"rand {cache} {seconds:.3f}s")
            finally:
                for fd in fds.values():
                    os.close(fd)
    print(f"bench: [{rep}] {op:<4} {tool.name:<13} " + ", ".join(done), flush=True)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind through the finally blocks that unmount


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000, help="regular files in the tree")
    ap.add_argument("--mbytes", type=int, default=500, help="MB (10^6) of file data")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/nydusfs-bench"))
    ap.add_argument(
        "--tools", default=",".join(TOOL_NAMES), help="comma list of " + ", ".join(TOOL_NAMES)
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of every session (medians)")
    ap.add_argument("--random-reads", type=int, default=5000)
    ap.add_argument("--ops", default="walk,seq,rand", help="sessions to run: walk, seq, rand")
    ap.add_argument("--fuse-threads", type=int, default=4, help="nydusd --fuse-threads")
    args = ap.parse_args(argv)

    tools_wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools_wanted if t not in TOOL_NAMES]
    if unknown:
        ap.error(f"unknown tool(s): {', '.join(unknown)}")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not set(ops) <= {"walk", "seq", "rand"}:
        ap.error("--ops: from walk, seq, rand")
    if os.geteuid() != 0:
        ap.error("needs root (mount, drop_caches)")
    needed = {
        "squashfuse": ["mksquashfs", "squashfuse", "fusermount3"],
        "squashfuse_ll": ["mksquashfs", "squashfuse_ll", "fusermount3"],
        "erofs": ["mkfs.erofs"],
        "erofs-lz4hc": ["mkfs.erofs"],
    }
    missing = {b for t in tools_wanted for b in needed.get(t, []) if shutil.which(b) is None}
    if missing:
        ap.error(
            f"not found: {', '.join(sorted(missing))} (squashfuse squashfs-tools erofs-utils fuse3)"
        )

    signal.signal(signal.SIGTERM, _sigterm)
    workdir: Path = args.workdir.resolve()
    src, n_files, n_bytes = ensure_tree(
        workdir, files=args.files, mbytes=args.mbytes, seed=args.seed
    )
    print(f"bench: tree {src}: {n_files} regular files, {n_bytes / 1e6:.1f} MB", flush=True)
    base = workdir / "mount"
    images, scratch, mnts = base / "images", base / "run", base / "mnt"
    tree_params = json.loads((workdir / "tree.json").read_text())
    tools = make_tools(tools_wanted, images, scratch, src, args.fuse_threads)

    for tool in tools:
        if isinstance(tool, SquashfuseLl) and any(t.name == "squashfuse" for t in tools):
            continue  # shares the squashfuse image
        params = {"tree": tree_params, **tool.params()}
        started = time.perf_counter()
        if reuse_or_build(tool.image_dir, params, tool.build):
            took = time.perf_counter() - started
            print(f"bench: built the {tool.name} image in {took:.1f}s", flush=True)
    print_rows(
        ["image", "MB"],
        [
            [t.name, f"{t.image_bytes() / 1e6:.1f}"]
            for t in tools
            if not isinstance(t, SquashfuseLl)
        ],
    )

    load = scan_source(src, args.random_reads, args.seed)
    print(
        f"bench: {load.entries} entries, {len(load.files)} files to read "
        f"({load.total / 1e6:.1f} MB), {len(load.reads)} random reads over "
        f"{len({r for r, _ in load.reads})} files",
        flush=True,
    )

    res = Results()
    if not drop_caches():
        raise SystemExit("bench: cannot drop caches")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for tool in tools:
        _unmount(mnts / tool.name)  # a mount left by an interrupted earlier run
    try:
        for rep in range(1, args.repeat + 1):
            for op in ops:
                for tool in tools:
                    session(op, tool, mnts / tool.name, load, res, rep)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        for tool in tools:
            _unmount(mnts / tool.name)
        shutil.rmtree(scratch, ignore_errors=True)
        left = [t.name for t in tools if is_mounted(mnts / t.name)]
        if left:
            print(f"bench: WARNING: still mounted: {', '.join(left)}", file=sys.stderr)

    print_results(res, [t.name for t in tools], load, args.repeat)
    print_targets(res)
    for problem in res.problems:
        print(f"bench: CHECK FAILED: {problem}")
    return 1 if res.problems else 0


if __name__ == "__main__":
    sys.exit(main())
