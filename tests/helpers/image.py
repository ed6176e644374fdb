"""Snapshots of a RAFS image in the same shape as ``tests.helpers.tree.snapshot`` of a directory.

Reads file data straight from local blob files (decompressing and checking digests), so a test
can compare a built image with its source without any daemon.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from nydusfs.rafs.inode import RafsInode
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage import compress, digest
from tests.helpers.tree import FILE_TYPES


def file_bytes(sup: RafsSuper, inode: RafsInode, blob_dir: Path) -> bytes:
    """The whole content of a regular file, validated chunk by chunk."""
    out = bytearray()
    for chunk in inode.chunks():
        blob = sup.blobs[chunk.blob_index]
        with open(blob_dir / blob.blob_id, "rb") as f:
            payload = os.pread(f.fileno(), chunk.compressed_size, chunk.compressed_offset)
        data = (
            compress.decompress(blob.compressor, payload, chunk.uncompressed_size)
            if chunk.is_compressed
            else payload
        )
        assert len(data) == chunk.uncompressed_size
        assert digest.digest(blob.digester, data) == chunk.digest, "chunk digest mismatch"
        if chunk.file_offset > len(out):
            out += bytes(chunk.file_offset - len(out))
        out[chunk.file_offset : chunk.file_offset + len(data)] = data
    if len(out) < inode.size:
        out += bytes(inode.size - len(out))
    assert len(out) == inode.size
    return bytes(out)


def snapshot_image(bootstrap: Path, blob_dir: Path) -> dict[bytes, dict[str, Any]]:
    sup = RafsSuper.load(bootstrap)
    result: dict[bytes, dict[str, Any]] = {}
    groups: dict[int, int] = {}
    for path, inode in sup.walk():
        kind = FILE_TYPES[stat.S_IFMT(inode.mode)]
        entry: dict[str, Any] = {
            "type": kind,
            "mode": stat.S_IMODE(inode.mode),
            "uid": inode.uid,
            "gid": inode.gid,
            "xattrs": dict(sorted(inode.xattrs())),
        }
        if kind == "reg":
            entry["size"] = inode.size
            entry["sha256"] = hashlib.sha256(file_bytes(sup, inode, blob_dir)).hexdigest()
        elif kind == "lnk":
            entry["symlink"] = inode.symlink()
            entry["size"] = inode.size
        elif kind in ("chr", "blk"):
            entry["rdev"] = (os.major(inode.rdev), os.minor(inode.rdev))
        if kind == "reg" and inode.nlink > 1:
            entry["hardlink"] = inode.ino
        result[path] = entry
    sup.close()
    # Number hard link groups in sorted path order, as the directory snapshot does.
    for path in sorted(result):
        entry = result[path]
        if "hardlink" in entry:
            entry["hardlink"] = groups.setdefault(entry["hardlink"], len(groups))
    return result
