"""``nydusd nbd``: export a RAFS v6 image as a read-only NBD block device.

The device is the image's flat EROFS view (``rafs/blockdev.py``): ``mount -t erofs`` on the
client side mounts it as one disk. Upstream attaches the export to a kernel ``/dev/nbdX``
(its positional ``DEVICE``); this build serves the NBD network protocol instead, on a unix
socket (``--unix``) or a TCP address (``--ipaddr``/``--port``), so any NBD client can attach
(``nbdfuse``, ``qemu -drive file=nbd+unix://...``, ``nbd-client`` for ``/dev/nbdX``).

The image comes as upstream takes it: ``-B/--bootstrap`` with ``-D/--localfs-dir`` (blobs and
cache in one directory), or ``-C/--config`` with a ``BlobCacheEntry`` JSON file (``type``
"bootstrap", ``config_v2`` with ``metadata_path``). As an extension ``-C`` may also be an
ordinary nydusd config (JSON v1/v2, TOML v2) given together with ``-B``, which is how a
registry or S3 backend is used. User errors print one ``nydusd: <message>`` line and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

import trio

from nydusfs import __version__
from nydusfs.cli.common import (
    add_log_args,
    return_large_buffers_to_the_system,
    run_reporting_errors,
    setup_logging,
)
from nydusfs.cli.nydusd import _threads
from nydusfs.config import MAX_CONFIG_SIZE, ConfigV2, load_config_file, localfs_config, parse_v2
from nydusfs.daemon.fs_service import prefetch_chunks
from nydusfs.errors import ConfigError, NydusError
from nydusfs.nbd.server import NbdServer, listener_address, tcp_listeners, unix_listener
from nydusfs.rafs.blockdev import BlockDevice

log = logging.getLogger("nydusd")

DEFAULT_EXPORT = "disk-default"  # upstream's BlobCacheEntry id for --bootstrap


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydusd nbd",
        description="Export a RAFS v6 image as a read-only block device over NBD.",
    )
    p.add_argument("-V", "--version", action="version", version=f"nydusd {__version__}")
    p.add_argument("DEVICE", nargs="?", help="kernel NBD device (not supported: use --unix/--port)")
    p.add_argument("-B", "--bootstrap", help="RAFS v6 metadata file")
    p.add_argument("-D", "--localfs-dir", help="directory of blobs (localfs backend and cache)")
    p.add_argument("-C", "--config", help="BlobCacheEntry JSON, or a nydusd config with -B")
    p.add_argument("--threads", type=_threads, default=4, help="requests served at once (1..1024)")
    p.add_argument("--unix", help="serve on this unix socket (mode 0600)")
    p.add_argument("--ipaddr", default="127.0.0.1", help="TCP address (with --port)")
    p.add_argument("--port", type=int, help="serve on this TCP port (0 = any free port)")
    p.add_argument("--export-name", default=DEFAULT_EXPORT, help="export name (also the default)")
    p.add_argument("--id", help="daemon id (accepted for upstream compatibility)")
    add_log_args(p)
    return p


def image_source(
    bootstrap: str | None, localfs_dir: str | None, config: str | None
) -> tuple[str, ConfigV2]:
    """The bootstrap and storage config upstream's ``-B``/``-D``/``-C`` trio describes (shared
    by ``nydusd nbd`` and ``nydus-image export --block``)."""
    if localfs_dir and config:
        raise ConfigError("--localfs-dir conflicts with --config")
    if config:
        entry = _blob_cache_entry(config)
        if entry is not None:
            if bootstrap:
                raise ConfigError("--bootstrap conflicts with a BlobCacheEntry --config")
            return entry
        if not bootstrap:
            raise ConfigError(f"{config} is a nydusd config: --bootstrap is required with it")
        return bootstrap, load_config_file(config)
    if not bootstrap:
        raise ConfigError("either --bootstrap (with --localfs-dir) or --config is required")
    if not localfs_dir:
        raise ConfigError("--bootstrap needs --localfs-dir (or --config)")
    return bootstrap, localfs_config(localfs_dir)


def _blob_cache_entry(path: str) -> tuple[str, ConfigV2] | None:
    """Parse upstream's ``BlobCacheEntry`` file; None when the file is some other config."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_SIZE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data: Any = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or "config_v2" not in data:
        return None
    if data.get("type", "bootstrap") != "bootstrap":
        raise ConfigError(f'{path}: type: expected "bootstrap", got {data.get("type")!r}')
    raw = data["config_v2"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config_v2: expected a table")
    raw = dict(raw)
    meta = raw.pop("metadata_path", None) or data.get("metadata_path")
    if not isinstance(meta, str) or not meta:
        raise ConfigError(f"{path}: config_v2.metadata_path: the bootstrap path is missing")
    try:
        return meta, parse_v2(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: config_v2.{e}") from None


def export_uri(name: str, unix: str | None, address: str | None) -> str:
    """The NBD URI clients use (``nbd+unix:///NAME?socket=PATH`` or ``nbd://HOST:PORT/NAME``)."""
    quoted = urllib.parse.quote(name)
    if unix is not None:
        return f"nbd+unix:///{quoted}?socket={urllib.parse.quote(os.path.abspath(unix))}"
    return f"nbd://{address}/{quoted}"


async def run(args: argparse.Namespace, bootstrap: str, config: ConfigV2) -> None:
    """Open the image, listen, serve until SIGINT/SIGTERM, then release everything."""
    device = await trio.to_thread.run_sync(BlockDevice.open, bootstrap, config)
    unix = os.path.abspath(args.unix) if args.unix else None
    try:
        if unix is not None:
            listeners = [await unix_listener(unix)]
        else:
            listeners = await tcp_listeners(args.ipaddr, args.port)
        address = None if unix else listener_address(listeners[0])
        server = NbdServer(device, name=args.export_name, threads=args.threads,
                           description=f"RAFS v6 image {os.path.basename(bootstrap)}")  # fmt: skip
        log.info("serving %s (%d bytes, %d blocks) at %s", bootstrap, device.size, device.blocks,
                 export_uri(args.export_name, unix, address))  # fmt: skip
        async with trio.open_nursery() as nursery:
            device.start(nursery)
            if device.storage is not None and config.rafs.prefetch.enable:
                # The bootstrap's prefetch table (or everything with prefetch_all), as a mount.
                chunks = prefetch_chunks(device.sup, [], config.rafs.prefetch.prefetch_all)
                await device.storage.prefetch_chunks(chunks)
            nursery.start_soon(server.serve, listeners)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await device.close()
        if unix is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    return_large_buffers_to_the_system()

    def serve() -> None:
        if args.DEVICE:
            raise NydusError(
                f"kernel NBD devices ({args.DEVICE}) are not supported by this build: serve with "
                "--unix PATH or --port N and attach a client (e.g. nbd-client) to that"
            )
        if (args.unix is None) == (args.port is None):
            raise ConfigError("give exactly one of --unix PATH and --port N")
        bootstrap, config = image_source(args.bootstrap, args.localfs_dir, args.config)
        trio.run(run, args, bootstrap, config)

    return run_reporting_errors("nydusd", serve)
