"""``nydus-image unpack``: write a RAFS image back out as an OCI layer tar (POSIX PAX).

Entries follow the image walk (depth first, children by name), as upstream's ``OCIUnpacker``
does. The root directory gets no entry, paths are relative, and modes keep only permission bits.
uname and gname are looked up on this host, as upstream does.

- A second path of a hard-linked inode becomes a ``LNKTYPE`` entry naming the first path.
- Sockets cannot be stored in a tar. Upstream drops them silently; here each one is logged as a
  warning and counted in the result.
- xattrs become PAX ``SCHILY.xattr.<name>`` records carrying the raw value bytes.
- Names, link targets and owner names that are longer than the ustar fields or not ASCII go
  into PAX ``path``/``linkpath``/``uname``/``gname`` records as raw bytes, so non-UTF-8 names
  survive. Sizes of 8 GiB and more, and ids of 2^21 and more, go into PAX ``size``/``uid``/``gid``.
- Fixes of upstream: hard link targets are relative paths (upstream writes absolute ones, which
  tar then strips), and a non-zero ``mtime_nsec`` becomes a PAX ``mtime`` with nanoseconds
  (upstream drops the fraction).

Headers are built here rather than with ``tarfile``. ``tarfile`` marks any non-UTF-8 PAX value
with ``hdrcharset=BINARY``, which GNU tar warns about on extraction, and it cannot encode xattr
names that are not UTF-8. File data is streamed chunk by chunk from the ``LocalBlobReader``, so
memory stays at one chunk whatever the file size.

Nothing here is async: the CLI runs it in the main thread.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from nydusfs.atomicfile import atomic_write
from nydusfs.errors import FormatError, NydusError
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage.localblob import LocalBlobReader

log = logging.getLogger(__name__)

BLOCK = 512
REGTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE = b"0123456"
XHDTYPE = ord("x")
_TYPES = {
    stat.S_IFREG: REGTYPE,
    stat.S_IFDIR: DIRTYPE,
    stat.S_IFLNK: SYMTYPE,
    stat.S_IFCHR: CHRTYPE,
    stat.S_IFBLK: BLKTYPE,
    stat.S_IFIFO: FIFOTYPE,
}
_XATTR_PREFIX = b"SCHILY.xattr."


@dataclass(slots=True)
class TarEntry:
    """One archive member, before encoding. Names are raw bytes."""

    name: bytes
    type: int  # one of the *TYPE bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    linkname: bytes = b""
    uname: bytes = b""
    gname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)


def _octal(value: int, width: int) -> bytes | None:
    """``width``-byte NUL-terminated octal, or None when the value does not fit."""
    if not 0 <= value < 8 ** (width - 1):
        return None
    return b"%0*o\0" % (width - 1, value)


def _numeric(value: int, width: int) -> bytes:
    """Octal if it fits, else GNU base-256 (only used for device numbers, which PAX lacks)."""
    text = _octal(value, width)
    if text is not None:
        return text
    if not 0 <= value < 1 << (8 * (width - 1)):
        raise NydusError(f"value {value} does not fit a {width}-byte tar field")
    return b"\x80" + value.to_bytes(width - 1, "big")


def pax_record(key: bytes, value: bytes) -> bytes:
    """``"<len> <key>=<value>\\n"`` where ``len`` counts the whole record, itself included."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length = len(b"%d" % length) + len(body)
    return b"%d" % length + body


def _ustar(entry: TarEntry, size: int, mtime: int, uid: int, gid: int) -> bytes:
    """The 512-byte ustar header; numeric fields that overflowed are passed as 0 (in PAX)."""
    fields = [
        entry.name[:100].ljust(100, b"\0"),
        _numeric(entry.mode & 0o7777, 8),
        _numeric(uid, 8),
        _numeric(gid, 8),
        _numeric(size, 12),
        _numeric(mtime, 12),
        b" " * 8,  # checksum, computed below over the header with these blanks
        bytes([entry.type]),
        entry.linkname[:100].ljust(100, b"\0"),
        b"ustar\x0000",
        entry.uname[:32].ljust(32, b"\0"),
        entry.gname[:32].ljust(32, b"\0"),
        _numeric(entry.devmajor, 8) if entry.type in (CHRTYPE, BLKTYPE) else bytes(8),
        _numeric(entry.devminor, 8) if entry.type in (CHRTYPE, BLKTYPE) else bytes(8),
        bytes(155),
    ]
    header = bytearray(b"".join(fields).ljust(BLOCK, b"\0"))
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def encode_header(entry: TarEntry) -> bytes:
    """The PAX extended header (when needed) and the ustar header of ``entry``."""
    pax: dict[bytes, bytes] = {}
    name = entry.name
    for key, value, limit in (
        (b"path", name, 100),
        (b"linkpath", entry.linkname, 100),
        (b"uname", entry.uname, 32),
        (b"gname", entry.gname, 32),
    ):
        if len(value) > limit or not value.isascii():
            pax[key] = value
    size, mtime, uid, gid = entry.size, entry.mtime, entry.uid, entry.gid
    if _octal(size, 12) is None:
        pax[b"size"], size = b"%d" % size, 0
    if entry.mtime_nsec or _octal(mtime, 12) is None:
        nsec = entry.mtime_nsec
        pax[b"mtime"] = b"%d.%09d" % (mtime, nsec) if nsec else b"%d" % mtime
        mtime = mtime if _octal(mtime, 12) is not None else 0
    if _octal(uid, 8) is None:
        pax[b"uid"], uid = b"%d" % uid, 0
    if _octal(gid, 8) is None:
        pax[b"gid"], gid = b"%d" % gid, 0
    for key, value in entry.xattrs:
        pax[_XATTR_PREFIX + key] = value
    out = b""
    if pax:
        records = b"".join(pax_record(k, pax[k]) for k in sorted(pax))
        # Upstream names the extended header "<dir>/PaxHeaders.0/<file>"; readers ignore it.
        parent, _, base = name.rstrip(b"/").rpartition(b"/")
        xname = (parent + b"/" if parent else b"") + b"PaxHeaders.0/" + base
        xhdr = TarEntry(name=xname, type=XHDTYPE, mode=0o644, size=len(records))
        out = _ustar(xhdr, len(records), 0, 0, 0) + _pad(records)
    return out + _ustar(entry, size, mtime, uid, gid)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


