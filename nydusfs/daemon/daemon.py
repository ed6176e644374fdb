"""``Daemon``: one nydusd process: a VFS served on a FUSE mount, its mounts and its lifecycle.

State machine (upstream's names): ``INIT`` until the initial filesystems are mounted, ``READY``
once they are, ``RUNNING`` while the frontend serves requests, ``STOPPED`` after shutdown (or
from the moment ``PUT /api/v1/daemon/exit`` is accepted). SIGINT and SIGTERM stop serving; the
FUSE mount is always removed and every filesystem's resources released, whether the daemon
stops on a signal, on an error or on request.

With ``api_socket`` the daemon serves the HTTP API (``nydusfs.api``) on that unix socket from
before the initial mounts until it stops; without initial mounts it serves an empty pseudo root
and waits for ``POST /api/v1/mount``. ERROR log records are kept for ``/daemon/events`` and
the frontend's requests are tracked for ``/metrics/inflight``.

Concurrency: everything runs in one ``trio.run``; the frontend's request workers, the API
connections, the signal watcher and prefetch workers are tasks of the daemon's nursery.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import signal
from collections.abc import Sequence
from typing import Any

import trio

from nydusfs.daemon.frontends import Frontend, FuseFrontend
from nydusfs.daemon.fs_service import FsService, MountCmd
from nydusfs.errors import NydusError
from nydusfs.metrics import ErrorHolder, ErrorLogHandler, InflightTracker
from nydusfs.vfs import Vfs

log = logging.getLogger(__name__)

MNT_DETACH = 2


class DaemonState(enum.Enum):
    INIT = "INIT"
    READY = "READY"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


def clear_stale_mount(mountpoint: str) -> None:
    """Detach a FUSE mount left behind by a crashed daemon ("transport endpoint not connected")."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise NydusError(f"mountpoint {mountpoint}: {e.strerror}") from e
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            reason = os.strerror(err)
            raise NydusError(f"cannot clear the stale mount at {mountpoint}: {reason}") from None
        log.warning("cleared a stale FUSE mount at %s", mountpoint)
    if not os.path.isdir(mountpoint):
        raise NydusError(f"mountpoint {mountpoint} is not a directory")


class Daemon:
    """Serve ``vfs`` on ``mountpoint`` with the mounts given at start, until stopped."""

    def __init__(
        self,
        mountpoint: str,
        *,
        threads: int = 4,
        writable: bool = False,
        fsname: str = "nydusfs",
        handle_signals: bool = True,
        api_socket: str | None = None,
        id: str | None = None,
        supervisor: str | None = None,
        frontend: Frontend | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        self.frontend = frontend if frontend is not None else FuseFrontend(mountpoint)
        self.threads = threads
        self.writable = writable
        self.fsname = fsname
        # Signal handlers can only be installed from the main thread (not when embedded).
        self.handle_signals = handle_signals
        self.api_socket = api_socket
        self.id = id
        self.supervisor = supervisor
        self.vfs = Vfs()
        self.service = FsService(self.vfs)
        self.state = DaemonState.INIT
        self.inflight = InflightTracker()
        self.events = ErrorHolder()
        self._cancel: trio.CancelScope | None = None

    def stop(self) -> None:
        """Ask a running daemon to stop (safe from any task of its loop)."""
        if self._cancel is not None:
            self._cancel.cancel()

    def request_exit(self) -> None:
        """Upstream's ``trigger_exit``: the state machine goes to STOPPED now; the caller then
        calls ``stop`` (the API does so once its reply is sent)."""
        self.state = DaemonState.STOPPED

    async def run(
        self, mounts: Sequence[MountCmd] = (), *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.frontend.prepare()
        errors = ErrorLogHandler(self.events)
        logging.getLogger().addHandler(errors)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                self.service.attach(nursery)
                if self.api_socket is not None:
                    await nursery.start(self._serve_api)
                for cmd in mounts:
                    await self.service.mount(cmd)
                self.state = DaemonState.READY
                if self.handle_signals:
                    nursery.start_soon(self._watch_signals)
                await nursery.start(self._serve)
                self.state = DaemonState.RUNNING
                log.info("nydusd serving %s", self.frontend.describe())
                task_status.started()
        finally:
            self.state = DaemonState.STOPPED
            with trio.CancelScope(shield=True):
                await self.service.umount_all()
            logging.getLogger().removeHandler(errors)
            log.info("nydusd stopped")

    async def _serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.frontend.serve(self, task_status=task_status)
        finally:
            # The frontend is gone (unmounted from outside, or we are stopping): so are we.
            self.stop()

    async def _serve_api(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from nydusfs.api.routes import ApiRoutes
        from nydusfs.api.server import ApiServer

        assert self.api_socket is not None
        server = ApiServer(self.api_socket, ApiRoutes(self))
        await server.serve(task_status=task_status)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                self.stop()
                return
