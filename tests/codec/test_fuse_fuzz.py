"""Hypothesis fuzzing of the FUSE codec: malformed requests never escape as exceptions or hang.

Requests are random bytes behind a plausible header, or valid requests with bytes flipped,
cut or appended. Every answer must be a well-formed reply to the request's ``unique`` (or no
reply, for the opcodes FUSE never answers), and the filesystem must never be asked to forget
more references than the peer was given (``MemFs`` asserts that).
"""

from __future__ import annotations

import struct

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydusfs.fuse.abi import Opcode
from nydusfs.fuse.server import FuseServer
from tests.codec.memfs import MemFs
from tests.codec.test_fuse_codec import IN, INIT, MKDIR, name

NO_REPLY = {Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT, Opcode.NOTIFY_REPLY}
opcodes = st.one_of(st.sampled_from([int(o) for o in Opcode]), st.integers(0, 2**32 - 1))
nodeids = st.sampled_from([0, 1, 2, 3, 2**64 - 1])


async def _populated() -> tuple[FuseServer, MemFs]:
    fs = MemFs()
    server = FuseServer(fs)
    await server.handle(struct.pack(IN, 56, INIT, 1, 0, 0, 0, 0, 0, 0)
                        + struct.pack("<IIII", 7, 38, 65536, 0xFFFFFFFF))  # fmt: skip
    body = struct.pack("<II", 0o755, 0) + name(b"d")
    await server.handle(struct.pack(IN, 40 + len(body), MKDIR, 2, 1, 0, 0, 0, 0, 0) + body)
    return server, fs


def _check(server: FuseServer, data: bytes) -> None:
    trio.run(_check_reply, server, data)
    fs = server.fs
    assert isinstance(fs, MemFs)
    assert all(n >= 0 for n in fs.lookups.values()), fs.lookups


async def _check_reply(server: FuseServer, data: bytes) -> None:
    with trio.fail_after(5):
        reply = await server.handle(data)
    if len(data) < 40:
        assert reply is None
        return
    _, opcode, unique = struct.unpack_from("<IIQ", data)
    if reply is None:
        assert opcode in NO_REPLY
        return
    out = b"".join(bytes(b) for b in reply)
    out_len, err, out_unique = struct.unpack_from("<IiQ", out)
    assert out_len == len(out) and out_unique == unique
    assert -4096 < err <= 0
    if err:
        assert len(out) == 16


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opcode=opcodes, nodeid=nodeids, body=st.binary(max_size=300), slack=st.integers(-45, 8),
       init=st.booleans())  # fmt: skip
def test_random_requests(opcode: int, nodeid: int, body: bytes, slack: int, init: bool) -> None:
    server = trio.run(_populated)[0] if init else FuseServer(MemFs())
    length = max(0, 40 + len(body) + slack)
    header = struct.pack(IN, length & 0xFFFFFFFF, opcode, 7, nodeid, 0, 0, 0, 0, 0)
    _check(server, header + body)


VALID = [
    (Opcode.LOOKUP, 1, name(b"d")),
    (Opcode.GETATTR, 2, bytes(16)),
    (Opcode.SETATTR, 2, struct.pack("<IIQQQQQQIIIIIIII", 0x49, 0, 1, 7, *[0] * 12)),
    (Opcode.SYMLINK, 2, name(b"l") + name(b"target")),
    (Opcode.RENAME2, 1, struct.pack("<QII", 2, 0, 0) + name(b"d") + name(b"e")),
    (Opcode.CREATE, 2, struct.pack("<IIII", 0o102, 0o644, 0, 0) + name(b"f")),
    (Opcode.WRITE, 3, struct.pack("<QQIIQII", 1, 0, 4, 0, 0, 0, 0) + b"data"),
    (Opcode.READ, 3, struct.pack("<QQIIQII", 1, 0, 4096, 0, 0, 0, 0)),
    (Opcode.READDIRPLUS, 1, struct.pack("<QQIIQII", 1, 0, 4096, 0, 0, 0, 0)),
    (Opcode.SETXATTR, 2, struct.pack("<II", 3, 0) + name(b"user.x") + b"abc"),
    (Opcode.BATCH_FORGET, 0, struct.pack("<IIQQ", 1, 0, 2, 5)),
    (Opcode.INIT, 0, struct.pack("<IIII", 7, 38, 0, 0xFFFFFFFF)),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(VALID) - 1),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 80),
    extra=st.binary(max_size=16),
)
def test_mutated_valid_requests(
    which: int, flips: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    server, _ = trio.run(_populated)
    opcode, nodeid, body = VALID[which]
    data = bytearray(struct.pack(IN, 40 + len(body), opcode, 9, nodeid, 0, 0, 0, 0, 0) + body)
    for pos, value in flips:
        if 16 <= pos < len(data):  # keep the opcode and unique: the reply must match them
            data[pos] = value
    data = data[: max(40, len(data) - cut)] + extra
    struct.pack_into("<I", data, 0, len(data))
    _check(server, bytes(data))
