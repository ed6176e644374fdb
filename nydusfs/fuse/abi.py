"""The FUSE wire ABI (Linux ``include/uapi/linux/fuse.h``, protocol 7.x): numbers and layouts.

Pure data: opcodes, flags and one ``struct.Struct`` per message body, in the byte order of the
host (FUSE messages are native-endian; virtio-fs guests on x86 are little-endian like the host).
Every layout carries its size so the request parser can check a body is long enough before it
unpacks it. No I/O here; ``nydusfs.fuse.server`` builds on it.
"""

from __future__ import annotations

import enum
import struct

KERNEL_VERSION = 7
# The newest minor this codec speaks; the session runs at min(kernel's, ours). 7.31 is the
# first minor with every field we use (max_pages in INIT, the 64-byte fuse_init_out).
KERNEL_MINOR_VERSION = 31
MIN_MINOR_VERSION = 12  # older kernels (before Linux 2.6.31) are not served

ROOT_ID = 1
MIN_READ_BUFFER = 8192
MAX_NAME = 255  # NAME_MAX: longest file name a request may carry
MAX_XATTR_NAME = 255
MAX_XATTR_SIZE = 65536
MAX_SYMLINK = 4095  # PATH_MAX - 1


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50


# Requests that are never answered.
NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})

# INIT flags (fuse_init_in/out.flags; bits 32..63 travel in flags2 with FUSE_INIT_EXT)
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30

# open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1

GETATTR_FH = 1 << 0  # getattr_in.getattr_flags: fh is valid
FSYNC_FDATASYNC = 1 << 0
FATTR_FH = 1 << 6  # setattr_in.valid: fh is valid

# Notifications (out header ``error`` field, unique 0): written to /dev/fuse by the daemon.
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

# --- layouts ----------------------------------------------------------------------------------
IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique

# fuse_attr: ino size blocks atime mtime ctime, atimensec mtimensec ctimensec mode nlink uid
# gid rdev blksize flags
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")  # nodeid generation entry_valid attr_valid, nsecs
ATTR_OUT_HEAD = struct.Struct("=QII")  # attr_valid attr_valid_nsec dummy
ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size

INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags
INIT_IN_EXT = struct.Struct("=IIIII44x")  # ... flags2 unused[11]
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")  # 64 bytes
INIT_OUT_COMPAT_SIZE = 24  # minor < 23: up to max_write

FORGET_IN = struct.Struct("=Q")
BATCH_FORGET_IN = struct.Struct("=II")
FORGET_ONE = struct.Struct("=QQ")
GETATTR_IN = struct.Struct("=IIQ")
# valid pad fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode unused uid
# gid unused
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("=IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("=II")  # mode umask
RENAME_IN = struct.Struct("=Q")
RENAME2_IN = struct.Struct("=QII")
LINK_IN = struct.Struct("=Q")
OPEN_IN = struct.Struct("=II")  # flags open_flags
OPEN_OUT = struct.Struct("=QII")  # fh open_flags padding
CREATE_IN = struct.Struct("=IIII")  # flags mode umask open_flags
RELEASE_IN = struct.Struct("=QIIQ")
FLUSH_IN = struct.Struct("=QIIQ")
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("=QQIIQII")
WRITE_OUT = struct.Struct("=II")
FSYNC_IN = struct.Struct("=QII")
SETXATTR_IN = struct.Struct("=II")  # size flags
SETXATTR_IN_EXT = struct.Struct("=IIII")  # size flags setxattr_flags padding
GETXATTR_IN = struct.Struct("=II")
GETXATTR_OUT = struct.Struct("=II")
ACCESS_IN = struct.Struct("=II")
INTERRUPT_IN = struct.Struct("=Q")
# blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
KSTATFS = struct.Struct("=QQQQQIIII24x")
DIRENT_HEAD = struct.Struct("=QQII")  # ino off namelen type
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")  # parent namelen flags


def dirent_size(namelen: int) -> int:
    """Bytes a ``fuse_dirent`` with a name of ``namelen`` takes, padded to 8."""
    return (DIRENT_HEAD.size + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    return ENTRY_OUT_SIZE + dirent_size(namelen)
