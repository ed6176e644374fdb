"""The FUSE codec on byte vectors: every opcode, packed by hand from ``linux/fuse.h``.

Requests and expected replies are written out with explicit ``struct`` formats here (not with
``nydusfs.fuse.abi``), so a layout mistake in the codec cannot hide behind the same mistake in
the test. The filesystem is ``MemFs``, which implements the write side too.
"""

from __future__ import annotations

import errno
import stat
import struct
from typing import Any

import pytest
import trio

from nydusfs.fuse.server import FuseServer
from tests.codec.memfs import TIME_NS, MemFs

IN = "<IIQQIIIHH"  # fuse_in_header
ATTR = "<QQQQQQIIIIIIIIII"  # fuse_attr
T_S, T_NS = divmod(TIME_NS, 10**9)

# fuse opcodes (linux/fuse.h), spelled out
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS = range(8, 18)
RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH = 18, 20, 21, 22, 23, 24, 25
INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK = 26, 27, 28, 29, 30, 31
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET, READDIRPLUS, RENAME2 = 34, 35, 36, 38, 42, 44, 45


class Session:
    """Sends hand-packed requests to a ``FuseServer`` over ``MemFs``."""

    def __init__(self, fs: MemFs | None = None) -> None:
        self.fs = fs or MemFs()
        self.server = FuseServer(self.fs, attr_timeout=3.0)
        self.unique = 0

    def raw(self, data: bytes) -> bytes | None:
        reply = trio.run(self.server.handle, data)
        return None if reply is None else b"".join(bytes(b) for b in reply)

    def send(self, opcode: int, nodeid: int = 1, body: bytes = b"", uid: int = 0) -> bytes | None:
        self.unique += 2
        head = struct.pack(IN, 40 + len(body), opcode, self.unique, nodeid, uid, 0, 77, 0, 0)
        return self.raw(head + body)

    def ok(self, opcode: int, nodeid: int = 1, body: bytes = b"", **kw: Any) -> bytes:
        reply = self.send(opcode, nodeid, body, **kw)
        assert reply is not None
        length, err, unique = struct.unpack_from("<IiQ", reply)
        assert (err, unique, length) == (0, self.unique, len(reply)), (err, unique)
        return reply[16:]

    def error(self, opcode: int, nodeid: int = 1, body: bytes = b"") -> int:
        reply = self.send(opcode, nodeid, body)
        assert reply is not None and len(reply) == 16
        length, err, unique = struct.unpack("<IiQ", reply)
        assert (length, unique) == (16, self.unique)
        return -err

    def init(self, minor: int = 38, flags: int = 0xFFFFFFFF) -> bytes:
        return self.ok(INIT, 0, struct.pack("<IIII", 7, minor, 131072, flags))


def attr_bytes(ino: int, mode: int, size: int, nlink: int = 1, rdev: int = 0) -> bytes:
    return struct.pack(ATTR, ino, size, (size + 511) // 512, T_S, T_S, T_S, T_NS, T_NS, T_NS,
                       mode, nlink, 0, 0, rdev, 4096, 0)  # fmt: skip


def entry_bytes(ino: int, mode: int, size: int, nlink: int = 1, rdev: int = 0) -> bytes:
    # MemFs entries: entry timeout 1.5 s, attr timeout 2.25 s
    return struct.pack("<QQQQII", ino, 0, 1, 2, 500_000_000, 250_000_000) + attr_bytes(
        ino, mode, size, nlink, rdev
    )


def name(n: bytes) -> bytes:
    return n + b"\0"


@pytest.fixture
def s() -> Session:
    session = Session()
    session.init()
    return session


