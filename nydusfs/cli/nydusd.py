"""``nydusd``: mount RAFS images on a FUSE mount point (upstream's flags and config files).

``nydusd [fuse] --config C --bootstrap B --mountpoint M`` (the ``fuse`` subcommand and the
top-level form are the same, as upstream). ``--shared-dir D`` serves a host directory
(passthroughfs) instead; ``--writable`` mounts read-write, and with the v2 config's
``overlay: {upper_dir, work_dir}`` the image becomes the lower layer of a writable overlay.
With ``--apisock S`` the daemon serves the HTTP API
on ``S``; without ``--bootstrap`` it then starts with an empty root and images are mounted
through the API (``POST /api/v1/mount``). Parsing only: the daemon is ``nydusfs.daemon``.
User errors print one ``nydusd: <message>`` line and exit 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from collections.abc import Sequence

import trio

from nydusfs import __version__
from nydusfs.cli.common import (
    add_log_args,
    return_large_buffers_to_the_system,
    run_reporting_errors,
    setup_logging,
)
from nydusfs.config import ConfigV2, load_config_file, localfs_config
from nydusfs.daemon.daemon import Daemon
from nydusfs.daemon.fs_service import MountCmd
from nydusfs.errors import ConfigError, NydusError

log = logging.getLogger("nydusd")

UNAVAILABLE_SUBCOMMANDS = ("singleton", "uffd")


def _threads(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError("must be in 1..1024")
    return value


def add_daemon_args(p: argparse.ArgumentParser) -> None:
    """The flags every daemon form shares (``nydusd [fuse]`` and ``nydusd virtiofs``): API,
    config, image sources, logging, limits, and the ones refused in this build."""
    p.add_argument("-V", "--version", action="version", version=f"nydusd {__version__}")
    p.add_argument("-A", "--apisock", help="HTTP API unix socket")
    p.add_argument("-C", "--config", help="configuration file (JSON v1/v2 or TOML v2)")
    p.add_argument("--id", help="service instance id (needs --supervisor)")
    p.add_argument("--supervisor", help="supervisor socket (needs --id)")
    p.add_argument("--upgrade", action="store_true", help="start in upgrade mode")
    add_log_args(p)
    p.add_argument("--log-rotation-size", type=int, default=0, help="MB, 0 = off")
    p.add_argument("--rlimit-nofile", type=int, default=1_000_000, help="0 = unchanged")
    p.add_argument("-B", "--bootstrap", help="RAFS metadata file")
    p.add_argument(
        "--image", help="nydus image in a registry (host/repo:tag): bootstrap fetched, data lazy"
    )
    p.add_argument("-D", "--localfs-dir", help="directory of blobs (localfs backend and cache)")
    p.add_argument("-s", "--shared-dir", help="directory to share with passthroughfs")
    p.add_argument("--prefetch-files", help="file listing paths to prefetch, one per line")
    p.add_argument("-m", "--virtual-mountpoint", default="/", help="RAFS path inside the VFS")
    p.add_argument("--dedup-db", help="SQLite CAS database for chunk dedup")
    p.add_argument(
        "--fuse-threads", "--thread-num", dest="threads", type=_threads, default=4,
        help="requests served at once (1..1024)",
    )  # fmt: skip
    p.add_argument("--writable", action="store_true", help="serve read-write")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydusd", description="Nydus image service: mount RAFS images over FUSE."
    )
    add_daemon_args(p)
    p.add_argument("-M", "--mountpoint", required=True, help="FUSE mount point")
    p.add_argument("--failover-policy", default="resend", choices=["none", "resend", "flush"])
    return p


def _refuse_unavailable(args: argparse.Namespace) -> None:
    unavailable = {
        "dedup_db": "the chunk dedup database (--dedup-db)",
        "supervisor": "hot upgrade (--supervisor)",
        "id": "hot upgrade (--id)",
    }
    for key, what in unavailable.items():
        if getattr(args, key):
            raise NydusError(f"{what} is not available in this build")
    if args.upgrade:
        raise NydusError("hot upgrade (--upgrade) is not available in this build")


def mount_commands(args: argparse.Namespace) -> list[MountCmd]:
    if args.config and args.localfs_dir:
        raise ConfigError("--localfs-dir conflicts with --config")
    if args.image:
        if args.bootstrap or args.localfs_dir:
            raise ConfigError("--image conflicts with --bootstrap and --localfs-dir")
        from nydusfs.oci.bootstrap import load_image_config, prepare_image
        from nydusfs.oci.reference import parse_reference

        ref = parse_reference(args.image)
        base = load_image_config(args.config, ref) if args.config else None
        args.bootstrap, image_config = prepare_image(ref, base)
    if args.prefetch_files and not args.bootstrap:
        raise ConfigError("--prefetch-files requires --bootstrap")
    if args.shared_dir and args.bootstrap:
        raise ConfigError("--shared-dir conflicts with --bootstrap")
    if args.shared_dir:
        config = load_config_file(args.config) if args.config else ConfigV2()
        shared = os.path.abspath(args.shared_dir)
        return [MountCmd("passthrough_fs", shared, config, args.virtual_mountpoint,
                         writable=args.writable)]  # fmt: skip
    if not args.bootstrap:
        return []
    if args.image:
        config = image_config
    elif args.config:
        config = load_config_file(args.config)
    elif args.localfs_dir:
        config = localfs_config(args.localfs_dir)
    else:
        config = ConfigV2()
    files: list[str] = []
    if args.prefetch_files:
        try:
            with open(args.prefetch_files) as f:
                files = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ConfigError(f"cannot read --prefetch-files {args.prefetch_files}: {e}") from e
    return [MountCmd("rafs", args.bootstrap, config, args.virtual_mountpoint, files,
                     writable=args.writable)]  # fmt: skip


def _raise_nofile(limit: int) -> None:
    """Upstream's ``--rlimit-nofile``: capped by fs.file-max - 16384 (and here fs.nr_open)."""
    if limit <= 0:
        return
    for path, reserve in (("/proc/sys/fs/file-max", 16384), ("/proc/sys/fs/nr_open", 0)):
        try:
            with open(path) as f:
                limit = min(limit, max(1024, int(f.read()) - reserve))
        except (OSError, ValueError):
            pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= limit:
        return
    for new_hard in (max(hard, limit), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, new_hard), new_hard))
            return
        except (ValueError, OSError):
            continue
    log.warning("cannot raise RLIMIT_NOFILE to %d (keeping %d)", limit, soft)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "nbd":
        from nydusfs.cli import nydusd_nbd

        return nydusd_nbd.main(argv[1:])
    if argv and argv[0] == "virtiofs":
        from nydusfs.cli.nydusd_virtiofs import main as virtiofs_main

        return virtiofs_main(argv[1:])
    if argv and argv[0] in UNAVAILABLE_SUBCOMMANDS:
        print(f"nydusd: the {argv[0]} frontend is not available in this build", file=sys.stderr)
        return 2
    if argv and argv[0] == "fuse":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    return_large_buffers_to_the_system()

    def serve() -> None:
        _refuse_unavailable(args)
        commands = mount_commands(args)
        _raise_nofile(args.rlimit_nofile)
        apisock = os.path.abspath(args.apisock) if args.apisock else None
        daemon = Daemon(
            os.path.abspath(args.mountpoint), threads=args.threads, writable=args.writable,
            api_socket=apisock,
        )  # fmt: skip
        trio.run(daemon.run, commands)

    return run_reporting_errors("nydusd", serve)


if __name__ == "__main__":
    sys.exit(main())
