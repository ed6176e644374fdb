"""The multi-mount VFS: a pseudo root with filesystems mounted at sub-paths."""

from nydusfs.vfs.vfs import MOUNT_SHIFT, Vfs

__all__ = ["MOUNT_SHIFT", "Vfs"]
