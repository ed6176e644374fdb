"""``nydus-image check | inspect | stat | unpack``: argument parsing and printing only.

``nydus_image.main`` registers these subcommands with ``add_parsers`` and runs
``COMMANDS[name](args)``; the work is done by ``rafs.check``, ``rafs.inspect`` and
``rafs.unpack``. Flags are upstream's (``src/bin/nydus-image/main.rs``). Errors are raised as
``NydusError`` and printed by ``main`` as one line; a command returns its exit code.

Flags upstream has but nydusfs cannot honour yet (``--config``, ``--backend-type``: storage
backends other than local files) are accepted and refused with a clear message, so scripts fail
loudly instead of with a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import struct
import sys
from collections.abc import Callable
from typing import Any

from nydusfs import __version__
from nydusfs.cli.common import add_log_args
from nydusfs.errors import FormatError, NydusError, UnsupportedError
from nydusfs.rafs.check import check_image, format_blob_features
from nydusfs.rafs.inspect import ImageStat, InspectExit, Inspector, InspectUsageError
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.rafs.unpack import unpack_to_path
from nydusfs.storage.localblob import LocalBlobReader
from nydusfs.types import Digester

log = logging.getLogger("nydus-image")

PROMPT = "Inspecting RAFS :> "


# --- shared helpers -------------------------------------------------------------------------------


def add_common(p: argparse.ArgumentParser) -> None:
    add_log_args(p)


def _add_bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument("BOOTSTRAP", nargs="?", help="file path of RAFS metadata")
    p.add_argument("-B", "--bootstrap", help="[Deprecated] file path of RAFS meta blob/bootstrap")


def _bootstrap(args: argparse.Namespace) -> str:
    if args.bootstrap and args.BOOTSTRAP:
        raise NydusError("the argument '--bootstrap' cannot be used with 'BOOTSTRAP'")
    path: str | None = args.bootstrap or args.BOOTSTRAP
    if not path:
        raise NydusError("missing parameter `bootstrap` or `BOOTSTRAP`")
    return path


def _load(path: str) -> RafsSuper:
    try:
        return RafsSuper.load(path)
    except NydusError:
        raise
    except (struct.error, IndexError, KeyError, OverflowError) as e:
        # A reader bug on malformed input: still one line for the user.
        raise FormatError(f"{path}: malformed bootstrap ({type(e).__name__}: {e})") from e


def _blob_dir(path: str | None) -> str | None:
    if path is not None and not os.path.isdir(path):
        raise NydusError(f"blob directory {path} does not exist or is not a directory")
    return path


def _json_compact(value: Any, *, sort_keys: bool = False) -> str:
    # serde_json::to_writer: no spaces. Structs keep their field order; json! maps are
    # BTreeMaps, so inspect's request results come out with sorted keys.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)


def _write_json(path: str, value: Any) -> None:
    try:
        with open(path, "w") as f:
            f.write(_json_compact(value))
    except OSError as e:
        raise NydusError(f"can not open output file {path}: {e.strerror}") from e


# --- check ----------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    path = _bootstrap(args)
    if args.config:
        raise UnsupportedError("--config (storage backends) is not supported yet, use --blob-dir")
    blob_dir = _blob_dir(args.blob_dir)
    verbose: Callable[[str], None] | None = print if args.verbose else None
    try:
        with _load(path) as sup, LocalBlobReader(blob_dir, blobs=sup.blobs) as reader:
            report = check_image(sup, reader if blob_dir else None, verbose=verbose)
            compressor = sup.meta.compressor
    except NydusError as e:
        raise type(e)(f"failed to check bootstrap {path}: {e}") from e

    print("RAFS filesystem metadata is valid, referenced data blobs: ")
    for idx, blob in enumerate(report.blobs):
        print(
            f"\t {idx}: {blob.blob_id}, compressed size {blob.compressed_size}, "
            f"uncompressed size {blob.uncompressed_size}, chunk size: {blob.chunk_size}, "
            f"chunk count: {blob.chunk_count}, features: {format_blob_features(blob.features)}"
        )
    if report.data_checked:
        print(
            f"RAFS filesystem data is valid: {report.chunks_read} chunks, "
            f"{report.bytes_read} bytes in {len(report.blobs)} blobs"
        )
    if args.output_json:
        # OutputSerializer::dump_for_check
        _write_json(
            args.output_json,
            {
                "version": f"{__version__}-nydusfs",
                "bootstrap": path,
                "blobs": [b.blob_id for b in report.blobs],
                "external_bootstrap": "",
                "external_blobs": [],
                "trace": {},
                "fs_version": str(report.version),
                "compressor": compressor.label,
            },
        )
    return 0


# --- inspect --------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    path = _bootstrap(args)
    with _load(path) as sup:
        if args.request is not None:
            return _inspect_request(Inspector(sup, request_mode=True), args.request)
        _inspect_prompt(Inspector(sup))
    return 0


def _inspect_request(inspector: Inspector, request: str) -> int:
    try:
        text, value = inspector.execute(request)
    except InspectExit:
        text, value = "", None
    except InspectUsageError as e:
        raise NydusError(str(e)) from None
    except (NydusError, OSError) as e:
        raise NydusError(f"failed to execute inspect request `{request}`: {e}") from e
    sys.stdout.write(text)
    # Upstream serialises the command's value even when there is none ("null").
    print(_json_compact(value, sort_keys=True))
    return 0


def _inspect_prompt(inspector: Inspector) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing for input()
    while True:
        if interactive:
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                return
        else:
            # Commands from a pipe or file: no prompt, stop at end of input (upstream spins).
            line = sys.stdin.readline()
            if not line:
                return
        try:
            text, value = inspector.execute(line)
        except InspectExit:
            return
        except InspectUsageError as e:
            sys.stdout.write(e.text)
            continue
        except (NydusError, OSError) as e:
            print(f"Failed to execute command, {e}")
            continue
        sys.stdout.write(text)
        if value is not None:
            print(_json_compact(value, sort_keys=True))
        sys.stdout.flush()


# --- stat -----------------------------------------------------------------------------------------


def cmd_stat(args: argparse.Namespace) -> int:
    stat = ImageStat(Digester.from_name(args.digester))
    target = args.target
    if args.bootstrap:
        with _load(args.bootstrap) as sup:
            stat.stat(sup, is_base=True)
    elif args.blob_dir:
        blob_dir = _blob_dir(args.blob_dir)
        assert blob_dir is not None
        stat.dedup_enabled = True
        for name in sorted(os.listdir(blob_dir)):
            path = os.path.join(blob_dir, name)
            if (
                not os.path.isfile(path)
                or os.path.splitext(name)[1]
                or (target and os.path.abspath(path) == os.path.abspath(target))
            ):
                continue
            # Blobs and other files in the directory are not bootstraps: skip them quietly.
            try:
                with _load(path) as sup:
                    stat.stat(sup, is_base=True)
            except (NydusError, OSError) as e:
                log.debug("failed to process %s, %s", path, e)
    else:
        raise NydusError("one of `--bootstrap` and `--blob-dir` must be specified")
    if target:
        stat.target_enabled = True
        with _load(target) as sup:
            stat.stat(sup, is_base=False)
    stat.finalize()
    if args.output_json:
        _write_json(args.output_json, stat.to_json())
    else:
        sys.stdout.write(stat.render())
    return 0


# --- unpack ---------------------------------------------------------------------------------------


def cmd_unpack(args: argparse.Namespace) -> int:
    path = _bootstrap(args)
    if args.backend_type is not None:
        if args.backend_type == "localfs":
            raise NydusError("Use --blob-dir to specify localfs backend")
        raise UnsupportedError(
            f"--backend-type {args.backend_type} is not supported yet, use --blob or --blob-dir"
        )
    blob_dir = _blob_dir(args.blob_dir)
    with _load(path) as sup:
        paths: dict[str, str] = {}
        if args.blob is not None:
            if len(sup.blobs) > 1:
                raise NydusError(
                    f"the image references {len(sup.blobs)} blobs but --blob names one file, "
                    "use --blob-dir"
                )
            paths = {b.blob_id: args.blob for b in sup.blobs}
        elif blob_dir is None and sup.blobs:
            raise NydusError("--blob, --blob-dir or --backend-type must be specified")
        with LocalBlobReader(blob_dir, paths, blobs=sup.blobs) as reader:
            try:
                result = unpack_to_path(sup, reader, args.output)
            except NydusError as e:
                raise type(e)(f"fail to unpack: {e}") from e
    log.info(
        "unpacked %d entries (%d files, %d bytes of data) to %s",
        result.entries,
        result.files,
        result.data_bytes,
        args.output,
    )
    return 0


# --- wiring ---------------------------------------------------------------------------------------


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``check``, ``inspect``, ``stat`` and ``unpack`` on ``nydus-image``'s subparsers."""
    p = sub.add_parser("check", help="validate RAFS filesystem metadata (and data with -D)")
    _add_bootstrap(p)
    p.add_argument(
        "-D", "--blob-dir", help="directory holding the data blobs; their data is validated too"
    )
    p.add_argument("-C", "--config", help="storage backend configuration (not supported yet)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every inode and chunk")
    p.add_argument("-J", "--output-json", help="file to save the result to, as JSON")
    add_common(p)

    p = sub.add_parser("inspect", help="inspect RAFS metadata interactively or in request mode")
    _add_bootstrap(p)
    p.add_argument("-D", "--blob-dir", help="directory holding the data blobs (not needed)")
    p.add_argument("-C", "--config", help="storage backend configuration (not needed)")
    p.add_argument(
        "-R",
        "--request",
        help="run one request (stats, ls, stat FILE, blobs, prefetch, chunk OFFSET, "
        "icheck INODE) and print its JSON result",
    )
    add_common(p)

    p = sub.add_parser("stat", help="generate statistics for RAFS filesystems")
    p.add_argument("-B", "--bootstrap", help="statistics of this RAFS filesystem")
    p.add_argument(
        "-D", "--blob-dir", help="statistics of all RAFS filesystems in this directory, with dedup"
    )
    p.add_argument("-T", "--target", help="statistics of this filesystem after deduplication")
    p.add_argument("-C", "--config", help="storage backend configuration (not needed)")
    p.add_argument(
        "--digester", default="blake3", choices=["blake3", "sha256"], help="chunk digest algorithm"
    )
    p.add_argument("-J", "--output-json", help="file to save the statistics to, as JSON")
    add_common(p)

    p = sub.add_parser("unpack", help="unpack a RAFS filesystem to a tar file")
    _add_bootstrap(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("-b", "--blob", help="path to the RAFS data blob file")
    source.add_argument("-D", "--blob-dir", help="directory holding the data blobs")
    source.add_argument("--backend-type", help="storage backend type (not supported yet)")
    p.add_argument("--backend-config", help="backend configuration string")
    p.add_argument("--backend-config-file", help="backend configuration file")
    p.add_argument("--output", required=True, help="path for the output tar file")
    add_common(p)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": cmd_check,
    "inspect": cmd_inspect,
    "stat": cmd_stat,
    "unpack": cmd_unpack,
}
