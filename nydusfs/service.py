"""The embedding API: run the nydus daemon inside a Python program.

What the nydus-service crate is for Rust programs. A ``NydusService`` runs a daemon (the same
``Daemon`` ``nydusd`` runs) on its own thread with its own trio loop, serving a FUSE mount
point; the calling thread mounts and unmounts images on it::

    from nydusfs.service import NydusService

    with NydusService("/mnt/images") as svc:
        svc.mount("/var/lib/images/app.boot", "/app", blob_dir="/var/lib/images/blobs")
        print(open("/mnt/images/app/etc/os-release").read())
        svc.umount("/app")

Every method is thread-safe and blocks until the daemon has done the work; errors raised in
the daemon (``ConfigError``, ``FormatError``, ``OSError``...) are raised in the caller.

``NydusService(mountpoint, api_socket=PATH)`` also serves nydusd's HTTP API on ``PATH``, so
``nydusctl`` and other API clients can manage the embedded daemon too.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import trio

from nydusfs.config import ConfigV2, load_config, localfs_config
from nydusfs.daemon.daemon import Daemon, DaemonState
from nydusfs.daemon.fs_service import MountCmd
from nydusfs.errors import NydusError

STARTUP_TIMEOUT = 30.0


class NydusService:
    """A daemon serving ``mountpoint`` from a background thread of this process."""

    def __init__(self, mountpoint: str, *, threads: int = 4, api_socket: str | None = None) -> None:
        self.daemon = Daemon(
            os.path.abspath(mountpoint),
            threads=threads,
            handle_signals=False,
            api_socket=os.path.abspath(api_socket) if api_socket else None,
        )
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Mount the (empty) FUSE file system and return once it serves requests."""
        if self._thread is not None:
            raise NydusError("the service is already started")
        self._thread = threading.Thread(target=self._run, name="nydusfs-daemon", daemon=True)
        self._thread.start()
        if not self._started.wait(STARTUP_TIMEOUT):
            raise NydusError(f"the daemon did not start within {STARTUP_TIMEOUT:.0f}s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.daemon.run)
                self._started.set()

        try:
            trio.run(main)
        except BaseException as e:
            while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                e = e.exceptions[0]
            self._error = e
        finally:
            self._started.set()

    def stop(self) -> None:
        """Unmount everything and stop the daemon thread."""
        if self._thread is None:
            return
        if self._token is not None and self.daemon.state is not DaemonState.STOPPED:
            with contextlib.suppress(trio.RunFinishedError):  # it stopped on its own meanwhile
                trio.from_thread.run_sync(self.daemon.stop, trio_token=self._token)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> NydusService:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- mounts -------------------------------------------------------------------------------
    def call(self, fn: Any, *args: Any) -> Any:
        """Run the coroutine function ``fn(*args)`` on the daemon's loop; return its result."""
        if self._token is None or self.daemon.state is not DaemonState.RUNNING:
            raise NydusError("the service is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def mount(
        self,
        bootstrap: str,
        path: str = "/",
        *,
        config: ConfigV2 | str | None = None,
        blob_dir: str | None = None,
        prefetch_files: Sequence[str] = (),
    ) -> None:
        """Mount the RAFS image ``bootstrap`` at ``path`` inside the FUSE mount point.

        ``config`` is a ``ConfigV2`` or the text of a config file; ``blob_dir`` is the
        shorthand for a localfs backend with a blob cache in the same directory.
        """
        if isinstance(config, str):
            config = load_config(config)
        elif config is None:
            if blob_dir is None:
                raise NydusError("give a config or a blob_dir")
            config = localfs_config(blob_dir)
        cmd = MountCmd("rafs", bootstrap, config, path, list(prefetch_files))
        self.call(self.daemon.service.mount, cmd)

    def umount(self, path: str) -> None:
        self.call(self.daemon.service.umount, path)

    def mounts(self) -> list[str]:
        return sorted(self.daemon.service.mounts)

    def info(self) -> dict[str, Any]:
        """What ``GET /api/v1/daemon`` answers: version, state and mounts (no secrets)."""
        from nydusfs.api.types import daemon_info

        return daemon_info(self.daemon, include_fs=True)

    def metrics(self, path: str, kind: str = "fs") -> dict[str, Any]:
        """The metrics of the mount at ``path``, as the API's ``/metrics[/backend|/blobcache]``.

        ``kind`` is ``fs``, ``files``, ``backend`` or ``blobcache``.
        """
        mounted = self.daemon.service.mounts.get(path)
        if mounted is None:
            raise FileNotFoundError(f"nothing is mounted at {path}")
        if kind == "fs":
            return mounted.fs.stats.to_dict()
        if kind == "files":
            return mounted.fs.stats.files_dict()
        if kind == "backend" and mounted.backend is not None:
            return mounted.backend.metrics.to_dict()
        if kind == "blobcache" and mounted.device is not None:
            return mounted.device.metrics.to_dict()
        raise NydusError(f"no {kind} metrics for {path}")

    @property
    def state(self) -> DaemonState:
        return self.daemon.state
