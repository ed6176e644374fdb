"""nydusfs: a Python implementation of the nydus image service.

RAFS images (bootstrap plus chunked, compressed, deduplicated data blobs), the builder that makes
them, the storage stack that fetches their data lazily, and the daemon that serves them.
"""

from __future__ import annotations

__version__ = "0.1.0"
