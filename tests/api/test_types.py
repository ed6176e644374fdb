"""API pieces without a daemon: request validation, error mapping, shapes, Vfs.replace, events."""

from __future__ import annotations

import json

import pytest
import trio

from nydusfs.api.errors import (
    AlreadyExists,
    BadRequest,
    InternalError,
    NotFound,
    Unsupported,
    from_exception,
)
from nydusfs.api.types import (
    MountRequest,
    format_mounted_time,
    normalize_mountpoint,
    parse_config_update,
    parse_daemon_conf,
)
from nydusfs.cli.nydusctl import f64, fdiv, udiv
from nydusfs.config import FileCacheConfig, load_config, localfs_config
from nydusfs.errors import BackendError, ConfigError, FormatError, UnsupportedError
from nydusfs.metrics import ErrorHolder, InflightTracker
from nydusfs.vfs import MOUNT_SHIFT, Vfs
from tests.fs_api.test_vfs import CTX, TinyFs


def test_mount_request() -> None:
    body = {"source": "/b", "config": "{}", "prefetch_files": ["/x"]}
    req = MountRequest.parse(json.dumps(body).encode())
    assert req == MountRequest("/b", "rafs", "{}", ["/x"])  # fs_type defaults to rafs
    assert (
        MountRequest.parse(b'{"source":"/b","config":"","prefetch_files":null}').prefetch_files
        == []
    )
    for raw, fragment in [
        (b"", "empty"),
        (b"\xff", "not utf-8"),
        (b'{"source": "/b", "config": "{}", "x": 1}', "unknown field 'x'"),
        (b'{"source": true, "config": "{}"}', "must be a string, got a boolean"),
        (b'{"source": "/b", "config": "{}", "prefetch_files": [1]}', "must hold strings"),
        (b'{"source": "", "config": "{}"}', "empty"),
        (b'{"source": "/b", "config": Infinity}', "malformed json"),
    ]:
        with pytest.raises(BadRequest, match="(?i)" + fragment.replace("(", r"\(")):
            MountRequest.parse(raw)


def test_small_bodies_and_mountpoints() -> None:
    assert parse_daemon_conf(b'{"log_level": "TRACE"}') == 10
    with pytest.raises(BadRequest, match="unknown log_level"):
        parse_daemon_conf(b'{"log_level": "verbose"}')
    assert parse_config_update(b'{"registry_auth": ""}') == {"registry_auth": ""}
    with pytest.raises(BadRequest, match="must be a string"):
        parse_config_update(b'{"registry_auth": 1}')
    assert normalize_mountpoint("/a//b/") == "/a/b"
    assert normalize_mountpoint("/") == "/"
    for bad in (None, "a/b", "/a/./b", "/a/../b", ""):
        with pytest.raises(BadRequest):
            normalize_mountpoint(bad)


def test_error_mapping() -> None:
    assert isinstance(from_exception(FileExistsError("x"), "mount"), AlreadyExists)
    assert isinstance(from_exception(FileNotFoundError("x"), "umount"), NotFound)
    assert isinstance(from_exception(ConfigError("bad key"), "mount"), BadRequest)
    assert isinstance(from_exception(FormatError("bad boot"), "mount"), BadRequest)
    assert isinstance(from_exception(UnsupportedError("no"), "mount"), Unsupported)
    assert isinstance(from_exception(BackendError("down"), "mount"), InternalError)
    err = from_exception(RuntimeError("boom"), "mount /a")
    assert err.status == 500 and err.message == "mount /a: RuntimeError: boom"
    assert json.loads(err.body()) == {"code": "Internal", "message": "mount /a: RuntimeError: boom"}


def test_mounted_time_format() -> None:
    assert format_mounted_time(0) == "1970-01-01 00:00:00.0 +00:00:00"
    assert format_mounted_time(1.25) == "1970-01-01 00:00:01.25 +00:00:00"


def test_config_to_dict_drops_secrets_and_uses_v2_keys() -> None:
    config = localfs_config("/blobs")
    assert config.cache.filecache is not None
    config.cache.filecache = FileCacheConfig(work_dir="/w", encryption_key="00" * 32)
    out = config.to_dict()
    assert "encryption_key" not in out["cache"]["filecache"]
    assert (
        out["cache"]["prefetch"]["threads"] == 8 and "threads_count" not in out["rafs"]["prefetch"]
    )
    assert config.to_dict(secrets=True)["cache"]["filecache"]["encryption_key"] == "00" * 32
    assert load_config(json.dumps(config.to_dict(secrets=True)), strict=True) == config


def test_nydusctl_numbers_print_like_rust() -> None:
    assert f64(0.0) == "0" and f64(1024.0) == "1024" and f64(0.5) == "0.5"
    assert f64(fdiv(0, 0)) == "NaN" and f64(fdiv(1, 0)) == "inf"
    assert udiv(7, 0) == 0 and udiv(7, 2) == 3


def test_error_holder_limits() -> None:
    holder = ErrorHolder(max_errors=3, max_size=200)
    for i in range(5):
        holder.push(f"error {i}")
    out = holder.to_dict()
    assert out["total_errors"] == 3 and [e[-7:] for e in out["errors"]] == [
        "error 2",
        "error 3",
        "error 4",
    ]
    holder.push("x" * 500)  # larger than the buffer: kept, cut to fit
    out = holder.to_dict()
    assert out["total_errors"] == 1 and out["total_size"] == 200 <= holder.max_size


def test_inflight_tracker() -> None:
    tracker = InflightTracker()
    a = tracker.begin(5, "read")
    b = tracker.begin(6, "lookup")
    tracker.end(a)
    (op,) = tracker.to_list()
    assert (op["inode"], op["opcode"], op["opcode_name"], op["unique"]) == (6, 1, "lookup", b)
    tracker.end(b)
    assert len(tracker) == 0


def test_vfs_replace_keeps_old_inodes_until_released() -> None:
    async def main() -> None:
        vfs = Vfs()
        old, new = TinyFs(b"old"), TinyFs(b"new")
        vfs.mount("/m", old)
        root = await vfs.lookup(CTX, 1, b"m")
        old_file = await vfs.lookup(CTX, root.ino, b"f")
        old_index, new_index = vfs.replace("/m", new)
        assert old_index != new_index and old_file.ino >> MOUNT_SHIFT == old_index
        # New lookups reach the new filesystem; the old inode still reads the old one.
        fresh = await vfs.lookup(CTX, (await vfs.lookup(CTX, 1, b"m")).ino, b"f")
        assert await vfs.read(CTX, fresh.ino, 7, 0, 10) == b"new"
        assert await vfs.read(CTX, old_file.ino, 7, 0, 10) == b"old"
        assert vfs.entry_of("/m") == (1, b"m") and vfs.entry_of("/") is None
        with pytest.raises(ValueError):
            vfs.release_replaced(new_index)  # still mounted
        assert vfs.release_replaced(old_index) is old
        with pytest.raises(OSError):
            await vfs.read(CTX, old_file.ino, 7, 0, 10)
        with pytest.raises(FileNotFoundError):
            vfs.replace("/nothing", TinyFs(b"x"))
        # Indexes go round-robin: an unmounted index is not handed out again at once.
        vfs.umount("/m")
        assert vfs.mount("/n", TinyFs(b"n")) not in (old_index, new_index)

    trio.run(main)
