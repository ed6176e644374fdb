#!/usr/bin/env python3
"""virtio-fs benchmark: nydusd's vhost-user-fs device against QEMU's virtiofsd, one guest.

One QEMU (TCG) guest gets two virtio-fs devices: ``nydus`` served by ``nydusd virtiofs`` from a
RAFS v6 image (zstd, blob cache in a fresh work dir) and ``ref`` served by QEMU's own C
``virtiofsd`` (``/usr/lib/qemu/virtiofsd``, QEMU 7.2; Debian bookworm has no separate
virtiofsd package) sharing the unpacked source tree. The guest times, for each device in turn:

* walk: ``find`` over the whole tree (lookups, getattr, readdir);
* read: every regular file read whole (``cat`` to /dev/null);

``--passes`` times. The guest's page and dentry caches are dropped before each operation, so
each pass asks the daemon again; the first pass is cold on the host (host page cache dropped,
nydusd's blob cache empty), later passes are warm. Times come from the guest's /proc/uptime
(10 ms resolution). Everything runs under TCG, so the guest itself is slow and bounds the
wall times; the host CPU seconds each daemon spent serving its own operation (from
/proc/PID/stat, sampled as the guest reports each operation's start and end) show the
daemons' own cost. Prints figures, asserts nothing.

Needs root, ``qemu-system-x86``, ``busybox-static``, ``cpio``, ``gcc`` and the guest kernel
that ``make deps`` fetches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from nydusfs.rafs.builder.build import BuildOptions, build
from tests.e2e.guest import (
    VIRTIOFSD,
    Guest,
    build_initramfs,
    is_socket,
    missing_tools,
    virtiofs_daemon,
)
from tests.helpers.servers import stop_process
from tests.mount.nydusd_proc import localfs_config, write_config

DEVICES = ("nydus", "ref")

SCRIPT = """
for tag in {tags}; do
    mkdir -p /mnt/$tag && mount -t virtiofs $tag /mnt/$tag || exit 1
done
now() {{ cut -d' ' -f1 /proc/uptime; }}
for pass in $(seq 1 {passes}); do
    for tag in {tags}; do
        sync; echo 3 > /proc/sys/vm/drop_caches; echo BEGIN
        t0=$(now); n=$(find /mnt/$tag | wc -l); t1=$(now)
        echo "BENCH $pass $tag walk $t0 $t1 $n"
        sync; echo 3 > /proc/sys/vm/drop_caches; echo BEGIN
        t0=$(now); find /mnt/$tag -type f -exec cat {{}} + | wc -c > /tmp/bytes; t1=$(now)
        echo "BENCH $pass $tag read $t0 $t1 $(cat /tmp/bytes)"
    done
