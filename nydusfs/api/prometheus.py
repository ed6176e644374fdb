"""The daemon's counters in the Prometheus text exposition format (``/api/v1/metrics/prometheus``).

Upstream has no such endpoint (nydus-snapshotter scrapes the JSON routes and re-exports them);
this one exposes the same counters directly, so a node exporter's textfile collector or a
sidecar can forward them. Every mount is a ``mountpoint`` label; names follow the Prometheus
conventions (``_total`` for counters, base units: bytes and seconds). Each family has its
``# HELP`` and ``# TYPE`` lines once, before its samples, as the format requires. The FUSE read
latency buckets become a real cumulative histogram (``le`` bounds from upstream's buckets).

Reads counters without awaiting: one call is one consistent snapshot of the event-loop state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from nydusfs.metrics import FOPS

if TYPE_CHECKING:
    from nydusfs.daemon.daemon import Daemon

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Upper bounds (seconds) of upstream's read latency buckets: <=200us ... <=2s, then more.
READ_LATENCY_BOUNDS = (0.0002, 0.001, 0.02, 0.05, 0.5, 1.0, 2.0, math.inf)
STATES = ("INIT", "READY", "RUNNING", "STOPPED")
READ = FOPS.index("read")

Sample = tuple[dict[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Families:
    def __init__(self) -> None:
        self._order: list[str] = []
        self._meta: dict[str, tuple[str, str]] = {}
        self._samples: dict[str, list[tuple[str, dict[str, str], float]]] = {}

    def add(
        self, name: str, kind: str, help_text: str, samples: Iterable[Sample], suffix: str = ""
    ) -> None:
        if name not in self._meta:
            self._order.append(name)
            self._meta[name] = (kind, help_text)
            self._samples[name] = []
        self._samples[name].extend((name + suffix, labels, value) for labels, value in samples)

    def render(self) -> str:
        lines: list[str] = []
        for name in self._order:
            kind, help_text = self._meta[name]
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for sample, labels, value in self._samples[name]:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(
                    f"{sample}{{{text}}} {_number(value)}" if text else f"{sample} {_number(value)}"
                )
        return "\n".join(lines) + "\n"


def render(daemon: Daemon) -> str:
    f = _Families()
    state = daemon.state.value
    f.add(
        "nydusd_state",
        "gauge",
        "1 for the daemon's current state.",
        [({"state": s}, 1.0 if s == state else 0.0) for s in STATES],
    )
    f.add(
        "nydusd_mounts",
        "gauge",
        "Filesystem instances mounted.",
        [({}, float(len(daemon.service.mounts)))],
    )
    f.add(
        "nydusd_fuse_inflight_requests",
        "gauge",
        "FUSE requests being served.",
        [({}, float(len(daemon.inflight)))],
    )
    f.add(
        "nydusd_error_events",
        "gauge",
        "Error events held in the events buffer.",
        [({}, float(daemon.events.to_dict()["total_errors"]))],
    )

    for mp, mounted in sorted(daemon.service.mounts.items()):
        label = {"mountpoint": mp}
        st = mounted.fs.stats
        f.add(
            "nydusd_fs_fop_total",
            "counter",
            "Filesystem operations that succeeded.",
            [({**label, "fop": fop}, float(st.fop_hits[i])) for i, fop in enumerate(FOPS)],
        )
        f.add(
            "nydusd_fs_fop_errors_total",
            "counter",
            "Filesystem operations that failed.",
            [({**label, "fop": fop}, float(st.fop_errors[i])) for i, fop in enumerate(FOPS)],
        )
        f.add(
            "nydusd_fs_fop_latency_seconds_total",
            "counter",
            "Cumulative latency of filesystem operations.",
            [
                ({**label, "fop": fop}, st.fop_cumulative_latency_total[i] / 1e6)
                for i, fop in enumerate(FOPS)
            ],
        )
        f.add(
            "nydusd_fs_read_bytes_total",
            "counter",
            "Bytes read from the filesystem.",
            [(label, float(st.data_read))],
        )
        f.add("nydusd_fs_open_files", "gauge", "Files open.", [(label, float(st.nr_opens))])
        cumulative = 0
        buckets: list[Sample] = []
        for bound, count in zip(READ_LATENCY_BOUNDS, st.read_latency_dist, strict=True):
            cumulative += count
            buckets.append(({**label, "le": _number(bound)}, float(cumulative)))
        name = "nydusd_fs_read_latency_seconds"
        f.add(name, "histogram", "Latency of FUSE reads.", buckets, "_bucket")
        read_micros = st.fop_cumulative_latency_total[READ]
        f.add(name, "histogram", "", [(label, read_micros / 1e6)], "_sum")
        f.add(name, "histogram", "", [(label, float(cumulative))], "_count")

        if mounted.backend is not None:
            b = mounted.backend.metrics.to_dict()
            blabel = {**label, "backend_type": str(b["backend_type"])}
            f.add(
                "nydusd_backend_reads_total",
                "counter",
                "Reads served by the blob backend.",
                [(blabel, float(b["read_count"]))],
            )
            f.add(
                "nydusd_backend_read_errors_total",
                "counter",
                "Backend reads that failed.",
                [(blabel, float(b["read_errors"]))],
            )
            f.add(
                "nydusd_backend_read_bytes_total",
                "counter",
                "Bytes read from the backend.",
                [(blabel, float(b["read_amount_total"]))],
            )
            f.add(
                "nydusd_backend_read_latency_seconds_total",
                "counter",
                "Cumulative latency of backend reads.",
                [(blabel, b["read_cumulative_latency_millis_total"] / 1e3)],
            )
        if mounted.device is not None:
            c = mounted.device.metrics.to_dict()
            for key, metric, help_text in (
                ("partial_hits", "partial_hits", "Reads partly served from the blob cache."),
                ("whole_hits", "whole_hits", "Reads wholly served from the blob cache."),
                ("total", "reads", "Reads that went through the blob cache."),
                ("prefetch_data_amount", "prefetch_bytes", "Bytes prefetched."),
                ("prefetch_requests_count", "prefetch_requests", "Prefetch backend requests."),
            ):
                f.add(
                    f"nydusd_blobcache_{metric}_total",
                    "counter",
                    help_text,
                    [(label, float(c[key]))],
                )
            f.add(
                "nydusd_blobcache_entries",
                "gauge",
                "Chunks the blob cache holds.",
                [(label, float(c["entries_count"]))],
            )
            f.add(
                "nydusd_blobcache_data_all_ready",
                "gauge",
                "1 when every blob of the mount is fully cached.",
                [(label, 1.0 if c["data_all_ready"] else 0.0)],
            )
    return f.render()
