"""``VhostUserFsDevice``: the virtio-fs device (virtio device 26) behind ``vhost-user-fs-pci``.

Queue 0 is the high-priority queue (FORGET, BATCH_FORGET, INTERRUPT), queues 1..n carry
requests; the device offers 8 request queues and QEMU uses as many as its
``num-request-queues`` says (1 by default).
Every chain is one FUSE request: its device-readable buffers hold ``fuse_in_header``
and the request body, its device-writable buffers receive ``fuse_out_header`` and the reply;
the guest splits both across descriptors as it likes, so the device gathers and scatters.
The bytes go to a ``FuseServer`` (the same codec /dev/fuse uses), which validates them.

QEMU serves the config space (tag, number of request queues) itself. The device serves one
guest at a time and outlives it: when QEMU disconnects (guest shutdown, QEMU killed) the FUSE
session ends, its handles and lookup references go back to the filesystem, and the device
waits for the next connection.
"""

from __future__ import annotations

import errno
import logging
import struct

import trio

from nydusfs.filesystem import FileSystem
from nydusfs.fuse import abi
from nydusfs.fuse.server import FuseServer
from nydusfs.fuse.wire import error_reply
from nydusfs.metrics import InflightTracker
from nydusfs.virtiofs.vhost_user import VhostUserBackend
from nydusfs.virtiofs.virtqueue import Chain, Virtqueue

log = logging.getLogger(__name__)

HIPRIO_QUEUE = 0
# The largest request a guest may send: a WRITE of max_write bytes plus headers.
MAX_WRITE = 1 << 20
MAX_REQUEST = MAX_WRITE + 4096


class VhostUserFsDevice(VhostUserBackend):
    """A virtio-fs device serving ``fs``, with ``request_queues`` request queues."""

    def __init__(
        self,
        fs: FileSystem,
        *,
        request_queues: int = 8,
        max_tasks: int = 16,
        attr_timeout: float = 1.0,
        inflight: InflightTracker | None = None,
    ) -> None:
        if not 1 <= request_queues <= 254:
            raise ValueError("request_queues must be in 1..254")
        super().__init__(1 + request_queues)
        self.fs = fs
        self.server = FuseServer(
            fs, attr_timeout=attr_timeout, max_write=MAX_WRITE, inflight=inflight
        )
        # Filesystem calls in flight across all request queues; the hiprio queue does not
        # take a slot, so a FORGET is never stuck behind slow reads.
        self.slots = trio.Semaphore(max_tasks)
        self.requests = 0

    async def process(self, queue: Virtqueue, chain: Chain) -> int:
        if chain.readable_len > MAX_REQUEST:
            log.error("virtio-fs: %d-byte request refused", chain.readable_len)
            return self._fail(queue, chain, errno.E2BIG)
        data = queue.gather(chain, MAX_REQUEST)
        self.requests += 1
        if queue.index == HIPRIO_QUEUE:
            reply = await self.server.handle(data)
        else:
            async with self.slots:
                reply = await self.server.handle(data)
        if reply is None:
            return 0
        size = sum(len(b) for b in reply)
        if size > chain.writable_len:
            log.error("virtio-fs: a %d-byte reply does not fit %d bytes", size, chain.writable_len)
            return self._fail(queue, chain, errno.EIO, data)
        return queue.scatter(chain, reply)

    def _fail(self, queue: Virtqueue, chain: Chain, err: int, data: bytes | None = None) -> int:
        """Answer ``-err`` if the chain has room for a header; the guest's request fails."""
        if data is None:
            data = queue.gather(chain, abi.IN_HEADER.size)
        if len(data) < abi.IN_HEADER.size or chain.writable_len < abi.OUT_HEADER.size:
            return 0
        (unique,) = struct.unpack_from("=Q", data, 8)
        return queue.scatter(chain, error_reply(unique, err))

    async def reset(self) -> None:
        await self.server.end_session()


async def serve(
    fs: FileSystem,
    socket_path: str,
    *,
    request_queues: int = 8,
    max_tasks: int = 16,
    inflight: InflightTracker | None = None,
    task_status: trio.TaskStatus[VhostUserFsDevice] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``fs`` as a virtio-fs device on the vhost-user socket ``socket_path`` until
    cancelled; ``task_status.started(device)`` once QEMU can connect. Calls ``fs.init()``."""
    await fs.init()
    device = VhostUserFsDevice(
        fs, request_queues=request_queues, max_tasks=max_tasks, inflight=inflight
    )

    async def listening(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await device.serve(socket_path, task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(listening)
        task_status.started(device)
