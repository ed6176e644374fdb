"""Shared setup of the NBD tests: images, ``nydus-image export --block`` outputs, a running
``nydusd nbd`` and the real clients (libnbd's nbdinfo/nbdcopy/nbdfuse, qemu-img).

Images and exports are built once per session per compressor; servers are started per test
module. Each client is a process nobody here wrote (docs/test-harness.md §3).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.types import Compressor
from tests.helpers.servers import running, stop_process

REPO = Path(__file__).resolve().parents[2]
CLIENTS = ("nbdinfo", "nbdcopy", "nbdfuse", "qemu-img", "fusermount3")


def require_clients() -> None:
    missing = [tool for tool in CLIENTS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (make deps installs libnbd-bin, qemu-utils)")


@dataclass(frozen=True)
class Image:
    bootstrap: Path
    blob_dir: Path
    disk: Path  # `nydus-image export --block` of the image
    compressor: Compressor


def tool(name: str, *args: str) -> list[str]:
    """The argv running one of our entry points with this worktree's interpreter."""
    module = {"nydusd": "nydusfs.cli.nydusd", "nydus-image": "nydusfs.cli.nydus_image"}[name]
    return [sys.executable, "-m", module, *args]


def export_block(bootstrap: Path, out: Path, *args: str) -> None:
    proc = subprocess.run(
        tool("nydus-image", "export", "--block", "-B", str(bootstrap), "-O", str(out), *args),
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="session")
def nbd_image(
    small_tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Compressor], Image]:
    """``nbd_image(compressor)``: ``small_tree`` built with that compressor (64 KiB chunks) and
    its block export, made once per session."""
    cache: dict[Compressor, Image] = {}

    def make(compressor: Compressor) -> Image:
        if compressor not in cache:
            # Not on tmpfs: the kernel's file-backed EROFS mode refuses tmpfs files.
            out = tmp_path_factory.mktemp(f"nbd-{compressor.label}")
            blobs = out / "blobs"
            blobs.mkdir()
            boot = out / "image.boot"
            build(BuildOptions(source=str(small_tree), bootstrap=str(boot), blob_dir=str(blobs),
                               compressor=compressor, chunk_size=0x10000))  # fmt: skip
            disk = out / "image.disk"
            export_block(boot, disk, "-D", str(blobs))
            cache[compressor] = Image(boot, blobs, disk, compressor)
        return cache[compressor]

    return make


def uri(sock: Path, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


@contextlib.contextmanager
def nydusd_nbd(sock: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``nydusd nbd ARGS --unix SOCK`` until the block ends (SIGTERM), once it listens."""
    argv = tool("nydusd", "nbd", *args, "--unix", str(sock))
    with running(argv, unix_socket=sock, timeout=30, cwd=REPO) as proc:
        yield proc
    assert not sock.exists(), "nydusd nbd left its socket behind"


@contextlib.contextmanager
def nbdfuse(target: Path, nbd_uri: str, timeout: float = 20.0) -> Iterator[Path]:
    """Expose ``nbd_uri`` as the file ``target/disk`` with nbdfuse (read-only); yield the file."""
    target.mkdir(parents=True, exist_ok=True)
    disk = target / "disk"
    proc = subprocess.Popen(
        ["nbdfuse", "-r", str(disk), nbd_uri], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not disk.exists():
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"nbdfuse exited with {proc.returncode}: {out}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nbdfuse did not show {disk} in {timeout}s")
            time.sleep(0.05)
        yield disk
    finally:
        subprocess.run(["fusermount3", "-u", str(target)], check=False, capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop_process(proc)
        if proc.stdout:
            proc.stdout.close()


def same_file(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def run_client(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {proc.stderr}"
    return proc


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is 108 bytes; pytest's tmp_path is long)."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"nbd-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