done
"""


def _image(src: Path, out: Path) -> None:
    build(BuildOptions(source=str(src), bootstrap=str(out / "image.boot"), blob_dir=str(out)))


def _start_virtiofsd(sock: Path, source: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={source}", "-o", "cache=auto"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not is_socket(str(sock)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: virtiofsd did not start: {proc.stderr.read()!r}")
        time.sleep(0.05)
    return proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--mbytes", type=int, default=100)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/nydusfs-bench/virtiofs"))
    args = p.parse_args()
    missing = missing_tools() + ([] if os.path.exists(VIRTIOFSD) else [VIRTIOFSD])
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)} (make deps)")
    src, nfiles, nbytes = _common.ensure_tree(
        args.workdir, files=args.files, mbytes=args.mbytes, seed=args.seed
    )
    images = args.workdir / "image"
    params = {"tree": [nfiles, nbytes], "code": _common.source_digest([_common.REPO / "nydusfs"])}
    if _common.reuse_or_build(images, params, lambda out: _image(src, out)):
        print("bench: built the RAFS image", flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        run = Path(tmp)
        initramfs = build_initramfs(
            run / "initramfs.cpio", SCRIPT.format(tags=" ".join(DEVICES), passes=args.passes)
        )
        config = write_config(run / "config.json", localfs_config(images, run / "cache"))
        socks = {tag: run / f"{tag}.sock" for tag in DEVICES}
        cpu: dict[tuple[str, str, str], float] = {}
        _common.drop_caches()
        ref = _start_virtiofsd(socks["ref"], src)
        try:
            nydus_args = ["--config", str(config), "--bootstrap", str(images / "image.boot")]
            with virtiofs_daemon(socks["nydus"], *nydus_args, "--log-level", "warn") as nydus:
                pids = {"nydus": nydus.pid, "ref": ref.pid}
                begin: dict[str, float] = {}

                def on_line(line: str) -> None:
                    # Host CPU of both daemons at each operation's start and end.
                    now = {tag: _cpu_seconds(pid) for tag, pid in pids.items()}
                    if line == "BEGIN":
                        begin.update(now)
                    elif line.startswith("BENCH ") and begin:
                        _, npass, tag, op = line.split()[:4]
                        cpu[(npass, tag, op)] = now[tag] - begin[tag]

                devices = [(str(socks[t]), t) for t in DEVICES]
                guest = Guest(initramfs, devices, memory_mb=512, on_line=on_line)
                lines = guest.run(timeout=3600)
        finally:
            stop_process(ref)
    _report(lines, cpu, nfiles, nbytes, args.passes)
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process and its descendants (virtiofsd serves from
    a child in its sandbox); 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        children: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(_cpu_seconds(child) for child in children)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _report(
    lines: list[str], cpu: dict[tuple[str, str, str], float], nfiles: int, nbytes: int,
    passes: int,
) -> None:  # fmt: skip
    times: dict[tuple[str, str, str], float] = {}
    counts: dict[tuple[str, str], set[str]] = {}
    for line in lines:
        if line.startswith("BENCH "):
            _, npass, tag, op, t0, t1, n = line.split()
            phase = "cold" if npass == "1" else "warm"
            key = (tag, op, phase)
            if phase == "warm" and key in times:
                times[key] = statistics.median([times[key], float(t1) - float(t0)])
            times.setdefault(key, float(t1) - float(t0))
            counts.setdefault((tag, op), set()).add(n)
    print(f"\ntree: {nfiles} files, {nbytes / 1e6:.1f} MB; guest under TCG; "
          f"{passes} passes (1 cold, the rest warm: median)")  # fmt: skip
    for (tag, op), seen in sorted(counts.items()):
        print(f"  {tag} {op}: {'entries' if op == 'walk' else 'bytes'} read {', '.join(seen)}")
    rows = []
    for op in ("walk", "read"):
        for phase in ("cold", "warm"):
            mine, peer = times.get(("nydus", op, phase)), times.get(("ref", op, phase))
            if mine is None or peer is None:
                continue
            mbs = [f"{nbytes / 1e6 / t:.1f}" if op == "read" and t else "-" for t in (mine, peer)]
            ratio = f"{mine / peer:.2f}x" if peer else "-"
            passes_of = ["1"] if phase == "cold" else [str(i) for i in range(2, passes + 1)]
            c_mine, c_peer = (
                _median([cpu[(n, tag, op)] for n in passes_of if (n, tag, op) in cpu])
                for tag in ("nydus", "ref")
            )
            cpu_cols = [f"{c:.2f}" if c is not None else "-" for c in (c_mine, c_peer)]
            cpu_ratio = f"{c_mine / c_peer:.1f}x" if c_mine is not None and c_peer else "-"
            rows.append([op, phase, f"{mine:.2f}", mbs[0], f"{peer:.2f}", mbs[1], ratio,
                         *cpu_cols, cpu_ratio])  # fmt: skip
    cols = ["op", "phase", "nydusd s", "MB/s", "virtiofsd s", "MB/s", "ratio",
            "nydusd CPU s", "virtiofsd CPU s", "CPU ratio"]  # fmt: skip
    _common.print_rows(cols, rows)


if __name__ == "__main__":
    sys.exit(main())
