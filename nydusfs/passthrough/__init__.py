"""Passthrough filesystem: a host directory served through the ``FileSystem`` interface."""

from nydusfs.passthrough.fs import PassthroughFs

__all__ = ["PassthroughFs"]
