"""The few Linux syscalls Python's ``os`` module lacks, through ctypes.

``renameat2`` (``RENAME_NOREPLACE``, ``RENAME_EXCHANGE``, ``RENAME_WHITEOUT``) and
``fchownat``/``utimensat`` with ``AT_EMPTY_PATH``, which change the inode an ``O_PATH`` fd
stands for (``os.chown(fd)`` and ``os.utime(fd)`` use ``fchown``/``futimens``, which refuse
``O_PATH`` fds, and ``os.utime`` cannot leave one of the two times alone). All raise ``OSError``
with the syscall's errno. No state; safe from any thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int
_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_fchownat.restype = ctypes.c_int
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_utimensat.restype = ctypes.c_int


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int = 0) -> None:
    _check(_renameat2(old_dir, old, new_dir, new, flags), "renameat2")


def fchown_path_fd(fd: int, uid: int, gid: int) -> None:
    """Change the owner of the inode behind ``fd`` (an ``O_PATH`` fd; symlinks included).
    -1 leaves a field unchanged."""
    _check(
        _fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
        "fchownat",
    )


def _timespec(ns: int | None) -> _Timespec:
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


def utimens_path_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set the times of the inode behind ``fd`` (an ``O_PATH`` fd; symlinks included); None
    leaves a time unchanged. Needs a kernel that accepts ``AT_EMPTY_PATH`` here (EINVAL else)."""
    times = (_Timespec * 2)(_timespec(atime_ns), _timespec(mtime_ns))
    _check(_utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * 128),  # MAX_HANDLE_SZ
    ]


_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                               ctypes.POINTER(ctypes.c_int), ctypes.c_int]  # fmt: skip
_name_to_handle_at.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


def file_handle(fd: int) -> tuple[bytes, int] | None:
    """``(handle, mount id)`` of the inode behind ``fd`` (``name_to_handle_at`` with
    ``AT_EMPTY_PATH``), or None when its filesystem has no file handles."""
    handle = _FileHandle()
    handle.handle_bytes = 128
    mount_id = ctypes.c_int()
    if _name_to_handle_at(fd, b"", handle, ctypes.byref(mount_id), AT_EMPTY_PATH) < 0:
        return None
    return bytes(handle), mount_id.value


def open_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open the inode a ``file_handle`` names (``open_by_handle_at``; needs
    CAP_DAC_READ_SEARCH). ``mount_fd`` is a non-``O_PATH`` fd on the same mount."""
    fd = int(_open_by_handle_at(mount_fd, _FileHandle.from_buffer_copy(handle), flags))
    _check(fd, "open_by_handle_at")
    return fd
