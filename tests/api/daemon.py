"""Helpers for API tests: a real ``nydusd --apisock`` process, images and mount configs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nydusfs.api.client import NydusdClient
from nydusfs.rafs.builder.build import BuildOptions, build
from tests.mount.nydusd_proc import REPO, localfs_config, nydusd


@dataclass
class ApiDaemon:
    proc: subprocess.Popen[bytes]
    sock: Path
    mnt: Path
    client: NydusdClient

    def nydusctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "nydusfs.cli.nydusctl", "-S", str(self.sock), *args]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"nydusctl {args} failed: {result.stderr}")
        return result


@contextlib.contextmanager
def api_daemon(tmp_path: Path, *args: str, timeout: float = 20.0) -> Iterator[ApiDaemon]:
    """``nydusd --apisock`` (no image unless ``args`` has one), yielded once both the FUSE
    mount and the API socket answer."""
    sock = tmp_path / "api.sock"
    mnt = tmp_path / "mnt"
    with nydusd("--apisock", str(sock), *args, mountpoint=mnt, timeout=timeout) as proc:
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"nydusd did not create {sock}")
            time.sleep(0.02)
        with NydusdClient(str(sock)) as client:
            yield ApiDaemon(proc, sock, mnt, client)


def make_image(src: Path, out: Path, **kw: Any) -> Path:
    """Build ``src`` into ``out/image.boot`` plus blobs in ``out``; returns the bootstrap."""
    out.mkdir(parents=True, exist_ok=True)
    boot = out / "image.boot"
    build(BuildOptions(source=str(src), bootstrap=str(boot), blob_dir=str(out), **kw))
    return boot


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def mount_config(blob_dir: Path, work_dir: Path | None = None, **rafs: Any) -> str:
    """The text of a v2 localfs config (what the API's ``config`` field carries)."""
    return json.dumps(localfs_config(blob_dir, work_dir or blob_dir / "cache", **rafs))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
