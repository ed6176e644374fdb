"""API request bodies (validated strictly) and response shapes (upstream's JSON).

Requests: ``MountRequest`` (``{"source", "fs_type", "config", "prefetch_files"}``, where
``config`` is the config file's *text*, as upstream's ``ApiMountCmd``), ``DaemonConf``
(``{"log_level"}``) and the runtime config update (``{"registry_auth": "<base64>"}``). Parsing
rejects what upstream's serde would silently accept or misread: malformed or non-UTF-8 JSON,
``NaN``, duplicate keys, unknown fields, wrong types, relative or ``..`` paths. Every
``BadRequest`` message names the field and what is wrong with it.

Responses: ``daemon_info`` (upstream ``DaemonInfo``: ``version`` is ``BuildTimeInfo``, ``state``
the state's name, ``backend_collection`` maps mountpoints to ``FsBackendDescriptor``s whose
``mounted_time`` has the format of the Rust ``time`` crate's serde form) and ``super_meta`` for
``/daemon/backend`` (the subset of upstream's ``RafsSuperMeta`` this implementation knows).

Pure functions of their inputs; no I/O except reading the git commit once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nydusfs import __version__
from nydusfs.api.errors import BadRequest
from nydusfs.storage.backends.auth import validate_auth
from nydusfs.vfs.vfs import split_mountpoint

if TYPE_CHECKING:
    from nydusfs.daemon.daemon import Daemon
    from nydusfs.daemon.fs_service import MountedFs
    from nydusfs.rafs.superblock import RafsSuper

# Upstream's log::LevelFilter names; Python has no TRACE, so trace is DEBUG.
LOG_LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}
# Keys of upstream's runtime config store; only registry_auth is used by this build.
CONFIG_KEYS = ("registry_auth",)
UNSUPPORTED_CONFIG_KEYS = ("proxy_url", "dragonfly_scheduler_endpoint")
RAFS_VERSIONS = {5: 0x500, 6: 0x600}  # upstream's RAFS_SUPER_VERSION_V5 / V6


# --- parsing helpers ---------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(body: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys."""
    if not body:
        raise BadRequest(f"{what}: request body is empty (expected JSON)")
    try:
        text = body.decode("utf-8")
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise BadRequest(f"{what}: request body is not UTF-8 ({e})") from None
    except ValueError as e:  # JSONDecodeError included
        raise BadRequest(f"{what}: malformed JSON body ({e})") from None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string",
        list: "an array", dict: "an object",
    }.get(type(value), type(value).__name__)  # fmt: skip


def parse_object(body: bytes, what: str, fields: dict[str, tuple[type, bool]]) -> dict[str, Any]:
    """A JSON object with exactly the known ``fields`` (name -> (type, required)); ``null``
    counts as absent for optional fields."""
    data = parse_json(body, what)
    if not isinstance(data, dict):
        raise BadRequest(f"{what}: expected a JSON object, got {_type_name(data)}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadRequest(
            f"{what}: unknown field {unknown[0]!r} (known: {', '.join(sorted(fields))})"
        )
    for name, (kind, required) in fields.items():
        value = data.get(name)
        if value is None:
            if required:
                raise BadRequest(f"{what}: field {name!r} is required")
            continue
        # bool is an int in Python: keep them apart as JSON does.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            expected = _type_name(kind())
            raise BadRequest(f"{what}: field {name!r} must be {expected}, got {_type_name(value)}")
    return data


def normalize_mountpoint(value: str | None) -> str:
    """The canonical form of a VFS mountpoint (``/a/b``); BadRequest for a missing, relative
    or ``..``/``.`` path."""
    if value is None:
        raise BadRequest("'mountpoint' should be specified in query string")
    try:
        parts = split_mountpoint(value)
    except ValueError:
        raise BadRequest(
            f"invalid mountpoint {value!r}: must be an absolute path without '.', '..' or NUL"
        ) from None
    return "/" + "/".join(p.decode("utf-8", "surrogateescape") for p in parts)


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountRequest:
    source: str
    fs_type: str
    config: str
    prefetch_files: list[str]

    @classmethod
    def parse(cls, body: bytes) -> MountRequest:
        what = "mount request"
        data = parse_object(
            body,
            what,
            {
                "source": (str, True),
                "fs_type": (str, False),
                "config": (str, True),
                "prefetch_files": (list, False),
            },
        )
        source: str = data["source"]
        if not source:
            raise BadRequest(f"{what}: field 'source' is empty (the bootstrap path)")
        if not os.path.isabs(source):
            raise BadRequest(f"{what}: source {source!r} must be an absolute path")
        files = data.get("prefetch_files") or []
        for item in files:
            if not isinstance(item, str):
                got = _type_name(item)
                raise BadRequest(f"{what}: prefetch_files must hold strings, got {got}")
            if not item.startswith("/"):
                raise BadRequest(f"{what}: prefetch file {item!r} is not an absolute path")
        # Upstream's serde default for fs_type is "", which it then refuses; rafs is meant.
        return cls(source, data.get("fs_type") or "rafs", data["config"], list(files))


