"""``FsService``: mount and umount filesystems in a daemon's ``Vfs`` (upstream's FsService).

A ``MountCmd`` names a filesystem type, its source (a bootstrap for ``rafs``, a host directory
for ``passthrough_fs``), a config and a mount point inside the VFS. A RAFS mount whose config
has an ``overlay`` section (``upper_dir``, ``work_dir``) is served as an ``OverlayFs`` with the
image as its lower layer: writable when the command says so (``nydusd --writable``), else
read-only. For RAFS the service builds the chain the image needs: bootstrap
reader, blob backend, ``BlobDevice`` (cache and prefetch) and ``RafsFs``; umount tears the chain
down in reverse. Each mount's resources are kept together so a failure while mounting releases
everything it had opened, and other mounts never notice.

Remount (upstream's ``PUT /api/v1/mount``) swaps the image or config at a mount point without a
window where lookups fail: the new filesystem is mounted under a new VFS index first, then the
mount point is switched to it (``Vfs.replace``); the old one keeps serving the inodes the kernel
already holds for ``REMOUNT_DRAIN_SECONDS`` and is then released. When the frontend can, the
kernel's cached entries for the mount point are invalidated (``invalidate``) so new path walks
reach the new image at once instead of after the pseudo directory's entry timeout.

Concurrency: runs on the daemon's trio loop. Opening the bootstrap and the cache files blocks,
so that part runs in a worker thread; the VFS table changes without awaiting. Mount, umount and
remount are serialized by one lock (as upstream, whose API thread runs them one at a time).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from nydusfs.config import ConfigV2
from nydusfs.errors import ConfigError, NydusError
from nydusfs.filesystem import ROOT_INODE
from nydusfs.metrics import FsIoStats
from nydusfs.overlay import OverlayFs
from nydusfs.passthrough import PassthroughFs
from nydusfs.rafs.fs import RafsFs
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage.backends import new_backend
from nydusfs.storage.backends.base import BlobBackend
from nydusfs.storage.blobdevice import BlobDevice
from nydusfs.storage.device import ChunkInfo
from nydusfs.vfs import Vfs

log = logging.getLogger(__name__)

# How long a replaced filesystem keeps serving inodes the kernel still holds (open files,
# cached dentries) after a remount: longer than the pseudo directories' entry timeout.
REMOUNT_DRAIN_SECONDS = 5.0

# (parent inode, name) pairs to drop from the kernel's dentry cache; set by the frontend.
Invalidator = Callable[[list[tuple[int, bytes]]], Awaitable[None]]

FS_TYPES = {"rafs": "rafs", "passthrough": "passthrough_fs", "passthroughfs": "passthrough_fs",
            "passthrough_fs": "passthrough_fs"}  # fmt: skip


@dataclass(slots=True)
class MountCmd:
    fs_type: str
    source: str
    config: ConfigV2
    mountpoint: str
    prefetch_files: list[str] = field(default_factory=list)
    writable: bool = False  # passthrough and overlay: serve writes (else EROFS)


ServedFs = RafsFs | PassthroughFs | OverlayFs


@dataclass(slots=True)
class MountedFs:
    cmd: MountCmd
    fs: ServedFs
    sup: RafsSuper | None  # None for passthrough_fs
    backend: BlobBackend | None
    device: BlobDevice | None
    index: int
    mounted_time: float


class FsService:
    """The mounts of one daemon."""

    def __init__(self, vfs: Vfs) -> None:
        self.vfs = vfs
        self.mounts: dict[str, MountedFs] = {}
        self.draining: dict[int, MountedFs] = {}  # replaced by a remount, by VFS index
        self.invalidate: Invalidator | None = None
        self.remount_drain_seconds = REMOUNT_DRAIN_SECONDS
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()

    def attach(self, nursery: trio.Nursery) -> None:
        """Where background work (prefetch workers) of later mounts runs."""
        self._nursery = nursery

    async def mount(self, cmd: MountCmd) -> MountedFs:
        _check_fs_type(cmd.fs_type)
        async with self._lock:
            if cmd.mountpoint in self.mounts:
                raise FileExistsError(f"{cmd.mountpoint} is already mounted")
            sup, backend, device, fs = await self._open(cmd)
            try:
                index = self.vfs.mount(cmd.mountpoint, fs)
            except BaseException:
                await _close(sup, backend, device)
                raise
            mounted = self._started(cmd, fs, sup, backend, device, index)
            self.mounts[cmd.mountpoint] = mounted
            await self._start_prefetch(mounted)
        log.info("mounted %s (%s) at %s", cmd.source, _describe(fs, sup), cmd.mountpoint)
        return mounted

    async def remount(self, cmd: MountCmd) -> MountedFs:
        """Replace what is mounted at ``cmd.mountpoint`` by ``cmd`` (a new bootstrap, config or
        both); FileNotFoundError if nothing is mounted there."""
        _check_fs_type(cmd.fs_type)
        async with self._lock:
            old = self.mounts.get(cmd.mountpoint)
            if old is None:
                raise FileNotFoundError(f"nothing is mounted at {cmd.mountpoint}")
            sup, backend, device, fs = await self._open(cmd)
            try:
                old_index, index = self.vfs.replace(cmd.mountpoint, fs)
            except BaseException:
                await _close(sup, backend, device)
                raise
            mounted = self._started(cmd, fs, sup, backend, device, index)
            self.mounts[cmd.mountpoint] = mounted
            self.draining[old_index] = old
            await self._invalidate(cmd.mountpoint, self._kernel_entries(cmd.mountpoint, old))
            if self._nursery is not None:
                self._nursery.start_soon(self._drain, old_index)
            await self._start_prefetch(mounted)
        log.info(
            "remounted %s at %s (index %d -> %d)", cmd.source, cmd.mountpoint, old_index, index
        )
        return mounted

    async def umount(self, mountpoint: str) -> None:
        async with self._lock:
            mounted = self.mounts.get(mountpoint)
            if mounted is None:
                raise FileNotFoundError(f"nothing is mounted at {mountpoint}")
            entries = self._kernel_entries(mountpoint, mounted)
            del self.mounts[mountpoint]
            self.vfs.umount(mountpoint)
            with trio.CancelScope(shield=True):  # half-closed resources would leak
                await self._invalidate(mountpoint, entries)
                await _release(mounted)
        log.info("unmounted %s", mountpoint)

    async def umount_all(self) -> None:
        for mountpoint in list(self.mounts):
            try:
                await self.umount(mountpoint)
            except Exception:
                log.exception("umount of %s failed", mountpoint)
        for index in list(self.draining):
            await self._release_draining(index)

    # --- helpers ------------------------------------------------------------------------------
    async def _open(
        self, cmd: MountCmd
    ) -> tuple[RafsSuper | None, BlobBackend | None, BlobDevice | None, ServedFs]:
        if FS_TYPES[cmd.fs_type] == "passthrough_fs":
            fs = await trio.to_thread.run_sync(_open_passthrough, cmd)
            return None, None, None, fs
        sup, backend, device = await trio.to_thread.run_sync(_open_rafs, cmd)
        try:
            rafs = cmd.config.rafs
            stats = FsIoStats(
                id=cmd.mountpoint,
                files_account_enabled=rafs.iostats_files,
                access_pattern_enabled=rafs.access_pattern,
                record_latest_read_files_enabled=rafs.latest_read_files,
            )
            lower = RafsFs(sup, device, enable_xattr=rafs.enable_xattr, stats=stats)
            overlay = cmd.config.overlay
            served: ServedFs = lower
            if overlay is not None and overlay.upper_dir:
                served = OverlayFs(
                    [lower], overlay.upper_dir, overlay.work_dir, writable=cmd.writable
                )
        except BaseException:
            await _close(sup, backend, device)
            raise
        return sup, backend, device, served

    def _started(
        self,
        cmd: MountCmd,
        fs: ServedFs,
        sup: RafsSuper | None,
        backend: BlobBackend | None,
        device: BlobDevice | None,
        index: int,
    ) -> MountedFs:
        if device is not None and self._nursery is not None:
            device.start(self._nursery)
        return MountedFs(cmd, fs, sup, backend, device, index, time.time())

    def _kernel_entries(self, mountpoint: str, mounted: MountedFs) -> list[tuple[int, bytes]]:
        """The kernel dentries that lead into ``mounted`` (taken while it is still mounted)."""
        if self.invalidate is None or mounted.sup is None:
            return []
        entry = self.vfs.entry_of(mountpoint)
        if entry is not None:
            return [entry]
        # Mounted at "/": the root inode stays, its cached children are the way in.
        return [(ROOT_INODE, name) for name, _ in mounted.sup.root.children()]

    async def _invalidate(self, mountpoint: str, entries: list[tuple[int, bytes]]) -> None:
        """Drop kernel entries after the VFS changed (best effort: a frontend without the
        ability, or a kernel that does not know the entry, leaves the entry timeouts to it)."""
        if self.invalidate is None or not entries:
            return
        try:
            await self.invalidate(entries)
        except Exception:
            log.warning("invalidating kernel entries under %s failed", mountpoint, exc_info=True)

    async def _drain(self, index: int) -> None:
        await trio.sleep(self.remount_drain_seconds)
        await self._release_draining(index)

    async def _release_draining(self, index: int) -> None:
        mounted = self.draining.pop(index, None)
        if mounted is None:
            return
        self.vfs.release_replaced(index)
        with trio.CancelScope(shield=True):
            await _release(mounted)
        log.info("released the filesystem replaced at %s (index %d)", mounted.cmd.mountpoint, index)

    async def _start_prefetch(self, mounted: MountedFs) -> None:
        device, config = mounted.device, mounted.cmd.config
        if device is None or mounted.sup is None:
            return
        if config.cache.prefetch.enable:
            await device.prefetch_blobs()
        if config.rafs.prefetch.enable:
            chunks = prefetch_chunks(
                mounted.sup, mounted.cmd.prefetch_files, config.rafs.prefetch.prefetch_all
            )
            if chunks:
                await device.prefetch_chunks(chunks)


def _check_fs_type(fs_type: str) -> None:
    kind = FS_TYPES.get(fs_type)
    if kind is None:
        raise ConfigError(f"unknown filesystem type {fs_type!r} (rafs or passthrough_fs)")


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


def _describe(fs: ServedFs, sup: RafsSuper | None) -> str:
    if sup is None:
        return "passthrough_fs"
    kind = "overlay over " if isinstance(fs, OverlayFs) else ""
    return f"{kind}rafs v{sup.meta.version}"


def _open_passthrough(cmd: MountCmd) -> PassthroughFs:
    if not os.path.isdir(cmd.source):
        raise ConfigError(f"passthrough_fs source {cmd.source} is not a directory")
    return PassthroughFs(cmd.source, writable=cmd.writable)


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


async def _release(mounted: MountedFs) -> None:
    try:
        await mounted.fs.destroy()
    finally:
        await _close(mounted.sup, mounted.backend, mounted.device)


async def _close(
    sup: RafsSuper | None, backend: BlobBackend | None, device: BlobDevice | None
) -> None:
    if device is not None:
        await device.close()
    if backend is not None:
        await trio.to_thread.run_sync(backend.close)
    if sup is not None:
        sup.close()
