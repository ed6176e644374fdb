"""``FsService``: mount and umount filesystems in a daemon's ``Vfs`` (upstream's FsService).

A ``MountCmd`` names a filesystem type, its source (a bootstrap for ``rafs``), a config and a
mount point inside the VFS. For RAFS the service builds the chain the image needs: bootstrap
reader, blob backend, ``BlobDevice`` (cache and prefetch) and ``RafsFs``; umount tears the chain
down in reverse. Each mount's resources are kept together so a failure while mounting releases
everything it had opened, and other mounts never notice.

Concurrency: runs on the daemon's trio loop. Opening the bootstrap and the cache files blocks,
so that part runs in a worker thread; the VFS table changes without awaiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from nydusfs.config import ConfigV2
from nydusfs.errors import ConfigError, NydusError
from nydusfs.metrics import FsIoStats
from nydusfs.rafs.fs import RafsFs
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage.backends import new_backend
from nydusfs.storage.backends.base import BlobBackend
from nydusfs.storage.blobdevice import BlobDevice
from nydusfs.storage.device import ChunkInfo
from nydusfs.vfs import Vfs

log = logging.getLogger(__name__)

FS_TYPES = {"rafs": "rafs", "passthrough": "passthrough_fs", "passthroughfs": "passthrough_fs",
            "passthrough_fs": "passthrough_fs"}  # fmt: skip


@dataclass(slots=True)
class MountCmd:
    fs_type: str
    source: str
    config: ConfigV2
    mountpoint: str
    prefetch_files: list[str] = field(default_factory=list)


@dataclass(slots=True)
class MountedFs:
    cmd: MountCmd
    fs: RafsFs
    sup: RafsSuper
    backend: BlobBackend | None
    device: BlobDevice | None
    index: int
    mounted_time: float


class FsService:
    """The mounts of one daemon."""

    def __init__(self, vfs: Vfs) -> None:
        self.vfs = vfs
        self.mounts: dict[str, MountedFs] = {}
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Where background work (prefetch workers) of later mounts runs."""
        self._nursery = nursery

    async def mount(self, cmd: MountCmd) -> MountedFs:
        kind = FS_TYPES.get(cmd.fs_type)
        if kind is None:
            raise ConfigError(f"unknown filesystem type {cmd.fs_type!r} (rafs or passthrough_fs)")
        if kind != "rafs":
            raise NydusError("passthrough_fs is not available in this build")
        if cmd.mountpoint in self.mounts:
            raise FileExistsError(f"{cmd.mountpoint} is already mounted")
        sup, backend, device = await trio.to_thread.run_sync(_open_rafs, cmd)
        try:
            rafs = cmd.config.rafs
            stats = FsIoStats(
                id=cmd.mountpoint,
                files_account_enabled=rafs.iostats_files,
                access_pattern_enabled=rafs.access_pattern,
                record_latest_read_files_enabled=rafs.latest_read_files,
            )
            fs = RafsFs(sup, device, enable_xattr=rafs.enable_xattr, stats=stats)
            index = self.vfs.mount(cmd.mountpoint, fs)
        except BaseException:
            await _close(sup, backend, device)
            raise
        if device is not None and self._nursery is not None:
            device.start(self._nursery)
        mounted = MountedFs(cmd, fs, sup, backend, device, index, time.time())
        self.mounts[cmd.mountpoint] = mounted
        await self._start_prefetch(mounted)
        log.info("mounted %s (rafs v%d) at %s", cmd.source, sup.meta.version, cmd.mountpoint)
        return mounted

    async def umount(self, mountpoint: str) -> None:
        mounted = self.mounts.pop(mountpoint, None)
        if mounted is None:
            raise FileNotFoundError(f"nothing is mounted at {mountpoint}")
        self.vfs.umount(mountpoint)
        await mounted.fs.destroy()
        await _close(mounted.sup, mounted.backend, mounted.device)
        log.info("unmounted %s", mountpoint)

    async def umount_all(self) -> None:
        for mountpoint in list(self.mounts):
            try:
                await self.umount(mountpoint)
            except Exception:
                log.exception("umount of %s failed", mountpoint)

    async def _start_prefetch(self, mounted: MountedFs) -> None:
        device, config = mounted.device, mounted.cmd.config
        if device is None:
            return
        if config.cache.prefetch.enable:
            await device.prefetch_blobs()
        if config.rafs.prefetch.enable:
            chunks = prefetch_chunks(
                mounted.sup, mounted.cmd.prefetch_files, config.rafs.prefetch.prefetch_all
            )
            if chunks:
                await device.prefetch_chunks(chunks)


def prefetch_chunks(sup: RafsSuper, files: Sequence[str], prefetch_all: bool) -> list[ChunkInfo]:
    """Chunks of the files to prefetch: ``files`` (paths; a directory means its subtree) or the
    bootstrap's prefetch table, then every other file when ``prefetch_all``."""
    roots = []
    for path in files:
        try:
            roots.append(sup.lookup_path(path).ino)
        except (FileNotFoundError, NydusError):
            log.warning("prefetch: %s is not in the image", path)
    if not files:
        roots = list(sup.prefetch_table)
    chunks: list[ChunkInfo] = []
    seen: set[int] = set()

    def add_tree(ino: int) -> None:
        stack = [ino]
        while stack:
            node = sup.inode(stack.pop())
            if node.ino in seen:
                continue
            seen.add(node.ino)
            if node.is_dir():
                stack.extend(i for _, i in node.children())
            elif node.is_reg():
                chunks.extend(node.chunks())

    for ino in roots:
        add_tree(ino)
    if prefetch_all:
        add_tree(sup.meta.root_ino)
    return chunks


def _open_rafs(cmd: MountCmd) -> tuple[RafsSuper, BlobBackend | None, BlobDevice | None]:
    sup = RafsSuper.load(cmd.source)
    backend: BlobBackend | None = None
    device: BlobDevice | None = None
    try:
        if sup.blobs:
            if cmd.config.backend is None:
                raise ConfigError(f"{cmd.source} has data blobs but the config has no backend")
            backend = new_backend(cmd.config.backend, cmd.config.id or cmd.mountpoint)
            device = BlobDevice(sup.blobs, cmd.config, backend)
    except BaseException:
        if backend is not None:
            backend.close()
        sup.close()
        raise
    return sup, backend, device


async def _close(sup: RafsSuper, backend: BlobBackend | None, device: BlobDevice | None) -> None:
    if device is not None:
        await device.close()
    if backend is not None:
        await trio.to_thread.run_sync(backend.close)
    sup.close()
