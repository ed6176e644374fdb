"""``nydusify convert``: an OCI image (registry or layout directory) to a nydus image.

Upstream's nydusify flags that apply: ``--source``, ``--target``, ``--source-insecure``,
``--target-insecure``, ``--work-dir``, ``--platform``, ``--compressor``, ``--chunk-size``,
``--fs-version`` (6), ``--prefetch-patterns`` (read the prefetch list from stdin),
``--merge-platform`` (the target tag gets an index holding the source manifest and the nydus one,
marked with ``artifactType`` and the ``nydus.remoteimage.v1`` OS feature) and ``--output-json``.
References are ``host[:port]/repo[:tag]`` (``http://`` for a plain-http registry) or
``oci:DIR[:tag]``. Progress bars (pull, build, push) go to stderr on a terminal
only. User errors print one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from nydusfs import __version__
from nydusfs.cli.common import add_log_args, run_reporting_errors, setup_logging
from nydusfs.cli.nydus_image import _size as parse_size
from nydusfs.oci.convert import ConvertOptions, convert
from nydusfs.oci.reference import parse_reference
from nydusfs.types import Compressor, Digester

log = logging.getLogger("nydusify")


Bars = Callable[[str, int], Callable[[int], None]]


def progress_bars(stream: TextIO | None = None) -> Bars | None:
    """A bar factory when stderr is a terminal, else None (no bars in logs and pipes)."""
    out = stream or sys.stderr
    if not out.isatty():
        return None

    def factory(what: str, total: int) -> Callable[[int], None]:
        last = [0.0]

        def show(done: int) -> None:
            now = time.monotonic()
            if now - last[0] < 0.2 and done < total:
                return
            last[0] = now
            pct = 100.0 * done / total if total else 100.0
            bar = "#" * int(pct // 4)
            out.write(f"\r{what:<28} [{bar:<25}] {pct:5.1f}% {done >> 20}/{total >> 20} MiB")
            if done >= total:
                out.write("\n")
            out.flush()

        return show

    return factory


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusify", description="Convert OCI images to nydus images.")
    p.add_argument("-V", "--version", action="version", version=f"nydusify {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert an OCI image to a nydus image and push it")
    c.add_argument("--source", required=True, help="source image: host/repo:tag or oci:DIR:tag")
    c.add_argument("--target", required=True, help="target image: host/repo:tag or oci:DIR:tag")
    c.add_argument("--source-insecure", action="store_true", help="allow http and bad TLS")
    c.add_argument("--target-insecure", action="store_true", help="allow http and bad TLS")
    c.add_argument("--work-dir", default=None, help="work directory (default: a temp dir)")
    c.add_argument("--platform", default="linux/amd64", help="os/arch to convert")
    c.add_argument("--compressor", default="zstd", choices=["none", "lz4_block", "zstd"])
    c.add_argument("--digester", default="blake3", choices=["blake3", "sha256"])
    c.add_argument("--chunk-size", type=parse_size, default=0x100000, help="power of two")
    c.add_argument("--fs-version", default="6", choices=["6"], help="RAFS version (6)")
    c.add_argument("--prefetch-patterns", action="store_true",
                   help="read the paths to prefetch from stdin, one per line")  # fmt: skip
    c.add_argument("--merge-platform", action="store_true",
                   help="tag an index of the source and the nydus manifest")  # fmt: skip
    c.add_argument("--output-json", help="write a summary of the conversion to this file")
    add_log_args(c)
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    patterns = sys.stdin.buffer.read().splitlines() if args.prefetch_patterns else []
    opts = ConvertOptions(
        source=parse_reference(args.source),
        target=parse_reference(args.target),
        work_dir=args.work_dir,
        source_insecure=args.source_insecure,
        target_insecure=args.target_insecure,
        platform=args.platform,
        compressor=Compressor.from_name(args.compressor),
        digester=Digester.from_name(args.digester),
        chunk_size=args.chunk_size,
        prefetch_patterns=patterns,
        progress=progress_bars(),
        merge_platform=args.merge_platform,
    )
    result = convert(opts)
    log.info("converted %s -> %s (%s): %d blobs, %d MiB -> %d MiB", opts.source, opts.target,
             result.manifest_digest, len(result.blob_ids), result.source_compressed_size >> 20,
             result.target_compressed_size >> 20)  # fmt: skip
    if args.output_json:
        summary = {
            "source": str(opts.source),
            "target": str(opts.target),
            "manifest_digest": result.manifest_digest,
            "blobs": result.blob_ids,
            "bootstrap_size": result.bootstrap_size,
            "source_compressed_size": result.source_compressed_size,
            "target_compressed_size": result.target_compressed_size,
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        }
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    return run_reporting_errors("nydusify", lambda: cmd_convert(args), say_interrupted=True)


if __name__ == "__main__":
    sys.exit(main())
