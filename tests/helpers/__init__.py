"""Shared test helpers: directory snapshots and trees (``tree``), RAFS image snapshots
(``image``), and the kernel EROFS oracle (``erofs``)."""