def test_init_negotiation() -> None:
    s = Session()
    assert s.error(GETATTR, 1, bytes(16)) == errno.EIO  # nothing before INIT
    out = s.init(minor=38, flags=0x7BFFFFFB)
    major, minor, readahead, flags, bg, cong, max_write, gran, pages, align, flags2 = struct.unpack(
        "<IIIIHHIIHHI28x", out
    )
    assert (major, minor, readahead, gran, align, flags2) == (7, 31, 131072, 1, 0, 0)
    # async read, big writes, readdirplus (+auto), async dio, parallel dirops, max pages
    assert flags == 0x1 | 0x20 | 0x2000 | 0x4000 | 0x8000 | 0x40000 | 0x400000
    assert (max_write, pages) == (1 << 20, 256)
    assert (bg, cong) == (64, 48)
    # An old kernel: no MAX_PAGES, the short (24-byte) reply of minor < 23.
    s2 = Session()
    out = s2.ok(INIT, 0, struct.pack("<IIII", 7, 22, 65536, 0x1))
    assert struct.unpack("<IIIIHHI", out[:20] + out[20:24]) == (7, 22, 65536, 1, 64, 48, 131072)
    assert len(out) == 24
    # Too old, and a newer major (the kernel retries with ours).
    assert Session().error(INIT, 0, struct.pack("<IIII", 7, 11, 0, 0)) == errno.EPROTO
    assert Session().ok(INIT, 0, struct.pack("<IIII", 8, 0, 0, 0)) == struct.pack("<II", 7, 31)


def test_namespace_opcodes(s: Session) -> None:
    fs = s.fs
    assert s.ok(MKDIR, 1, struct.pack("<II", 0o777, 0o022) + name(b"d")) == entry_bytes(
        2, stat.S_IFDIR | 0o755, 0, nlink=2
    )
    mode = stat.S_IFCHR | 0o644
    body = struct.pack("<IIII", mode, 0x0103, 0, 0) + name(b"dev")
    assert s.ok(MKNOD, 2, body) == entry_bytes(3, mode, 0, rdev=0x0103)
    assert s.ok(SYMLINK, 2, name(b"ln") + name(b"../target")) == entry_bytes(
        4, stat.S_IFLNK | 0o777, 9
    )
    assert s.ok(READLINK, 4) == b"../target"
    assert s.ok(LINK, 1, struct.pack("<Q", 3) + name(b"dev2")) == entry_bytes(
        3, mode, 0, nlink=2, rdev=0x0103
    )
    assert s.ok(LOOKUP, 1, name(b"dev2")) == entry_bytes(3, mode, 0, nlink=2, rdev=0x0103)
    assert s.error(LOOKUP, 1, name(b"missing")) == errno.ENOENT
    assert s.ok(RENAME, 1, struct.pack("<Q", 2) + name(b"dev2") + name(b"moved")) == b""
    assert sorted(fs.nodes[2].children) == [b"dev", b"ln", b"moved"]
    body = struct.pack("<QII", 2, 1, 0) + name(b"dev") + name(b"moved")  # RENAME_NOREPLACE
    assert s.error(RENAME2, 2, body) == errno.EEXIST
    assert s.ok(UNLINK, 2, name(b"moved")) == b""
    assert s.error(RMDIR, 1, name(b"d")) == errno.ENOTEMPTY
    assert s.ok(MKDIR, 1, struct.pack("<II", 0o700, 0) + name(b"e"))
    assert s.ok(RMDIR, 1, name(b"e")) == b""
    assert s.ok(ACCESS, 1, struct.pack("<II", 4, 0)) == b""
    assert s.send(ACCESS, 1, struct.pack("<II", 2, 0), uid=1000)[4:8] == struct.pack(
        "<i", -errno.EACCES
    )
    # The peer holds: d (mkdir), dev (mknod + link + lookup), ln (symlink), e (mkdir).
    assert fs.lookups == {2: 1, 3: 3, 4: 1, 5: 1}


