"""Copy-up: make the upper layer hold a node that so far lives in a lower layer.

Data, owner, mode, times and xattrs (except the overlay's own ``trusted.overlay.*``) are copied
into a temporary object in the work directory, which is then renamed into place, so the upper
layer shows either nothing or the complete copy. Runs of zero bytes are not written (the copy is
sparse where the data is zero, which also keeps holes of the lower file). Parents are copied up
first, down from the nearest ancestor already in the upper layer.

Concurrency: reads from the lower layer await its ``read`` (RAFS may fetch from a backend);
writes of large pieces go to a worker thread. The overlay serialises copy-ups of one node with
a per-node lock, so two requests never copy the same file twice.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

import trio

from nydusfs.overlay.layer import OPAQUE_XATTR, Node, is_private_xattr
from nydusfs.types import Attr, Context

if TYPE_CHECKING:
    from nydusfs.overlay.tree import OverlayTree as OverlayFs

COPY_CHUNK = 1 << 20
ROOT_CTX = Context(0, 0, 0, 0)


async def lower_xattrs(ov: OverlayFs, layer: int, inner: int) -> list[tuple[bytes, bytes]]:
    fs = ov.lowers[layer]
    try:
        names = await fs.listxattr(ROOT_CTX, inner)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM):
            return []
        raise
    out = []
    for name in names:
        if is_private_xattr(name):
            continue
        try:
            out.append((name, await fs.getxattr(ROOT_CTX, inner, name)))
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return out


async def _copy_data(ov: OverlayFs, layer: int, inner: int, fd: int, size: int) -> None:
    fs = ov.lowers[layer]
    handle = await fs.open(ROOT_CTX, inner, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            data = await fs.read(ROOT_CTX, inner, handle.fh, offset, min(COPY_CHUNK, size - offset))
            if not data:
                break
            if bytes(data).strip(b"\0"):
                if len(data) >= 64 * 1024:
                    await trio.to_thread.run_sync(os.pwrite, fd, data, offset)
                else:
                    os.pwrite(fd, data, offset)
            offset += len(data)
        os.ftruncate(fd, size)
    finally:
        await fs.release(ROOT_CTX, inner, handle.fh)


async def copy_up(ov: OverlayFs, node: Node, *, data: bool = True) -> None:
    """Give ``node`` an upper copy (no-op when it has one). ``data=False``: the caller is
    about to truncate the file to zero, so only its metadata is copied."""
    if node.upper is not None:
        return
    parent = node.parent
    if parent is None:
        raise OSError(errno.EIO, "the overlay root has no upper directory")
    async with ov.copy_lock(node):
        if node.upper is not None:  # another request did it while we waited
            return
        await copy_up(ov, parent)
        assert parent.upper is not None
        layer, inner = node.lowers[0]
        attr = await ov.lowers[layer].getattr(ROOT_CTX, inner)
        xattrs = await lower_xattrs(ov, layer, inner)
        target = b""
        if stat.S_ISLNK(attr.mode):
            target = await ov.lowers[layer].readlink(ROOT_CTX, inner)
        work = ov.work
        tmp = work.tmp_name()
        fd = work.make(tmp, attr.mode, attr.rdev, target)
        try:
            if fd is not None and data:
                await _copy_data(ov, layer, inner, fd, attr.size)
            work.finish(tmp, attr, xattrs)
            if fd is not None:
                os.close(fd)
                fd = None
            parent_fd = ov.upper_fd(parent)
            if node.parent is not parent or parent.children.get(node.name) is not node:
                raise OSError(errno.ENOENT, "removed while being copied up")
            work.install(tmp, parent_fd, node.name, exchange=False)
        except BaseException:
            if fd is not None:
                os.close(fd)
            work.remove(tmp)
            raise
        entry = await ov.upper_fs.lookup(ROOT_CTX, parent.upper, node.name)
        await ov.set_upper(node, entry.ino)


async def copy_up_tree(ov: OverlayFs, node: Node) -> None:
    """Copy a directory up with everything it shows, and make the copy opaque: afterwards it
    no longer depends on the lower layers (what moving it to another name needs)."""
    await copy_up(ov, node)
    if not node.lowers and not node.lower_names:
        return
    for name, _kind in await ov.merged_entries(node):
        child = await ov.child(node, name)
        if child is None:
            continue
        if child.is_dir:
            await copy_up_tree(ov, child)
        else:
            await copy_up(ov, child)
    assert node.upper is not None
    await ov.upper_fs.setxattr(ROOT_CTX, node.upper, OPAQUE_XATTR, b"y", 0)
    node.opaque = True
    await ov.drop_lowers(node)
    node.lower_names.clear()


def attr_for(kind: int, mode: int, ctx: Context) -> Attr:
    """The attributes a newly built object gets (caller's owner, the time now)."""
    import time

    now = time.time_ns()
    return Attr(0, kind | stat.S_IMODE(mode), 1, ctx.uid, ctx.gid, 0, 0, 0, 0, now, now, now)
