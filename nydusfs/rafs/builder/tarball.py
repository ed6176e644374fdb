"""Build a ``Node`` tree from an OCI layer tarball (``nydus-image create --type tar-rafs``).

The tarball is read once, front to back, without seeking, so the source may be a pipe and may be
larger than memory. Each regular file's data goes to the blob writer while its entry is read,
so blob data is in tar order, as upstream lays it out. The gzip magic decides whether the stream
is decompressed (upstream accepts a plain tar for ``targz-rafs`` and a .tar.gz for ``tar-rafs``).

Semantics follow upstream's tarball builder:

- Entries apply in tar order. A later entry for an existing path replaces it; a directory
  replacing a directory keeps the children already under it. Missing parent directories are
  created as ``0755`` directories owned by 0:0 with mtime 0. The root starts as such a directory
  and a ``./`` entry replaces its attributes.
- Whiteouts (``.wh.*`` files, opaque markers, overlayfs 0:0 devices) are kept as ordinary
  entries: a single layer has nothing to hide, and a later merge applies them.
- A hard link names an earlier regular file; it shares that file's inode: size, data and xattrs.
- Extensions: GNU long names and long links; PAX ``path``, ``linkpath``, ``size``, ``uid``,
  ``gid`` and ``SCHILY.xattr.*`` (upstream ignores ``LIBARCHIVE.xattr.*``, and so do we).
  Modification times are whole seconds from the header (``mtime_nsec`` is 0, as upstream).
- The eStargz bookkeeping files at the root (``stargz.index.json`` and the prefetch landmarks)
  are skipped.

Where upstream fails or misbehaves we do what tar itself does, and say so here: PAX global
headers apply to the members after them (upstream rejects them), contiguous files (type ``7``)
are regular files (upstream rejects them), ``..`` components are rejected (upstream would make a
child named ``..``), an entry whose parent is not a directory is an error (upstream would hang it
under a file), and a PAX ``mtime`` is used when the header field could not hold the time.

Concurrency: called from one thread; the blob writer runs its own thread pool.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from nydusfs.errors import BuildError
from nydusfs.rafs.builder.blob import BlobWriter
from nydusfs.rafs.builder.node import WHITEOUT_SPECS, Node, split_path
from nydusfs.rafs.layout.v6 import RAFS_MAX_CHUNKS_PER_BLOB

log = logging.getLogger(__name__)

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_GZIP_MAGIC = b"\x1f\x8b\x08"
_READ_BUFFER = 1 << 20
# Long names and PAX records are metadata: anything this large is a corrupt or hostile archive.
_META_LIMIT = 16 << 20
_NAME_MAX = 255  # EROFS dirents, like Linux, hold names of at most 255 bytes
_SYMLINK_MAX = 0xFFFF
_XATTR_NAME_MAX = 255
_XATTR_VALUE_MAX = 0xFFFF
_SCHILY_XATTR = b"SCHILY.xattr."
_RAFS_XATTR_PREFIXES = (
    b"user.",
    b"security.",
    b"trusted.",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
)
_STARGZ_SPECIAL = frozenset({b"stargz.index.json", b".prefetch.landmark", b".no.prefetch.landmark"})
# Tar members have no device; upstream's identity for them is (u64::MAX, entry number).
_TAR_DEV = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1

_HARDLINK = b"1"
_FILE_TYPES = {
    b"0": stat.S_IFREG,
    b"\0": stat.S_IFREG,
    b"7": stat.S_IFREG,  # contiguous file: a regular file to everyone but its writer
    _HARDLINK: stat.S_IFREG,
    b"2": stat.S_IFLNK,
    b"3": stat.S_IFCHR,
    b"4": stat.S_IFBLK,
    b"5": stat.S_IFDIR,
    b"6": stat.S_IFIFO,
}
_TYPE_NAMES = {b"S": "GNU sparse file", b"D": "GNU dump directory", b"V": "GNU volume label"}


@dataclass(slots=True)
class _Member:
    """One tar member with its GNU and PAX extensions applied."""

    typeflag: bytes
    path: bytes
    linkpath: bytes
    mode: int
    uid: int
    gid: int
    size: int  # bytes of data stored after the header
    mtime: int
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


class _Stream:
    """The decompressed tar as a forward-only byte stream that knows its offset."""

    def __init__(self, read: Callable[[int], bytes], name: str) -> None:
        self._read = read
        self.name = name
        self.offset = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        parts = []
        while n > 0:
            try:
                part = self._read(min(n, _READ_BUFFER * 16))
            except (OSError, EOFError, zlib.error) as e:
                raise BuildError(f"{self.name}: cannot read tarball: {e}") from e
            if not part:
                break
            parts.append(part)
            n -= len(part)
            self.offset += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise BuildError(f"{self.name}: tarball is truncated in {what}")
        return data

    def skip(self, n: int, what: str) -> None:
        while n > 0:
            step = min(n, _READ_BUFFER)
            self.read_exact(step, what)
            n -= step


def _padding(size: int) -> int:
    return -size % BLOCK


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


def _number(field_: bytes) -> int | None:
    """A numeric header field: octal text or GNU base-256; None if it is neither."""
    if field_ and field_[0] in (0x80, 0xFF):
        value = int.from_bytes(field_[1:], "big")
        return value - (1 << (8 * (len(field_) - 1))) if field_[0] == 0xFF else value
    text = _cstr(field_).strip(b" ")
    if not text:
        return 0
    if text.strip(b"01234567"):
        return None
    return int(text, 8)


def _decimal(value: bytes | None) -> int | None:
    if not value or not value.isdigit():
        return None
    return int(value)


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    body = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(body)
    if stored == unsigned:
        return True
    # Some old writers summed signed chars; tar readers accept both.
    return stored == unsigned - 256 * sum(1 for b in body if b >= 0x80)


def _parse_pax(data: bytes, name: str) -> dict[bytes, bytes]:
    """PAX records, ``"<len> <key>=<value>\\n"`` each; later records override earlier ones."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        length = _decimal(data[pos:space]) if space > pos else None
        end = pos + length if length is not None else 0
        if length is None or end > len(data) or data[end - 1 : end] != b"\n":
            raise BuildError(f"{name}: malformed PAX header record at byte {pos}")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise BuildError(f"{name}: malformed PAX header record at byte {pos}")
        records[key] = value
        pos = end
    return records


