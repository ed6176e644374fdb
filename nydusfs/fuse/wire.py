"""FUSE messages on the wire: the request cursor and the reply encoders.

``Request`` walks a request body with bounds checks (``FuseInvalid`` past its end, for a string
without its NUL or for a name that is not one path component); the encoders turn the
``FileSystem`` value types into ``fuse_attr``, ``fuse_entry_out`` and ``fuse_dirent`` bytes.
Pure functions over bytes; ``nydusfs.fuse.server`` uses them.
"""

from __future__ import annotations

import errno
import struct

from nydusfs.fuse import abi
from nydusfs.types import Attr, Context, Entry

Buffers = list[bytes | memoryview]
_U64_MASK = (1 << 64) - 1


class FuseInvalid(Exception):
    """A request the server refuses; answered with ``-errno``."""

    def __init__(self, err: int, why: str) -> None:
        super().__init__(why)
        self.errno = err


class Request:
    """One parsed request: the header fields and a cursor over the body."""

    __slots__ = ("body", "gid", "nodeid", "opcode", "pid", "pos", "uid", "unique")

    def __init__(self, header: tuple[int, ...], body: memoryview) -> None:
        _, self.opcode, self.unique, self.nodeid, self.uid, self.gid, self.pid, _, _ = header
        self.body = body
        self.pos = 0

    def take(self, layout: struct.Struct) -> tuple[int, ...]:
        end = self.pos + layout.size
        if end > len(self.body):
            raise FuseInvalid(errno.EINVAL, f"body too short for {layout.size} bytes")
        values = layout.unpack_from(self.body, self.pos)
        self.pos = end
        return values

    def rest(self) -> memoryview:
        data = self.body[self.pos :]
        self.pos = len(self.body)
        return data

    def string(self) -> bytes:
        """The next NUL-terminated string."""
        rest = bytes(self.body[self.pos :])
        end = rest.find(b"\0")
        if end < 0:
            raise FuseInvalid(errno.EINVAL, "string without its NUL terminator")
        self.pos += end + 1
        return rest[:end]

    def name(self, dots: int = errno.EINVAL) -> bytes:
        """The next string, checked to be a single path component (``.``/``..``: ``dots``)."""
        name = self.string()
        if name in (b".", b".."):
            raise FuseInvalid(dots, f"{name!r} is not a name here")
        if not name or b"/" in name:
            raise FuseInvalid(errno.EINVAL, f"invalid name {name[:64]!r}")
        if len(name) > abi.MAX_NAME:
            raise FuseInvalid(errno.ENAMETOOLONG, "name longer than NAME_MAX")
        return name

    def xattr_name(self) -> bytes:
        name = self.string()
        if not name:
            raise FuseInvalid(errno.EINVAL, "empty xattr name")
        if len(name) > abi.MAX_XATTR_NAME:
            raise FuseInvalid(errno.ERANGE, "xattr name too long")
        return name

    def context(self, umask: int = 0o022) -> Context:
        return Context(self.uid, self.gid, self.pid, umask)


def split_timeout(seconds: float) -> tuple[int, int]:
    seconds = max(0.0, min(seconds, float(1 << 32)))
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def _split_ns(ns: int) -> tuple[int, int]:
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec & _U64_MASK, nsec


def encode_attr(attr: Attr) -> bytes:
    a_s, a_ns = _split_ns(attr.atime_ns)
    m_s, m_ns = _split_ns(attr.mtime_ns)
    c_s, c_ns = _split_ns(attr.ctime_ns)
    return abi.ATTR.pack(
        attr.ino, attr.size, attr.blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns, attr.mode,
        attr.nlink & 0xFFFFFFFF, attr.uid, attr.gid, attr.rdev & 0xFFFFFFFF, attr.blksize, 0,
    )  # fmt: skip


def encode_entry(entry: Entry) -> bytes:
    e_s, e_ns = split_timeout(entry.entry_timeout)
    a_s, a_ns = split_timeout(entry.attr_timeout)
    head = abi.ENTRY_OUT_HEAD.pack(entry.ino, entry.generation, e_s, a_s, e_ns, a_ns)
    return head + encode_attr(entry.attr)


NO_ENTRY = bytes(abi.ENTRY_OUT_SIZE)  # readdirplus entry without attributes (. and ..)


def out_header(unique: int, err: int, payload_len: int) -> bytes:
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + payload_len, err, unique)


def error_reply(unique: int, err: int) -> Buffers:
    if not 0 < err < 4096:
        err = errno.EIO
    return [out_header(unique, -err, 0)]


def dirent(ino: int, off: int, dtype: int, name: bytes, total: int) -> bytes:
    head = abi.DIRENT_HEAD.pack(ino, off, len(name), dtype)
    return head + name + bytes(total - len(head) - len(name))


def join_ns(sec: int, nsec: int) -> int:
    if sec >= 1 << 63:  # the kernel sends signed seconds in an unsigned field
        sec -= 1 << 64
    return sec * 1_000_000_000 + nsec
