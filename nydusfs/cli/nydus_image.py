"""``nydus-image``: build, inspect, check and unpack RAFS images (upstream's flags).

Parsing only: each subcommand calls the library and prints its result. User errors print one
line ``nydus-image: <message>`` and exit 1 (2 for usage errors), without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

from nydusfs import __version__
from nydusfs.cli import image_export, image_merge, image_tools
from nydusfs.cli.common import run_reporting_errors, setup_logging
from nydusfs.errors import NydusError
from nydusfs.types import Compressor, Digester

log = logging.getLogger("nydus-image")


def _size(text: str) -> int:
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def _create_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("create", help="create a RAFS image from a directory or a tar layer")
    p.add_argument("SOURCE", help="source directory, tar or tar.gz file")
    p.add_argument(
        "-t",
        "--type",
        "--source-type",
        dest="type",
        default="dir-rafs",
        help="conversion type: dir-rafs (directory), tar-rafs, targz-rafs",
    )
    p.add_argument("-B", "--bootstrap", help="path to write the RAFS metadata (bootstrap)")
    p.add_argument("-D", "--blob-dir", help="directory to write the blob, named by its digest")
    p.add_argument("-b", "--blob", help="path to write the data blob")
    p.add_argument("--chunk-size", type=_size, default=0x100000, help="chunk size (0x100000)")
    p.add_argument(
        "-c",
        "--compressor",
        default="zstd",
        choices=["none", "lz4_block", "zstd"],
        help="chunk compression algorithm (zstd)",
    )
    p.add_argument(
        "-d", "--digester", default="blake3", choices=["blake3", "sha256"], help="digest algorithm"
    )
    p.add_argument("-v", "--fs-version", default="6", choices=["5", "6"], help="RAFS version")
    p.add_argument("--features", default="", help="comma-separated features: blob-toc")
    p.add_argument("--whiteout-spec", default="oci", choices=["oci", "overlayfs", "none"])
    p.add_argument(
        "--prefetch-policy",
        default="none",
        choices=["fs", "blob", "none"],
        help="prefetch policy; the file list is read from stdin",
    )
    p.add_argument("--repeatable", action="store_true", help="reproducible metadata")
    p.add_argument("--aligned-chunk", action="store_true", help="implied for RAFS v6")
    p.add_argument("-J", "--output-json", help="write the build result as JSON to this file")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help=argparse.SUPPRESS)
    image_tools.add_common(p)


def _progress_printer() -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2 and done < total:
            return
        last[0] = now
        pct = 100.0 * done / total if total else 100.0
        bar = "#" * int(pct // 4)
        sys.stderr.write(f"\r[{bar:<25}] {pct:5.1f}% {done >> 20}/{total >> 20} MiB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def cmd_create(args: argparse.Namespace) -> int:
    from nydusfs.rafs.builder.build import BuildOptions, build

    features = {f.strip() for f in args.features.split(",") if f.strip()}
    unknown = features - {"blob-toc"}
    if unknown:
        raise NydusError(f"unknown feature(s): {', '.join(sorted(unknown))}")
    patterns: list[bytes] = []
    if args.prefetch_policy != "none":
        patterns = sys.stdin.buffer.read().splitlines()
    opts = BuildOptions(
        source=args.SOURCE,
        source_type=args.type,
        bootstrap=args.bootstrap,
        blob=args.blob,
        blob_dir=args.blob_dir,
        fs_version=int(args.fs_version),
        compressor=Compressor.from_name(args.compressor),
        digester=Digester.from_name(args.digester),
        chunk_size=args.chunk_size,
        whiteout_spec=args.whiteout_spec,
        prefetch_policy=args.prefetch_policy,
        prefetch_patterns=patterns,
        repeatable=args.repeatable,
        blob_toc="blob-toc" in features,
        threads=max(1, args.threads),
        progress=_progress_printer(),
    )
    result = build(opts)
    log.info(
        "built %s: %d files, %d MiB data (%d MiB deduplicated) in %.2fs",
        result.bootstrap,
        result.files,
        result.data_bytes >> 20,
        result.deduplicated_bytes >> 20,
        result.seconds,
    )
    for blob, path in zip(result.blobs, result.blob_paths, strict=True):
        log.info("blob %s: %d chunks, %d bytes -> %s", blob.blob_id, blob.chunk_count,
                 blob.compressed_size, path)  # fmt: skip
    if args.output_json:
        out = {
            "version": f"{__version__}-nydusfs",
            "bootstrap": result.bootstrap,
            "blobs": [b.blob_id for b in result.blobs],
            "external_bootstrap": "",
            "external_blobs": [],
            "trace": {"total_build": f"{result.seconds:.3f}"},
            "fs_version": str(opts.fs_version),
            "compressor": opts.compressor.label,
        }
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nydus-image", description="Build, analyze, inspect or validate RAFS filesystems."
    )
    parser.add_argument("-V", "--version", action="version", version=f"nydus-image {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _create_parser(sub)
    image_merge.add_parser(sub)
    image_tools.add_parsers(sub)
    image_export.add_parser(sub)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "create": cmd_create,
    "export": image_export.cmd_export,
    "merge": image_merge.cmd_merge,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "log_level"):
        args.log_level = "info"
    setup_logging(args.log_level, getattr(args, "log_file", None))
    handler = COMMANDS.get(args.command) or image_tools.COMMANDS[args.command]
    return run_reporting_errors("nydus-image", lambda: handler(args), say_interrupted=True)


if __name__ == "__main__":
    sys.exit(main())
