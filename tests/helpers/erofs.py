"""The host kernel's EROFS driver and erofs-utils as a format oracle.

``mount_erofs`` mounts an image (plus extra blob devices) read-only, preferring the kernel's
file-backed mode (>= 6.12: ``mount(2)`` straight on the regular file, extra devices opened as files)
and falling back to loop devices. util-linux ``mount`` is not used: it always puts a loop device in
front of a regular file, and then the kernel insists ``device=`` names block devices too.

Caveats measured on the project's machines (docs/test-harness.md §4): file-backed mode refuses
images on tmpfs (ENOTBLK); the first file-backed mount of an image on ext4 may log a one-time
kernel WARNING that anything watching dmesg should ignore.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import pytest

MS_RDONLY = 1
MountMode = Literal["auto", "file", "loop"]

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (kernel mounts)")
requires_erofs_utils = pytest.mark.skipif(
    shutil.which("mkfs.erofs") is None, reason="erofs-utils not installed"
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def kernel_has_erofs() -> bool:
    """True when the running kernel lists erofs (built in or already loaded)."""
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "erofs" for line in f if line.strip())


def _mount(source: Path | str, target: Path, devices: Sequence[Path | str]) -> None:
    opts = []
    for dev in devices:
        raw = os.fsencode(os.path.abspath(dev))
        if b"," in raw:  # the option parser splits on commas; there is no escaping
            raise ValueError(f"erofs device path must not contain a comma: {dev}")
        opts.append(b"device=" + raw)
    data = b",".join(opts) or None
    rc = _libc.mount(
        os.fsencode(os.path.abspath(source)), os.fsencode(target), b"erofs", MS_RDONLY, data
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount erofs {source} on {target}: {os.strerror(err)}")


def _umount(target: Path) -> None:
    # A just-closed file can keep the mount busy for a moment; retry before giving up.
    for attempt in range(50):
        if _libc.umount2(os.fsencode(target), 0) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EBUSY or attempt == 49:
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
        time.sleep(0.1)


def _losetup(path: Path) -> str:
    out = subprocess.run(
        ["losetup", "-r", "-f", "--show", str(path)], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


@contextlib.contextmanager
def mount_erofs(
    image: Path,
    mnt: Path,
    devices: Sequence[Path] = (),
    *,
    mode: MountMode = "auto",
) -> Iterator[Path]:
    """Mount ``image`` read-only at ``mnt`` with ``devices`` as extra blob devices, in order
    (the kernel takes one ``device=`` option per extra device); yield ``mnt``.

    ``mode="auto"`` tries a file-backed mount and falls back to loop devices when the kernel
    refuses it (ENOTBLK: no file-backed support or an image on tmpfs; EINVAL). Always unmounts and
    detaches the loop devices it made, even when the body raises.
    """
    mnt.mkdir(parents=True, exist_ok=True)
    loops: list[str] = []
    mounted = False
    try:
        if mode in ("auto", "file"):
            try:
                _mount(image, mnt, devices)
                mounted = True
            except OSError as e:
                if mode == "file" or e.errno not in (errno.ENOTBLK, errno.EINVAL):
                    raise
        if not mounted:
            primary = _losetup(image)
            loops.append(primary)
            for dev in devices:
                loops.append(_losetup(dev))
            _mount(primary, mnt, loops[1:])
            mounted = True
        yield mnt
    finally:
        try:
            if mounted:
                _umount(mnt)
        finally:
            for loop in loops:
                subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)


def mount_source(mnt: Path) -> str | None:
    """The source column of ``/proc/mounts`` for ``mnt`` (a file path or ``/dev/loopN``)."""
    target = os.path.realpath(mnt)
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1].encode().decode("unicode_escape") == target:
                return fields[0].encode().decode("unicode_escape")
    return None


def fsck_erofs(
    image: Path, devices: Sequence[Path] = (), *, extract: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``fsck.erofs`` (with ``--device=`` per extra device, and ``--extract=`` when asked);
    the caller checks ``returncode`` (0 = consistent) and reads ``stdout``/``stderr``."""
    cmd = ["fsck.erofs", *(f"--device={dev}" for dev in devices)]
    if extract is not None:
        cmd.append(f"--extract={extract}")
    cmd.append(str(image))
    return subprocess.run(cmd, capture_output=True, text=True, check=False)
