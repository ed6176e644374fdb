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