def parse_daemon_conf(body: bytes) -> int:
    """``{"log_level": "debug"}`` -> the logging level."""
    data = parse_object(body, "daemon configuration", {"log_level": (str, True)})
    name = data["log_level"].strip().lower()
    if name not in LOG_LEVELS:
        raise BadRequest(
            f"daemon configuration: unknown log_level {data['log_level']!r} "
            f"(one of {', '.join(LOG_LEVELS)})"
        )
    return LOG_LEVELS[name]


def parse_config_update(body: bytes) -> dict[str, str]:
    """Upstream's ``Config`` map (string -> string), restricted to the keys this build uses."""
    what = "config update"
    data = parse_json(body, what)
    if not isinstance(data, dict):
        raise BadRequest(f"{what}: expected a JSON object, got {_type_name(data)}")
    if not data:
        raise BadRequest(f"{what}: no keys given (known: {', '.join(CONFIG_KEYS)})")
    for key, value in data.items():
        if key in UNSUPPORTED_CONFIG_KEYS:
            continue  # the route answers 501 for these
        if key not in CONFIG_KEYS:
            raise BadRequest(f"{what}: unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})")
        if not isinstance(value, str):
            raise BadRequest(f"{what}: {key} must be a string, got {_type_name(value)}")
        if key == "registry_auth" and value:
            try:
                validate_auth(value, key)
            except ValueError as e:
                raise BadRequest(f"{what}: {e}") from None
    return data


# --- responses ---------------------------------------------------------------------------------


@functools.cache
def _git_commit() -> str:
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


@functools.cache
def build_time_info() -> dict[str, str]:
    """Upstream's ``BuildTimeInfo``; ``rustc`` carries the Python version here."""
    return {
        "package_ver": __version__,
        "git_commit": _git_commit(),
        "build_time": "unknown",
        "profile": "release",
        "rustc": f"python {sys.version.split()[0]}",
    }


def format_mounted_time(seconds: float) -> str:
    """``2024-05-01 09:05:03.123456 +00:00:00``: the Rust ``time`` crate's human-readable serde
    format for ``OffsetDateTime`` (UTC), which upstream's ``mounted_time`` uses."""
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    frac = f"{nanos:09d}".rstrip("0") or "0"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole)) + f".{frac} +00:00:00"


def backend_descriptor(mounted: MountedFs) -> dict[str, Any]:
    """Upstream's ``FsBackendDescriptor`` of one mount (config without secrets)."""
    return {
        "backend_type": "Rafs" if mounted.sup is not None else "PassthroughFs",
        "mountpoint": mounted.cmd.mountpoint,
        "mounted_time": format_mounted_time(mounted.mounted_time),
        "config": mounted.cmd.config.to_dict(secrets=False),
    }


def daemon_info(daemon: Daemon, *, include_fs: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "version": build_time_info(),
        "id": daemon.id,
        "supervisor": daemon.supervisor,
        "state": daemon.state.value,
    }
    if include_fs:
        mounts = daemon.service.mounts
        info["backend_collection"] = {mp: backend_descriptor(m) for mp, m in mounts.items()}
    return info


def super_meta(sup: RafsSuper, mountpoint: str) -> dict[str, Any]:
    """What ``/daemon/backend`` reports: upstream serialises ``RafsSuperMeta``; these are the
    fields this implementation knows (plus the blob ids, which upstream does not show)."""
    meta = sup.meta
    return {
        "mountpoint": mountpoint,
        "bootstrap": sup.path,
        "version": RAFS_VERSIONS.get(meta.version, meta.version),
        "root_inode": meta.root_ino,
        "chunk_size": meta.chunk_size,
        "block_size": meta.block_size,
        "inodes_count": meta.inodes_count,
        "flags": int(meta.flags),
        "compressor": meta.compressor.name.lower(),
        "digester": meta.digester.name.lower(),
        "explicit_uidgid": meta.explicit_uidgid,
        "has_xattr": meta.has_xattr,
        "prefetch_table_entries": len(sup.prefetch_table),
        "blobs": [b.blob_id for b in sup.blobs],
    }
