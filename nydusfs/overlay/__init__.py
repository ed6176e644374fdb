"""Overlay filesystem: a writable upper directory over read-only lower layers."""

from nydusfs.overlay.fs import OverlayFs

__all__ = ["OverlayFs"]
