"""``nydusctl``: query and configure a running nydusd through its API socket (upstream's CLI).

``nydusctl -S SOCK [-r] info | set log-level LEVEL | metrics backend|cache|fsstats [-I SECS] |
mount -s SOURCE -c CONFIG -m MOUNTPOINT -t rafs|passthrough_fs | umount -m MOUNTPOINT``.

Output follows upstream's ``src/bin/nydusctl/commands.rs`` line for line: JSON values are
printed as serde_json shows them (strings quoted, arrays compact), computed floats as Rust
prints an ``f64`` (``0`` not ``0.0``, ``NaN`` for 0/0). ``-r/--raw`` prints the JSON reply
instead. ``metrics backend -I SECS`` refreshes every SECS seconds until interrupted (``--count``
stops after N refreshes, which upstream lacks). An error prints one ``nydusctl: ...`` line and
exits 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from nydusfs import __version__
from nydusfs.api.client import ApiClientError, NydusdClient

SIZES = ["<1K", "1K~", "4K~", "16K~", "64K~", "128K~", "512K~", "1M~"]
PERIODS = ["<1ms", "~20ms", "~50ms", "~100ms", "~500ms", "~1s", "~2s", "2s~"]
FOP_NAMES = (
    "Getattr", "Readlink", "Open", "Release", "Read", "Statfs", "Getxattr", "Listxattr",
    "Opendir", "Lookup", "Readdir", "Readdirplus", "Access", "Forget", "BatchForget",
)  # fmt: skip
CONFIGURE_ITEMS = {"log-level": "log_level"}


def js(value: Any) -> str:
    """A JSON value as serde_json's ``Display`` shows it (compact)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def f64(value: float) -> str:
    """A float as Rust's ``{}`` shows an ``f64``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == int(value):
        return str(int(value))
    return repr(value)


def fdiv(a: float, b: float) -> float:
    """IEEE division, as Rust's: x/0 is inf (or NaN for 0/0) instead of an exception."""
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def udiv(a: int, b: int) -> int:
    """Rust's ``checked_div(..).unwrap_or_default()`` on u64."""
    return a // b if b else 0


# --- commands ----------------------------------------------------------------------------------


def cmd_info(client: NydusdClient, raw: bool) -> None:
    info = client.get("v1/daemon")
    if raw:
        print(js(info))
        return
    version = info.get("version", {})
    print(
        f"\nVersion:                {js(version.get('package_ver'))}\n"
        f"Status:                 {js(info.get('state'))}\n"
        f"Profile:                {js(version.get('profile'))}\n"
        f"Commit:                 {js(version.get('git_commit'))}"
    )
    backends = info.get("backend_collection") or {}
    if backends:
        print("Instances:")
    for mountpoint, backend in backends.items():
        print(f"\tInstance Mountpoint:  {mountpoint}")
        print(f"\tType:  {backend.get('backend_type')}")
        print(f"\tMounted Time:  {backend.get('mounted_time')}")
        if backend.get("backend_type") == "Rafs":
            config = backend.get("config") or {}
            prefetch = config.get("cache", {}).get("prefetch", {})
            print(f"\tMode:  {config.get('rafs', {}).get('mode', 'direct')}")
            print(f"\tPrefetch:  {js(bool(prefetch.get('enable', False)))}")
            print(f"\tPrefetch Merging Size:  {prefetch.get('batch_size', 1 << 20)}")
            print()


def cmd_set(client: NydusdClient, kind: str, value: str) -> None:
    client.put("v1/daemon", {CONFIGURE_ITEMS[kind]: value})


