"""Frontends of the daemon: how its VFS reaches a kernel or a guest.

A ``Frontend`` prepares its endpoint before the daemon mounts anything (``prepare``) and then
serves the daemon's VFS until cancelled (``serve``), calling ``task_status.started()`` once
requests can arrive. ``FuseFrontend`` mounts the VFS on the host, through pyfuse3 (the default)
or through the project's own /dev/fuse codec (``transport="fusedev"``, or the environment
variable ``NYDUSD_FUSE_TRANSPORT=fusedev``); ``VirtiofsFrontend`` is a vhost-user-fs device for
QEMU guests. The daemon's state machine, API and mounts are the same behind each.
"""

from __future__ import annotations

import abc
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import trio

from nydusfs.errors import NydusError

if TYPE_CHECKING:
    from nydusfs.daemon.daemon import Daemon

log = logging.getLogger(__name__)

TRANSPORT_ENV = "NYDUSD_FUSE_TRANSPORT"
FUSE_TRANSPORTS = ("pyfuse3", "fusedev")


class Frontend(abc.ABC):
    """Where the daemon serves its VFS."""

    @abc.abstractmethod
    def describe(self) -> str: ...

    def prepare(self) -> None:
        """Check (and clean up) the endpoint before anything is mounted."""
        return None

    @abc.abstractmethod
    async def serve(self, daemon: Daemon, task_status: Any = trio.TASK_STATUS_IGNORED) -> None: ...


class FuseFrontend(Frontend):
    """A host FUSE mount at ``mountpoint``."""

    def __init__(self, mountpoint: str, transport: str | None = None) -> None:
        self.mountpoint = mountpoint
        self.transport = transport or os.environ.get(TRANSPORT_ENV) or "pyfuse3"
        if self.transport not in FUSE_TRANSPORTS:
            raise NydusError(f"unknown FUSE transport {self.transport!r} (pyfuse3 or fusedev)")

    def describe(self) -> str:
        return self.mountpoint

    def prepare(self) -> None:
        from nydusfs.daemon.daemon import clear_stale_mount

        clear_stale_mount(self.mountpoint)

    async def serve(self, daemon: Daemon, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.transport == "fusedev":
            from nydusfs.fuse import fusedev

            notifier: Any = fusedev.FusedevNotifier()
            serve: Any = fusedev.serve
        else:
            from nydusfs.fuse import pyfuse3_frontend

            notifier = pyfuse3_frontend.KernelNotifier()
            serve = pyfuse3_frontend.serve
        log.info("FUSE transport: %s", self.transport)
        daemon.service.invalidate = notifier.invalidate
        try:
            await serve(
                daemon.vfs,
                self.mountpoint,
                fsname=daemon.fsname,
                read_only=not daemon.writable,
                max_tasks=daemon.threads,
                inflight=daemon.inflight,
                notifier=notifier,
                task_status=task_status,
            )
        finally:
            daemon.service.invalidate = None


class VirtiofsFrontend(Frontend):
    """A vhost-user-fs device listening on the unix socket ``socket_path``."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def describe(self) -> str:
        return f"virtio-fs on {self.socket_path}"

    def prepare(self) -> None:
        parent = os.path.dirname(self.socket_path) or "."
        if not os.path.isdir(parent):
            raise NydusError(f"--sock {self.socket_path}: {parent} is not a directory")
        if os.path.isdir(self.socket_path):
            raise NydusError(f"--sock {self.socket_path} is a directory")
        if _listening(self.socket_path):
            raise NydusError(f"--sock {self.socket_path} is in use by another process")

    async def serve(self, daemon: Daemon, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from nydusfs.virtiofs.device import serve

        # The guest's kernel is not told when mounts change (virtio-fs has no notifications);
        # its caches expire with the entry and attribute timeouts.
        await serve(
            daemon.vfs,
            self.socket_path,
            max_tasks=daemon.threads,
            inflight=daemon.inflight,
            task_status=task_status,
        )


def _listening(path: str) -> bool:
    """Someone accepts connections on the unix socket ``path`` (a stale one is replaced)."""
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
