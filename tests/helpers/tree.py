"""Directory-tree snapshots and a deterministic tree generator for tests and benchmarks.

``snapshot`` turns a tree into plain data (the same shape as ``tests.helpers.image.snapshot_image``
produces for a RAFS image), so "the mounted image equals its source" is one ``diff_snapshots``.
``make_tree`` builds a reproducible source tree that covers the awkward corners of a filesystem
(hard links, holes, devices, sockets, xattrs, non-UTF-8 and 255-byte names, a deep path).

All paths are ``bytes`` so that non-UTF-8 names survive; a ``Path`` or ``str`` root is accepted.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

Snapshot = dict[bytes, dict[str, Any]]
# The ``tree_factory`` fixture (tests/conftest.py): make_tree keyword arguments -> cached root.
TreeFactory = Callable[..., Path]

FILE_TYPES = {
    stat.S_IFREG: "reg",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "lnk",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}

# Labels that no filesystem image can reproduce faithfully and that the host may add on its own.
_SKIP_XATTRS = frozenset({b"security.selinux"})


def _fs(path: Path | str | bytes) -> bytes:
    return os.fsencode(path)


# --------------------------------------------------------------------------------------------
# snapshot / diff
# --------------------------------------------------------------------------------------------


def _walk(root: bytes) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """Depth-first ``(relative path, full path, lstat)``; children by name; no symlink following."""
    stack = [b"/"]
    while stack:
        rel = stack.pop()
        full = root + rel if rel != b"/" else root or b"/"
        st = os.lstat(full)
        yield rel, full, st
        if stat.S_ISDIR(st.st_mode):
            prefix = b"/" if rel == b"/" else rel + b"/"
            stack.extend(prefix + name for name in sorted(os.listdir(full), reverse=True))


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # filesystem without xattr support (ENOTSUP) or a vanished entry
        return {}
    out: dict[bytes, bytes] = {}
    for name in names:
        key = os.fsencode(name)
        if key in _SKIP_XATTRS:
            continue
        out[key] = os.getxattr(path, name, follow_symlinks=False)
    return dict(sorted(out.items()))


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def snapshot(root: Path | str | bytes, *, mtime: bool = False, dir_size: bool = False) -> Snapshot:
    """Describe every entry under ``root`` keyed by its path relative to it (``b"/"``, ``b"/a/b"``).

    Each entry has ``type`` (reg/dir/lnk/chr/blk/fifo/sock), ``mode`` (S_IMODE), ``uid``, ``gid``
    and ``xattrs`` (sorted ``{bytes: bytes}``, ``security.selinux`` left out), plus ``size`` for
    regular files and symlinks, ``sha256`` (hex) for regular files, ``symlink`` (target bytes),
    ``rdev`` as ``(major, minor)`` for devices, and ``hardlink``: a small integer shared by the
    non-directory paths that are the same inode *within this tree*, numbered in sorted path order
    (absent for an inode seen once). ``mtime=True`` adds ``mtime`` (ns); ``dir_size=True`` adds
    ``size`` for directories (filesystem-specific, so off by default).
    """
    result: Snapshot = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    for rel, full, st in _walk(_fs(root).rstrip(b"/")):
        kind = FILE_TYPES[stat.S_IFMT(st.st_mode)]
        entry: dict[str, Any] = {
            "type": kind,
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "xattrs": _xattrs(full),
        }
        if kind == "reg":
            entry["size"] = st.st_size
            entry["sha256"] = _sha256(full)
        elif kind == "lnk":
            entry["symlink"] = os.readlink(full)
            entry["size"] = st.st_size
        elif kind in ("chr", "blk"):
            entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif kind == "dir" and dir_size:
            entry["size"] = st.st_size
        if mtime:
            entry["mtime"] = st.st_mtime_ns
        if kind != "dir":
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        result[rel] = entry
    groups = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    for group_id, paths in enumerate(groups):
        for rel in paths:
            result[rel]["hardlink"] = group_id
    return dict(sorted(result.items()))


def diff_snapshots(
    a: Snapshot,
    b: Snapshot,
    *,
    ignore: Collection[str] = (),
    ignore_paths: Collection[bytes] = (),
    limit: int = 50,
) -> list[str]:
    """Human-readable differences between two snapshots; an empty list means equal.

    ``ignore`` names entry fields to leave out (``"mtime"``, ``"xattrs"``, ``"uid"``, ...);
    ``"dir_size"`` ignores ``size`` of directories only. ``ignore_paths`` skips whole entries
    (e.g. ``b"/lost+found"``). At most ``limit`` lines are returned, the last saying how many
    were cut.
    """
    out: list[str] = []
    skip = set(ignore_paths)
    for path in sorted((a.keys() | b.keys()) - skip):
        shown = path.decode("utf-8", "backslashreplace")
        if path not in b:
            out.append(f"{shown}: only in first ({a[path]['type']})")
            continue
        if path not in a:
            out.append(f"{shown}: only in second ({b[path]['type']})")
            continue
        ea, eb = a[path], b[path]
        for field in sorted(ea.keys() | eb.keys()):
            if field in ignore:
                continue
            if field == "size" and "dir_size" in ignore and "dir" in (ea["type"], eb["type"]):
                continue
            va, vb = ea.get(field, "<absent>"), eb.get(field, "<absent>")
            if va != vb:
                if field == "mode":
                    va, vb = oct(va), oct(vb)
                out.append(f"{shown}: {field} {va!r} != {vb!r}")
    if len(out) > limit:
        out = [*out[: limit - 1], f"... and {len(out) - limit + 1} more differences"]
    return out


# --------------------------------------------------------------------------------------------
# make_tree
# --------------------------------------------------------------------------------------------

KIB = 1024
MIB = 1024 * 1024
# Chunk sizes whose boundaries are worth straddling: EROFS blocks and nydus' default chunk.
_BOUNDARY_CHUNKS = (4 * KIB, MIB)
_EPOCH = 1_600_000_000  # base for generated timestamps, well inside 32-bit time


class _Content:
    """Deterministic file contents that compress about as well as a typical container layer."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        syllables = [
            "".join(rng.choice("bcdfghjklmnprstvwxz") + rng.choice("aeiouy") for _ in range(2))
            for _ in range(400)
        ]
        words = [
            "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(2000)
        ]
        lines: list[str] = []
        size = 0
        while size < MIB:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
            line = " " * (4 * rng.randint(0, 3)) + line + "\n"
            lines.append(line)
            size += len(line)
        # One megabyte of text-like bytes, sliced at random offsets: compressible, but not so
        # repetitive that the ratio is absurd, and slices rarely coincide (so dedup stays rare).
        self.text = "".join(lines).encode()

    def _text(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            start = self.rng.randrange(len(self.text))
            out += self.text[start : start + n - len(out)]
        return bytes(out)

    def make(self, n: int) -> bytes:
        kind = self.rng.random()
        if kind < 0.5:
            return self._text(n)
        if kind < 0.75:
            return self.rng.randbytes(n)
        # "Binary-like": 4 KiB pieces that are random, text, or zeros.
        parts: list[bytes] = []
        left = n
        while left > 0:
            piece = min(left, 4 * KIB)
            roll = self.rng.random()
            if roll < 0.4:
                parts.append(self.rng.randbytes(piece))
            elif roll < 0.8:
                parts.append(self._text(piece))
            else:
                parts.append(bytes(piece))
            left -= piece
        return b"".join(parts)


class _Names:
    """Unique, varied directory-entry names; never ``.wh.``-prefixed (that means whiteout)."""

    _ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_-."

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: dict[bytes, set[bytes]] = {}

    def new(self, parent: bytes, suffix: bytes = b"") -> bytes:
        taken = self.used.setdefault(parent, set())
        while True:
            n = self.rng.choice((1, 3, 5, 8, 8, 12, 12, 20, 40))
            name = "".join(self.rng.choice(self._ALPHABET) for _ in range(n))
            if self.rng.random() < 0.03:
                name += " é"  # spaces and UTF-8 are everyday names too
            raw = name.encode() + suffix
            if raw in (b".", b"..") or raw.startswith(b".wh.") or raw in taken:
                continue
            taken.add(raw)
            return raw

    def claim(self, parent: bytes, name: bytes) -> bytes:
        self.used.setdefault(parent, set()).add(name)
        return name


def _sizes(rng: random.Random, count: int, budget: int) -> list[int]:
    """``count`` file sizes summing to about ``budget``: many small, some on chunk boundaries,
    a few large."""
    sizes: list[int] = [0] * min(count, 3)  # a few empty files
    for chunk in _BOUNDARY_CHUNKS:
        for size in (chunk - 1, chunk, chunk + 1, 2 * chunk):
            if len(sizes) < count and sum(sizes) + size <= budget // 4:
                sizes.append(size)
    left = max(0, budget - sum(sizes))
    n_large = min(max(1, count // 2000), max(0, count - len(sizes)))
    large_total = int(left * 0.4) if count > 20 else 0
    for _ in range(n_large if large_total else 0):
        sizes.append(max(1, int(large_total / n_large * rng.uniform(0.6, 1.4))))
    left = max(0, budget - sum(sizes))
    rest = count - len(sizes)
    if rest > 0:
        # Log-normal shapes: median near 2 KiB with a long tail, then scaled to the budget.
        weights = [rng.lognormvariate(7.6, 1.6) for _ in range(rest)]
        scale = left / sum(weights)
        sizes += [max(1, int(w * scale)) for w in weights]
    rng.shuffle(sizes)
    return sizes


def make_tree(
    root: Path | str | bytes,
    *,
    files: int,
    total_bytes: int,
    seed: int,
    dirs_fanout: int = 8,
    with_special: bool = True,
    long_name: int = 255,
) -> None:
    """Create a reproducible tree under ``root`` (created if missing, expected to be empty).

    About ``files`` regular files holding about ``total_bytes`` in nested directories (at most
    ``dirs_fanout`` subdirectories each, one directory much larger than the rest), varied modes,
    owners (when root) and timestamps. ``with_special`` adds the corner cases: symlinks (relative,
    absolute, to a directory, dangling, long target), hard links, empty files and an empty
    directory, a sparse file with a hole, a fifo, char/block devices and ``security.capability``
    and ``trusted.*`` xattrs (root only), a unix socket, ``user.*`` xattrs, non-UTF-8 names,
    ``long_name``-byte names (255 = NAME_MAX; erofs-utils 1.5 mishandles 255, so its tests pass
    254) and a 40-deep path. The same arguments (and privilege: root adds devices, owners and
    trusted xattrs) give the same tree, whatever the umask.
    """
    # Modes must not depend on the caller's umask (the process-wide umask is restored after).
    old_umask = os.umask(0o022)
    try:
        _make_tree(_fs(root), files, total_bytes, seed, dirs_fanout, with_special, long_name)
    finally:
        os.umask(old_umask)


def _make_tree(
    base: bytes,
    files: int,
    total_bytes: int,
    seed: int,
    dirs_fanout: int,
    with_special: bool,
    long_name: int,
) -> None:
    os.makedirs(base, exist_ok=True)
    rng = random.Random(seed)
    content = _Content(random.Random(rng.getrandbits(64)))
    names = _Names(random.Random(rng.getrandbits(64)))
    is_root = os.geteuid() == 0

    def full(rel: bytes) -> bytes:
        return base + rel

    # Directories: each new one under a random existing directory that still has room.
    n_dirs = max(1, files // 20)
    if with_special:
        names.claim(b"", b"special")
    dirs: list[bytes] = [b""]
    subdirs: dict[bytes, int] = {b"": 0}
    for _ in range(n_dirs):
        open_dirs = [d for d in dirs[-64:] if subdirs[d] < dirs_fanout] or dirs
        parent = rng.choice(open_dirs)
        rel = parent + b"/" + names.new(parent)
        os.mkdir(full(rel), 0o755)
        subdirs[parent] += 1
        subdirs[rel] = 0
        dirs.append(rel)
    big_dir = dirs[len(dirs) // 2]

    specials_budget = 0
    regular: list[bytes] = []
    if with_special:
        specials_budget = min(total_bytes // 10, 2 * MIB + 8 * KIB)
    sizes = _sizes(rng, files, max(0, total_bytes - specials_budget))
    for size in sizes:
        parent = big_dir if rng.random() < 0.25 else rng.choice(dirs)
        rel = parent + b"/" + names.new(parent)
        with open(full(rel), "wb") as f:
            f.write(content.make(size))
        mode = rng.choice((0o644, 0o644, 0o644, 0o755, 0o600, 0o444, 0o640))
        os.chmod(full(rel), mode)
        regular.append(rel)

    if with_special:
        _make_special(base, rng, names, content, dirs, regular, specials_budget, is_root, long_name)

    # Owners, special mode bits and timestamps last: chown clears setuid bits and file
    # capabilities, and creating entries changes the parent's mtime.
    entries = sorted((rel, path) for rel, path, _ in _walk(base.rstrip(b"/")))
    for rel, path in entries:
        st = os.lstat(path)
        if is_root and rel != b"/" and rng.random() < 0.1:
            uid, gid = rng.choice(((1000, 1000), (65534, 65534), (0, 1000), (12345, 54321)))
            caps = _get_caps(path) if stat.S_ISREG(st.st_mode) else None
            os.chown(path, uid, gid, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(path, stat.S_IMODE(st.st_mode))
            if caps is not None:
                os.setxattr(path, "security.capability", caps, follow_symlinks=False)
    for _rel, path in sorted(entries, key=lambda e: -e[0].count(b"/")):
        ns = (_EPOCH + rng.randrange(200_000_000)) * 10**9 + rng.randrange(10**9)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


def _get_caps(path: bytes) -> bytes | None:
    try:
        return os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError:
        return None


def _make_special(
    base: bytes,
    rng: random.Random,
    names: _Names,
    content: _Content,
    dirs: list[bytes],
    regular: list[bytes],
    budget: int,
    is_root: bool,
    long_name: int,
) -> None:
    def full(rel: bytes) -> bytes:
        return base + rel

    sp = b"/special"
    os.mkdir(full(sp), 0o755)

    def write(rel: bytes, data: bytes, mode: int = 0o644) -> None:
        with open(full(rel), "wb") as f:
            f.write(data)
        os.chmod(full(rel), mode)

    # Empty things.
    write(sp + b"/empty", b"")
    os.mkdir(full(sp + b"/empty-dir"), 0o700)

    # A sparse file: data, a hole spanning whole chunks, data, and a hole at the end.
    hole = 2 * MIB if budget >= 2 * MIB + 8 * KIB else 64 * KIB
    with open(full(sp + b"/sparse"), "wb") as f:
        f.write(content.make(4 * KIB))
        f.seek(4 * KIB + hole)
        f.write(content.make(4 * KIB))
        f.truncate(8 * KIB + hole + 5000)

    # Names: non-UTF-8, 255 bytes long (file and directory), and a 40-deep path.
    write(sp + b"/\xff\xfe", b"not utf-8\n")
    os.mkdir(full(sp + b"/caf\xe9"), 0o755)
    write(sp + b"/caf\xe9/\x80latin1-\xe9t\xe9", content.make(300))
    long_dir = sp + b"/" + b"D" * (long_name - 1) + b"d"
    write(sp + b"/" + b"L" * long_name, content.make(100))
    os.mkdir(full(long_dir), 0o755)
    write(long_dir + b"/" + b"f" * long_name, b"long/long\n")
    deep = sp + b"/deep"
    for depth in range(40):
        deep += b"/d%02d" % depth
    os.makedirs(full(deep))
    write(deep + b"/bottom.txt", b"forty levels down\n")

    # Symlinks.
    target = regular[0] if regular else sp + b"/empty"
    os.symlink(b"../" * sp.count(b"/") + target.lstrip(b"/"), full(sp + b"/rel-link"))
    os.symlink(b"/etc/hostname", full(sp + b"/abs-link"))
    os.symlink(b"deep", full(sp + b"/dir-link"))
    os.symlink(b"does/not/exist", full(sp + b"/dangling"))
    os.symlink(b"x" * 200 + b"/" + b"y" * 800, full(sp + b"/long-target"))
    os.symlink(b"\xff\xfe", full(sp + b"/link-to-non-utf8"))

    # Hard links: a pair, and a triple across directories.
    linkable = [r for r in regular if os.path.getsize(full(r)) > 0][:2]
    if len(linkable) == 2:
        os.link(full(linkable[0]), full(sp + b"/hardlink-a"))
        other = rng.choice(dirs)
        os.link(full(linkable[1]), full(other + b"/" + names.new(other, b".hl")))
        os.link(full(linkable[1]), full(sp + b"/hardlink-b"))

    # Fifo and a unix socket. bind() takes at most 107 bytes of path, so go through a
    # /proc/self/fd link to the directory instead of the full path.
    os.mkfifo(full(sp + b"/fifo"), 0o640)
    dir_fd = os.open(full(sp), os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(f"/proc/self/fd/{dir_fd}/socket")
    finally:
        os.close(dir_fd)

    def setx(rel: bytes, name: str, value: bytes) -> None:
        os.setxattr(full(rel), name, value, follow_symlinks=False)

    # xattrs: user.* works for everyone on regular files and directories.
    setx(sp + b"/empty", "user.empty", b"")
    setx(sp + b"/sparse", "user.mime_type", b"application/octet-stream")
    setx(sp + b"/sparse", "user.binary", bytes(range(256)))
    setx(sp + b"/empty-dir", "user.dir", b"yes")
    for rel in regular[2:6]:
        setx(rel, "user.checksum", hashlib.md5(rel).hexdigest().encode())

    if is_root:
        os.mknod(full(sp + b"/null-ish"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(full(sp + b"/tty-ish"), 0o620 | stat.S_IFCHR, os.makedev(4, 64))
        os.mknod(full(sp + b"/loop-ish"), 0o660 | stat.S_IFBLK, os.makedev(7, 200))
        os.mknod(full(sp + b"/big-dev"), 0o600 | stat.S_IFBLK, os.makedev(259, 70000))
        # trusted.* (root only), also on entries where user.* is not allowed.
        setx(sp + b"/empty-dir", "trusted.label", b"dir")
        setx(sp + b"/rel-link", "trusted.label", b"on a symlink")
        setx(sp + b"/fifo", "trusted.label", b"on a fifo")
        setx(sp + b"/sparse", "trusted.big", bytes(range(256)) * 4)
        # A valid VFS_CAP_REVISION_2 value (the kernel checks it): cap_net_bind_service,
        # effective. Written after any chown, which clears it (see make_tree).
        cap = (0x02000000 | 1).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little")
        cap += bytes(12)
        setuid = sp + b"/setuid-cap"
        write(setuid, content.make(2000), 0o755)
        setx(setuid, "security.capability", cap)
        write(sp + b"/setuid", b"#!/bin/sh\n", 0o4755)
        write(sp + b"/setgid", b"#!/bin/sh\n", 0o2711)
        os.mkdir(full(sp + b"/sticky"))
        os.chmod(full(sp + b"/sticky"), 0o1777)
