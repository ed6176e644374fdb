"""The NBD wire protocol, server side, without I/O (the "sans-IO" shape of ``fuse/abi.py``).

Covers what a read-only export needs (https://github.com/NetworkBlockDevice/nbd, proto.md):
the fixed newstyle handshake, the options ``EXPORT_NAME``, ``ABORT``, ``LIST``, ``INFO``,
``GO``, ``STRUCTURED_REPLY`` and the meta-context pair (``base:allocation`` is offered), then
transmission with ``READ``, ``FLUSH``, ``CACHE``, ``BLOCK_STATUS`` and ``DISC`` (writes, trims
and zeroing are refused with EPERM). Simple replies by default, structured replies once the
client asked. The server answers ``BLOCK_STATUS`` with ``block_status_reply`` and the device's
data and hole runs.

``ServerConnection`` is fed the bytes a client sent (``receive``) and returns events: ``Send``
(bytes to write back now), ``Go`` (the handshake is over: transmission starts), ``Command`` (a
transmission request for the server to carry out and answer with ``read_reply``, ``ok_reply`` or
``error_reply``) and ``Close``. A malformed message (bad magic, an option or payload longer than
the limits, unknown client flags) raises ``ProtocolError``: the byte stream cannot be trusted
after that, so the server closes that connection. Requests that are well formed but invalid
(out of range, unknown command or flags, writes) get an error reply and the connection goes on.

Pure computation, no threads or awaits: safe to use from one task per connection.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from nydusfs.errors import NydusError

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6

# NBD_REP_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands and their flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
COMMAND_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
                 CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
                 CMD_BLOCK_STATUS: "BLOCK_STATUS"}  # fmt: skip

# structured reply chunk types and flags
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1

# the one metadata context offered: which ranges hold data (holes read as zeros)
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# errors on the wire (the protocol's own numbering, which matches Linux for these)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108
_WIRE_ERRNOS = {
    errno.EPERM: NBD_EPERM, errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL, errno.ENOSPC: NBD_ENOSPC, errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP, errno.ESHUTDOWN: NBD_ESHUTDOWN, errno.EROFS: NBD_EPERM,
}  # fmt: skip

MAX_OPTION_LENGTH = 64 * 1024  # longer option data is refused (a name is at most 4 KiB)
MAX_NAME_LENGTH = 4096
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ (and discarded WRITE payload) accepted
PREFERRED_BLOCK = 4096

OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")


class ProtocolError(NydusError):
    """The client sent something that is not NBD: the connection must be closed."""


def wire_errno(err: int | None) -> int:
    """The NBD error code for a local errno (EIO for anything the protocol does not name)."""
    return _WIRE_ERRNOS.get(err or errno.EIO, NBD_EIO)


@dataclass(frozen=True, slots=True)
class Export:
    """One export: a read-only device of ``size`` bytes."""

    name: str
    size: int
    description: str = ""

    def flags(self, structured: bool) -> int:
        flags = (
            FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
            | FLAG_SEND_CACHE
        )  # fmt: skip
        return flags | FLAG_SEND_DF if structured else flags


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Go:
    export: Export


@dataclass(frozen=True, slots=True)
class Command:
    """A transmission request. ``error`` is nonzero (an NBD error) when the request is invalid
    and must be answered with ``error_reply`` without doing anything."""

    type: int
    flags: int
    cookie: int
    offset: int
    length: int
    error: int = 0
    message: str = ""


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


Event = Send | Go | Command | Close


class ServerConnection:
    """The protocol state of one client connection (see the module docstring)."""

    def __init__(self, exports: Mapping[str, Export], default: str | None = None) -> None:
        self.exports = dict(exports)
        self.default = default
        self.structured = False
        self.allocation_context = False  # base:allocation selected by SET_META_CONTEXT
        self.export: Export | None = None
        self.no_zeroes = False
        self._state = "client_flags"
        self._buf = bytearray()

    @property
    def state(self) -> str:
        """``client_flags``, ``options``, ``transmission`` or ``closed``."""
        return self._state

    def greeting(self) -> bytes:
        """What the server sends first."""
        return NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; the events they complete, in order."""
        if self._state == "closed":
            raise ProtocolError("data after the connection was closed")
        self._buf += data
        events: list[Event] = []
        while self._state != "closed":
            step = self._step()
            if step is None:
                break
            events.extend(step)
        return events

    # --- parsing -------------------------------------------------------------------------------
    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    # Each parser returns the events of one complete message, or None until it is complete.
    def _step(self) -> list[Event] | None:
        if self._state == "client_flags":
            raw = self._take(4)
            if raw is None:
                return None
            (flags,) = struct.unpack(">I", raw)
            if flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
                raise ProtocolError(f"unknown client flags {flags:#x}")
            self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
            self._state = "options"
            return []
        if self._state == "options":
            return self._option()
        return self._request()

    def _option(self) -> list[Event] | None:
        if len(self._buf) < OPTION_HEADER.size:
            return None
        magic, option, length = OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            raise ProtocolError(f"option {option} carries {length} bytes, over {MAX_OPTION_LENGTH}")
        raw = self._take(OPTION_HEADER.size + length)
        if raw is None:
            return None
        return self._handle_option(option, raw[OPTION_HEADER.size :])

    def _request(self) -> list[Event] | None:
        if len(self._buf) < REQUEST.size:
            return None
        magic, flags, kind, cookie, offset, length = REQUEST.unpack_from(self._buf)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        payload = length if kind == CMD_WRITE else 0
        if payload > MAX_PAYLOAD:
            raise ProtocolError(f"WRITE of {length} bytes is larger than {MAX_PAYLOAD}")
        if self._take(REQUEST.size + payload) is None:
            return None  # a WRITE's payload is consumed and dropped: the export is read-only
        if kind == CMD_DISC:
            self._state = "closed"
            return [Close("client disconnected")]
        return [self._check(Command(kind, flags, cookie, offset, length))]

    def _check(self, cmd: Command) -> Command:
        assert self.export is not None
        size = self.export.size
        name = COMMAND_NAMES.get(cmd.type, f"command {cmd.type}")

        def bad(error: int, message: str) -> Command:
            return Command(cmd.type, cmd.flags, cmd.cookie, cmd.offset, cmd.length, error, message)

        if cmd.type in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            return bad(NBD_EPERM, f"{name}: the export is read-only")
        if cmd.type == CMD_BLOCK_STATUS and not self.allocation_context:
            return bad(NBD_EINVAL, "BLOCK_STATUS needs the base:allocation context")
        if cmd.type not in (CMD_READ, CMD_FLUSH, CMD_CACHE, CMD_BLOCK_STATUS):
            return bad(NBD_EINVAL, f"{name} is not supported")
        allowed = CMD_FLAG_DF if cmd.type == CMD_READ and self.structured else 0
        if cmd.type == CMD_FLUSH:
            allowed = CMD_FLAG_FUA
        if cmd.type == CMD_BLOCK_STATUS:
            allowed = CMD_FLAG_REQ_ONE
        if cmd.flags & ~allowed:
            return bad(NBD_EINVAL, f"{name}: unsupported flags {cmd.flags:#x}")
        if cmd.type == CMD_FLUSH:
            return cmd
        if cmd.offset + cmd.length > size or (cmd.type == CMD_BLOCK_STATUS and not cmd.length):
            return bad(NBD_EINVAL, f"{name} of {cmd.length} at {cmd.offset} is past the end")
        if cmd.type == CMD_READ and cmd.length > MAX_PAYLOAD:
            error = NBD_EOVERFLOW if self.structured else NBD_EINVAL
            return bad(error, f"READ of {cmd.length} bytes is larger than {MAX_PAYLOAD}")
        return cmd

    # --- options -------------------------------------------------------------------------------
    def _reply(self, option: int, kind: int, data: bytes = b"") -> Send:
        return Send(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, kind, len(data)) + data)

    def _error(self, option: int, kind: int, message: str) -> list[Event]:
        return [self._reply(option, kind, message.encode())]

    def _lookup(self, name: str) -> Export | None:
        if name == "" and self.default is not None:
            return self.exports.get(self.default)
        return self.exports.get(name)

    def _handle_option(self, option: int, data: bytes) -> list[Event]:
        if option == OPT_EXPORT_NAME:
            export = self._lookup(data.decode("utf-8", "replace"))
            if export is None:
                self._state = "closed"
                return [Close(f"EXPORT_NAME of unknown export {data[:64]!r}")]
            return self._start(export, [Send(self._export_name_reply(export))])
        if option == OPT_ABORT:
            self._state = "closed"
            return [self._reply(option, REP_ACK), Close("client aborted the handshake")]
        if option == OPT_LIST:
            if data:
                return self._error(option, REP_ERR_INVALID, "LIST takes no data")
            out: list[Event] = []
            for export in self.exports.values():
                name = export.name.encode()
                out.append(self._reply(option, REP_SERVER, struct.pack(">I", len(name)) + name))
            return [*out, self._reply(option, REP_ACK)]
        if option in (OPT_INFO, OPT_GO):
            return self._info(option, data)
        if option == OPT_STRUCTURED_REPLY:
            if data:
                return self._error(option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            self.structured = True
            return [self._reply(option, REP_ACK)]
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        if option == OPT_STARTTLS:
            return self._error(option, REP_ERR_UNSUP, "TLS is not supported")
        return self._error(option, REP_ERR_UNSUP, f"option {option} is not supported")

    def _start(self, export: Export, events: list[Event]) -> list[Event]:
        self.export = export
        self._state = "transmission"
        return [*events, Go(export)]

    def _export_name_reply(self, export: Export) -> bytes:
        reply = struct.pack(">QH", export.size, export.flags(self.structured))
        return reply if self.no_zeroes else reply + bytes(124)

    def _info(self, option: int, data: bytes) -> list[Event]:
        parsed = _parse_name_and_list(data, 2)
        if parsed is None:
            return self._error(option, REP_ERR_INVALID, "malformed INFO/GO request")
        name, requests = parsed
        export = self._lookup(name)
        if export is None:
            return self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
        info = struct.pack(">HQH", INFO_EXPORT, export.size, export.flags(self.structured))
        out: list[Event] = [self._reply(option, REP_INFO, info)]
        for req in dict.fromkeys(int.from_bytes(r, "big") for r in requests):
            if req == INFO_NAME:
                out.append(self._reply(option, REP_INFO, struct.pack(">H", INFO_NAME)
                                       + export.name.encode()))  # fmt: skip
            elif req == INFO_DESCRIPTION and export.description:
                text = export.description.encode()[:MAX_NAME_LENGTH]
                out.append(self._reply(option, REP_INFO, struct.pack(">H", req) + text))
            elif req == INFO_BLOCK_SIZE:
                sizes = struct.pack(">HIII", INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, MAX_PAYLOAD)
                out.append(self._reply(option, REP_INFO, sizes))
        out.append(self._reply(option, REP_ACK))
        return self._start(export, out) if option == OPT_GO else out

    def _meta_context(self, option: int, data: bytes) -> list[Event]:
        if not self.structured:
            return self._error(option, REP_ERR_INVALID, "meta contexts need structured replies")
        parsed = _parse_name_and_list(data, 4, counted_items=True)
        if parsed is None:
            return self._error(option, REP_ERR_INVALID, "malformed meta context request")
        name, queries = parsed
        if self._lookup(name) is None:
            return self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
        if option == OPT_LIST_META_CONTEXT:
            # No query lists everything; "base:" is the namespace's wildcard.
            wanted = not queries or any(q in (b"base:", BASE_ALLOCATION.encode()) for q in queries)
        else:
            wanted = BASE_ALLOCATION.encode() in queries
            self.allocation_context = wanted
        out: list[Event] = []
        if wanted:
            ctx = struct.pack(">I", BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode()
            out.append(self._reply(option, REP_META_CONTEXT, ctx))
        return [*out, self._reply(option, REP_ACK)]

    # --- transmission replies --------------------------------------------------------------------
    def read_reply(self, cmd: Command, data: bytes | bytearray) -> list[bytes | bytearray]:
        """The reply to a successful READ: the header, then ``data`` itself (not copied), to be
        sent back to back."""
        if not self.structured:
            return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cmd.cookie), data]
        if not data:
            return [self._chunk(cmd.cookie, REPLY_TYPE_NONE, b"")]
        header = STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cmd.cookie,
            8 + len(data),
        )  # fmt: skip
        return [header + struct.pack(">Q", cmd.offset), data]

    def block_status_reply(self, cmd: Command, extents: list[tuple[int, bool]]) -> bytes:
        """The reply to BLOCK_STATUS: ``extents`` are ``(length, is_hole)`` runs from
        ``cmd.offset``, covering at most ``cmd.length`` bytes (one run with REQ_ONE)."""
        if cmd.flags & CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        payload = struct.pack(">I", BASE_ALLOCATION_ID) + b"".join(
            struct.pack(">II", length, STATE_HOLE | STATE_ZERO if hole else 0)
            for length, hole in extents
        )
        return self._chunk(cmd.cookie, REPLY_TYPE_BLOCK_STATUS, payload)

    def ok_reply(self, cmd: Command) -> bytes:
        """The reply to a successful command without data (FLUSH, CACHE)."""
        if not self.structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cmd.cookie)
        return self._chunk(cmd.cookie, REPLY_TYPE_NONE, b"")

    def error_reply(self, cmd: Command, error: int, message: str = "") -> bytes:
        """An error reply (``error`` is an NBD error code, see ``wire_errno``)."""
        if not self.structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cmd.cookie)
        text = message.encode()[:4096]
        payload = struct.pack(">IH", error, len(text)) + text
        return self._chunk(cmd.cookie, REPLY_TYPE_ERROR, payload)

    def _chunk(self, cookie: int, kind: int, payload: bytes) -> bytes:
        header = STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, kind, cookie, len(payload)
        )
        return header + payload


def _parse_name_and_list(
    data: bytes, item: int, *, counted_items: bool = False
) -> tuple[str, list[bytes]] | None:
    """``u32 name length, name, u16/u32 count, items``: INFO/GO items are u16 info types
    (``item`` = 2); meta context queries are ``u32 length + string`` (``counted_items``).
    None when malformed."""
    if len(data) < 4:
        return None
    (name_len,) = struct.unpack_from(">I", data)
    if name_len > MAX_NAME_LENGTH or 4 + name_len > len(data):
        return None
    try:
        name = data[4 : 4 + name_len].decode()
    except UnicodeDecodeError:
        return None
    pos = 4 + name_len
    if len(data) < pos + item:
        return None
    count = int.from_bytes(data[pos : pos + item], "big")
    pos += item
    items: list[bytes] = []
    for _ in range(count):
        if counted_items:
            if len(data) < pos + 4:
                return None
            (size,) = struct.unpack_from(">I", data, pos)
            pos += 4
        else:
            size = item
        if len(data) < pos + size:
            return None
        items.append(data[pos : pos + size])
        pos += size
    if pos != len(data):
        return None
    return name, items
