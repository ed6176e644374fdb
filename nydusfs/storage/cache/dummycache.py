"""The dummy cache (``dummycache`` or no cache type): nothing is kept, every read goes to the
backend.

As upstream's ``storage/src/cache/dummycache.rs`` it still inflates chunks and verifies them
(CRC32C when the chunk has one, the digest when ``validate`` is on). Beyond upstream, which reads
chunk by chunk, adjacent chunks of one read are merged into one ranged backend request (within
``rafs.batch_size``), and concurrent readers of one chunk share one fetch (the single-flight
logic of ``base.py``): the fetched bytes are handed to every waiter and then dropped. There is no
amplification (nothing would keep the extra chunks) and no prefetch (nothing to fill).

Concurrency: as ``base.BlobCache``; this class adds no state.
"""

from __future__ import annotations

from collections.abc import Sequence

from nydusfs.storage.cache.base import BlobCache, CacheContext, ChunkResult, Gate
from nydusfs.storage.cache.chunkmap import NoopChunkMap
from nydusfs.storage.device import BlobInfo, ChunkInfo


class DummyCache(BlobCache):
    """One blob read straight from the backend."""

    kind = "dummycache"
    fast_path = False
    amplifies = False

    def __init__(self, blob: BlobInfo, ctx: CacheContext) -> None:
        super().__init__(blob, ctx, NoopChunkMap())

    def _read_cached(self, chunks: Sequence[ChunkInfo]) -> dict[int, ChunkResult]:
        raise AssertionError("the dummy cache has no ready chunks")

    async def prefetch(self, chunks: Sequence[ChunkInfo], gate: Gate, batch_size: int) -> int:
        return 0
