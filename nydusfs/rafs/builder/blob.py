"""Write a native RAFS data blob: chunked, compressed, deduplicated file data plus its metadata.

Layout, as upstream ``nydus-image`` writes it::

    chunk data | [tar hdr] | CI array | CI header (4 KiB) | [tar hdr]
               | [digest table | tar hdr | ToC | tar hdr]          (the bracketed parts: blob-toc)

Concurrency: the caller feeds file data in inode order from one thread. Hashing and compression
of each chunk run on a thread pool (zstd, lz4, blake3 and hashlib release the GIL), while the
deduplication decision and the write happen back on the caller's thread, in submission order, so
the output is deterministic whatever the scheduling. At most ``max_pending`` chunks are in flight,
which bounds memory to about that many chunk sizes.
"""

from __future__ import annotations

import collections
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import crc32c

from nydusfs.errors import BuildError
from nydusfs.rafs.builder.node import Node
from nydusfs.storage import compress, digest, meta
from nydusfs.storage import toc as blob_toc
from nydusfs.storage.device import BlobInfo, ChunkInfo
from nydusfs.types import BlobFeatures, ChunkFlags, Compressor, Digester

BLOCK_SIZE = 4096


@dataclass(slots=True)
class BlobOptions:
    compressor: Compressor = Compressor.ZSTD
    digester: Digester = Digester.BLAKE3
    chunk_size: int = 0x10_0000
    blob_toc: bool = False  # upstream's ``--features blob-toc``
    aligned: bool = True  # 4 KiB-aligned uncompressed offsets (always for v6)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


@dataclass(slots=True)
class _Processed:
    digest: bytes
    crc32: int
    payload: bytes
    compressed: bool


@dataclass(slots=True)
class _Pending:
    node: Node
    file_offset: int
    size: int
    future: Future[_Processed]


