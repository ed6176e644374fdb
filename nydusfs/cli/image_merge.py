"""``nydus-image merge SOURCE...``: upstream's flags, parsing only (``rafs.builder.merge``).

Exit codes as upstream: 0 on success, 2 when the layers are inconsistent (for instance,
different chunk sizes), 1 for other errors. ``--chunk-dict`` is refused (chunk dictionaries
are not in this build); ``-C/--config`` is accepted: upstream uses it only to keep the blob ids
of the bootstraps, which this implementation always does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys

from nydusfs import __version__
from nydusfs.cli.common import add_log_args
from nydusfs.errors import NydusError, UnsupportedError
from nydusfs.rafs.builder.merge import InconsistentFilesystemError, MergeOptions, merge

log = logging.getLogger("nydus-image")


def _strings(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",")]


def _numbers(text: str | None, flag: str) -> list[int] | None:
    items = _strings(text)
    if items is None:
        return None
    try:
        return [int(item) for item in items]
    except ValueError:
        raise NydusError(f"invalid number in {flag} option") from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("merge", help="merge multiple bootstraps into an overlaid bootstrap")
    p.add_argument("SOURCE", nargs="+", help="bootstrap paths, lowest layer first")
    p.add_argument("--parent-bootstrap", help="parent (already merged) bootstrap")
    p.add_argument("-B", "--bootstrap", help="output path of the overlaid bootstrap")
    p.add_argument("-D", "--blob-dir", help="directory to write the bootstrap, named by digest")
    p.add_argument("--chunk-dict", help="chunk dictionary (not supported)")
    p.add_argument("--prefetch-policy", default="none", choices=["fs", "blob", "none"],
                   help="prefetch policy; the file list is read from stdin")  # fmt: skip
    p.add_argument("-J", "--output-json", help="write the result as JSON to this file")
    p.add_argument("--blob-digests", help="RAFS blob digests, comma separated")
    p.add_argument("--original-blob-ids", help="original blob ids, comma separated")
    p.add_argument("--blob-sizes", help="RAFS blob sizes, comma separated")
    p.add_argument("--blob-toc-digests", help="blob ToC digests, comma separated")
    p.add_argument("--blob-toc-sizes", help="blob ToC sizes, comma separated")
    p.add_argument("-C", "--config", help="storage backend config (accepted, not needed)")
    p.add_argument("--whiteout-spec", default="oci", choices=["oci", "overlayfs", "none"],
                   help=argparse.SUPPRESS)  # fmt: skip
    add_log_args(p)


def cmd_merge(args: argparse.Namespace) -> int:
    if args.chunk_dict:
        raise UnsupportedError("--chunk-dict is not available in this build")
    target = args.bootstrap
    if target is None:
        if not args.blob_dir:
            raise NydusError("both --bootstrap and --blob-dir are missing")
        target = os.path.join(args.blob_dir, ".merged.boot")
    patterns = sys.stdin.buffer.read().splitlines() if args.prefetch_policy != "none" else []
    opts = MergeOptions(
        sources=args.SOURCE,
        bootstrap=target,
        parent_bootstrap=args.parent_bootstrap,
        whiteout_spec=args.whiteout_spec,
        prefetch_policy=args.prefetch_policy,
        prefetch_patterns=patterns,
        blob_digests=_strings(args.blob_digests),
        original_blob_ids=_strings(args.original_blob_ids),
        blob_sizes=_numbers(args.blob_sizes, "--blob-sizes"),
        blob_toc_digests=_strings(args.blob_toc_digests),
        blob_toc_sizes=_numbers(args.blob_toc_sizes, "--blob-toc-sizes"),
    )
    try:
        result = merge(opts)
    except InconsistentFilesystemError as e:
        print(f"nydus-image: {e}", file=sys.stderr)
        return 2
    if args.bootstrap is None:
        with open(target, "rb") as f:
            name = hashlib.sha256(f.read()).hexdigest()
        final = os.path.join(args.blob_dir, name)
        os.replace(target, final)
        result.bootstrap = final
    if args.output_json:
        out = {
            "version": f"{__version__}-nydusfs",
            "bootstrap": result.bootstrap,
            "blobs": [b.blob_id for b in result.blobs],
            "external_bootstrap": "",
            "external_blobs": [],
            "trace": {"total_build": f"{result.seconds:.3f}"},
            "fs_version": "6",
            "compressor": result.blobs[0].compressor.label if result.blobs else "none",
        }
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
