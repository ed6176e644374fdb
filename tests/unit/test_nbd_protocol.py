"""``nbd.protocol``: the server side of the NBD handshake and transmission, without sockets.

Messages are built here from the protocol document's layouts (not with the module's own structs),
so a wrong field order or size in the module shows up as a failure.
"""

from __future__ import annotations

import struct

import pytest

from nydusfs.nbd import protocol as P

EXPORT = P.Export("disk", 1 << 20, "test disk")


def _conn(flags: int = 3) -> P.ServerConnection:
    conn = P.ServerConnection({"disk": EXPORT}, default="disk")
    assert conn.receive(struct.pack(">I", flags)) == []
    return conn


def _option(option: int, data: bytes = b"") -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", option, len(data)) + data


def _replies(events: list[P.Event]) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of each option reply among ``events``."""
    out = []
    for event in events:
        assert isinstance(event, P.Send)
        magic, option, kind, length = struct.unpack_from(">QIII", event.data)
        assert magic == 0x3E889045565A9
        assert len(event.data) == 20 + length
        out.append((option, kind, event.data[20:]))
    return out


def _go_data(name: bytes, *infos: int) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def _request(kind: int, offset: int, length: int, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, offset, length)


def test_greeting_is_fixed_newstyle() -> None:
    greeting = P.ServerConnection({}).greeting()
    assert greeting[:8] == b"NBDMAGIC"
    assert greeting[8:16] == b"IHAVEOPT"
    assert struct.unpack(">H", greeting[16:]) == (3,)  # FIXED_NEWSTYLE | NO_ZEROES


def test_unknown_client_flags_close_the_connection() -> None:
    conn = P.ServerConnection({"disk": EXPORT})
    with pytest.raises(P.ProtocolError, match="client flags"):
        conn.receive(struct.pack(">I", 0x10))


def test_go_replies_info_then_ack_and_starts_transmission() -> None:
    conn = _conn()
    events = conn.receive(_option(P.OPT_GO, _go_data(b"", P.INFO_BLOCK_SIZE, P.INFO_NAME)))
    assert isinstance(events[-1], P.Go) and events[-1].export is EXPORT
    replies = _replies(events[:-1])
    assert [kind for _, kind, _ in replies] == [3, 3, 3, 1]  # INFO x3, ACK
    info_type, size, flags = struct.unpack(">HQH", replies[0][2])
    assert (info_type, size) == (0, 1 << 20)
    assert flags & 0x3 == 0x3 and flags & 0x100  # HAS_FLAGS | READ_ONLY, CAN_MULTI_CONN
    assert struct.unpack(">HIII", replies[1][2]) == (3, 1, 4096, 32 << 20)
    assert replies[2][2] == struct.pack(">H", 1) + b"disk"
    assert conn.state == "transmission"


def test_info_unknown_export_and_malformed_requests_keep_negotiating() -> None:
    conn = _conn()
    (reply,) = _replies(conn.receive(_option(P.OPT_INFO, _go_data(b"nope"))))
    assert reply[1] == (1 << 31) | 6  # ERR_UNKNOWN
    (reply,) = _replies(conn.receive(_option(P.OPT_GO, b"\x00\x00\x00\x09ab")))
    assert reply[1] == (1 << 31) | 3  # ERR_INVALID: name longer than the data
    (reply,) = _replies(conn.receive(_option(99)))
    assert reply[1] == (1 << 31) | 1  # ERR_UNSUP
    (reply,) = _replies(conn.receive(_option(P.OPT_STARTTLS)))
    assert reply[1] == (1 << 31) | 1
    # INFO answers without leaving the handshake; GO then succeeds.
    events = conn.receive(_option(P.OPT_INFO, _go_data(b"disk")))
    assert not any(isinstance(e, P.Go) for e in events) and conn.state == "options"
    assert isinstance(conn.receive(_option(P.OPT_GO, _go_data(b"disk")))[-1], P.Go)


def test_list_and_abort() -> None:
    conn = _conn()
    replies = _replies(conn.receive(_option(P.OPT_LIST)))
    assert replies == [(3, 2, struct.pack(">I", 4) + b"disk"), (3, 1, b"")]
    events = conn.receive(_option(P.OPT_ABORT))
    assert isinstance(events[-1], P.Close) and conn.state == "closed"


def test_export_name_old_style_reply() -> None:
    conn = _conn(flags=1)  # no NO_ZEROES: the reply is padded with 124 zeros
    events = conn.receive(_option(P.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(events[0], P.Send) and isinstance(events[1], P.Go)
    size, flags = struct.unpack_from(">QH", events[0].data)
    assert size == 1 << 20 and flags & 2
    assert len(events[0].data) == 10 + 124
    conn = _conn()
    assert isinstance(conn.receive(_option(P.OPT_EXPORT_NAME, b"other"))[-1], P.Close)


def test_bad_option_magic_and_huge_option_are_protocol_errors() -> None:
    with pytest.raises(P.ProtocolError, match="magic"):
        _conn().receive(b"IHAVEOPX" + bytes(8))
    with pytest.raises(P.ProtocolError, match="bytes"):
        _conn().receive(b"IHAVEOPT" + struct.pack(">II", P.OPT_GO, 1 << 30))


def test_messages_split_at_any_byte_are_reassembled() -> None:
    conn = P.ServerConnection({"disk": EXPORT}, default="disk")
    stream = struct.pack(">I", 3) + _option(P.OPT_GO, _go_data(b"")) + _request(0, 4096, 512)
    events: list[P.Event] = []
    for i in range(len(stream)):
        events += conn.receive(stream[i : i + 1])
    assert isinstance(events[-2], P.Go)
    cmd = events[-1]
    assert isinstance(cmd, P.Command)
    assert (cmd.type, cmd.cookie, cmd.offset, cmd.length, cmd.error) == (0, 7, 4096, 512, 0)


def _transmitting(structured: bool = False) -> P.ServerConnection:
    conn = _conn()
    if structured:
        assert _replies(conn.receive(_option(P.OPT_STRUCTURED_REPLY)))[0][1] == 1
    conn.receive(_option(P.OPT_GO, _go_data(b"disk")))
    return conn


def test_invalid_requests_get_errors_and_the_connection_goes_on() -> None:
    conn = _transmitting()
    cases = [
        (_request(P.CMD_READ, (1 << 20) - 10, 11), P.NBD_EINVAL),  # past the end
        (_request(P.CMD_WRITE, 0, 3) + b"abc", P.NBD_EPERM),  # payload consumed, refused
        (_request(P.CMD_TRIM, 0, 4096), P.NBD_EPERM),
        (_request(P.CMD_BLOCK_STATUS, 0, 4096), P.NBD_EINVAL),
        (_request(P.CMD_READ, 0, 10, flags=P.CMD_FLAG_DF), P.NBD_EINVAL),  # DF needs SR
        (_request(42, 0, 0), P.NBD_EINVAL),
    ]
    for raw, error in cases:
        (cmd,) = conn.receive(raw)
        assert isinstance(cmd, P.Command) and cmd.error == error, cmd
        reply = conn.error_reply(cmd, cmd.error)
        assert reply == struct.pack(">IIQ", 0x67446698, error, 7)
    (cmd,) = conn.receive(_request(P.CMD_READ, 0, 4))
    assert isinstance(cmd, P.Command) and cmd.error == 0
    simple = struct.pack(">IIQ", 0x67446698, 0, 7)
    assert b"".join(conn.read_reply(cmd, b"abcd")) == simple + b"abcd"
    (close,) = conn.receive(_request(P.CMD_DISC, 0, 0))
    assert isinstance(close, P.Close)


def test_bad_request_magic_is_a_protocol_error() -> None:
    conn = _transmitting()
    with pytest.raises(P.ProtocolError, match="request magic"):
        conn.receive(b"\x00" * 28)


def test_structured_replies() -> None:
    conn = _transmitting(structured=True)
    (cmd,) = conn.receive(_request(P.CMD_READ, 8192, 3, flags=P.CMD_FLAG_DF))
    assert isinstance(cmd, P.Command) and cmd.error == 0
    reply = b"".join(conn.read_reply(cmd, b"xyz"))
    magic, flags, kind, cookie, length = struct.unpack_from(">IHHQI", reply)
    assert (magic, flags, kind, cookie, length) == (0x668E33EF, 1, 1, 7, 11)
    assert reply[20:] == struct.pack(">Q", 8192) + b"xyz"
    error = conn.error_reply(cmd, P.NBD_EIO, "boom")
    assert struct.unpack_from(">IHHQI", error) == (0x668E33EF, 1, 0x8001, 7, 10)
    assert error[20:] == struct.pack(">IH", 5, 4) + b"boom"
    (big,) = conn.receive(_request(P.CMD_READ, 0, (32 << 20) + 1))
    assert isinstance(big, P.Command) and big.error in (P.NBD_EINVAL, P.NBD_EOVERFLOW)


def _meta_query(*queries: bytes, name: bytes = b"disk") -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def test_meta_contexts_offer_base_allocation() -> None:
    conn = _conn()
    query = _meta_query(b"base:allocation")
    (reply,) = _replies(conn.receive(_option(P.OPT_SET_META_CONTEXT, query)))
    assert reply[1] == (1 << 31) | 3  # ERR_INVALID: structured replies first
    conn.receive(_option(P.OPT_STRUCTURED_REPLY))
    context = (4, struct.pack(">I", 1) + b"base:allocation")  # REP_META_CONTEXT: id, name
    listed = _replies(conn.receive(_option(P.OPT_LIST_META_CONTEXT, _meta_query())))
    assert [(k, d) for _, k, d in listed] == [context, (1, b"")]
    listed = _replies(conn.receive(_option(P.OPT_LIST_META_CONTEXT, _meta_query(b"qemu:x"))))
    assert [(k, d) for _, k, d in listed] == [(1, b"")]
    (reply,) = _replies(conn.receive(_option(P.OPT_SET_META_CONTEXT, query[:-3])))
    assert reply[1] == (1 << 31) | 3  # truncated query
    (reply,) = _replies(conn.receive(_option(P.OPT_SET_META_CONTEXT, _meta_query(name=b"x"))))
    assert reply[1] == (1 << 31) | 6  # unknown export
    selected = _replies(conn.receive(_option(P.OPT_SET_META_CONTEXT, query)))
    assert [(k, d) for _, k, d in selected] == [context, (1, b"")]
    assert conn.allocation_context


def test_block_status() -> None:
    conn = _transmitting()  # no context selected
    (cmd,) = conn.receive(_request(P.CMD_BLOCK_STATUS, 0, 4096))
    assert isinstance(cmd, P.Command) and cmd.error == P.NBD_EINVAL
    conn = _conn()
    conn.receive(_option(P.OPT_STRUCTURED_REPLY))
    conn.receive(_option(P.OPT_SET_META_CONTEXT, _meta_query(b"base:allocation")))
    conn.receive(_option(P.OPT_GO, _go_data(b"")))
    (cmd,) = conn.receive(_request(P.CMD_BLOCK_STATUS, 4096, 8192, flags=P.CMD_FLAG_REQ_ONE))
    assert isinstance(cmd, P.Command) and cmd.error == 0
    reply = conn.block_status_reply(cmd, [(4096, False), (4096, True)])
    assert struct.unpack_from(">IHHQI", reply) == (0x668E33EF, 1, 5, 7, 12)
    assert reply[20:] == struct.pack(">III", 1, 4096, 0)  # REQ_ONE: the first run only
    (cmd,) = conn.receive(_request(P.CMD_BLOCK_STATUS, 0, 8192))
    assert isinstance(cmd, P.Command)
    reply = conn.block_status_reply(cmd, [(4096, False), (4096, True)])
    assert reply[20:] == struct.pack(">IIIII", 1, 4096, 0, 4096, 3)  # hole | zero
    (cmd,) = conn.receive(_request(P.CMD_BLOCK_STATUS, 0, 0))
    assert isinstance(cmd, P.Command) and cmd.error == P.NBD_EINVAL


def test_wire_errno_maps_unknown_errors_to_eio() -> None:
    import errno

    assert P.wire_errno(errno.EINVAL) == 22
    assert P.wire_errno(errno.EROFS) == 1
    assert P.wire_errno(errno.ENOENT) == 5
    assert P.wire_errno(None) == 5
