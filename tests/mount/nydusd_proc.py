"""Run ``nydusd`` as a real process for mount tests: start, wait for the FUSE mount, stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def is_mounted(mnt: Path) -> bool:
    target = os.path.realpath(mnt)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def is_serving(mnt: Path) -> bool:
    """Mounted and answering (a stale mount of a dead daemon answers ENOTCONN)."""
    if not is_mounted(mnt):
        return False
    try:
        os.listdir(mnt)
    except OSError:
        return False
    return True


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config))
    return path


def localfs_config(
    blob_dir: Path,
    work_dir: Path | None,
    *,
    cache: str = "blobcache",
    compressed: bool = False,
    validate: bool = False,
    **rafs: Any,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": 2,
        "backend": {"type": "localfs", "localfs": {"dir": str(blob_dir)}},
        "cache": {"type": cache, "compressed": compressed, "validate": validate},
        "rafs": {"enable_xattr": True, **rafs},
    }
    if work_dir is not None:
        config["cache"]["filecache"] = {"work_dir": str(work_dir)}
    return config


@contextlib.contextmanager
def nydusd(
    *args: str, mountpoint: Path, timeout: float = 20.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``nydusd ARGS --mountpoint M``; yield once mounted; SIGTERM and check it unmounted."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "nydusfs.cli.nydusd", *args, "--mountpoint", str(mountpoint)]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not is_serving(mountpoint):
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"nydusd exited with {proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nydusd did not mount {mountpoint} in {timeout}s")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        if proc.stderr:
            proc.stderr.close()
