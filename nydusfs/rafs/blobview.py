"""The uncompressed view of a blob: every chunk's data at its uncompressed offset.

This is what the kernel's EROFS driver reads through a RAFS v6 device slot, and what a blob
cache's ``.blob.data`` file holds, so a bootstrap plus these files mount as EROFS with one
``device=`` per blob. Files are sparse: unwritten ranges (alignment padding) stay holes.
"""

from __future__ import annotations

import os
from pathlib import Path

from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage.device import BlobInfo
from nydusfs.storage.localblob import LocalBlobReader


def write_uncompressed_blob(
    sup: RafsSuper, reader: LocalBlobReader, blob: BlobInfo, path: Path, *, validate: bool = True
) -> None:
    """Write ``blob``'s uncompressed view to ``path``, reading each distinct chunk once."""
    written: set[int] = set()
    with open(path, "wb") as out:
        out.truncate(blob.uncompressed_size)
        for _, inode in sup.walk():
            if not inode.is_reg():
                continue
            for chunk in inode.chunks():
                if chunk.blob_index != blob.blob_index or chunk.index in written:
                    continue
                written.add(chunk.index)
                data = reader.read_chunk(blob, chunk, validate=validate)
                os.pwrite(out.fileno(), data, chunk.uncompressed_offset)


def write_uncompressed_blobs(bootstrap: Path, blob_dir: Path, out_dir: Path) -> list[Path]:
    """The uncompressed view of each blob of ``bootstrap``, as ``<out_dir>/<blob id>.data``."""
    with RafsSuper.load(bootstrap) as sup:
        reader = LocalBlobReader(blob_dir=blob_dir, blobs=sup.blobs)
        try:
            paths = []
            for blob in sup.blobs:
                path = out_dir / f"{blob.blob_id}.data"
                write_uncompressed_blob(sup, reader, blob, path)
                paths.append(path)
            return paths
        finally:
            reader.close()
