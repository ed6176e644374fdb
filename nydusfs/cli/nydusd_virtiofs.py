"""``nydusd virtiofs``: serve RAFS images to QEMU guests as a vhost-user-fs device.

``nydusd virtiofs --sock S [--config C --bootstrap B | --apisock A]``: the same VFS, mounts and
HTTP API as ``nydusd fuse``, behind a virtio-fs device on the vhost-user socket ``S`` (QEMU:
``-chardev socket,id=c,path=S -device vhost-user-fs-pci,chardev=c,tag=T``). The daemon serves
one guest after another until SIGINT/SIGTERM or ``PUT /api/v1/daemon/exit``. Parsing only.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import trio

from nydusfs.cli import nydusd
from nydusfs.cli.common import (
    return_large_buffers_to_the_system,
    run_reporting_errors,
    setup_logging,
)
from nydusfs.daemon.daemon import Daemon
from nydusfs.daemon.frontends import VirtiofsFrontend
from nydusfs.errors import NydusError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydusd virtiofs",
        description="Nydus image service: serve RAFS images to QEMU guests over virtio-fs.",
    )
    nydusd.add_daemon_args(p)
    p.add_argument("--sock", required=True, help="vhost-user socket QEMU connects to")
    p.add_argument("--hybrid-mode", action="store_true", help="RAFS plus passthroughfs")
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    setup_logging(args.log_level, args.log_file)
    return_large_buffers_to_the_system()

    def serve() -> None:
        nydusd._refuse_unavailable(args)
        if args.hybrid_mode:
            raise NydusError("--hybrid-mode (passthroughfs behind RAFS) is not supported")
        commands = nydusd.mount_commands(args)
        nydusd._raise_nofile(args.rlimit_nofile)
        sock = os.path.abspath(args.sock)
        apisock = os.path.abspath(args.apisock) if args.apisock else None
        daemon = Daemon(
            sock, threads=args.threads, api_socket=apisock, frontend=VirtiofsFrontend(sock)
        )
        trio.run(daemon.run, commands)

    return run_reporting_errors("nydusd", serve)
