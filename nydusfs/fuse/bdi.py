"""Kernel read-ahead for a FUSE mount.

The kernel offers FUSE filesystems 128 KiB of read-ahead, so sequential reads reach the daemon
as 128 KiB requests even when 1 MiB requests are allowed (libfuse negotiates max_pages = 256).
pyfuse3 gives no access to the INIT reply's ``max_readahead``, but the mount's backing device
info has a sysfs knob: raising it to 1 MiB makes the kernel send 1 MiB reads, an eighth of the
requests (and Python-side work) for the same bytes.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

BIG_READ_KB = 1024


def mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the filesystem mounted at ``mountpoint``, from /proc/self/mountinfo.

    Not from ``stat()``: called by the FUSE daemon before it serves requests, a stat of its
    own mount point would wait for an answer only the caller could give.
    """
    target = os.path.abspath(mountpoint)  # realpath() would lstat the mount: same deadlock
    device = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # Octal escapes (\040 for a space) as the kernel writes them.
            point = fields[4].encode().decode("unicode_escape")
            if point == target:
                device = fields[2]  # the last (topmost) mount at that path wins
    return device


def set_readahead(mountpoint: str, kb: int = BIG_READ_KB) -> bool:
    """Set the read-ahead of the filesystem mounted at ``mountpoint``; False if not possible."""
    device = mount_device(mountpoint)
    if device is None:
        log.info("cannot find the mount at %s in /proc/self/mountinfo", mountpoint)
        return False
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.info("cannot set read-ahead of %s to %d KiB: %s", mountpoint, kb, e.strerror)
        return False
    return True
