#!/usr/bin/env python3
"""Build benchmark: ``nydus-image create`` (zstd, none, lz4_block) against ``mkfs.erofs`` (plain
and lz4hc) on the same generated tree, each with a cold page cache and then warm.

Note on the comparison: mkfs.erofs compresses per physical cluster (pcluster) into one image
file, nydus-image per chunk (1 MiB by default) into a separate blob plus a bootstrap, so the sizes
are comparable but the on-disk shapes are not the same.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    Result,
    drop_caches,
    ensure_tree,
    print_table,
    run_timed,
)

ToolCmd = Callable[[Path, Path], tuple[list[str], list[Path]]]


def nydus(compressor: str) -> ToolCmd:
    def cmd(src: Path, out: Path) -> tuple[list[str], list[Path]]:
        boot, blobs = out / "image.boot", out / "blobs"
        blobs.mkdir()  # nydus-image wants an existing --blob-dir (made here, untimed)
        argv = [sys.executable, "-m", "nydusfs.cli.nydus_image", "create", str(src)]
        argv += ["--bootstrap", str(boot), "--blob-dir", str(blobs)]
        argv += ["--compressor", compressor, "--fs-version", "6"]
        return argv, [boot, blobs]

    return cmd


def mkfs_erofs(*options: str) -> ToolCmd:
    def cmd(src: Path, out: Path) -> tuple[list[str], list[Path]]:
        image = out / "image.erofs"
        return ["mkfs.erofs", "--quiet", *options, str(image), str(src)], [image]

    return cmd


TOOLS: dict[str, ToolCmd] = {
    "nydus-zstd": nydus("zstd"),
    "nydus-none": nydus("none"),
    "nydus-lz4_block": nydus("lz4_block"),
    "mkfs.erofs": mkfs_erofs(),
    "mkfs.erofs-lz4hc": mkfs_erofs("-zlz4hc"),
}
BASELINES = {"vs lz4hc": "mkfs.erofs-lz4hc", "vs plain": "mkfs.erofs"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000, help="regular files in the tree")
    ap.add_argument("--mbytes", type=int, default=500, help="MB (10^6) of file data")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/nydusfs-bench"))
    ap.add_argument(
        "--tools", default=",".join(TOOLS), help=f"comma list, from: {', '.join(TOOLS)}"
    )
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-cache runs")
    args = ap.parse_args(argv)

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        ap.error(f"unknown tool(s): {', '.join(unknown)}")
    if shutil.which("mkfs.erofs") is None and any(t.startswith("mkfs") for t in tools):
        ap.error("mkfs.erofs not found (apt-get install erofs-utils, or `make deps`)")

    workdir: Path = args.workdir.resolve()
    src, n_files, n_bytes = ensure_tree(
        workdir, files=args.files, mbytes=args.mbytes, seed=args.seed
    )
    print(f"bench: tree {src}: {n_files} regular files, {n_bytes / 1e6:.1f} MB", flush=True)

    env = dict(os.environ)
    # Run our CLI from this checkout even when the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out_root = workdir / "out"
    can_drop = True
    results: list[Result] = []
    for tool in tools:
        for cache in ("cold",) if args.no_warm else ("cold", "warm"):
            out = out_root / tool
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            argv_, outputs = TOOLS[tool](src, out)
            if cache == "cold":
                can_drop = drop_caches() and can_drop
            print(f"bench: {tool} ({cache}) ...", flush=True)
            result = run_timed(tool, cache, argv_, outputs, env)
            results.append(result)
            if not result.ok:
                print(f"bench: {tool} failed: {result.error}", flush=True)
                break  # no warm run of something that does not work
    shutil.rmtree(out_root, ignore_errors=True)

    if not can_drop:
        print("bench: could not drop the page cache (not root?): 'cold' runs were warm")
    print_table(results, n_bytes, BASELINES, os.cpu_count() or 1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