def _next_header(stream: _Stream) -> bytes | None:
    """The next non-zero header block; None at the end of the stream.

    Zero blocks are skipped rather than taken as the end of the archive, as upstream reads with
    ``ignore_zeros``: concatenated archives are read whole.
    """
    while True:
        at = stream.offset
        block = stream.read(BLOCK)
        if not block:
            return None
        if len(block) != BLOCK:
            raise BuildError(f"{stream.name}: tarball is truncated in the header at byte {at}")
        if block == _ZERO_BLOCK:
            continue
        if not _checksum_ok(block):
            raise BuildError(f"{stream.name}: bad tar header checksum at byte {at}")
        return block


def _members(stream: _Stream) -> Iterator[_Member]:
    """Members in tar order, extensions applied.

    The caller may consume part of each member's data; the rest is skipped before the next
    member is read.
    """
    global_pax: dict[bytes, bytes] = {}
    while True:
        long_name: bytes | None = None
        long_link: bytes | None = None
        pax: dict[bytes, bytes] | None = None
        while True:
            header = _next_header(stream)
            if header is None:
                if long_name is not None or long_link is not None or pax is not None:
                    raise BuildError(
                        f"{stream.name}: tarball ends after an extended header, "
                        "without the member it describes"
                    )
                return
            typeflag = header[156:157]
            if typeflag not in (b"L", b"K", b"x", b"g"):
                break
            size = _number(header[124:136])
            if size is None or not 0 <= size <= _META_LIMIT:
                raise BuildError(f"{stream.name}: bad size in an extended tar header")
            data = stream.read_exact(size, "an extended header")
            stream.skip(_padding(size), "an extended header")
            if typeflag == b"g":
                for key, value in _parse_pax(data, stream.name).items():
                    if value:
                        global_pax[key] = value
                    else:  # an empty global value unsets the keyword
                        global_pax.pop(key, None)
                continue
            seen = {b"L": long_name, b"K": long_link, b"x": pax}[typeflag]
            if seen is not None:
                raise BuildError(f"{stream.name}: two extended headers describe the same member")
            if typeflag == b"L":
                long_name = _cstr(data)
            elif typeflag == b"K":
                long_link = _cstr(data)
            else:
                pax = _parse_pax(data, stream.name)
        member = _member(header, long_name, long_link, {**global_pax, **(pax or {})}, stream)
        start = stream.offset
        yield member
        rest = member.size - (stream.offset - start)
        stream.skip(rest + _padding(member.size), f"the data of {os.fsdecode(member.path)}")