def cmd_cache(client: NydusdClient, raw: bool) -> None:
    m = client.get("v1/metrics/blobcache")
    if raw:
        print(js(m))
        return
    begin = m["prefetch_begin_time_secs"] + m["prefetch_begin_time_millis"] / 1000.0
    end = m["prefetch_end_time_secs"] + m["prefetch_end_time_millis"] / 1000.0
    duration = end - begin
    amount = float(m["prefetch_data_amount"])
    requests = m["prefetch_requests_count"]
    print(
        f"""
Partial Hits:               {js(m["partial_hits"])}
Whole Hits:                 {js(m["whole_hits"])}
Total Read:                 {js(m["total"])}
Directory:                  {js(m["store_path"])}
Files:                      {js(m["underlying_files"])}
Persister Buffer:           {js(m["buffered_backend_size"])}

Prefetch Workers:           {js(m["prefetch_workers"])}
Prefetch Amount:            {f64(amount)} = {f64(amount / 1024.0)} KB
Prefetch Requests:          {js(requests)}
Prefetch Average Size:      {udiv(int(amount), requests)} Bytes
Prefetch Duration:          {f64(duration)} Seconds
Prefetch Bandwidth:         {f64(fdiv(amount / 1024.0 / 1024.0, duration))} MB/S
Prefetch Request Latency:   {f64(fdiv(m["prefetch_cumulative_time_millis"], requests) / 1000.0)} \
Seconds
Prefetch Unmerged:          {js(m["prefetch_unmerged_chunks"])}"""
    )


def _delta(old: dict[str, Any], new: dict[str, Any], key: str) -> int:
    return max(0, int(new[key]) - int(old[key]))


def _vec_delta(old: dict[str, Any], new: dict[str, Any], key: str) -> list[int]:
    return [max(0, int(n) - int(o)) for o, n in zip(old[key], new[key], strict=True)]


def cmd_backend(client: NydusdClient, raw: bool, interval: int | None, count: int | None) -> None:
    metrics = client.get("v1/metrics/backend")
    if interval is not None:
        last, rounds = metrics, 0
        while count is None or rounds < count:
            time.sleep(interval)
            current = client.get("v1/metrics/backend")
            data = _delta(last, current, "read_amount_total")
            requests = _delta(last, current, "read_count")
            latency = _delta(last, current, "read_cumulative_latency_millis_total")
            dist = _vec_delta(last, current, "read_cumulative_latency_millis_dist")
            hits = _vec_delta(last, current, "read_count_block_size_dist")
            print(
                f"\n>>> >>> >>> >>> >>>\n"
                f"Backend Read Bandwidth:     {udiv(data, interval * 1024)} KB/S\n"
                f"Backend Average IO Size:    {udiv(data, requests)} Bytes\n"
                f"Backend Average Latency:    {udiv(latency, requests)} millis\n\n"
                f"Block Sizes/millis:\n" + "".join(f"{s:<8}" for s in SIZES)
            )
            print("".join(f"{udiv(d, h):<8}" for d, h in zip(dist, hits, strict=True)))
            print("<<< <<< <<< <<< <<<")
            last, rounds = current, rounds + 1
        return
    if raw:
        print(js(metrics))
        return
    m = metrics
    print(
        f"\nBackend Type:       {js(m['backend_type'])}\n"
        f"Read Amount:        {js(m['read_amount_total'])} Bytes "
        f"({f64(m['read_amount_total'] / 1024.0 / 1024.0)} MB)\n"
        f"Read Count:         {js(m['read_count'])}\n"
        f"Read Errors:        {js(m['read_errors'])}"
    )
    dist = m["read_cumulative_latency_millis_dist"]
    hits = m["read_count_block_size_dist"]
    header = f"{'Block Sizes:':<25}" + "".join(f"{s:<8}" for s in SIZES)
    print(f"\n{header}")
    print(
        f"{'Average Latency(millis):':<25}"
        + "".join(f"{udiv(d, h):<8}" for d, h in zip(dist, hits, strict=True))
    )
    print(f"\n{header}")
    print(f"{'Request Count:':<25}" + "".join(f"{h:<8}" for h in hits))


def cmd_fsstats(client: NydusdClient, raw: bool) -> None:
    m = client.get("v1/metrics")
    if raw:
        print(js(m))
        return
    hits, errors = m["fop_hits"], m["fop_errors"]
    print(f"\n{'Read Latency:':<16}" + "".join(f"{p:<8}" for p in PERIODS))
    print(f"{'Reads Count:':<16}" + "".join(f"{d:<8}" for d in m["read_latency_dist"]))
    print()
    print(f"Read Errors: {js(errors[4])}")
    data_read = int(m["data_read"])
    print(f"Read Data: {data_read}Bytes ({data_read // 1024 // 1024}MB)")
    counters = [f"{name}({js(hits[i])})" for i, name in enumerate(FOP_NAMES)]
    print(f"\nFOP Counters:\n{' '.join(counters[:8])}\n{' '.join(counters[8:])}")


