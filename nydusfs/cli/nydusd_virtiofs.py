"""``nydusd virtiofs``: serve RAFS images to QEMU guests as a vhost-user-fs device.

``nydusd virtiofs --sock S [--config C --bootstrap B | --apisock A]``: the same VFS, mounts and
HTTP API as ``nydusd fuse``, behind a virtio-fs device on the vhost-user socket ``S`` (QEMU:
``-chardev socket,id=c,path=S -device vhost-user-fs-pci,chardev=c,tag=T``). The daemon serves
one guest after another until SIGINT/SIGTERM or ``PUT /api/v1/daemon/exit``. Parsing only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import trio

from nydusfs import __version__
from nydusfs.cli import nydusd
from nydusfs.cli.common import add_log_args, setup_logging
from nydusfs.daemon.daemon import Daemon
from nydusfs.daemon.frontends import VirtiofsFrontend
from nydusfs.errors import NydusError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydusd virtiofs",
        description="Nydus image service: serve RAFS images to QEMU guests over virtio-fs.",
    )
    p.add_argument("-V", "--version", action="version", version=f"nydusd {__version__}")
    p.add_argument("--sock", required=True, help="vhost-user socket QEMU connects to")
    p.add_argument("-A", "--apisock", help="HTTP API unix socket")
    p.add_argument("-C", "--config", help="configuration file (JSON v1/v2 or TOML v2)")
    p.add_argument("-B", "--bootstrap", help="RAFS metadata file")
    p.add_argument("-D", "--localfs-dir", help="directory of blobs (localfs backend and cache)")
    p.add_argument("--prefetch-files", help="file listing paths to prefetch, one per line")
    p.add_argument("-m", "--virtual-mountpoint", default="/", help="RAFS path inside the VFS")
    p.add_argument(
        "--thread-num", "--fuse-threads", dest="threads", type=nydusd._threads, default=4,
        help="requests served at once (1..1024)",
    )  # fmt: skip
    add_log_args(p)
    p.add_argument("--log-rotation-size", type=int, default=0, help="MB, 0 = off")
    p.add_argument("--rlimit-nofile", type=int, default=1_000_000, help="0 = unchanged")
    p.add_argument("--dedup-db", help="SQLite CAS database for chunk dedup")
    for flag, dest in (("--id", "id"), ("--supervisor", "supervisor"), ("-s", "shared_dir")):
        p.add_argument(flag, dest=dest, help=argparse.SUPPRESS)
    p.add_argument("--hybrid-mode", action="store_true", help="RAFS plus passthroughfs")
    p.add_argument("--upgrade", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--writable", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    setup_logging(args.log_level, args.log_file)
    try:
        nydusd._refuse_unavailable(args)
        if args.hybrid_mode:
            raise NydusError("--hybrid-mode needs passthroughfs, not available in this build")
        commands = nydusd.mount_commands(args)
        nydusd._raise_nofile(args.rlimit_nofile)
        sock = os.path.abspath(args.sock)
        apisock = os.path.abspath(args.apisock) if args.apisock else None
        daemon = Daemon(
            sock, threads=args.threads, api_socket=apisock, frontend=VirtiofsFrontend(sock)
        )
        trio.run(daemon.run, commands)
    except BaseException as e:
        leaf = nydusd._single(e)
        if isinstance(leaf, NydusError | OSError | ValueError):
            print(f"nydusd: {leaf}", file=sys.stderr)
            return 1
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        raise
    return 0
