#!/usr/bin/env python3
"""Storage benchmark: a cold read of an image's blob through the registry backend and the blob
cache, side by side with ``curl`` fetching the same blob bytes from the same registry in the same
run, plus the bytes fetched versus the bytes read for a partial (start-up-like) read.

Setup (untimed): the generated tree (``_common.ensure_tree``) is built into a zstd RAFS v6 image
(kept in ``<workdir>/storage-image`` and reused while the tree and the builder are unchanged),
Debian's ``docker-registry`` is started on 127.0.0.1 with a private config and storage under the
work dir, and the blob is pushed to it. The registry is stopped when the bench ends, however it
ends (error, Ctrl-C, SIGTERM; ``PR_SET_PDEATHSIG`` covers a killed bench).

Runs, all against that registry, each with an empty cache work dir:

1. ``curl -o /dev/null`` of the whole blob, ``--curl-runs`` times: the peer (best, median).
   Then one ``curl`` fetching the blob in 1 MiB ranges over one connection: the same bytes in
   the cache's request size, which shows what the registry's per-request cost alone allows.
2. Every regular file of the image read through ``RafsFs.read`` in 1 MiB reads by N concurrent
   readers (``--readers``; FUSE issues concurrent requests), ``rafs.batch_size`` 1 MiB.
3. Blob-level prefetch (``cache.prefetch.enable``: ``prefetch_blobs`` then ``wait_prefetch``),
   the closest analogue of curl's sequential whole-blob fetch, for each
   ``cache.prefetch.batch_size`` of ``--prefetch-batches``.
4. A partial read: ~``--partial-percent`` % of the files (seeded, stratified by size so that
   small and large files are both in), read fully, with ``rafs.batch_size`` 1 MiB and 0; its
   data is checked against the source tree.

Throughput is blob bytes fetched from the backend per wall second, compared with curl's median.
Memory is the peak RSS of this process during each run (``VmHWM``, reset before the run). The
registry and this process share the host's cores: the table shows the registry's CPU time too.
``--profile DIR`` writes a cProfile of the trio thread of each nydusfs run (worker threads are
not profiled).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
from _common import (
    REPO,
    ensure_tree,
    print_rows,
    proc_status_kib,
    reuse_or_build,
    run_timed,
    source_digest,
)

from nydusfs.config import ConfigV2, load_config
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.rafs.fs import RafsFs
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage.backends import new_backend
from nydusfs.storage.blobdevice import BlobDevice
from nydusfs.types import Compressor, Context
from tests.helpers.registry_servers import DockerRegistry, have_registry
from tests.helpers.servers import stop_process

REPO_NAME = "bench/storage"
IO_SIZE = 1 << 20  # bytes per RafsFs.read, as a FUSE max_read of 1 MiB
BATCH_SIZE = 1 << 20  # rafs.batch_size default (upstream amplify_io)
CTX = Context(0, 0, 0)
CURL_FORMAT = "%{size_download} %{time_total} %{http_code}\n"


# --- process memory ----------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` (``/proc/self/clear_refs`` 5, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_kib() -> int:
    """This process's peak RSS since start or the last ``reset_peak_rss``."""
    return (
        proc_status_kib(os.getpid(), "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pid: int) -> float:
    """User + system seconds of process ``pid`` (the registry), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- setup ---------------------------------------------------------------------------------------


@dataclass
class Image:
    bootstrap: Path
    blob: Path
    blob_id: str
    blob_size: int


def ensure_image(workdir: Path, src: Path) -> Image:
    """The zstd image of ``src`` under ``workdir/storage-image``, built unless one from the same
    tree (its ``tree.json``) and the same builder and format code is already there."""
    out = workdir / "storage-image"
    code = [REPO / "nydusfs" / "rafs" / d for d in ("builder", "layout")]
    code += [REPO / "nydusfs" / "storage" / f for f in ("compress.py", "meta.py")]
    params = {
        "tree": json.loads((workdir / "tree.json").read_text()),
        "compressor": "zstd",
        "code": source_digest(code),
    }

    def make(out: Path) -> None:
        (out / "blobs").mkdir()
        print(f"bench: building the zstd image in {out} ...", flush=True)
        started = time.perf_counter()
        result = build(
            BuildOptions(
                source=str(src),
                bootstrap=str(out / "image.boot"),
                blob_dir=str(out / "blobs"),
                compressor=Compressor.ZSTD,
            )
        )
        if len(result.blobs) != 1:
            raise SystemExit(f"bench: expected one blob, the build made {len(result.blobs)}")
        print(f"bench: built in {time.perf_counter() - started:.1f}s", flush=True)

    reuse_or_build(out, params, make)
    (blob,) = (out / "blobs").iterdir()  # named by its id (the sha256 of its bytes)
    return Image(out / "image.boot", blob, blob.name, blob.stat().st_size)


def push(registry: DockerRegistry, image: Image) -> None:
    data = image.blob.read_bytes()
    digest = registry.push_blob(REPO_NAME, data)
    if digest != image.blob_id:
        raise SystemExit(f"bench: blob id {image.blob_id} is not its sha256 ({digest})")


# --- the workload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRef:
    path: bytes
    ino: int
    size: int


def regular_files(sup: RafsSuper) -> list[FileRef]:
    """Every regular file of the image once (hard links once), in directory walk order."""
    seen: set[int] = set()
    out = []
    for path, node in sup.walk():
        if node.is_reg() and node.ino not in seen:
            seen.add(node.ino)
            out.append(FileRef(path, node.ino, node.size))
    return out


def partial_set(files: list[FileRef], percent: float, seed: int) -> list[FileRef]:
    """``percent`` % of the non-empty files, drawn evenly from ten size bands (seeded), so the
    set mixes tiny and large files; returned in walk order, like a start-up's file accesses."""
    rng = random.Random(seed)
    by_size = sorted((f for f in files if f.size), key=lambda f: f.size)
    bands = 10
    picked: set[int] = set()
    for b in range(bands):
        band = by_size[len(by_size) * b // bands : len(by_size) * (b + 1) // bands]
        want = max(1, round(len(band) * percent / 100)) if band else 0
        picked.update(f.ino for f in rng.sample(band, min(want, len(band))))
    return [f for f in files if f.ino in picked]


def needed_compressed(sup: RafsSuper, files: list[FileRef]) -> int:
    """Compressed bytes of the distinct chunks behind ``files``: what an ideal fetch takes."""
    chunks: dict[tuple[int, int], int] = {}
    for f in files:
        for c in sup.inode(f.ino).chunks():
            chunks[(c.blob_index, c.index)] = c.compressed_size
    return sum(chunks.values())


async def read_files(
    fs: RafsFs, files: list[FileRef], readers: int, crcs: dict[int, int] | None
) -> int:
    """Read ``files`` fully in ``IO_SIZE`` reads, ``readers`` at a time; returns bytes read.
    With ``crcs``, records each file's CRC-32 (cheap enough not to matter at these sizes)."""
    todo: Iterator[FileRef] = iter(files)  # shared: each reader takes the next file
    delivered = 0

    async def reader() -> None:
        nonlocal delivered
        for f in todo:
            crc = 0
            offset = 0
            while offset < f.size:
                data = await fs.read(CTX, f.ino, 0, offset, IO_SIZE)
                if not data:
                    raise RuntimeError(f"{f.path!r}: short read at {offset} of {f.size}")
                if crcs is not None:
                    crc = zlib.crc32(data, crc)
                offset += len(data)
            delivered += offset
            if crcs is not None:
                crcs[f.ino] = crc

    async with trio.open_nursery() as nursery:
        for _ in range(readers):
            nursery.start_soon(reader)
    return delivered


def source_crc(src: Path, path: bytes) -> int:
    crc = 0
    with open(os.fsencode(src) + path, "rb") as f:
        while block := f.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc


# --- runs ----------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    readers: int = 0
    seconds: float = 0.0
    fetched: int = 0  # blob bytes from the backend (curl: bytes downloaded)
    requests: int = 0
    delivered: int = 0  # file bytes returned by RafsFs.read
    cpu_seconds: float = 0.0
    server_cpu: float = 0.0  # the registry's
    peak_rss_kib: int = 0
    needed: int = 0  # partial runs: compressed bytes of the chunks the files need
    error: str = ""

    @property
    def fetch_mbps(self) -> float:
        return self.fetched / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def deliver_mbps(self) -> float:
        return self.delivered / 1e6 / self.seconds if self.seconds else 0.0


def make_config(
    host: str,
    work_dir: Path,
    *,
    batch_size: int,
    prefetch: bool,
    prefetch_batch: int = BATCH_SIZE,
) -> ConfigV2:
    doc = {
        "version": 2,
        "id": "bench-storage",
        "backend": {
            "type": "registry",
            "registry": {"scheme": "http", "host": host, "repo": REPO_NAME},
        },
        "cache": {
            "type": "blobcache",
            "filecache": {"work_dir": str(work_dir)},
            "prefetch": {"enable": prefetch, "batch_size": prefetch_batch},
        },
        "rafs": {"batch_size": batch_size},
    }
    return load_config(json.dumps(doc))


Workload = Callable[[RafsFs, BlobDevice], Awaitable[int]]


class Bench:
    def __init__(
        self,
        registry: DockerRegistry,
        sup: RafsSuper,
        scratch: Path,
        profile_dir: Path | None,
        host: str | None = None,
    ) -> None:
        self.registry = registry
        self.host = host or registry.host  # where nydusfs sends its requests (a proxy, maybe)
        self.sup = sup
        self.scratch = scratch  # cache work dirs and curl's config go here
        self.profile_dir = profile_dir

    def curl(self, name: str, url: str, size: int, range_size: int = 0) -> Run:
        """``curl`` of the blob to /dev/null: one GET, or (``range_size``) sequential ranged
        GETs of ``range_size`` bytes over one connection (``--next``), as a cache would ask."""
        run = Run(name, readers=1)
        ranges = [(o, min(o + range_size, size) - 1) for o in range(0, size, range_size or size)]
        fd, conf_name = tempfile.mkstemp(prefix="curl-", suffix=".conf", dir=self.scratch)
        os.close(fd)
        conf = Path(conf_name)
        lines = []
        for i, (first, last) in enumerate(ranges):
            lines += ["next"] if i else []
            lines += [f'url = "{url}"', 'output = "/dev/null"', f'write-out = "{CURL_FORMAT}"']
            lines += [f'range = "{first}-{last}"'] if range_size else []
        conf.write_text("\n".join(lines) + "\n")
        server = cpu_of(self.registry.proc.pid)
        try:
            result = run_timed(name, "cold", ["curl", "-s", "-S", "--fail", "-K", str(conf)], [],
                               dict(os.environ))  # fmt: skip
        finally:
            conf.unlink(missing_ok=True)
        run.server_cpu = cpu_of(self.registry.proc.pid) - server
        if not result.ok:
            run.error = result.error
            return run
        answers = [line.split() for line in result.output.splitlines() if line.strip()]
        run.fetched = run.delivered = sum(int(a[0]) for a in answers)
        # One GET: curl's own transfer time; several: the process's wall time (all of them).
        run.seconds = float(answers[0][1]) if len(answers) == 1 else result.seconds
        run.requests = len(answers)
        run.cpu_seconds = result.cpu_seconds
        # Not curl's: a child's ru_maxrss keeps the forking parent's high-water mark over exec.
        run.peak_rss_kib = 0
        bad = [a[2] for a in answers if a[2] not in ("200", "206")]
        if bad or run.fetched != size:
            run.error = f"HTTP {bad[0]}" if bad else f"fetched {run.fetched} of {size} bytes"
        print(f"bench: {name}: {run.fetch_mbps:.0f} MB/s", flush=True)
        return run

    def nydus(
        self,
        name: str,
        work: Workload,
        *,
        readers: int,
        batch_size: int,
        prefetch: bool,
        prefetch_batch: int = BATCH_SIZE,
    ) -> Run:
        """One measured run with a fresh cache work dir: backend + device + RafsFs, ``work``
        timed from its first request to its last byte (setup and close are not timed)."""
        run = Run(name, readers=readers)
        cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=self.scratch))
        config = make_config(
            self.host, cache_dir,
            batch_size=batch_size, prefetch=prefetch, prefetch_batch=prefetch_batch,
        )  # fmt: skip
        assert config.backend is not None
        backend = new_backend(config.backend, "bench-storage")
        profiler = cProfile.Profile() if self.profile_dir is not None else None
        print(f"bench: {name} ...", flush=True)
        try:
            reset_peak_rss()
            device = BlobDevice(self.sup.blobs, config, backend)
            fs = RafsFs(self.sup, device)

            async def main() -> None:
                async with trio.open_nursery() as nursery:
                    device.start(nursery)
                    try:
                        cpu, server = cpu_self(), cpu_of(self.registry.proc.pid)
                        started = time.perf_counter()
                        if profiler is not None:
                            profiler.enable()
                        run.delivered = await work(fs, device)
                        if profiler is not None:
                            profiler.disable()
                        run.seconds = time.perf_counter() - started
                        run.cpu_seconds = cpu_self() - cpu
                        run.server_cpu = cpu_of(self.registry.proc.pid) - server
                    finally:
                        with trio.CancelScope(shield=True):
                            await device.close()

            trio.run(main)
            run.peak_rss_kib = peak_rss_kib()
            metrics = backend.metrics.to_dict()
            run.fetched = metrics["read_amount_total"]
            run.requests = metrics["read_count"]
            if metrics["read_errors"]:
                run.error = f"{metrics['read_errors']} backend read errors"
        except Exception as e:  # one failed run must not hide the others' results
            run.error = f"{type(e).__name__}: {e}"
        finally:
            backend.close()
            shutil.rmtree(cache_dir, ignore_errors=True)
        if profiler is not None and self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            slug = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
            profiler.dump_stats(self.profile_dir / f"{slug}.pstats")
        if run.error:
            print(f"bench: {name} failed: {run.error}", flush=True)
        return run


@contextlib.contextmanager
def throttled(upstream: str, mbit: float) -> Iterator[str]:
    """A ``bench/_throttle.py`` proxy to ``upstream`` in a process of its own; yields its
    host:port and stops it afterwards."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_throttle.py")),
         "--upstream", upstream, "--mbit", str(mbit)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        host = proc.stdout.readline().strip()
        if not host:
            raise SystemExit(f"bench: the throttling proxy did not start ({proc.wait()})")
        yield host
    finally:
        stop_process(proc)


# --- report --------------------------------------------------------------------------------------


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_throughput(runs: list[Run], curl_median: float, curl_ranges: float) -> None:
    cols = ["run", "readers", "seconds", "fetched MB", "fetch MB/s", "file MB/s", "requests"]
    cols += ["cpu/wall", "registry cpu s", "peak RSS MB", "vs curl", "vs curl 1M ranges"]
    rows = []
    for r in runs:
        if r.error:
            rows.append([r.name, str(r.readers or "-"), "FAILED"] + [""] * (len(cols) - 3))
            continue
        rows.append([
            r.name,
            str(r.readers or "-"),
            f"{r.seconds:.2f}",
            mb(r.fetched),
            f"{r.fetch_mbps:.0f}",
            f"{r.deliver_mbps:.0f}" if r.delivered and not r.name.startswith("curl") else "-",
            str(r.requests),
            f"{r.cpu_seconds / r.seconds:.2f}" if r.seconds else "-",
            f"{r.server_cpu:.2f}",
            f"{r.peak_rss_kib / 1024:.0f}" if r.peak_rss_kib else "-",
            ratio(r.fetch_mbps, curl_median),
            ratio(r.fetch_mbps, curl_ranges),
        ])  # fmt: skip
    print()
    print_rows(cols, rows)


def print_partial(runs: list[Run]) -> None:
    cols = ["run", "readers", "seconds", "read MB", "needed MB", "fetched MB", "requests"]
    cols += ["fetched/read", "fetched/needed", "peak RSS MB"]
    rows = []
    for r in runs:
        if r.error:
            rows.append([r.name, str(r.readers), "FAILED"] + [""] * (len(cols) - 3))
            continue
        rows.append([
            r.name,
            str(r.readers),
            f"{r.seconds:.2f}",
            mb(r.delivered),
            mb(r.needed),
            mb(r.fetched),
            str(r.requests),
            ratio(r.fetched, r.delivered),
            ratio(r.fetched, r.needed),
            f"{r.peak_rss_kib / 1024:.0f}",
        ])  # fmt: skip
    print()
    print_rows(cols, rows)


# --- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then act as interrupted."""
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    old = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if pending:
        raise KeyboardInterrupt


def _sigterm(signum: int, frame: FrameType | None) -> None:
    # As a Ctrl-C: inside trio.run, trio's SIGINT handler raises KeyboardInterrupt where it is
    # safe; either way the finally blocks that stop the registry run.
    signal.raise_signal(signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C and SIGTERM unwind (a shell may start a background job with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return bench_main(argv)
    except BaseException as e:
        # trio delivers it inside a nursery: then it comes wrapped in an exception group.
        if isinstance(e, BaseExceptionGroup):
            interrupt, rest = e.split(KeyboardInterrupt)
            if interrupt is None or rest is not None:
                raise
        elif not isinstance(e, KeyboardInterrupt):
            raise
        print("bench: interrupted", file=sys.stderr)
        return 130


def bench_main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000, help="regular files in the tree")
    ap.add_argument("--mbytes", type=int, default=500, help="MB (10^6) of file data")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/nydusfs-bench"))
    ap.add_argument("--readers", default="1,8", help="comma list of concurrent reader counts")
    ap.add_argument("--curl-runs", type=int, default=5)
    ap.add_argument("--partial-percent", type=float, default=5.0)
    ap.add_argument(
        "--prefetch-batches", default="1,4",
        help="comma list of cache.prefetch.batch_size values in MiB, one prefetch run each",
    )  # fmt: skip
    ap.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="cProfile the trio thread of each nydusfs run into DIR/<run>.pstats",
    )  # fmt: skip
    ap.add_argument(
        "--link-mbit", type=float, default=500.0,
        help="also run curl and nydusfs through a link of this many Mbit/s (0: skip)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    readers = [int(n) for n in args.readers.split(",") if n.strip()]
    if not readers or min(readers) < 1:
        ap.error("--readers: positive integers")
    prefetch_batches = [float(n) for n in args.prefetch_batches.split(",") if n.strip()]
    if not have_registry():
        ap.error("docker-registry not found (apt-get install docker-registry, or `make deps`)")
    if shutil.which("curl") is None:
        ap.error("curl not found")

    workdir: Path = args.workdir.resolve()
    src, n_files, n_bytes = ensure_tree(
        workdir, files=args.files, mbytes=args.mbytes, seed=args.seed
    )
    print(f"bench: tree {src}: {n_files} regular files, {n_bytes / 1e6:.1f} MB", flush=True)
    image = ensure_image(workdir, src)
    print(f"bench: blob {image.blob_id[:16]}…: {image.blob_size / 1e6:.1f} MB", flush=True)
    sup = RafsSuper.load(image.bootstrap)
    files = regular_files(sup)
    partial = partial_set(files, args.partial_percent, args.seed)

    # Everything a run leaves (registry storage, cache work dirs) is under one scratch dir,
    # removed at the end however the bench ends.
    scratch = Path(tempfile.mkdtemp(prefix="storage-run-", dir=workdir))
    registry: DockerRegistry | None = None
    try:
        (scratch / "registry").mkdir()
        registry = DockerRegistry(scratch / "registry")
        print(f"bench: docker-registry on {registry.host}; pushing the blob ...", flush=True)
        push(registry, image)
        bench = Bench(registry, sup, scratch, args.profile)
        setup_peak = peak_rss_kib()  # build and in-memory push, before the first reset
        url = f"{registry.url}/v2/{REPO_NAME}/blobs/sha256:{image.blob_id}"

        curls = [bench.curl(f"curl #{i + 1}", url, image.blob_size) for i in range(args.curl_runs)]
        good = [c for c in curls if not c.error]
        if not good:
            raise SystemExit(f"bench: curl failed: {curls[0].error}")
        speeds = sorted(c.fetch_mbps for c in good)
        curl_median = statistics.median(speeds)
        median_run = min(good, key=lambda c: abs(c.fetch_mbps - curl_median))
        best_run = max(good, key=lambda c: c.fetch_mbps)
        throughput = [best_run] if best_run is median_run else [best_run, median_run]
        best_run.name = "curl, whole blob (best)"
        median_run.name = "curl, whole blob (median)"
        ranged = bench.curl("curl, 1 MiB ranges", url, image.blob_size, BATCH_SIZE)
        throughput.append(ranged)

        def read_all(n: int) -> Workload:
            async def work(fs: RafsFs, device: BlobDevice) -> int:
                return await read_files(fs, files, n, None)

            return work

        async def blob_prefetch(fs: RafsFs, device: BlobDevice) -> int:
            await device.prefetch_blobs()
            await device.wait_prefetch()
            return 0

        whole_file_bytes = sum(f.size for f in files)
        for n in readers:
            run = bench.nydus(
                "read all files, batch 1M", read_all(n),
                readers=n, batch_size=BATCH_SIZE, prefetch=False,
            )  # fmt: skip
            if not run.error and run.delivered != whole_file_bytes:
                run.error = f"read {run.delivered} bytes of {whole_file_bytes}"
            throughput.append(run)
        for mib in prefetch_batches:
            throughput.append(bench.nydus(
                f"blob prefetch, 8 workers, batch {mib:g}M", blob_prefetch,
                readers=0, batch_size=BATCH_SIZE, prefetch=True,
                prefetch_batch=int(mib * (1 << 20)),
            ))  # fmt: skip

        linked: list[Run] = []
        if args.link_mbit:
            with throttled(registry.host, args.link_mbit) as host:
                link = Bench(registry, sup, scratch, None, host=host)
                linked.append(link.curl("curl, whole blob", url.replace(registry.host, host),
                                        image.blob_size))  # fmt: skip
                linked.append(link.nydus(
                    "read all files, batch 1M", read_all(max(readers)),
                    readers=max(readers), batch_size=BATCH_SIZE, prefetch=False,
                ))  # fmt: skip
                linked.append(link.nydus(
                    "blob prefetch, 8 workers, batch 4M", blob_prefetch,
                    readers=0, batch_size=BATCH_SIZE, prefetch=True, prefetch_batch=4 << 20,
                ))  # fmt: skip

        partial_runs = []
        part_readers = max(readers)
        needed = needed_compressed(sup, partial)
        for batch in (BATCH_SIZE, 0):
            crcs: dict[int, int] = {}

            async def part(fs: RafsFs, device: BlobDevice, crcs: dict[int, int] = crcs) -> int:
                return await read_files(fs, partial, part_readers, crcs)

            label = f"{args.partial_percent:g}% of files, batch {'1M' if batch else '0'}"
            run = bench.nydus(label, part, readers=part_readers, batch_size=batch, prefetch=False)
            run.needed = needed
            bad = [f.path for f in partial if crcs.get(f.ino) != source_crc(src, f.path)]
            if bad and not run.error:
                run.error = f"{len(bad)} files differ from the source, first {bad[0]!r}"
            partial_runs.append(run)
    finally:
        with signals_deferred():  # a second Ctrl-C must not cut the clean-up short
            if registry is not None:
                registry.close()
            shutil.rmtree(scratch, ignore_errors=True)
            sup.close()

    print_throughput(throughput, curl_median, ranged.fetch_mbps if not ranged.error else 0.0)
    print(
        f"\nblob: {image.blob_size / 1e6:.1f} MB ({whole_file_bytes / 1e6:.1f} MB of file data in "
        f"{len(files)} files); curl whole blob, {len(good)} runs, MB/s: "
        f"{', '.join(f'{s:.0f}' for s in speeds)}\n"
        "fetch MB/s = blob bytes from the backend (curl: downloaded) / wall seconds from the "
        "first request to the last byte (curl, one GET: its time_total; ranges: its process);\n"
        "file MB/s = file bytes returned by RafsFs.read / wall; 'vs curl' = fetch MB/s / the "
        "median whole-blob curl's (target: at least 0.70x);\n'vs curl 1M ranges' = the same "
        "against curl GETting the blob in 1 MiB ranges over one connection (the cache's "
        "request size);\ncpu/wall = this process's (user+sys)/wall (curl: curl's) over "
        f"{os.cpu_count()} core(s); registry cpu s = docker-registry's CPU seconds in the run;"
        "\npeak RSS = VmHWM of the bench process during the run; the registry serves its "
        "blob file through the page cache"
    )
    if linked:
        link_curl = linked[0].fetch_mbps if not linked[0].error else 0.0
        print(f"\nthe same blob through a {args.link_mbit:g} Mbit/s link "
              f"({args.link_mbit / 8:g} MB/s, shared by all connections; bench/_throttle.py):")
        print_throughput(linked, link_curl, 0.0)
    print_partial(partial_runs)
    print(
        f"\npartial: {len(partial)} of {len(files)} files ({args.partial_percent:g}%, seed "
        f"{args.seed}, 10 size bands), each read fully by {part_readers} concurrent readers;\n"
        "read MB = file bytes the application read; needed MB = compressed bytes of the chunks "
        "those files use (the ideal fetch);\nfetched MB = bytes from the backend (chunk data, "
        "plus the blob's chunk-info array when batch > 0); target: fetched/read at most "
        "1.2x plus merging slack"
    )
    runs_peak = max(r.peak_rss_kib for r in throughput + partial_runs)
    print(
        f"\nprocess peak RSS: {runs_peak / 1024:.0f} MB over the measured runs; "
        f"{setup_peak / 1024:.0f} MB during setup (image build, in-memory push of the blob)"
    )
    failed = [r for r in throughput + partial_runs if r.error]
    for r in failed:
        print(f"{r.name} failed: {r.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
