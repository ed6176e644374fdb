"""Reading chunks straight from local blob files, without caches (``unpack``, ``check``, tests).

``LocalBlobReader`` finds a blob's file either in an explicit ``{blob_id: path}`` map (the CLI's
``--blob``) or as ``<blob_dir>/<blob_id>`` (``--blob-dir``), keeps one read-only descriptor per
blob, and reads a chunk with a single ``os.pread`` of its compressed extent. It decompresses,
checks the size and, when asked, the digest, so a corrupt blob raises ``FormatError`` (or
``DigestMismatch``) naming the blob, the chunk index and the offset, never returns wrong data.

This is the simple synchronous path. The daemon's lazy storage stack (backends, cache, chunk map,
prefetch) lives in ``storage/cache`` and ``storage/backends`` and does not use this module.

Concurrency: ``read_chunk`` only uses ``os.pread`` on cached descriptors, so it may be called from
several threads at once; opening (first use of a blob) and ``close`` are not synchronised and must
not race with each other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType

from nydusfs.errors import DigestMismatch, FormatError, NydusError, UnsupportedError
from nydusfs.rafs.inode import RafsInode
from nydusfs.storage import compress, digest
from nydusfs.storage.device import BlobInfo, ChunkInfo
from nydusfs.types import BlobFeatures, ChunkFlags

# Gaps (v5 holes) are yielded in pieces of at most this size, so a huge sparse file never needs
# a huge buffer.
_ZERO_PIECE = 1 << 20
_ZEROS = bytes(_ZERO_PIECE)
# Upstream's limit on a chunk (RAFS_MAX_CHUNK_SIZE); a larger extent is a corrupt record, and
# reading it would allocate whatever the record says.
MAX_CHUNK_SIZE = 16 << 20


class LocalBlobReader:
    """Chunk reader over blob files on the local filesystem.

    ``blob_dir`` holds blobs named by their id; ``paths`` maps blob ids to files and wins over
    ``blob_dir``. ``blobs`` is the image's blob table, needed by ``read_file`` to resolve a
    chunk's ``blob_index`` (it may also be passed to ``read_file``).
    """

    def __init__(
        self,
        blob_dir: str | os.PathLike[str] | None = None,
        paths: Mapping[str, str | os.PathLike[str]] | None = None,
        *,
        blobs: Sequence[BlobInfo] | None = None,
    ) -> None:
        self.blob_dir = os.fspath(blob_dir) if blob_dir is not None else None
        self.paths = {k: os.fspath(v) for k, v in (paths or {}).items()}
        self.blobs = list(blobs) if blobs is not None else None
        self._fds: dict[str, int] = {}

    # --- files ------------------------------------------------------------------------------
    def path_for(self, blob_id: str) -> str:
        """The file holding ``blob_id``; ``NydusError`` when no source names it."""
        path = self.paths.get(blob_id)
        if path is not None:
            return path
        if self.blob_dir is not None:
            return os.path.join(self.blob_dir, blob_id)
        raise NydusError(f"no file given for blob {blob_id} (use --blob or --blob-dir)")

    def _fd(self, blob: BlobInfo) -> int:
        fd = self._fds.get(blob.blob_id)
        if fd is not None:
            return fd
        path = self.path_for(blob.blob_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise NydusError(f"blob {blob.blob_id} not found: {path} does not exist") from e
            raise NydusError(f"cannot open blob {blob.blob_id} at {path}: {e.strerror}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NydusError(f"blob {blob.blob_id}: {path} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        self._fds[blob.blob_id] = fd
        return fd

    def blob_size(self, blob: BlobInfo) -> int:
        """Size in bytes of the file holding ``blob``."""
        return os.fstat(self._fd(blob)).st_size

    # --- data -------------------------------------------------------------------------------
    def read_chunk(self, blob: BlobInfo, chunk: ChunkInfo, *, validate: bool) -> bytes:
        """The uncompressed data of ``chunk``, digest-checked against ``chunk.digest`` if asked."""
        where = (
            f"blob {blob.blob_id} chunk {chunk.index} at compressed offset "
            f"{chunk.compressed_offset:#x}"
        )
        if chunk.flags & ChunkFlags.HOLECHUNK:
            data = bytes(chunk.uncompressed_size)
        else:
            if chunk.flags & (ChunkFlags.ENCRYPTED | ChunkFlags.BATCH) or blob.has(
                BlobFeatures.ZRAN
            ):
                raise UnsupportedError(f"{where}: encrypted, batched or zran chunk data")
            payload = self._read_extent(blob, chunk, where)
            if chunk.is_compressed:
                try:
                    data = compress.decompress(blob.compressor, payload, chunk.uncompressed_size)
                except FormatError as e:
                    raise FormatError(f"{where}: {e}") from None
            else:
                data = payload
            if len(data) != chunk.uncompressed_size:
                raise FormatError(
                    f"{where}: data is {len(data)} bytes, chunk record says "
                    f"{chunk.uncompressed_size}"
                )
        if validate and digest.digest(blob.digester, data) != chunk.digest:
            raise DigestMismatch(
                f"{where}: {blob.digester.label} digest mismatch (expected {chunk.digest.hex()})"
            )
        return data

    def read_at(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        """Up to ``size`` raw bytes of the blob file at ``offset`` (short only at end of file)."""
        if offset < 0 or size < 0:
            raise FormatError(f"blob {blob.blob_id}: invalid read of {size} bytes at {offset}")
        fd = self._fd(blob)
        parts: list[bytes] = []
        done = 0
        # pread may return short reads on some filesystems; only 0 means end of file.
        while done < size:
            part = os.pread(fd, size - done, offset + done)
            if not part:
                break
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_extent(self, blob: BlobInfo, chunk: ChunkInfo, where: str) -> bytes:
        size, offset = chunk.compressed_size, chunk.compressed_offset
        if not 0 <= size <= MAX_CHUNK_SIZE or offset < 0:
            raise FormatError(f"{where}: invalid compressed size {size}")
        if not chunk.is_compressed and size != chunk.uncompressed_size:
            raise FormatError(
                f"{where}: uncompressed chunk has compressed size {size} but uncompressed "
                f"size {chunk.uncompressed_size}"
            )
        data = self.read_at(blob, offset, size)
        if len(data) != size:
            raise FormatError(
                f"{where}: blob file {self.path_for(blob.blob_id)} ends at "
                f"{offset + len(data):#x}, chunk needs {size} bytes"
            )
        return data

    def read_file(
        self,
        inode: RafsInode,
        *,
        blobs: Sequence[BlobInfo] | None = None,
        validate: bool = False,
    ) -> Iterator[bytes]:
        """A regular file's content in order: exactly ``inode.size`` bytes, zeros in the gaps."""
        table = blobs if blobs is not None else self.blobs
        if table is None:
            raise ValueError("read_file needs the image's blob table (blobs=...)")
        size = inode.size
        pos = 0
        for chunk in inode.chunks():
            if chunk.file_offset < pos:
                raise FormatError(
                    f"inode {inode.ino}: chunk at file offset {chunk.file_offset:#x} overlaps "
                    f"the previous one (ends {pos:#x})"
                )
            if chunk.file_offset + chunk.uncompressed_size > size:
                raise FormatError(
                    f"inode {inode.ino}: chunk at file offset {chunk.file_offset:#x} "
                    f"(+{chunk.uncompressed_size:#x}) runs past the file size {size:#x}"
                )
            if not 0 <= chunk.blob_index < len(table):
                raise FormatError(
                    f"inode {inode.ino}: chunk {chunk.index} names blob index {chunk.blob_index}, "
                    f"the image has {len(table)} blobs"
                )
            yield from _zeros(chunk.file_offset - pos)
            data = self.read_chunk(table[chunk.blob_index], chunk, validate=validate)
            yield data
            pos = chunk.file_offset + len(data)
        yield from _zeros(size - pos)

    # --- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> LocalBlobReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Descriptors are only leaked if a caller forgot close(); don't let them pile up.
        fds = getattr(self, "_fds", None)
        if fds:
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            fds.clear()


def _zeros(count: int) -> Iterator[bytes]:
    while count > 0:
        n = min(count, _ZERO_PIECE)
        yield _ZEROS if n == _ZERO_PIECE else _ZEROS[:n]
        count -= n
