"""The /dev/fuse transport: ``FuseServer`` on a kernel FUSE mount, without libfuse or pyfuse3.

``serve`` opens /dev/fuse, mounts it with mount(2) (as root) and moves requests between the
device and a ``FuseServer``: one read of the device is one request, one ``writev`` is one
reply. It serves the same ``FileSystem`` as the pyfuse3 frontend, through the project's own
codec, and owns the device fd, which a hot upgrade can pass to a new process.

Concurrency: one trio task reads the device (non-blocking fd, ``wait_readable``) and starts a
task per request, at most ``max_tasks`` at once (reading pauses at the limit); replies go out in
whatever order requests finish. Entry invalidations (``FusedevNotifier``) are written from a
worker thread because the kernel may wait, inside that write, for requests only we can answer.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from typing import Any

import trio

from nydusfs.filesystem import FileSystem
from nydusfs.fuse import abi
from nydusfs.fuse.bdi import set_readahead
from nydusfs.fuse.server import FuseServer
from nydusfs.fuse.wire import Buffers
from nydusfs.metrics import InflightTracker

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
MAX_WRITE = 1 << 20
# A read of /dev/fuse must have room for the largest request: a WRITE of max_write bytes
# after its headers (libfuse uses the same page of slack).
BUFFER_SIZE = MAX_WRITE + 4096
NOTIFY_CLOSE_TIMEOUT = 2.0

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount_fuse(
    fd: int, mountpoint: str, *, fsname: str, read_only: bool, allow_other: bool
) -> None:
    """mount(2) a FUSE filesystem whose requests arrive on ``fd`` (needs CAP_SYS_ADMIN)."""
    st = os.stat(mountpoint)
    options = [
        f"fd={fd}",
        f"rootmode={st.st_mode & 0o170000:o}",
        f"user_id={os.geteuid()}",
        f"group_id={os.getegid()}",
        "default_permissions",
    ]
    if allow_other:
        options.append("allow_other")
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    _check(
        _libc.mount(
            fsname.encode(), os.fsencode(mountpoint), b"fuse.nydusfs", flags,
            ",".join(options).encode(),
        ),
        f"mounting FUSE at {mountpoint}",
    )  # fmt: skip


def unmount(mountpoint: str) -> None:
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            log.warning("unmounting %s: %s", mountpoint, os.strerror(err))


class FusedevNotifier:
    """Invalidates kernel dentries of the live session (FUSE_NOTIFY_INVAL_ENTRY)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self._running = 0

    @property
    def live(self) -> bool:
        return self.fd is not None

    async def invalidate(self, entries: list[tuple[int, bytes]]) -> None:
        if self.fd is None or not entries:
            return
        self._running += 1
        try:
            await trio.to_thread.run_sync(self._write_all, self.fd, entries)
        finally:
            self._running -= 1

    @staticmethod
    def _write_all(fd: int, entries: list[tuple[int, bytes]]) -> None:
        for parent, name in entries:
            body = abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
            head = abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body), abi.NOTIFY_INVAL_ENTRY, 0)
            try:
                os.write(fd, head + body)
            except OSError as e:  # ENOENT: the kernel never looked it up, nothing cached
                if e.errno != errno.ENOENT:
                    log.debug("fuse: invalidating %r in %d: %s", name, parent, e)

    async def close(self) -> None:
        self.fd = None
        with trio.move_on_after(NOTIFY_CLOSE_TIMEOUT):
            while self._running:
                await trio.sleep(0.01)


class FusedevSession:
    """Moves requests between one /dev/fuse fd and a ``FuseServer``."""

    def __init__(
        self, fd: int, server: FuseServer, mountpoint: str, *, max_tasks: int = 16
    ) -> None:
        self.fd = fd
        self.server = server
        self.mountpoint = mountpoint
        self.slots = trio.Semaphore(max_tasks)
        self._readahead_set = False

    async def run(self) -> None:
        """Serve until the filesystem is unmounted (ENODEV) or the caller cancels."""
        async with trio.open_nursery() as nursery:
            while True:
                await self.slots.acquire()
                try:
                    data = await self._read()
                except BaseException:
                    self.slots.release()
                    raise
                if data is None:
                    self.slots.release()
                    break
                nursery.start_soon(self._serve_one, data)

    async def _read(self) -> bytes | None:
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                return os.read(self.fd, BUFFER_SIZE)
            except BlockingIOError:
                continue  # another reader took it, or a spurious wakeup
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR):
                    continue  # the request was interrupted before we read it
                if e.errno == errno.ENODEV:
                    return None  # unmounted
                raise

    async def _serve_one(self, data: bytes) -> None:
        try:
            reply = await self.server.handle(data)
            if reply is not None:
                self._write(reply)
                if not self._readahead_set and self.server.initialized:
                    # The kernel applied the INIT reply inside that write; it reset the
                    # read-ahead to what INIT negotiated, so raising it sticks only now.
                    self._readahead_set = True
                    await trio.to_thread.run_sync(set_readahead, self.mountpoint)
        finally:
            self.slots.release()

    def _write(self, reply: Buffers) -> None:
        try:
            os.writev(self.fd, reply)
        except OSError as e:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted meanwhile.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("fuse: writing a reply: %s", e)


async def serve(
    fs: FileSystem,
    mountpoint: str,
    *,
    fsname: str = "nydusfs",
    read_only: bool = True,
    allow_other: bool = True,
    max_tasks: int = 16,
    attr_timeout: float = 1.0,
    inflight: InflightTracker | None = None,
    notifier: FusedevNotifier | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``fs`` at ``mountpoint`` over /dev/fuse and serve it until cancelled or unmounted.

    Same contract as ``pyfuse3_frontend.serve``: ``task_status.started()`` once the kernel
    mount exists; always unmounts; calls ``fs.init()`` but not ``fs.destroy()``.
    """
    await fs.init()
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    server = FuseServer(fs, attr_timeout=attr_timeout, max_write=MAX_WRITE, inflight=inflight)
    mounted = False
    try:
        mount_fuse(fd, mountpoint, fsname=fsname, read_only=read_only, allow_other=allow_other)
        mounted = True
        if notifier is not None:
            notifier.fd = fd
        task_status.started()
        await FusedevSession(fd, server, mountpoint, max_tasks=max_tasks).run()
    finally:
        with trio.CancelScope(shield=True):
            if notifier is not None:
                await notifier.close()
            if mounted:
                unmount(mountpoint)
            await server.end_session()
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