def _member(
    header: bytes,
    long_name: bytes | None,
    long_link: bytes | None,
    pax: dict[bytes, bytes],
    stream: _Stream,
) -> _Member:
    path = _cstr(header[0:100])
    if header[257:263] == b"ustar\0" and header[263:265] == b"00":
        prefix = _cstr(header[345:500])  # POSIX ustar splits long names; GNU uses it otherwise
        if prefix:
            path = prefix + b"/" + path
    if long_name is not None:
        path = long_name
    elif pax.get(b"path"):
        path = pax[b"path"]
    linkpath = _cstr(header[157:257])
    if long_link is not None:
        linkpath = long_link
    elif pax.get(b"linkpath"):
        linkpath = pax[b"linkpath"]
    where = f"{stream.name}: {os.fsdecode(path)}"

    if any(key.startswith(b"GNU.sparse.") for key in pax):
        raise BuildError(f"{where}: sparse files are not supported")  # nor by upstream
    typeflag = header[156:157]
    if typeflag == b"\0" and path.endswith(b"/"):
        typeflag = b"5"  # the old V7 way to store a directory
    mode = _number(header[100:108])
    size = _decimal(pax.get(b"size"))
    if size is None:
        size = _number(header[124:136])
    if mode is None or size is None or size < 0:
        raise BuildError(f"{where}: bad mode or size in tar header")
    # Like upstream, unreadable ownership or time fields read as 0.
    uid = _decimal(pax.get(b"uid"))
    gid = _decimal(pax.get(b"gid"))
    uid = uid if uid is not None else _number(header[108:116]) or 0
    gid = gid if gid is not None else _number(header[116:124]) or 0
    if not (0 <= uid <= _U32_MAX and 0 <= gid <= _U32_MAX):
        raise BuildError(f"{where}: uid {uid} or gid {gid} is out of range")
    devmajor = _number(header[329:337])
    devminor = _number(header[337:345])
    if devmajor is None or devminor is None:
        raise BuildError(f"{where}: bad device number in tar header")

    xattrs: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if not key.startswith(_SCHILY_XATTR):
            continue
        name = key[len(_SCHILY_XATTR) :]
        if not name.startswith(_RAFS_XATTR_PREFIXES):
            raise BuildError(f"{where}: xattr {os.fsdecode(name)!r} has a prefix RAFS cannot store")
        if len(name) > _XATTR_NAME_MAX or len(value) > _XATTR_VALUE_MAX:
            raise BuildError(f"{where}: xattr {os.fsdecode(name)!r} name or value is too long")
        xattrs[name] = value
    return _Member(
        typeflag=typeflag,
        path=path,
        linkpath=linkpath,
        mode=mode,
        uid=uid,
        gid=gid,
        size=size,
        mtime=_mtime(_number(header[136:148]), pax.get(b"mtime")),
        devmajor=devmajor,
        devminor=devminor,
        xattrs=xattrs,
    )


def _mtime(header: int | None, pax: bytes | None) -> int:
    """Whole seconds: the header's, as upstream, unless a PAX time shows the header could not
    hold it (writers store 0 there, or round the PAX value, which is fine)."""
    seconds = header if header is not None else 0
    if pax:
        whole = pax.split(b".", 1)[0]
        try:
            pax_seconds = int(whole)
        except ValueError:
            pax_seconds = None
        if pax_seconds is not None and abs(pax_seconds - seconds) > 1:
            seconds = pax_seconds
    return min(max(seconds, 0), (1 << 64) - 1)


