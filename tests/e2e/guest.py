"""QEMU (TCG) guests for virtio-fs tests and benchmarks: kernel, initramfs, boot, tree listings.

The guest kernel is Debian's bookworm-backports 6.12 kernel (virtio_pci and virtiofs built in,
so the initramfs needs no modules), the one the NBD guest uses: ``make deps`` fetches it once
(``tests/nbd/guest.py``). The initramfs is busybox plus
``vfswalk`` (``vfswalk.c``, built static here) and an ``/init`` that mounts proc/sys/dev and
runs the caller's script; the script's output comes back on the serial console (QEMU stdout).

``Guest`` boots one VM with any number of vhost-user-fs devices and lets the caller react to
lines as they arrive (for a test that changes the daemon while the guest runs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from nydusfs.api.client import NydusdClient
from tests.helpers.servers import stop_process
from tests.helpers.tree import Snapshot
from tests.mount.nydusd_proc import REPO
from tests.nbd.guest import GUEST_DIR, have_kernel

HERE = Path(__file__).resolve().parent
QEMU = "qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
DONE = "HARNESS-DONE"
# no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check can time out and
# panic ("IO-APIC + timer doesn't work"); the check is meant for broken hardware, not for us.
APPEND = "console=ttyS0 quiet panic=-1 no_timer_check"

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "HARNESS: up $(cut -d' ' -f1 /proc/uptime)"
sh /harness.sh
echo "HARNESS-DONE rc=$?"
poweroff -f
"""


def guest_kernel() -> Path | None:
    """The guest kernel, or None when ``make deps`` has not fetched it."""
    found = have_kernel()
    return found.vmlinuz if found is not None else None


def missing_tools() -> list[str]:
    tools = [QEMU, "busybox", "cpio", "gcc"]
    missing = [t for t in tools if shutil.which(t) is None]
    if guest_kernel() is None:
        missing.append(f"guest kernel in {GUEST_DIR} (make deps)")
    return missing


def build_initramfs(out: Path, script: str) -> Path:
    """An initramfs whose /init runs ``script`` (sh) and powers off; returns ``out``."""
    busybox = shutil.which("busybox")
    assert busybox is not None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "mnt", "tmp"):
            (root / d).mkdir()
        shutil.copy(busybox, root / "bin" / "busybox")
        subprocess.run(
            ["gcc", "-O2", "-static", "-o", str(root / "bin" / "vfswalk"), str(HERE / "vfswalk.c")],
            check=True,
        )
        (root / "init").write_text(_INIT)
        (root / "init").chmod(0o755)
        (root / "harness.sh").write_text(script)
        files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, check=True,
            capture_output=True,
        ).stdout  # fmt: skip
        out.write_bytes(cpio)
    return out


class Guest:
    """One QEMU run: ``devices`` are (vhost-user socket, tag) pairs; ``on_line`` sees each
    console line as it arrives (from a reader thread)."""

    def __init__(
        self,
        initramfs: Path,
        devices: Sequence[tuple[str, str]],
        *,
        memory_mb: int = 256,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        kernel = guest_kernel()
        assert kernel is not None
        cmd = [
            QEMU, "-accel", "tcg", "-m", f"{memory_mb}M", "-smp", "1", "-nodefaults",
            "-serial", "stdio", "-display", "none", "-no-reboot",
            "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
            "-numa", "node,memdev=mem", "-kernel", str(kernel), "-initrd", str(initramfs),
            "-append", APPEND,
        ]  # fmt: skip
        for i, (sock, tag) in enumerate(devices):
            cmd += ["-chardev", f"socket,id=vfs{i},path={sock}"]
            cmd += ["-device", f"vhost-user-fs-pci,chardev=vfs{i},tag={tag}"]
        self.cmd = cmd
        self.on_line = on_line
        self.lines: list[str] = []

    def run(self, timeout: float = 240.0) -> list[str]:
        """Boot, wait for power-off; the console lines. Raises if the script did not finish."""
        proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        stream = proc.stdout

        def read() -> None:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.lines.append(line)
                if self.on_line is not None:
                    self.on_line(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"guest did not finish in {timeout}s: {self.tail()}") from None
        finally:
            reader.join(timeout=5)
            stream.close()
        if not any(line.startswith(DONE) for line in self.lines):
            raise RuntimeError(f"guest stopped early (rc {proc.returncode}): {self.tail()}")
        return self.lines

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


def parse_walk(lines: Sequence[str], prefix: str) -> Snapshot:
    """The ``vfswalk`` lines after ``prefix`` (``"<prefix> E ..."``) as a tree snapshot."""
    result: Snapshot = {}
    inodes: dict[str, list[bytes]] = {}
    start = f"{prefix} E "
    for line in lines:
        if not line.startswith(start):
            continue
        path_hex, kind, mode, uid, gid, size, sha, target, rdev, ino, xattrs = line[
            len(start) :
        ].split(" ")
        path = _unhex(path_hex) or b"/"
        entry: dict[str, object] = {
            "type": kind, "mode": int(mode, 8), "uid": int(uid), "gid": int(gid),
            "xattrs": dict(sorted(_xattr_pairs(xattrs))),
        }  # fmt: skip
        if kind == "reg":
            entry["size"], entry["sha256"] = int(size), sha
        elif kind == "lnk":
            entry["symlink"], entry["size"] = _unhex(target), int(size)
        elif kind in ("chr", "blk"):
            major, minor = rdev.split(":")
            entry["rdev"] = (int(major), int(minor))
        if kind != "dir":
            inodes.setdefault(ino, []).append(path)
        result[path] = entry
    groups = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    for group_id, paths in enumerate(groups):
        for path in paths:
            result[path]["hardlink"] = group_id
    return dict(sorted(result.items()))


def _unhex(text: str) -> bytes:
    return b"" if text == "-" else bytes.fromhex(text)


def _xattr_pairs(text: str) -> list[tuple[bytes, bytes]]:
    if text == "-":
        return []
    pairs = []
    for item in text.split(","):
        name, _, value = item.partition("=")
        pairs.append((_unhex(name), _unhex(value)))
    return pairs


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def virtiofs_daemon(
    sock: Path, *args: str, apisock: Path | None = None, timeout: float = 20.0
) -> Iterator[subprocess.Popen[bytes]]:
    """``nydusd virtiofs --sock SOCK ARGS``, yielded once it serves (the API says RUNNING, or
    without ``apisock`` the vhost-user socket accepts a connection); stopped with SIGTERM."""
    cmd = [sys.executable, "-m", "nydusfs.cli.nydusd", "virtiofs", "--sock", str(sock), *args]
    if apisock is not None:
        cmd += ["--apisock", str(apisock)]
    # The log goes to a file: a pipe nobody reads would block a chatty daemon.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=log)
        try:
            deadline = time.monotonic() + timeout
            while not _serving(sock, apisock):
                if proc.poll() is not None:
                    log.seek(0)
                    err = log.read().decode(errors="replace")[-4000:]
                    raise RuntimeError(f"nydusd virtiofs exited with {proc.returncode}: {err}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nydusd virtiofs did not listen on {sock} in {timeout}s")
                time.sleep(0.05)
            yield proc
        finally:
            stop_process(proc, timeout=20)


def _serving(sock: Path, apisock: Path | None) -> bool:
    if apisock is None:
        # A probe connection: the device sees a front-end come and go, which it must survive.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(sock))
            except OSError:
                return False
        return True
    if not is_socket(str(apisock)):
        return False
    try:
        with NydusdClient(str(apisock), timeout=5) as client:
            return bool(client.daemon_info()["state"] == "RUNNING")
    except OSError:
        return False
