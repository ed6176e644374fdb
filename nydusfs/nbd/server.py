"""NBD server: serves a ``rafs.blockdev.BlockDevice`` read-only to any number of clients.

Listens on a unix socket or a TCP address (``serve_unix``/``serve_tcp``); each connection runs
``nbd.protocol.ServerConnection``. Upstream's ``nydusd nbd`` hands its sockets to the kernel's
nbd driver; this server speaks the network protocol instead, so any NBD client (qemu, nbdfuse,
nbdcopy, nbd-client feeding the kernel's driver) can attach.

Concurrency: one trio task per connection reads requests; each READ or CACHE runs in its own
task (at most ``MAX_INFLIGHT`` and ``INFLIGHT_MIB`` of data per connection, and ``threads``
reads at once across the server), so a slow
fetch does not hold back the requests behind it; replies go out whole under a per-connection
lock, in completion order (NBD matches them by cookie). The await points are the socket
receive, ``BlockDevice.read`` (threads for fetches and decompression) and the reply send. A
malformed message ends its connection with a logged error; an error inside a request becomes an
error reply. Neither touches the other connections. After DISC the connection finishes the
requests in flight, then closes, as the protocol requires.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Sequence

import trio

from nydusfs.errors import NydusError
from nydusfs.nbd import protocol as P
from nydusfs.rafs.blockdev import BlockDevice

log = logging.getLogger(__name__)

MAX_INFLIGHT = 16  # requests in progress per connection; more wait before being read
# Bytes of READ data a connection may have in progress, in 1 MiB tokens: bounds the memory one
# client can pin with large pipelined reads (a single READ may still be MAX_PAYLOAD).
INFLIGHT_MIB = 64
HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take to choose an export
RECEIVE_SIZE = 256 * 1024


class NbdServer:
    """One export (``name``, also served as the default export "") over a ``BlockDevice``."""

    def __init__(
        self,
        device: BlockDevice,
        *,
        name: str = "",
        description: str = "",
        threads: int = 4,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.device = device
        self.export = P.Export(name, device.size, description)
        self.limiter = trio.CapacityLimiter(max(1, threads))
        self.handshake_timeout = handshake_timeout
        self.connections = 0  # currently open
        self.served = 0  # accepted since start

    async def serve(self, listeners: Sequence[trio.abc.Listener[trio.SocketStream]]) -> None:
        """Accept and serve connections until cancelled."""
        await trio.serve_listeners(self.handle, list(listeners))

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection to its end; never raises for the client's faults."""
        self.connections += 1
        self.served += 1
        conn_id = self.served
        try:
            await _Connection(self, stream, conn_id).run()
        except Exception as e:
            # The transmission phase runs in a nursery, which wraps errors in groups.
            leaf: BaseException = e
            while isinstance(leaf, ExceptionGroup) and len(leaf.exceptions) == 1:
                leaf = leaf.exceptions[0]
            if isinstance(leaf, P.ProtocolError):
                log.error("nbd connection %d: %s; closing it", conn_id, leaf)
            elif isinstance(leaf, trio.BrokenResourceError | trio.ClosedResourceError
                            | ConnectionError):  # fmt: skip
                log.debug("nbd connection %d: the client went away", conn_id)
            elif isinstance(leaf, trio.TooSlowError):
                log.error("nbd connection %d: no export chosen in %.0fs; closing it", conn_id,
                          self.handshake_timeout)  # fmt: skip
            else:  # a bug must not take the other connections down
                log.exception("nbd connection %d failed", conn_id)
        finally:
            self.connections -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()


