"""The blob backend contract: where blob bytes come from.

A backend (``localfs``, ``registry``, ``s3``, ...) is synchronous and thread-safe: the cache calls
it from worker threads (``trio.to_thread.run_sync``), never from the event loop. Implementers
write two methods per blob, ``blob_size`` and ``try_read`` (one attempt, bounded by the
configured timeouts); ``BlobReader.read`` adds what every backend shares: retries with
exponential backoff and jitter (``retry_limit``), metrics, and one log line per failed read
naming blob, offset and cause. Every failure surfaces as ``BackendError`` (EIO by default), so
a read that cannot be served fails that read only.
"""

from __future__ import annotations

import abc
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import ClassVar, TypeVar

from nydusfs.errors import BackendError
from nydusfs.metrics import BackendMetrics

T = TypeVar("T")

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.1  # seconds before the first retry; doubles each time
BACKOFF_MAX = 5.0


class BlobReader(abc.ABC):
    """Reads one blob. Shared by all threads that read the blob."""

    def __init__(self, backend: BlobBackend, blob_id: str) -> None:
        self.backend = backend
        self.blob_id = blob_id
        self._size: int | None = None
        self._size_lock = threading.Lock()

    @abc.abstractmethod
    def try_blob_size(self) -> int:
        """The blob's size in bytes; one attempt. Raises ``BackendError``."""

    @abc.abstractmethod
    def try_read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; one attempt. Short only at the blob's end."""

    def blob_size(self) -> int:
        """The blob's size, fetched once (with retries) and remembered."""
        with self._size_lock:
            if self._size is None:
                self._size = self._with_retries("size", 0, 0, self.try_blob_size)
            return self._size

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (fewer only at the blob's end), with retries."""
        if size == 0:
            return b""
        started = time.monotonic()
        data = self._with_retries("read", offset, size, lambda: self.try_read(offset, size))
        self.backend.metrics.record_read(len(data), (time.monotonic() - started) * 1000)
        return data

    def _with_retries(self, what: str, offset: int, size: int, call: Callable[[], T]) -> T:
        attempts = 1 + self.backend.retry_limit
        delay = BACKOFF_BASE
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except BackendError as e:
                self.backend.metrics.record_error()
                if attempt == attempts or not e.retryable:
                    log.error(
                        "backend %s: %s of blob %s at offset %d size %d failed: %s",
                        self.backend.type, what, self.blob_id, offset, size, e,
                    )  # fmt: skip
                    raise
                time.sleep(min(BACKOFF_MAX, delay) * random.uniform(0.5, 1.5))
                delay *= 2
        raise AssertionError("unreachable")

    def close(self) -> None:  # noqa: B027 - optional: most readers hold nothing
        """Release what the reader holds (file descriptors, connections)."""


class BlobBackend(abc.ABC):
    """One configured backend, shared by all blobs of a mount."""

    type: ClassVar[str]

    def __init__(self, id: str = "", retry_limit: int = 0) -> None:
        self.id = id
        self.retry_limit = retry_limit
        self.metrics = BackendMetrics(backend_type=self.type)
        self._readers: dict[str, BlobReader] = {}
        self._lock = threading.Lock()

    @abc.abstractmethod
    def new_reader(self, blob_id: str) -> BlobReader:
        """A reader for ``blob_id`` (called once per blob; readers are cached)."""

    def get_reader(self, blob_id: str) -> BlobReader:
        with self._lock:
            reader = self._readers.get(blob_id)
            if reader is None:
                reader = self._readers[blob_id] = self.new_reader(blob_id)
            return reader

    def close(self) -> None:
        with self._lock:
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.close()
