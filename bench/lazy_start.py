#!/usr/bin/env python3
"""Lazy start benchmark: time until a container's start-up files are readable, OCI vs nydus.

Setup (untimed, reused between runs under ``--workdir``): the three-layer Debian image of the
OCI end-to-end tests (``tests/helpers/oci_image.py``: debootstrap minbase, apt packages, a layer
of deletions, renames and an opaque directory), Debian's ``docker-registry`` on 127.0.0.1, the
image pushed there by ``skopeo`` and converted by ``nydusify convert``. Between the clients and
the registry sits a throttling HTTP proxy on 127.0.0.1 that limits the *total* bandwidth of all
response bodies (``--mbit``, default 100 Mbit/s; a token bucket shared by every connection, so
parallel layer downloads get no more than one lazy reader) and counts the bytes it forwards.

Two start-up sets of ``--percent`` % of the regular files (default 5 %), the same paths on both
sides (``pick_sets``): ``random``, a seeded sample spread over the image, and ``clustered``,
whole directories as a program's start-up reads them. Both sides start with empty caches. Runs,
side by side in one process:

(a) OCI: ``skopeo copy`` of every layer through the proxy into an OCI layout, ``umoci unpack``,
    then the set read from the unpacked rootfs.
(b) nydus: ``nydusd --image`` through the proxy (fetches the manifest and the bootstrap layer,
    mounts; data comes lazily, chunk by chunk, with a blob cache in an empty work dir), then the
    set read through the FUSE mount. Nothing tells nydus which files come (no prefetch list).

Printed: time to first byte (start until the first byte of the first start-up file is read),
time until the whole set is read, bytes through the proxy, the ratios (a)/(b), and (b)'s bytes
as a share of the image's compressed size. Each side is read by ``--readers`` threads. Figures
are printed, never asserted; the machine is shared, so run it more than once.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, print_rows
from _throttle import ThrottlingProxy

from nydusfs.oci import MEDIA_OCI_MANIFEST
from tests.helpers.oci_image import TAG, build_debian_image, skopeo_copy
from tests.helpers.registry_servers import DockerRegistry
from tests.mount.nydusd_proc import nydusd, write_config


def regular_files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                out.append(os.path.relpath(path, root))
    return sorted(out)


class Reader:
    """Reads a file set with N threads; records when the first byte arrived."""

    def __init__(self, root: Path, files: list[str], readers: int) -> None:
        self.root = root
        self.files = files
        self.readers = readers
        self.first_byte: float | None = None
        self.bytes = 0
        self.digest = hashlib.sha256()
        self._lock = threading.Lock()

    def _read(self, rel: str) -> tuple[str, bytes]:
        with open(self.root / rel, "rb") as f:
            first = f.read(1)
            with self._lock:
                if self.first_byte is None:
                    self.first_byte = time.monotonic()
            return rel, first + f.read()

    def run(self) -> None:
        with ThreadPoolExecutor(self.readers) as pool:
            results = dict(pool.map(self._read, self.files))
        for rel in self.files:  # a content digest, the same on both sides
            self.digest.update(results[rel])
            self.bytes += len(results[rel])


def pick_sets(files: list[str], percent: float, seed: int) -> dict[str, list[str]]:
    """Two start-up sets of ``percent`` % of ``files``: ``random`` (a seeded sample spread over
    the whole image, the hard case for lazy loading) and ``clustered`` (whole directories,
    chosen at random: what a program reads at start-up, its binary, libraries and module tree,
    which sit together in the layer tars and so in the blobs)."""
    rng = random.Random(seed)
    count = max(1, round(len(files) * percent / 100))
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(os.path.dirname(f), []).append(f)
    clustered: list[str] = []
    dirs = sorted(by_dir)
    rng.shuffle(dirs)
    for d in dirs:
        need = count - len(clustered)
        if need <= 0:
            break
        members = by_dir[d]
        start = rng.randrange(len(members) - need + 1) if len(members) > need else 0
        clustered += members[start : start + need]
    return {"random": sorted(rng.sample(files, count)), "clustered": sorted(clustered)}


def run_oci(proxy: ThrottlingProxy, ref: str, sets: dict[str, list[str]], work: Path,
            readers: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    """One pull and unpack; each set's times are pull + unpack + its own read."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proxy.reset()
    started = time.monotonic()
    skopeo_copy(f"docker://{proxy.host}/{ref}", f"oci:{work / 'layout'}:{TAG}")
    pulled = time.monotonic()
    subprocess.run(["umoci", "unpack", "--image", f"{work / 'layout'}:{TAG}", str(work / "b")],
                   check=True, capture_output=True)  # fmt: skip
    unpacked = time.monotonic()
    out = {}
    for name, files in sets.items():
        began = time.monotonic()
        reader = Reader(work / "b" / "rootfs", files, readers)
        reader.run()
        done = time.monotonic()
        assert reader.first_byte is not None
        ready = unpacked - started
        out[name] = {"ttfb": ready + reader.first_byte - began, "set": ready + done - began,
                     "bytes": proxy.bytes, "requests": proxy.requests, "pull": pulled - started,
                     "unpack": unpacked - pulled, "read": done - began, "data": reader.bytes,
                     "digest": reader.digest.hexdigest()}  # fmt: skip
    return out