def cmd_mount(client: NydusdClient, source: str, config_path: str, mountpoint: str,
              fs_type: str) -> None:  # fmt: skip
    try:
        with open(config_path) as f:
            config = f.read()
    except OSError as e:
        raise CliError(f"failed to read mount config {config_path}: {e.strerror}") from None
    client.mount(mountpoint, source, config, fs_type=fs_type)


# --- arguments ---------------------------------------------------------------------------------


class CliError(Exception):
    pass


def _interval(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid interval input. {text!r}") from None
    if not 0 <= value < 1 << 32:
        raise argparse.ArgumentTypeError(f"Invalid interval input. {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.ArgumentParser(add_help=False)
    # -r is global in upstream (before or after the subcommand); SUPPRESS keeps the main
    # parser's value unless the subcommand's own -r is given.
    raw.add_argument("-r", "--raw", action="store_true", default=argparse.SUPPRESS,
                     help="Outputs messages in plain json mode")  # fmt: skip
    p = argparse.ArgumentParser(
        prog="nydusctl", description="A client to query and configure the nydusd daemon"
    )
    p.add_argument("-V", "--version", action="version", version=f"nydusctl {__version__}")
    p.add_argument("-S", "--sock", required=True, help="file path of the nydusd API socket")
    p.add_argument("-r", "--raw", action="store_true", help="Outputs messages in plain json mode")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", parents=[raw], help="Gets information about the nydusd daemon")
    s = sub.add_parser("set", parents=[raw], help="Configures parameters for the nydusd daemon",
                       description="log-level: trace, debug, info, warn, error")  # fmt: skip
    s.add_argument("kind", metavar="KIND", choices=sorted(CONFIGURE_ITEMS))
    s.add_argument("value", metavar="VALUE")
    m = sub.add_parser("metrics", parents=[raw], help="Gets runtime metrics")
    m.add_argument("category", choices=["backend", "cache", "fsstats"])
    m.add_argument("-I", "--interval", type=_interval, help="interval to refresh the metrics")
    m.add_argument("--count", type=int, help="stop after this many refreshes (with -I)")
    mo = sub.add_parser("mount", parents=[raw], help="Mounts a new filesystem instance")
    mo.add_argument("-s", "--source", required=True, help="bootstrap of the new instance")
    mo.add_argument("-c", "--config", required=True, help="configuration file")
    mo.add_argument("-m", "--mountpoint", required=True, help="mountpoint inside the VFS")
    mo.add_argument("-t", "--type", required=True, choices=["rafs", "passthrough_fs"])
    u = sub.add_parser("umount", parents=[raw], help="Umounts a filesystem instance")
    u.add_argument("-m", "--mountpoint", required=True, help="mountpoint inside the VFS")
    return p


def run(args: argparse.Namespace) -> None:
    with NydusdClient(args.sock) as client:
        if args.command == "info":
            cmd_info(client, args.raw)
        elif args.command == "set":
            cmd_set(client, args.kind, args.value)
        elif args.command == "metrics":
            if args.category == "backend":
                cmd_backend(client, args.raw, args.interval, args.count)
            elif args.category == "cache":
                cmd_cache(client, args.raw)
            else:
                cmd_fsstats(client, args.raw)
        elif args.command == "mount":
            cmd_mount(client, args.source, args.config, args.mountpoint, args.type)
        elif args.command == "umount":
            client.umount(args.mountpoint)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ApiClientError as e:
        print(f"nydusctl: request failed: {e}", file=sys.stderr)
        return 1
    except CliError as e:
        print(f"nydusctl: {e}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, ValueError) as e:
        print(f"nydusctl: unexpected reply from nydusd: {e!r}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"nydusctl: cannot talk to nydusd at {args.sock}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