class _Connection:
    def __init__(self, server: NbdServer, stream: trio.abc.Stream, conn_id: int) -> None:
        self.server = server
        self.stream = stream
        self.id = conn_id
        exports = {server.export.name: server.export}
        self.proto = P.ServerConnection(exports, default=server.export.name)
        self.send_lock = trio.Lock()
        self.slots = trio.Semaphore(MAX_INFLIGHT)
        self.budget = trio.Semaphore(INFLIGHT_MIB)  # only the reading task acquires: no deadlock

    async def send(self, *parts: bytes | bytearray) -> None:
        async with self.send_lock:
            for part in parts:
                if part:
                    await self.stream.send_all(part)

    async def receive(self) -> bytes:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        return bytes(data)

    async def run(self) -> None:
        await self.send(self.proto.greeting())
        pending: list[P.Event] = []
        with trio.fail_after(self.server.handshake_timeout):
            while self.proto.state in ("client_flags", "options"):
                data = await self.receive()
                if not data:
                    return
                pending = self.proto.receive(data)
                for i, event in enumerate(pending):
                    if isinstance(event, P.Send):
                        await self.send(event.data)
                    elif isinstance(event, P.Close):
                        log.info("nbd connection %d: %s", self.id, event.reason)
                        return
                    elif isinstance(event, P.Go):
                        log.info("nbd connection %d: serving export %r", self.id, event.export.name)
                        pending = pending[i + 1 :]  # requests sent right after the handshake
                        break
        async with trio.open_nursery() as nursery:
            while True:
                for event in pending:
                    if isinstance(event, P.Close):
                        log.info("nbd connection %d: %s", self.id, event.reason)
                        return  # the nursery waits for the requests in flight
                    if isinstance(event, P.Command):
                        await self.slots.acquire()
                        tokens = _tokens(event)
                        for _ in range(tokens):
                            await self.budget.acquire()
                        nursery.start_soon(self.command, event, tokens)
                data = await self.receive()
                if not data:
                    log.info("nbd connection %d: closed by the client", self.id)
                    nursery.cancel_scope.cancel()  # nobody is left to read the replies
                    return
                pending = self.proto.receive(data)

    async def command(self, cmd: P.Command, tokens: int) -> None:
        try:
            if cmd.error:
                log.debug("nbd connection %d: %s", self.id, cmd.message)
                await self.send(self.proto.error_reply(cmd, cmd.error, cmd.message))
                return
            if cmd.type == P.CMD_FLUSH:
                await self.send(self.proto.ok_reply(cmd))
                return
            if cmd.type == P.CMD_BLOCK_STATUS:
                runs = self.server.device.allocation(cmd.offset, cmd.length)
                await self.send(self.proto.block_status_reply(cmd, runs))
                return
            try:
                async with self.server.limiter:
                    data = await self.server.device.read(cmd.offset, cmd.length)
            except (OSError, NydusError) as e:
                error = e.errno if isinstance(e, OSError) else errno.EIO
                log.error("nbd connection %d: read of %d at %d failed: %s", self.id, cmd.length,
                          cmd.offset, e)  # fmt: skip
                await self.send(self.proto.error_reply(cmd, P.wire_errno(error), str(e)))
                return
            except Exception:  # a bug: answer EIO and keep serving
                log.exception("nbd connection %d: read of %d at %d failed", self.id, cmd.length,
                              cmd.offset)  # fmt: skip
                await self.send(self.proto.error_reply(cmd, P.NBD_EIO, "internal error"))
                return
            if cmd.type == P.CMD_CACHE:  # the data is now in the blob cache
                await self.send(self.proto.ok_reply(cmd))
            else:
                await self.send(*self.proto.read_reply(cmd, data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left; the reading task ends the connection
        finally:
            self.slots.release()
            for _ in range(tokens):
                self.budget.release()


def _tokens(cmd: P.Command) -> int:
    """The 1 MiB tokens a request holds while it runs (READ data; 1 for anything else)."""
    if cmd.type != P.CMD_READ or cmd.error:
        return 1
    return min(INFLIGHT_MIB, max(1, (cmd.length + (1 << 20) - 1) >> 20))


async def unix_listener(path: str) -> trio.SocketListener:
    """A listener on unix socket ``path`` (mode 0600). It is bound under a temporary name and
    renamed into place once listening, so a client that sees ``path`` can connect. A stale
    socket file at ``path`` is replaced; any other file there is an error."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(128)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return trio.SocketListener(sock)


async def tcp_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listeners on ``host:port`` (port 0 picks a free one: see ``listener_address``)."""
    return await trio.open_tcp_listeners(port, host=host)


def listener_address(listener: trio.SocketListener) -> str:
    """``host:port`` or the socket path a listener is bound to (for logs and tests)."""
    name = listener.socket.getsockname()
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name)