def run_nydus(proxy: ThrottlingProxy, ref: str, files: list[str], work: Path,
              readers: int, batch_size: int) -> dict[str, Any]:  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = write_config(work / "nydusd.json", {
        "version": 2,
        "backend": {"type": "registry", "registry": {"scheme": "http", "timeout": 60}},
        "cache": {"type": "blobcache", "filecache": {"work_dir": str(work / "cache")}},
        "rafs": {"enable_xattr": True, "batch_size": batch_size},
    })  # fmt: skip
    proxy.reset()
    started = time.monotonic()
    with nydusd("--image", f"http://{proxy.host}/{ref}", "--config", str(config),
                "--thread-num", str(max(4, readers)), mountpoint=work / "mnt",
                timeout=120):  # fmt: skip
        mounted = time.monotonic()
        reader = Reader(work / "mnt", files, readers)
        reader.run()
        done = time.monotonic()
    assert reader.first_byte is not None
    return {"ttfb": reader.first_byte - started, "set": done - started, "bytes": proxy.bytes,
            "requests": proxy.requests, "mount": mounted - started, "read": done - mounted,
            "data": reader.bytes, "digest": reader.digest.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/nydusfs-bench/lazy"))
    ap.add_argument("--mbit", type=float, default=100.0, help="proxy bandwidth, Mbit/s")
    ap.add_argument("--percent", type=float, default=5.0, help="start-up set, %% of files")
    ap.add_argument("--readers", type=int, default=4, help="threads reading the set")
    ap.add_argument("--batch-size", type=lambda s: int(s, 0), default=1 << 20,
                    help="nydus rafs.batch_size (read amplification), bytes; "
                         "default upstream's 1 MiB")  # fmt: skip
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--runs", type=int, default=1, help="repeat both sides this many times")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (debootstrap, FUSE mounts)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["NYDUSFS_OCI_IMAGE_CACHE"] = str(args.workdir / "image")
    os.environ.setdefault("PYTHONPATH", str(REPO))
    print("bench: building or reusing the Debian image ...", flush=True)
    layout, timings = build_debian_image(args.workdir / "image-tmp")
    if timings:
        print("bench: image built: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    reg_dir = args.workdir / "registry"
    shutil.rmtree(reg_dir, ignore_errors=True)
    reg_dir.mkdir()
    registry = DockerRegistry(reg_dir)
    proxy = ThrottlingProxy(registry.host, args.mbit)
    try:
        oci_ref = f"test/debian:{TAG}"
        nydus_ref = f"test/debian:{TAG}-nydus"
        skopeo_copy(f"oci:{layout}:{TAG}", f"docker://{registry.host}/{oci_ref}")
        ref_root = args.workdir / "reference"
        if not (ref_root / "rootfs").is_dir():
            shutil.rmtree(ref_root, ignore_errors=True)
            subprocess.run(["umoci", "unpack", "--image", f"{layout}:{TAG}", str(ref_root)],
                           check=True, capture_output=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "nydusfs.cli.nydusify", "convert", "--source",
                        f"http://{registry.host}/{oci_ref}", "--target",
                        f"http://{registry.host}/{nydus_ref}"],
                       check=True, cwd=REPO, capture_output=True)  # fmt: skip
        all_files = regular_files(ref_root / "rootfs")
        sets = pick_sets(all_files, args.percent, args.seed)
        oci_size = _image_size(registry, oci_ref)
        nydus_size = _image_size(registry, nydus_ref)
        print(f"image: {len(all_files)} regular files; OCI layers {oci_size / 1e6:.1f} MB, "
              f"nydus blobs + bootstrap {nydus_size / 1e6:.1f} MB (compressed)")
        for name, files in sets.items():
            size = sum(os.path.getsize(ref_root / "rootfs" / f) for f in files)
            print(f"start-up set {name}: {len(files)} files ({args.percent:g} %), "
                  f"{size / 1e6:.1f} MB")
        print(f"proxy limit {args.mbit:g} Mbit/s; {args.readers} reader thread(s); "
              f"nydus rafs.batch_size {args.batch_size}")
        rows = []
        for run in range(args.runs):
            oci = run_oci(proxy, oci_ref, sets, args.workdir / "run-oci", args.readers)
            for name, files in sets.items():
                a = oci[name]
                b = run_nydus(proxy, nydus_ref, files, args.workdir / "run-nydus",
                              args.readers, args.batch_size)  # fmt: skip
                if a["digest"] != b["digest"]:
                    raise SystemExit("bench: the two sides read different data")
                rows.append(_row(f"{run + 1} {name}: (a) OCI pull+unpack", a, oci_size))
                rows.append(_row(f"{run + 1} {name}: (b) nydus lazy", b, oci_size))
                rows.append([f"{run + 1} {name}: ratio (a)/(b)", f"{a['ttfb'] / b['ttfb']:.1f}x",
                             f"{a['set'] / b['set']:.1f}x",
                             f"{a['bytes'] / max(b['bytes'], 1):.1f}x", "", "", ""])  # fmt: skip
                print(f"run {run + 1} {name}: (a) pull {a['pull']:.2f}s, unpack "
                      f"{a['unpack']:.2f}s, read {a['read']:.2f}s; (b) mount {b['mount']:.2f}s, "
                      f"read {b['read']:.2f}s", flush=True)
        print()
        print_rows(["run", "first byte s", "set read s", "bytes MB", "% of image",
                    "requests", "set MB"], rows)  # fmt: skip
        print("\n'% of image' = bytes through the proxy / the OCI image's compressed layers; "
              "ratios: OCI / nydus (higher = nydus faster or leaner)")
    finally:
        proxy.close()
        registry.close()
    return 0


def _image_size(registry: DockerRegistry, ref: str) -> int:
    import requests

    repo, tag = ref.rsplit(":", 1)
    resp = requests.get(f"{registry.url}/v2/{repo}/manifests/{tag}", timeout=10,
                        headers={"Accept": MEDIA_OCI_MANIFEST})  # fmt: skip
    resp.raise_for_status()
    return sum(int(layer["size"]) for layer in resp.json()["layers"])


def _row(name: str, r: dict[str, Any], image: int) -> list[str]:
    return [name, f"{r['ttfb']:.2f}", f"{r['set']:.2f}", f"{r['bytes'] / 1e6:.1f}",
            f"{100 * r['bytes'] / image:.1f}", f"{int(r['requests'])}",
            f"{r['data'] / 1e6:.1f}"]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
