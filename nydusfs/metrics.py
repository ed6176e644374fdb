"""Counters behind upstream's metrics endpoints (``/api/v1/metrics/backend``, ``/blobcache``).

Field names and bucket boundaries are upstream's (``utils/src/metrics.rs``) so existing
dashboards and scripts read our JSON unchanged. Counters are updated from worker threads and
the event loop alike; a lock keeps each multi-field update consistent.
"""

from __future__ import annotations

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
