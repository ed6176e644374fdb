"""``nydus-image export --block``: write a RAFS v6 image's flat block view to a file.

The output is the disk ``nydusd nbd`` serves (``rafs/blockdev.py``), byte for byte: the bootstrap,
then each blob's uncompressed data at its ``mapped_blkaddr``, holes left sparse. It mounts with
``mount -t erofs -o ro,loop`` (Linux 6.12+). Flags are upstream's: ``-B``/``-D`` or ``-C``
(see ``nydusd_nbd.image_source``), ``-O/--output`` (default ``<localfs-dir>/<bootstrap>.disk``),
``--threads`` (1..32 concurrent readers). ``--verity`` is refused: dm-verity data is not written
by this build.
"""

from __future__ import annotations

import argparse
import logging
import os

import trio

from nydusfs.atomicfile import atomic_write
from nydusfs.cli.common import add_log_args
from nydusfs.cli.nydusd_nbd import image_source
from nydusfs.config import ConfigV2
from nydusfs.errors import ConfigError, UnsupportedError
from nydusfs.rafs.blockdev import BlockDevice, export

log = logging.getLogger("nydus-image")


def _threads(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 32:
        raise argparse.ArgumentTypeError("valid values: [1-32]")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="export a RAFS v6 image as a raw block disk image")
    p.add_argument("--block", action="store_true", help="export as a raw block disk image")
    p.add_argument("-B", "--bootstrap", help="bootstrap of the RAFS filesystem to export")
    p.add_argument("-C", "--config", help="BlobCacheEntry JSON, or a nydusd config with -B")
    p.add_argument("-D", "--localfs-dir", help="directory of the blobs (localfs backend)")
    p.add_argument("--threads", type=_threads, default=4, help="concurrent readers (1..32)")
    p.add_argument("-O", "--output", help="output file (default <localfs-dir>/<bootstrap>.disk)")
    p.add_argument("--verity", action="store_true", help="dm-verity data (not supported)")
    add_log_args(p)


def cmd_export(args: argparse.Namespace) -> int:
    if not args.block:
        raise ConfigError("unknown export type: only --block is supported")
    if args.verity:
        raise UnsupportedError("--verity (dm-verity data) is not supported by this build")
    bootstrap, config = image_source(args.bootstrap, args.localfs_dir, args.config)
    output = args.output
    if output is None:
        if not args.localfs_dir:
            raise ConfigError("--output is required with --config")
        output = os.path.join(args.localfs_dir, os.path.basename(bootstrap) + ".disk")
    size = trio.run(_export, bootstrap, config, output, args.threads)
    log.info("exported %s (%d bytes) to %s", bootstrap, size, output)
    return 0


async def _export(bootstrap: str, config: ConfigV2, output: str, threads: int) -> int:
    device = await trio.to_thread.run_sync(BlockDevice.open, bootstrap, config, "block-export")
    try:
        with atomic_write(output) as f:
            f.truncate(device.size)
            await export(device, f.fileno(), tasks=threads)
        return device.size
    finally:
        with trio.CancelScope(shield=True):
            await device.close()
