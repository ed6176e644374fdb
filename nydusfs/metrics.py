"""Counters behind upstream's metrics endpoints (``/api/v1/metrics/backend``, ``/blobcache``,
``/metrics``, ``/metrics/inflight``) and the error events of ``/api/v1/daemon/events``.

Field names and bucket boundaries are upstream's (``utils/src/metrics.rs``) so existing
dashboards and scripts read our JSON unchanged. Backend and blob cache counters are updated
from worker threads and the event loop alike; a lock keeps each multi-field update consistent.
``FsIoStats`` and ``InflightTracker`` live on the event loop; ``ErrorHolder`` takes any thread.
"""

from __future__ import annotations

import collections
import email.utils
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

SIZE_BUCKETS = 8  # <1K, 1K, 4K, 16K, 64K, 128K, 512K, 1M and more
LATENCY_BUCKETS = 8


def request_size_index(size: int) -> int:
    """Upstream's size bucket of a request: <1K, <4K, <16K, <64K, <128K, <512K, <1M, >=1M."""
    kib = size >> 10
    for index, limit in enumerate((1, 4, 16, 64, 128, 512, 1024)):
        if kib < limit:
            return index
    return 7


def latency_millis_index(millis: float) -> int:
    """Buckets <=1, <=20, <=50, <=100, <=500, <=1000, <=2000, >2000 ms."""
    for index, limit in enumerate((1, 20, 50, 100, 500, 1000, 2000)):
        if millis <= limit:
            return index
    return 7


@dataclass
class BackendMetrics:
    """Reads a backend served: counts, bytes, errors and latency by request size."""

    backend_type: str
    read_count: int = 0
    read_errors: int = 0
    read_amount_total: int = 0
    read_cumulative_latency_millis_total: int = 0
    read_cumulative_latency_millis_dist: list[int] = field(
        default_factory=lambda: [0] * SIZE_BUCKETS
    )
    read_count_block_size_dist: list[int] = field(default_factory=lambda: [0] * SIZE_BUCKETS)
    read_latency_sizes_dist: list[list[int]] = field(
        default_factory=lambda: [[0] * LATENCY_BUCKETS for _ in range(SIZE_BUCKETS)]
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_read(self, size: int, millis: float) -> None:
        """A successful read of ``size`` bytes that took ``millis``."""
        s = request_size_index(size)
        with self._lock:
            self.read_count += 1
            self.read_amount_total += size
            self.read_cumulative_latency_millis_total += int(millis)
            self.read_cumulative_latency_millis_dist[s] += int(millis)
            self.read_count_block_size_dist[s] += 1
            self.read_latency_sizes_dist[s][latency_millis_index(millis)] += 1

    def record_error(self) -> None:
        with self._lock:
            self.read_errors += 1

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend_type": self.backend_type,
                "read_count": self.read_count,
                "read_errors": self.read_errors,
                "read_amount_total": self.read_amount_total,
                "read_cumulative_latency_millis_total": self.read_cumulative_latency_millis_total,
                "read_cumulative_latency_millis_dist": list(
                    self.read_cumulative_latency_millis_dist
                ),
                "read_count_block_size_dist": list(self.read_count_block_size_dist),
                "read_latency_sizes_dist": [list(r) for r in self.read_latency_sizes_dist],
            }