class BlobWriter:
    """Accumulates chunks into ``out`` and returns the blob's ``BlobInfo`` on ``finish``."""

    def __init__(self, out: BinaryIO, options: BlobOptions, blob_index: int = 0) -> None:
        self.out = out
        self.opts = options
        self.blob_index = blob_index
        self._hash = hashlib.sha256()  # the blob id; see _write_unhashed for the exception
        self._pos = 0
        self._uncompressed = 0
        self._ci: list[meta.CiEntry] = []
        self._digests: list[bytes] = []
        self._dedup: dict[tuple[bytes, int], ChunkInfo] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, options.threads))
        self._pending: collections.deque[_Pending] = collections.deque()
        self._max_pending = 4 * max(1, options.threads)
        self._toc: list[blob_toc.TocEntry] = []
        self.deduplicated_chunks = 0
        self.deduplicated_bytes = 0

    # --- data ---------------------------------------------------------------------------------
    def add_file(self, node: Node, read: Callable[[int], bytes]) -> None:
        """Chunk a regular file's data. ``read(n)`` returns the next ``n`` bytes of the file.

        For streams (a tar being read front to back). ``node.chunks`` is complete once
        ``flush`` or ``finish`` has run.
        """
        for offset, want in self._chunk_spans(node.size):
            data = read(want)
            if len(data) != want:
                raise BuildError(_shrank(node.path, offset + len(data), node.size))
            self._submit(node, offset, want, self._pool.submit(self._process, data))

    def add_path(self, node: Node, path: bytes) -> None:
        """Chunk the regular file at ``path``; the worker threads read it, not the caller.

        Moving the open/read syscalls into the pool keeps the calling thread (which orders
        results and writes the blob) from becoming the bottleneck on trees of small files.
        """
        for offset, want in self._chunk_spans(node.size):
            future = self._pool.submit(self._process_path, path, node.size, offset, want)
            self._submit(node, offset, want, future)

    def _chunk_spans(self, size: int) -> Iterator[tuple[int, int]]:
        chunk_size = self.opts.chunk_size
        for offset in range(0, size, chunk_size):
            yield offset, min(chunk_size, size - offset)

    def _submit(self, node: Node, offset: int, size: int, future: Future[_Processed]) -> None:
        self._pending.append(_Pending(node, offset, size, future))
        if len(self._pending) >= self._max_pending:
            self._drain(self._max_pending // 2)

    def _process_path(self, path: bytes, file_size: int, offset: int, size: int) -> _Processed:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise BuildError(f"cannot open {os.fsdecode(path)}: {e.strerror}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BuildError(f"{os.fsdecode(path)} changed type during the build")
            parts = []
            done = 0
            while done < size:
                part = os.pread(fd, size - done, offset + done)
                if not part:
                    raise BuildError(_shrank(path, offset + done, file_size))
                parts.append(part)
                done += len(part)
        finally:
            os.close(fd)
        return self._process(parts[0] if len(parts) == 1 else b"".join(parts))

    def _process(self, data: bytes) -> _Processed:
        payload, compressed = compress.compress(self.opts.compressor, data)
        return _Processed(
            digest.digest(self.opts.digester, data), crc32c.crc32c(data), payload, compressed
        )

    def flush(self) -> None:
        self._drain(0)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            item = self._pending.popleft()
            result = item.future.result()
            item.node.chunks.append(self._place(item, result))

    def _place(self, item: _Pending, res: _Processed) -> ChunkInfo:
        key = (res.digest, item.size)
        known = self._dedup.get(key)
        if known is not None:
            self.deduplicated_chunks += 1
            self.deduplicated_bytes += item.size
            return ChunkInfo(
                digest=known.digest,
                blob_index=known.blob_index,
                flags=known.flags,
                compressed_offset=known.compressed_offset,
                compressed_size=known.compressed_size,
                uncompressed_offset=known.uncompressed_offset,
                uncompressed_size=known.uncompressed_size,
                file_offset=item.file_offset,
                index=known.index,
                crc32=known.crc32,
            )
        if len(self._ci) >= meta.MAX_CHUNKS_PER_BLOB:
            raise BuildError("the blob has more chunks than RAFS allows (2^24)")
        flags = ChunkFlags.HAS_CRC32
        if res.compressed:
            flags |= ChunkFlags.COMPRESSED
        info = ChunkInfo(
            digest=res.digest,
            blob_index=self.blob_index,
            flags=flags,
            compressed_offset=self._pos,
            compressed_size=len(res.payload),
            uncompressed_offset=self._uncompressed,
            uncompressed_size=item.size,
            file_offset=item.file_offset,
            index=len(self._ci),
            crc32=res.crc32,
        )
        self._write(res.payload)
        step = (
            (item.size + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
            if self.opts.aligned
            else item.size
        )
        self._uncompressed += step
        self._ci.append(
            meta.CiEntry(
                compressed_offset=info.compressed_offset,
                compressed_size=info.compressed_size,
                uncompressed_offset=info.uncompressed_offset,
                uncompressed_size=info.uncompressed_size,
                compressed=res.compressed,
            )
        )
        self._digests.append(res.digest)
        self._dedup[key] = info
        return info

    # --- output ---------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self._hash.update(data)
        self._pos += len(data)

    def _write_unhashed(self, data: bytes) -> None:
        # Upstream writes the chunk digest table straight to the file, past the hasher, so the
        # blob id of a blob-toc blob is not the sha256 of the whole file. Ours must match.
        self.out.write(data)
        self._pos += len(data)

    def _tar_header(self, name: str, size: int) -> bytes:
        header = blob_toc.make_tar_header(name, size)
        self._write(header)
        return header

    @property
    def chunk_count(self) -> int:
        return len(self._ci)

    def finish(self) -> BlobInfo | None:
        """Write the blob's metadata; None if the image has no file data (no blob at all)."""
        self.flush()
        self._pool.shutdown()
        if not self._ci:
            return None
        opts = self.opts
        features = BlobFeatures.CAP_TAR_TOC | BlobFeatures.ALIGNED
        if opts.blob_toc:
            features |= (
                BlobFeatures.HAS_TOC
                | BlobFeatures.HAS_TAR_HEADER
                | BlobFeatures.INLINED_CHUNK_DIGEST
            )
        data_size = self._pos
        if opts.blob_toc:
            self._tar_header(blob_toc.TOC_ENTRY_BLOB_RAW, data_size)
            self._toc.append(
                blob_toc.TocEntry(
                    name=blob_toc.TOC_ENTRY_BLOB_RAW,
                    compressor=Compressor.NONE,
                    uncompressed_digest=self._hash.copy().digest(),
                    compressed_offset=0,
                    compressed_size=data_size,
                    uncompressed_size=self._uncompressed,
                )
            )

        ci_raw = meta.encode_ci_v1(self._ci)
        ci_payload, ci_compressed = compress.compress(opts.compressor, ci_raw)
        ci_compressor = opts.compressor if ci_compressed else Compressor.NONE
        ci_offset = self._pos
        header = meta.BlobCompressionContextHeader(
            features=features,
            ci_compressor=ci_compressor,
            ci_entries=len(self._ci),
            ci_offset=ci_offset,
            ci_compressed_size=len(ci_payload),
            ci_uncompressed_size=len(ci_raw),
        ).pack()
        self._write(ci_payload)
        self._write(header)
        toc_digest = bytes(32)
        toc_size = 0
        if opts.blob_toc:
            self._tar_header(blob_toc.TOC_ENTRY_BLOB_META, len(ci_payload) + len(header))
            self._toc.append(
                blob_toc.TocEntry(
                    name=blob_toc.TOC_ENTRY_BLOB_META,
                    compressor=ci_compressor,
                    uncompressed_digest=hashlib.sha256(ci_raw).digest(),
                    compressed_offset=ci_offset,
                    compressed_size=len(ci_payload),
                    uncompressed_size=len(ci_raw),
                )
            )
            self._toc.append(
                blob_toc.TocEntry(
                    name=blob_toc.TOC_ENTRY_BLOB_META_HEADER,
                    compressor=Compressor.NONE,
                    uncompressed_digest=hashlib.sha256(header).digest(),
                    compressed_offset=ci_offset + len(ci_payload),
                    compressed_size=len(header),
                    uncompressed_size=len(header),
                )
            )
            table = b"".join(self._digests)
            table_offset = self._pos
            self._write_unhashed(table)
            self._tar_header(blob_toc.TOC_ENTRY_BLOB_DIGEST, len(table))
            self._toc.append(
                blob_toc.TocEntry(
                    name=blob_toc.TOC_ENTRY_BLOB_DIGEST,
                    compressor=Compressor.NONE,
                    uncompressed_digest=hashlib.sha256(table).digest(),
                    compressed_offset=table_offset,
                    compressed_size=len(table),
                    uncompressed_size=len(table),
                )
            )
            toc_bytes = blob_toc.encode_toc(self._toc)
            self._write(toc_bytes)
            toc_header = self._tar_header(blob_toc.TOC_ENTRY_BLOB_TOC, len(toc_bytes))
            toc_digest = hashlib.sha256(toc_bytes + toc_header).digest()
            toc_size = len(toc_bytes) + len(toc_header)

        return BlobInfo(
            blob_index=self.blob_index,
            blob_id=self._hash.hexdigest(),
            chunk_size=opts.chunk_size,
            chunk_count=len(self._ci),
            compressor=opts.compressor,
            digester=opts.digester,
            features=features,
            compressed_size=self._pos,
            uncompressed_size=self._uncompressed,
            blob_toc_size=toc_size,
            ci_compressor=ci_compressor,
            ci_offset=ci_offset,
            ci_compressed_size=len(ci_payload),
            ci_uncompressed_size=len(ci_raw),
            blob_toc_digest=toc_digest,
        )

    def abort(self) -> None:
        for item in self._pending:
            item.future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _shrank(path: bytes, got: int, size: int) -> str:
    return f"{os.fsdecode(path)}: file shrank while reading (got {got} of {size} bytes)"