class _TreeBuilder:
    """Applies members to the tree, feeding regular files' data to the blob writer."""

    def __init__(self, writer: BlobWriter, stream: _Stream) -> None:
        self.writer = writer
        self.stream = stream
        self.root = _directory(b"/", b"/")
        self._next_key = 0

    def add(self, member: _Member) -> None:
        parts = split_path(member.path)
        where = f"{self.stream.name}: {os.fsdecode(member.path)}"
        if len(parts) == 1 and parts[0] in _STARGZ_SPECIAL:
            return
        for part in parts:
            if len(part) > _NAME_MAX:
                raise BuildError(f"{where}: a path component is longer than {_NAME_MAX} bytes")
        ftype = _FILE_TYPES.get(member.typeflag)
        if ftype is None:
            kind = _TYPE_NAMES.get(member.typeflag, f"type {member.typeflag!r}")
            raise BuildError(f"{where}: unsupported tar entry ({kind})")
        node = Node(
            name=parts[-1] if parts else b"/",
            path=b"/" + b"/".join(parts),
            mode=(member.mode & 0o7777) | ftype,
            uid=member.uid,
            gid=member.gid,
            mtime=member.mtime,
            xattrs=sorted(member.xattrs.items()),
        )
        if not parts:
            self._set_root(node, where)
            return
        parent = self._parent(parts, where)

        if member.typeflag == _HARDLINK:
            self._link(node, member, where)
        elif ftype == stat.S_IFREG:
            self._regular(node, member, where)
        elif ftype == stat.S_IFLNK:
            if not 0 < len(member.linkpath) <= _SYMLINK_MAX:
                raise BuildError(f"{where}: symlink target is empty or too long")
            node.symlink = member.linkpath
            node.size = len(member.linkpath)
        elif ftype in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO):
            try:
                node.rdev = os.makedev(member.devmajor, member.devminor)
            except (OverflowError, ValueError) as e:
                raise BuildError(f"{where}: device number out of range") from e
        parent.insert(node)

    def _set_root(self, node: Node, where: str) -> None:
        if not node.is_dir():
            raise BuildError(f"{where}: the root of the image must be a directory")
        root = self.root
        root.mode, root.uid, root.gid = node.mode, node.uid, node.gid
        root.mtime, root.xattrs = node.mtime, node.xattrs

    def _parent(self, parts: list[bytes], where: str) -> Node:
        """The directory that will hold ``parts``, creating missing ancestors."""
        parent = self.root
        for i, name in enumerate(parts[:-1]):
            child = parent.child(name)
            if child is None:
                child = parent.insert(_directory(name, b"/" + b"/".join(parts[: i + 1])))
            elif not child.is_dir():
                raise BuildError(f"{where}: {os.fsdecode(child.path)} is not a directory")
            parent = child
        return parent

    def _lookup(self, parts: list[bytes]) -> Node | None:
        node: Node | None = self.root
        for name in parts:
            if node is None or not node.is_dir():
                return None
            node = node.child(name)
        return node

    def _link(self, node: Node, member: _Member, where: str) -> None:
        target_name = os.fsdecode(member.linkpath)
        target = self._lookup(split_path(member.linkpath))
        if target is None:
            raise BuildError(f"{where}: hard link target {target_name} is not earlier in the tar")
        if not target.is_reg():
            raise BuildError(f"{where}: hard link target {target_name} is not a regular file")
        # One inode: the bootstrap writer links nodes with the same src_key. The chunk list is
        # shared, not copied, because the blob writer may still be appending to it.
        node.src_key = target.src_key
        node.size = target.size
        node.xattrs = list(target.xattrs)
        node.chunks = target.chunks
        node.data_done = True

    def _regular(self, node: Node, member: _Member, where: str) -> None:
        node.size = member.size
        chunk_size = self.writer.opts.chunk_size
        if -(-node.size // chunk_size) > RAFS_MAX_CHUNKS_PER_BLOB:
            raise BuildError(f"{where}: file of {node.size} bytes is too big for RAFS")
        self._next_key += 1
        node.src_key = (0, _TAR_DEV, self._next_key)
        if node.size:
            stream = self.stream
            what = f"the data of {os.fsdecode(member.path)}"
            self.writer.add_file(node, lambda n: stream.read_exact(n, what))
        node.data_done = True


def _directory(name: bytes, path: bytes) -> Node:
    """A directory the tar implies but does not list, as upstream creates it."""
    return Node(name=name, path=path, mode=stat.S_IFDIR | 0o755)


def build_tree(
    source: str,
    writer: BlobWriter,
    whiteout_spec: str,
    *,
    gzipped: bool,
    progress: Callable[[int, int], None] | None = None,
) -> Node:
    """Read the tarball ``source`` once, in order, and return the root of its tree.

    Regular files' data is fed to ``writer`` as it is read; their ``chunks`` are complete after
    ``writer.flush()``. Hard links get their target's ``src_key`` (and share its chunk list)
    and no data. ``whiteout_spec`` is validated only: whiteouts stay in the tree, as upstream
    keeps them for a later merge. ``gzipped`` is what the caller expects; as upstream, the
    gzip magic decides. ``progress(bytes read, size)`` is called after each member when the
    source is a regular file (its size known). Raises ``BuildError`` for an unreadable, corrupt
    or unsupported tar.
    """
    if whiteout_spec not in WHITEOUT_SPECS:
        raise BuildError(f"invalid whiteout spec {whiteout_spec!r}")
    with contextlib.ExitStack() as stack:
        try:
            raw = io.BufferedReader(
                stack.enter_context(open(source, "rb", buffering=0)), _READ_BUFFER
            )
        except OSError as e:
            raise BuildError(f"cannot open tarball {source}: {e.strerror}") from e
        try:
            head = raw.peek(len(_GZIP_MAGIC))[: len(_GZIP_MAGIC)]
        except OSError as e:
            raise BuildError(f"cannot read tarball {source}: {e.strerror}") from e
        if not head:
            raise BuildError(f"tarball {source} is empty")
        read: Callable[[int], bytes] = raw.read
        if head == _GZIP_MAGIC:
            read = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")).read
        if (head == _GZIP_MAGIC) != gzipped:
            kind = "plain" if gzipped else "gzip"
            log.info("%s: this is a %s tarball, read as such", source, kind)
        stream = _Stream(read, source)
        builder = _TreeBuilder(writer, stream)
        size = 0
        if progress is not None:
            st = os.fstat(raw.fileno())
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
            else:
                progress = None  # a pipe has no size to measure progress against
        for member in _members(stream):
            builder.add(member)
            if progress is not None:
                progress(min(raw.tell(), size), size)
        if progress is not None:
            progress(size, size)
    return builder.root
