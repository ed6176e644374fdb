"""The cache layer between ``BlobDevice`` and the blob backends.

* ``base.py``: ``BlobCache``, the read path every cache shares (readiness, single flight,
  merging, amplification, fetch, decode, verify) and ``CacheContext``.
* ``filecache.py``: ``FileCache`` (``blobcache``/``filecache``): ``<blob_id>.blob.data`` or
  ``.blob.raw``, ``.blob.meta`` and ``.blob.data.chunk_map`` under ``work_dir``.
* ``dummycache.py``: ``DummyCache``: no local storage.
* ``chunkmap.py``: the persistent readiness bitmap and the in-flight (single flight) state.
* ``merge.py``: merging chunks into ranged requests and read amplification (pure).
* ``prefetch.py``: prefetch workers, the bandwidth token bucket, the "foreground busy" signal.

Everything runs in the daemon's one ``trio.run``; blocking work goes to worker threads under the
``CapacityLimiter``s in ``CacheContext``. See each module for its await points.
"""

from __future__ import annotations

from nydusfs.storage.cache.base import BlobCache, CacheContext
from nydusfs.storage.cache.chunkmap import (
    BlobStateMap,
    ChunkMap,
    IndexedChunkMap,
    MemoryChunkMap,
    NoopChunkMap,
)
from nydusfs.storage.cache.dummycache import DummyCache
from nydusfs.storage.cache.filecache import FileCache
from nydusfs.storage.cache.prefetch import Foreground, Prefetcher, TokenBucket

__all__ = [
    "BlobCache",
    "BlobStateMap",
    "CacheContext",
    "ChunkMap",
    "DummyCache",
    "FileCache",
    "Foreground",
    "IndexedChunkMap",
    "MemoryChunkMap",
    "NoopChunkMap",
    "Prefetcher",
    "TokenBucket",
]
