"""A blob backend over local files with fault switches, for the cache tests (and their child
processes): it records every read, and can delay, block, fail or corrupt reads on demand."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nydusfs.errors import BackendError
from nydusfs.storage.backends.base import BlobBackend, BlobReader
from nydusfs.storage.device import BlobInfo, ChunkInfo

Predicate = Callable[[str, int, int], bool]  # (blob_id, offset, size) -> bool


class FileBackend(BlobBackend):
    """Blobs are ``<blob_dir>/<blob_id>``. All switches may be flipped while reads run."""

    type = "testfs"

    def __init__(self, blob_dir: str | os.PathLike[str], *, delay: float = 0.0) -> None:
        super().__init__("test")
        self.blob_dir = Path(blob_dir)
        self.delay = delay
        self.delay_if: Callable[[str, int, int], float] | None = None
        self.fail_if: Predicate | None = None
        self.corrupt_if: Predicate | None = None
        self.gate: threading.Event | None = None  # reads wait until it is set
        self.reads: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()
        self.read_started = threading.Event()

    def new_reader(self, blob_id: str) -> BlobReader:
        return FileReader(self, blob_id)

    def data_reads(self, blob: BlobInfo) -> list[tuple[int, int]]:
        """Reads of chunk data (not of the blob meta behind it)."""
        with self.lock:
            return [
                (off, size)
                for bid, off, size in self.reads
                if bid == blob.blob_id and (not blob.ci_offset or off < blob.ci_offset)
            ]

    def chunks_read(self, blob: BlobInfo, chunks: list[ChunkInfo]) -> set[int]:
        """Indexes of the chunks some data read covered."""
        out = set()
        for off, size in self.data_reads(blob):
            for c in chunks:
                if (
                    off <= c.compressed_offset
                    and c.compressed_offset + c.compressed_size <= off + size
                ):
                    out.add(c.index)
        return out


class FileReader(BlobReader):
    backend: FileBackend

    def try_blob_size(self) -> int:
        return os.path.getsize(self.backend.blob_dir / self.blob_id)

    def try_read(self, offset: int, size: int) -> bytes:
        b = self.backend
        with b.lock:
            b.reads.append((self.blob_id, offset, size))
        b.read_started.set()
        gate = b.gate
        if gate is not None and not gate.wait(30):
            raise BackendError("test gate never opened", retryable=False)
        delay = b.delay + (b.delay_if(self.blob_id, offset, size) if b.delay_if else 0.0)
        if delay:
            time.sleep(delay)
        if b.fail_if is not None and b.fail_if(self.blob_id, offset, size):
            raise BackendError("injected failure", retryable=False)
        with open(b.blob_dir / self.blob_id, "rb") as f:
            data = os.pread(f.fileno(), size, offset)
        if b.corrupt_if is not None and b.corrupt_if(self.blob_id, offset, size):
            data = bytes(x ^ 0x5A for x in data)
        return data
