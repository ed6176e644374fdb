"""Shared benchmark plumbing: the generated source tree, cache dropping, timed child processes
and the result table. Each benchmark runs our tool side by side with a peer in the same run."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.helpers and, uninstalled, nydusfs itself

from tests.helpers.tree import make_tree  # noqa: E402

TREE_GENERATOR = REPO / "tests" / "helpers" / "tree.py"
# erofs-utils 1.5 fails on 255-byte names, and the same tree must suit every tool.
LONG_NAME = 254


def fs_type(path: Path) -> str:
    """The filesystem type name of ``path`` as ``stat -f`` reports it (``tmpfs``, ``ext2/ext3``)."""
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip()


def tree_bytes(root: Path) -> tuple[int, int]:
    """``(regular files, their apparent bytes)`` under ``root``, hard links counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(os.fsencode(root)):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_mode & 0o170000 == 0o100000 and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return len(seen), total


def ensure_tree(workdir: Path, *, files: int, mbytes: int, seed: int) -> tuple[Path, int, int]:
    """The source tree under ``workdir/src``, generated unless one with the same parameters (and
    the same generator code) is already there. Returns ``(root, files, bytes)``."""
    workdir.mkdir(parents=True, exist_ok=True)
    if fs_type(workdir) == "tmpfs":
        raise SystemExit(f"bench: {workdir} is on tmpfs; use a disk-backed --workdir")
    params = {
        "files": files,
        "mbytes": mbytes,
        "seed": seed,
        "long_name": LONG_NAME,
        "generator": hashlib.sha256(TREE_GENERATOR.read_bytes()).hexdigest(),
    }
    stamp = workdir / "tree.json"
    src = workdir / "src"
    if stamp.exists() and src.exists():
        old = json.loads(stamp.read_text())
        if old.get("params") == params:
            return src, old["files"], old["bytes"]
    stamp.unlink(missing_ok=True)
    shutil.rmtree(src, ignore_errors=True)
    print(f"bench: generating {files} files / {mbytes} MB in {src} ...", flush=True)
    started = time.perf_counter()
    make_tree(
        src,
        files=files,
        total_bytes=mbytes * 1_000_000,
        seed=seed,
        long_name=LONG_NAME,
    )
    n, size = tree_bytes(src)
    stamp.write_text(json.dumps({"params": params, "files": n, "bytes": size}))
    print(f"bench: generated in {time.perf_counter() - started:.1f}s", flush=True)
    return src, n, size


def drop_caches() -> bool:
    """Write back and drop the page cache (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def source_digest(paths: Sequence[Path]) -> str:
    """sha256 over the ``*.py`` files of ``paths`` (files or directories, recursively): a
    reused output is rebuilt when the code that made it changes."""
    h = hashlib.sha256()
    for path in paths:
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


def tool_version(argv: Sequence[str]) -> str:
    """The first output line of ``argv`` (e.g. ``["mksquashfs", "-version"]``), for stamps."""
    out = subprocess.run(list(argv), capture_output=True, text=True)
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0] if lines else ""


def reuse_or_build(out: Path, params: dict[str, Any], build: Callable[[Path], None]) -> bool:
    """Run ``build(out)`` into an emptied ``out`` unless ``out/stamp.json`` records the same
    ``params`` (a finished earlier build). Returns True when it built."""
    params = json.loads(json.dumps(params))  # as it reads back (tuples become lists)
    stamp = out / "stamp.json"
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("params") == params:
                return False
        except ValueError:
            pass
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    build(out)
    stamp.write_text(json.dumps({"params": params}))  # last: an interrupted build is redone
    return True


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``); 0 when unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def du(paths: Sequence[Path]) -> int:
    """Apparent bytes of files and directory trees (what would be shipped)."""
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.exists():
            total += path.stat().st_size
    return total


@dataclass
class Result:
    name: str
    cache: str  # "cold" | "warm"
    seconds: float = 0.0
    out_bytes: int = 0
    cpu_seconds: float = 0.0
    peak_rss_kib: int = 0
    error: str = ""
    output: str = ""  # the child's stdout and stderr
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def cpu_util(self) -> float:
        """(user + sys) / wall: above 1.0 means more than one core was busy."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0


def run_timed(
    name: str, cache: str, cmd: Sequence[str], outputs: Sequence[Path], env: dict[str, str]
) -> Result:
    """Run ``cmd`` to completion; wall time, CPU from RUSAGE_CHILDREN deltas, peak RSS of the
    child (wait4's own rusage, since RUSAGE_CHILDREN's maxrss is a max over all children ever)."""
    result = Result(name, cache)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    with proc.stdout:
        output = proc.stdout.read()  # drained while it runs: a chatty child cannot block
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result.seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result.peak_rss_kib = usage.ru_maxrss
    result.output = output.decode(errors="replace")
    if proc.returncode != 0:
        tail = result.output.strip().splitlines()[-5:]
        result.error = f"exit {proc.returncode}: " + " | ".join(tail)
    else:
        result.out_bytes = du(outputs)
    return result


def print_rows(cols: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain text table: a header, a rule, then the rows, columns left-aligned."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def print_table(
    results: Sequence[Result], input_bytes: int, baselines: dict[str, str], nproc: int
) -> None:
    """One row per run; ``baselines`` maps a column title to the tool name whose run (same cache
    state) each row's time is divided by."""
    by_key = {(r.name, r.cache): r for r in results}
    cols = ["tool", "cache", "seconds", "output MB", "MB/s", "cpu/wall", "peak RSS MB"]
    cols += list(baselines)
    rows: list[list[str]] = []
    for r in results:
        if not r.ok:
            rows.append([r.name, r.cache, "FAILED", "", "", "", ""] + [""] * len(baselines))
            continue
        row = [
            r.name,
            r.cache,
            f"{r.seconds:.2f}",
            f"{r.out_bytes / 1e6:.1f}",
            f"{input_bytes / 1e6 / r.seconds:.1f}" if r.seconds else "-",
            f"{r.cpu_util:.2f}",
            f"{r.peak_rss_kib / 1024:.0f}",
        ]
        for peer in baselines.values():
            base = by_key.get((peer, r.cache))
            ratio = r.seconds / base.seconds if base and base.ok and base.seconds else None
            row.append(f"{ratio:.2f}x" if ratio is not None else "-")
        rows.append(row)
    print()
    print_rows(cols, rows)
    print(
        f"\ninput: {input_bytes / 1e6:.1f} MB of regular files; MB/s = input / seconds; "
        f"cpu/wall = (user+sys)/wall over {nproc} core(s): above 1 means parallel work;\n"
        f"'vs X' = seconds / X's seconds in the same cache state (2.00x = twice as long)"
    )
    for r in results:
        if not r.ok:
            print(f"{r.name} ({r.cache}) failed: {r.error}")