@dataclass
class BlobcacheMetrics:
    """What the blob cache served, and how prefetch went."""

    store_path: str = ""
    underlying_files: set[str] = field(default_factory=set)
    partial_hits: int = 0
    whole_hits: int = 0
    total: int = 0
    entries_count: int = 0
    prefetch_data_amount: int = 0
    prefetch_requests_count: int = 0
    prefetch_workers: int = 0
    prefetch_unmerged_chunks: int = 0
    prefetch_cumulative_time_millis: int = 0
    prefetch_begin_time_secs: int = 0
    prefetch_begin_time_millis: int = 0
    prefetch_end_time_secs: int = 0
    prefetch_end_time_millis: int = 0
    buffered_backend_size: int = 0
    data_all_ready: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        """Add to several counters at once, e.g. ``add(total=1, whole_hits=1)``."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def mark_prefetch(self, *, begin: bool) -> None:
        now = time.time()
        secs, millis = int(now), int(now * 1000) % 1000
        with self._lock:
            if begin:
                self.prefetch_begin_time_secs, self.prefetch_begin_time_millis = secs, millis
            else:
                self.prefetch_end_time_secs, self.prefetch_end_time_millis = secs, millis

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            out = {k: v for k, v in vars(self).items() if not k.startswith("_")}
            out["underlying_files"] = sorted(self.underlying_files)
            return out


# --- filesystem I/O statistics (``/api/v1/metrics``, ``/metrics/files``, ``/metrics/pattern``) ---

# Upstream's StatsFop order: the index of each operation in the fop arrays.
FOPS = (
    "getattr", "readlink", "open", "release", "read", "statfs", "getxattr", "listxattr",
    "opendir", "lookup", "readdir", "readdirplus", "access", "forget", "batch_forget",
)  # fmt: skip
FOP_INDEX = {name: i for i, name in enumerate(FOPS)}


def latency_micros_index(micros: float) -> int:
    """Buckets <=200us, <=1ms, <=20ms, <=50ms, <=500ms, <=1s, <=2s, >2s."""
    for index, limit in enumerate((200, 1_000, 20_000, 50_000, 500_000, 1_000_000, 2_000_000)):
        if micros <= limit:
            return index
    return 7


@dataclass
class InodeIoStats:
    total_fops: int = 0
    data_read: int = 0
    block_count_read: list[int] = field(default_factory=lambda: [0] * SIZE_BUCKETS)
    fop_hits: list[int] = field(default_factory=lambda: [0] * len(FOPS))
    fop_errors: list[int] = field(default_factory=lambda: [0] * len(FOPS))


@dataclass
class AccessPattern:
    ino: int
    nr_read: int = 0
    first_access_time_secs: int = 0
    first_access_time_nanos: int = 0


@dataclass
class FsIoStats:
    """Per-filesystem counters; per-file ones only when ``files_account_enabled``."""

    id: str = ""
    files_account_enabled: bool = False
    access_pattern_enabled: bool = False
    record_latest_read_files_enabled: bool = False
    measure_latency: bool = True
    nr_opens: int = 0
    data_read: int = 0
    block_count_read: list[int] = field(default_factory=lambda: [0] * SIZE_BUCKETS)
    fop_hits: list[int] = field(default_factory=lambda: [0] * len(FOPS))
    fop_errors: list[int] = field(default_factory=lambda: [0] * len(FOPS))
    fop_cumulative_latency_total: list[int] = field(default_factory=lambda: [0] * len(FOPS))
    read_latency_dist: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)
    files: dict[int, InodeIoStats] = field(default_factory=dict)
    patterns: dict[int, AccessPattern] = field(default_factory=dict)
    latest_read: set[int] = field(default_factory=set)

    def record(self, fop: str, ino: int, *, ok: bool, micros: float, size: int = 0) -> None:
        """One finished operation on ``ino`` (called on the event loop: no lock needed)."""
        i = FOP_INDEX[fop]
        if ok:
            self.fop_hits[i] += 1
        else:
            self.fop_errors[i] += 1
        if self.measure_latency:
            self.fop_cumulative_latency_total[i] += int(micros)
            if fop == "read":
                self.read_latency_dist[latency_micros_index(micros)] += 1
        if fop == "open" and ok:
            self.nr_opens += 1
        elif fop == "release":
            self.nr_opens = max(0, self.nr_opens - 1)
        if fop == "read" and ok:
            self.data_read += size
            self.block_count_read[request_size_index(size)] += 1
        if self.files_account_enabled:
            counters = self.files.setdefault(ino, InodeIoStats())
            counters.total_fops += 1
            if ok:
                counters.fop_hits[i] += 1
            else:
                counters.fop_errors[i] += 1
            if fop == "read" and ok:
                counters.data_read += size
                counters.block_count_read[request_size_index(size)] += 1
        if fop == "read" and ok:
            if self.access_pattern_enabled:
                pattern = self.patterns.setdefault(ino, AccessPattern(ino))
                if pattern.nr_read == 0:
                    now = time.time_ns()
                    pattern.first_access_time_secs = now // 1_000_000_000
                    pattern.first_access_time_nanos = now % 1_000_000_000
                pattern.nr_read += 1
            if self.record_latest_read_files_enabled:
                self.latest_read.add(ino)

    def to_dict(self) -> dict[str, Any]:
        skip = {"files", "patterns", "latest_read"}
        return {k: v for k, v in vars(self).items() if k not in skip}

    def files_dict(self) -> dict[str, Any]:
        return {str(ino): vars(c) for ino, c in self.files.items()}

    def pattern_list(self) -> list[dict[str, int]]:
        return [vars(p) for p in self.patterns.values() if p.nr_read]

    def take_latest_read(self) -> list[list[int]]:
        """Inos read since the last call, as sorted ranges ``[start, end]`` or ``[ino]``."""
        inos, self.latest_read = sorted(self.latest_read), set()
        ranges: list[list[int]] = []
        for ino in inos:
            if ranges and ranges[-1][-1] == ino - 1:
                ranges[-1] = [ranges[-1][0], ino]
            else:
                ranges.append([ino])
        return ranges


# --- in-flight FUSE requests (``/api/v1/metrics/inflight``) ----------------------------------

# Kernel FUSE opcodes (include/uapi/linux/fuse.h), reported as numbers as upstream does.
FUSE_OPCODES = {
    "lookup": 1, "forget": 2, "getattr": 3, "setattr": 4, "readlink": 5, "symlink": 6,
    "mknod": 8, "mkdir": 9, "unlink": 10, "rmdir": 11, "rename": 12, "link": 13, "open": 14,
    "read": 15, "write": 16, "statfs": 17, "release": 18, "fsync": 20, "setxattr": 21,
    "getxattr": 22, "listxattr": 23, "removexattr": 24, "flush": 25, "init": 26, "opendir": 27,
    "readdir": 28, "releasedir": 29, "fsyncdir": 30, "access": 34, "create": 35, "destroy": 38,
    "batch_forget": 42, "readdirplus": 44,
}  # fmt: skip


@dataclass(slots=True)
class InflightOp:
    inode: int
    opcode: str
    started: float  # time.time()


class InflightTracker:
    """Requests a frontend is serving now: ``unique -> (inode, opcode, start)``.

    Upstream answers ``/metrics/inflight`` from the FUSE server's per-thread request slots; here
    the frontend calls ``begin``/``end`` around each request. ``unique`` is our own serial
    number (pyfuse3 does not expose the kernel's). Used on the event loop only.
    """

    def __init__(self) -> None:
        self._ops: dict[int, InflightOp] = {}
        self._serial = 0

    def begin(self, inode: int, opcode: str) -> int:
        self._serial += 1
        self._ops[self._serial] = InflightOp(inode, opcode, time.time())
        return self._serial

    def end(self, unique: int) -> None:
        self._ops.pop(unique, None)

    def __len__(self) -> int:
        return len(self._ops)

    def to_list(self) -> list[dict[str, Any]]:
        """Upstream's ``[{inode, opcode, unique, timestamp_secs}]``, oldest first, plus the
        opcode's name (``opcode_name``) and the age in seconds (``elapsed_secs``)."""
        now = time.time()
        return [
            {
                "inode": op.inode,
                "opcode": FUSE_OPCODES.get(op.opcode, 0),
                "unique": unique,
                "timestamp_secs": int(op.started),
                "opcode_name": op.opcode,
                "elapsed_secs": round(max(0.0, now - op.started), 6),
            }
            for unique, op in sorted(self._ops.items())
        ]


# --- error events (``/api/v1/daemon/events``) ---------------------------------------------------

MAX_ERRORS = 500
MAX_ERRORS_SIZE = 51200


class ErrorHolder:
    """Upstream's ``ERROR_HOLDER``: the latest error messages, at most ``max_errors`` of them
    and ``max_size`` bytes in all; the oldest go first. Each entry is ``"<HTTP date> - <msg>"``.

    Upstream drops a message larger than the whole buffer; we keep its head instead, so the
    newest error is always visible. Thread-safe (errors are logged from worker threads too).
    """

    def __init__(self, max_errors: int = MAX_ERRORS, max_size: int = MAX_ERRORS_SIZE) -> None:
        self.max_errors = max_errors
        self.max_size = max_size
        self.total_size = 0
        self._errors: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()

    def push(self, message: str) -> None:
        entry = f"{email.utils.formatdate(usegmt=True)} - {message}"
        if len(entry) > self.max_size:
            entry = entry[: self.max_size]
        with self._lock:
            while self._errors and (
                len(self._errors) >= self.max_errors or self.total_size + len(entry) > self.max_size
            ):
                self.total_size -= len(self._errors.popleft())
            self._errors.append(entry)
            self.total_size += len(entry)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "max_errors": self.max_errors,
                "total_errors": len(self._errors),
                "max_size": self.max_size,
                "total_size": self.total_size,
                "errors": list(self._errors),
            }


class ErrorLogHandler(logging.Handler):
    """Feeds ERROR (and worse) log records into an ``ErrorHolder``."""

    def __init__(self, holder: ErrorHolder) -> None:
        super().__init__(logging.ERROR)
        self.holder = holder

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message = f"{message}: {record.exc_info[1]!r}"
            self.holder.push(f"{record.name}: {message}")
        except Exception:  # a logging handler must never raise into the code that logged
            self.handleError(record)
