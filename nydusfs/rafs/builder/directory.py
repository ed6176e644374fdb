"""Build a ``Node`` tree from a directory on the host (``nydus-image create --type dir-rafs``).

Everything is read with ``lstat`` and without following symlinks; names stay ``bytes``. File
data is not read here: the blob writer opens ``src_path`` later, in inode order.
"""

from __future__ import annotations

import errno
import os
import stat

from nydusfs.errors import BuildError
from nydusfs.rafs.builder.node import Node, whiteout_kind

# SELinux labels belong to the build host, not to the image.
_SKIPPED_XATTRS = frozenset({b"security.selinux"})


def read_xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise BuildError(f"cannot list xattrs of {os.fsdecode(path)}: {e.strerror}") from e
    pairs = []
    for name in names:
        key = os.fsencode(name)
        if key in _SKIPPED_XATTRS:
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue  # removed while we looked
            raise BuildError(f"cannot read xattr {name} of {os.fsdecode(path)}: {e}") from e
        pairs.append((key, value))
    pairs.sort()
    return pairs


def node_from_stat(name: bytes, image_path: bytes, host_path: bytes, st: os.stat_result) -> Node:
    node = Node(
        name=name,
        path=image_path,
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        rdev=st.st_rdev if stat.S_IFMT(st.st_mode) in (stat.S_IFCHR, stat.S_IFBLK) else 0,
        size=st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
        mtime=st.st_mtime_ns // 1_000_000_000,
        mtime_nsec=st.st_mtime_ns % 1_000_000_000,
        xattrs=read_xattrs(host_path),
        src_key=(0, st.st_dev, st.st_ino),
        src_path=host_path,
    )
    if node.is_symlink():
        node.symlink = os.readlink(host_path)
        node.size = len(node.symlink)
    return node


def build_tree(source: str | bytes, whiteout_spec: str = "oci") -> Node:
    """The tree of ``source``. Whiteouts are dropped as upstream does for a single layer."""
    root_path = os.fsencode(source)
    try:
        st = os.lstat(root_path)
    except OSError as e:
        raise BuildError(f"cannot read source directory {os.fsdecode(root_path)}: {e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"source {os.fsdecode(root_path)} is not a directory")
    root = node_from_stat(b"/", b"/", root_path, st)
    # Upstream ignores the root's mtime so that repeated builds are identical.
    root.mtime = root.mtime_nsec = 0

    stack = [root]
    while stack:
        parent = stack.pop()
        assert parent.src_path is not None
        try:
            entries = sorted(os.scandir(parent.src_path), key=lambda e: e.name)
        except OSError as e:
            raise BuildError(f"cannot list {os.fsdecode(parent.src_path)}: {e.strerror}") from e
        children = []
        for entry in entries:
            name = entry.name
            assert isinstance(name, bytes)
            try:
                est = entry.stat(follow_symlinks=False)
            except OSError as e:
                raise BuildError(f"cannot stat {os.fsdecode(entry.path)}: {e.strerror}") from e
            prefix = parent.path if parent.path.endswith(b"/") else parent.path + b"/"
            child = node_from_stat(name, prefix + name, os.fsencode(entry.path), est)
            kind = whiteout_kind(child, whiteout_spec)
            # An overlayfs opaque directory stays (its xattr says what it hides); every other
            # whiteout only makes sense against a lower layer, which a single build has not.
            if kind == "removal" or (kind == "opaque" and whiteout_spec == "oci"):
                continue
            children.append(child)
            if child.is_dir():
                stack.append(child)
        parent.children = children
    return root