class TarWriter:
    """Streams entries into a binary file; ``close`` writes the end-of-archive marker."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.offset = 0

    def add(self, entry: TarEntry, data: Iterable[bytes] = ()) -> None:
        header = encode_header(entry)
        self.out.write(header)
        written = 0
        for piece in data:
            self.out.write(piece)
            written += len(piece)
            if written > entry.size:
                break
        if written != entry.size:
            name = os.fsdecode(entry.name)
            raise FormatError(f"{name}: produced {written} bytes of data, expected {entry.size}")
        padding = -written % BLOCK
        self.out.write(bytes(padding))
        self.offset += len(header) + written + padding

    def close(self) -> None:
        # Two zero blocks end the archive (what upstream's tar crate writes).
        self.out.write(bytes(2 * BLOCK))
        self.offset += 2 * BLOCK
        self.out.flush()


@dataclass(slots=True)
class UnpackResult:
    entries: int = 0
    files: int = 0
    hardlinks: int = 0
    data_bytes: int = 0
    skipped_sockets: list[bytes] = field(default_factory=list)


class _Owners:
    """uid/gid -> name on this host, cached (upstream fills uname/gname the same way)."""

    def __init__(self) -> None:
        self.users: dict[int, bytes] = {}
        self.groups: dict[int, bytes] = {}

    def user(self, uid: int) -> bytes:
        if uid not in self.users:
            try:
                self.users[uid] = os.fsencode(pwd.getpwuid(uid).pw_name)
            except (KeyError, OverflowError):
                self.users[uid] = b""
        return self.users[uid]

    def group(self, gid: int) -> bytes:
        if gid not in self.groups:
            try:
                self.groups[gid] = os.fsencode(grp.getgrgid(gid).gr_name)
            except (KeyError, OverflowError):
                self.groups[gid] = b""
        return self.groups[gid]


def unpack(
    sup: RafsSuper, reader: LocalBlobReader, out: BinaryIO, *, validate: bool = True
) -> UnpackResult:
    """Write the image as a tar to ``out``; chunk digests are checked when ``validate``."""
    writer = TarWriter(out)
    result = UnpackResult()
    owners = _Owners()
    first_paths: dict[int, bytes] = {}
    for path, inode in sup.walk():
        if path == b"/":
            continue  # upstream writes no entry for the root
        name = path.lstrip(b"/")
        kind = stat.S_IFMT(inode.mode)
        if kind == stat.S_IFSOCK:
            log.warning("skipping socket %s: a tar cannot hold sockets", os.fsdecode(path))
            result.skipped_sockets.append(path)
            continue
        if kind not in _TYPES:
            raise FormatError(f"{os.fsdecode(path)}: unknown file type in mode {inode.mode:#o}")
        entry = TarEntry(
            name=name + b"/" if kind == stat.S_IFDIR else name,
            type=_TYPES[kind],
            mode=inode.mode,
            uid=inode.uid,
            gid=inode.gid,
            mtime=inode.mtime,
            mtime_nsec=inode.mtime_nsec,
            uname=owners.user(inode.uid),
            gname=owners.group(inode.gid),
            xattrs=inode.xattrs(),
        )
        data: Iterable[bytes] = ()
        # Same rule as upstream's RafsInodeExt::is_hardlink for v5: any non-directory.
        if kind != stat.S_IFDIR and inode.nlink > 1:
            first = first_paths.get(inode.ino)
            if first is not None:
                entry.type, entry.linkname = LNKTYPE, first
                writer.add(entry)
                result.entries += 1
                result.hardlinks += 1
                continue
            first_paths[inode.ino] = name
        if kind == stat.S_IFLNK:
            entry.linkname = inode.symlink()
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            entry.devmajor, entry.devminor = os.major(inode.rdev), os.minor(inode.rdev)
        elif kind == stat.S_IFREG:
            entry.size = inode.size
            data = reader.read_file(inode, blobs=sup.blobs, validate=validate)
            result.files += 1
            result.data_bytes += inode.size
        writer.add(entry, data)
        result.entries += 1
    writer.close()
    return result


def unpack_to_path(
    sup: RafsSuper, reader: LocalBlobReader, output: str, *, validate: bool = True
) -> UnpackResult:
    """``unpack`` into the file ``output``, which appears only once the tar is complete.

    A FIFO or character device (``/dev/stdout``) is written in place; anything else is written
    under a temporary name in the same directory and renamed, so a failed unpack leaves no
    truncated tar behind.
    """
    if not output:
        raise NydusError("invalid empty --output option")
    try:
        st: os.stat_result | None = os.stat(output)
    except FileNotFoundError:
        st = None
    if st is not None and (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        with open(output, "wb") as f:
            return unpack(sup, reader, f, validate=validate)
    try:
        with atomic_write(output, buffering=1 << 20) as f:
            result = unpack(sup, reader, f, validate=validate)
    except PermissionError as e:
        raise NydusError(f"cannot write {output}: {e.strerror}") from e
    return result