def test_attr_and_statfs_opcodes(s: Session) -> None:
    s.ok(MKDIR, 1, struct.pack("<II", 0o755, 0) + name(b"d"))
    out = s.ok(GETATTR, 2, struct.pack("<IIQ", 0, 0, 0))
    assert out == struct.pack("<QII", 3, 0, 0) + attr_bytes(2, stat.S_IFDIR | 0o755, 0, 2)
    # SETATTR mode + uid (valid = FATTR_MODE | FATTR_UID)
    body = struct.pack("<IIQQQQQQIIIIIIII", 0x3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o700, 0, 42, 0, 0)
    out = s.ok(SETATTR, 2, body)
    assert struct.unpack_from(ATTR, out, 16)[9:12] == (stat.S_IFDIR | 0o700, 2, 42)
    out = s.ok(STATFS, 1)
    assert out == struct.pack("<QQQQQIIII24x", 1000, 500, 400, 100, 50, 4096, 255, 4096, 0)


def test_file_opcodes(s: Session) -> None:
    fs = s.fs
    out = s.ok(CREATE, 1, struct.pack("<IIII", 0o102, 0o666, 0o022, 0) + name(b"f"))
    assert out[:128] == entry_bytes(2, stat.S_IFREG | 0o644, 0)
    fh, open_flags, _ = struct.unpack("<QII", out[128:])
    assert open_flags == 2  # FOPEN_KEEP_CACHE
    body = struct.pack("<QQIIQII", fh, 3, 5, 0, 0, 0, 0) + b"hello"
    assert s.ok(WRITE, 2, body) == struct.pack("<II", 5, 0)
    assert fs.nodes[2].data == b"\0\0\0hello"
    assert s.ok(READ, 2, struct.pack("<QQIIQII", fh, 2, 100, 0, 0, 0, 0)) == b"\0hello"
    assert s.ok(FLUSH, 2, struct.pack("<QIIQ", fh, 0, 0, 0)) == b""
    assert s.ok(FSYNC, 2, struct.pack("<QII", fh, 1, 0)) == b""
    assert fs.calls[-1] == "fsync True"
    # SETATTR size through the handle (FATTR_SIZE | FATTR_FH)
    body = struct.pack("<IIQQQQQQIIIIIIII", 0x48, 0, fh, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert struct.unpack_from(ATTR, s.ok(SETATTR, 2, body), 16)[1] == 4
    assert s.ok(RELEASE, 2, struct.pack("<QIIQ", fh, 0, 0, 0)) == b""
    assert fs.open_handles == {}
    assert s.error(READ, 2, struct.pack("<QQIIQII", fh, 0, 10, 0, 0, 0, 0)) == errno.EBADF
    out = s.ok(OPEN, 2, struct.pack("<II", 0, 0))
    fh2 = struct.unpack("<QII", out)[0]
    assert fh2 != fh
    assert s.ok(READ, 2, struct.pack("<QQIIQII", fh2, 0, 4096, 0, 0, 0, 0)) == b"\0\0\0h"


def test_directory_opcodes(s: Session) -> None:
    for n in (b"b", b"a"):
        s.ok(MKDIR, 1, struct.pack("<II", 0o755, 0) + name(n))
    fh = struct.unpack("<QII", s.ok(OPENDIR, 1, struct.pack("<II", 0, 0)))[0]

    def dirent(ino: int, off: int, dtype: int, n: bytes) -> bytes:
        raw = struct.pack("<QQII", ino, off, len(n), dtype) + n
        return raw + bytes(-len(raw) % 8)

    listing = [dirent(1, 1, 4, b"."), dirent(1, 2, 4, b".."), dirent(3, 3, 4, b"a"),
               dirent(2, 4, 4, b"b")]  # fmt: skip
    read = struct.pack("<QQIIQII", fh, 0, 4096, 0, 0, 0, 0)
    assert s.ok(READDIR, 1, read) == b"".join(listing)
    # A small buffer: only what fits (24+8 each), then resume from the last cookie.
    assert s.ok(READDIR, 1, struct.pack("<QQIIQII", fh, 0, 70, 0, 0, 0, 0)) == b"".join(listing[:2])
    assert s.ok(READDIR, 1, struct.pack("<QQIIQII", fh, 2, 4096, 0, 0, 0, 0)) == b"".join(
        listing[2:]
    )
    before = dict(s.fs.lookups)
    out = s.ok(READDIRPLUS, 1, read)
    no_entry = bytes(128)
    assert out == (
        no_entry + listing[0] + no_entry + listing[1]
        + entry_bytes(3, stat.S_IFDIR | 0o755, 0, 2) + listing[2]
        + entry_bytes(2, stat.S_IFDIR | 0o755, 0, 2) + listing[3]
    )  # fmt: skip
    assert s.fs.lookups == {2: before[2] + 1, 3: before[3] + 1}
    # READDIRPLUS with room for 3 entries: the 4th is looked up, not sent, and given back.
    out = s.ok(READDIRPLUS, 1, struct.pack("<QQIIQII", fh, 0, 3 * 160, 0, 0, 0, 0))
    assert len(out) == 3 * 160
    assert s.fs.lookups == {2: before[2] + 1, 3: before[3] + 2}
    assert s.ok(FSYNCDIR, 1, struct.pack("<QII", fh, 0, 0)) == b""
    assert s.error(READ, 1, read) == errno.EBADF  # a directory handle is not a file handle
    assert s.ok(RELEASEDIR, 1, struct.pack("<QIIQ", fh, 0, 0, 0)) == b""
    assert s.error(READDIR, 1, read) == errno.EBADF


def test_xattr_opcodes(s: Session) -> None:
    assert s.ok(SETXATTR, 1, struct.pack("<II", 3, 0) + name(b"user.a") + b"xyz") == b""
    s.ok(SETXATTR, 1, struct.pack("<II", 0, 0) + name(b"user.empty"))
    assert s.ok(GETXATTR, 1, struct.pack("<II", 0, 0) + name(b"user.a")) == struct.pack("<II", 3, 0)
    assert s.ok(GETXATTR, 1, struct.pack("<II", 100, 0) + name(b"user.a")) == b"xyz"
    assert s.error(GETXATTR, 1, struct.pack("<II", 2, 0) + name(b"user.a")) == errno.ERANGE
    assert s.error(GETXATTR, 1, struct.pack("<II", 9, 0) + name(b"user.no")) == errno.ENODATA
    names = b"user.a\0user.empty\0"
    assert s.ok(LISTXATTR, 1, struct.pack("<II", 0, 0)) == struct.pack("<II", len(names), 0)
    assert s.ok(LISTXATTR, 1, struct.pack("<II", 4096, 0)) == names
    assert s.ok(REMOVEXATTR, 1, name(b"user.a")) == b""
    assert s.error(REMOVEXATTR, 1, name(b"user.a")) == errno.ENODATA


def test_forget_interrupt_destroy_and_unsupported(s: Session) -> None:
    fs = s.fs
    s.ok(MKDIR, 1, struct.pack("<II", 0o755, 0) + name(b"d"))
    s.ok(LOOKUP, 1, name(b"d"))
    s.ok(LOOKUP, 1, name(b"d"))
    assert fs.lookups[2] == 3
    assert s.send(FORGET, 2, struct.pack("<Q", 1)) is None
    assert fs.lookups[2] == 2
    # BATCH_FORGET can drop only what the peer holds: 99 -> 2; unknown inodes are ignored.
    assert s.send(BATCH_FORGET, 0, struct.pack("<IIQQQQ", 2, 0, 2, 99, 77, 1)) is None
    assert fs.lookups[2] == 0 and "forget 77 1" not in fs.calls
    assert s.send(INTERRUPT, 0, struct.pack("<Q", 4)) is None
    assert s.error(GETLK, 1, bytes(48)) == errno.ENOSYS
    assert s.error(200, 1) == errno.ENOSYS
    # DESTROY gives back everything still held: handles and lookups.
    s.ok(LOOKUP, 1, name(b"d"))
    s.ok(OPENDIR, 2, struct.pack("<II", 0, 0))
    assert s.ok(DESTROY, 0) == b""
    assert fs.lookups[2] == 0 and fs.open_handles == {}
    assert s.error(GETATTR, 1, bytes(16)) == errno.EIO  # a new INIT is needed


@pytest.mark.parametrize(
    ("opcode", "nodeid", "body", "err"),
    [
        (LOOKUP, 1, b"abc", errno.EINVAL),  # no NUL
        (LOOKUP, 1, b"\0", errno.EINVAL),  # empty name
        (LOOKUP, 1, b"a/b\0", errno.EINVAL),
        (LOOKUP, 1, b"..\0", errno.ENOENT),
        (MKDIR, 1, struct.pack("<II", 0o755, 0) + b".\0", errno.EINVAL),
        (LOOKUP, 1, b"x" * 256 + b"\0", errno.ENAMETOOLONG),
        (GETATTR, 1, b"\0" * 15, errno.EINVAL),  # short body
        (MKNOD, 1, struct.pack("<II", 0, 0), errno.EINVAL),
        (SYMLINK, 1, b"l\0" + b"t" * 4096 + b"\0", errno.ENAMETOOLONG),
        (SYMLINK, 1, b"l\0\0", errno.ENOENT),
        (READ, 1, struct.pack("<QQIIQII", 1, 0, 1 << 21, 0, 0, 0, 0), errno.EINVAL),
        (READ, 1, struct.pack("<QQIIQII", 1, 1 << 63, 1, 0, 0, 0, 0), errno.EINVAL),
        (READ, 1, struct.pack("<QQIIQII", 12345, 0, 1, 0, 0, 0, 0), errno.EBADF),
        (WRITE, 1, struct.pack("<QQIIQII", 1, 0, 10, 0, 0, 0, 0) + b"short", errno.EINVAL),
        (SETXATTR, 1, struct.pack("<II", 9, 0) + b"user.a\0abc", errno.EINVAL),
        (SETXATTR, 1, struct.pack("<II", 1 << 17, 0) + b"user.a\0", errno.E2BIG),
        (GETXATTR, 1, struct.pack("<II", 0, 0) + b"\0", errno.EINVAL),
        (RENAME, 1, struct.pack("<Q", 1) + b"a\0", errno.EINVAL),  # second name missing
        (GETATTR, 12345, bytes(16), errno.ENOENT),  # the filesystem's own error
    ],
)
def test_malformed_requests_get_error_replies(
    s: Session, opcode: int, nodeid: int, body: bytes, err: int
) -> None:
    assert s.error(opcode, nodeid, body) == err


def test_header_errors() -> None:
    s = Session()
    assert s.raw(b"\1" * 39) is None  # no header: nothing to answer
    # len larger than the buffer, and smaller than the header
    for length in (41, 39):
        reply = s.raw(struct.pack(IN, length, GETATTR, 9, 1, 0, 0, 0, 0, 0))
        assert reply == struct.pack("<IiQ", 16, -errno.EINVAL, 9)


def test_filesystem_bug_is_eio_and_serving_goes_on(s: Session) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("bug")

    s.fs.statfs = broken  # type: ignore[method-assign]
    assert s.error(STATFS, 1) == errno.EIO
    assert s.ok(GETATTR, 1, bytes(16))


def test_requests_are_listed_in_flight_while_they_run() -> None:
    from nydusfs.metrics import InflightTracker

    tracker = InflightTracker()
    fs = MemFs()
    seen: list[list[dict[str, Any]]] = []

    async def getattr_(*args: Any) -> Any:
        seen.append(tracker.to_list())
        return await MemFs.getattr(fs, *args)

    fs.getattr = getattr_  # type: ignore[method-assign]
    s = Session(fs)
    s.server.inflight = tracker
    s.init()
    s.ok(GETATTR, 1, bytes(16))
    assert [(op["inode"], op["opcode"]) for op in seen[0]] == [(1, GETATTR)]
    assert len(tracker) == 0
