"""Blob and chunk descriptions shared by the RAFS readers, the builder and the storage stack.

``BlobInfo`` is one entry of a bootstrap's blob table; ``ChunkInfo`` describes one chunk of file
data: where it lives in its blob (compressed) and in the blob's uncompressed view. RAFS reads
data only through ``BlobDevice.read`` (``nydusfs/storage/blobdevice.py``, re-exported here);
``BlobIoDesc`` records are what it passes: one contiguous piece of one chunk's uncompressed data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nydusfs.types import BlobFeatures, ChunkFlags, Cipher, Compressor, Digester

if TYPE_CHECKING:
    from nydusfs.storage.blobdevice import BlobDevice as BlobDevice


@dataclass(slots=True)
class ChunkInfo:
    """One chunk of a regular file (``RafsV5ChunkInfo`` fields, used by v5 and v6 alike)."""

    digest: bytes  # digest of the uncompressed chunk data ("block_id"), 32 bytes
    blob_index: int
    flags: ChunkFlags
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    file_offset: int
    index: int  # position of the chunk in its blob's chunk-info array
    crc32: int = 0

    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & ChunkFlags.COMPRESSED)


@dataclass(slots=True)
class BlobInfo:
    """One data blob referenced by a bootstrap (v6 ``RafsV6Blob`` fields; v5 fills a subset)."""

    blob_index: int
    blob_id: str
    chunk_size: int
    chunk_count: int
    compressor: Compressor
    digester: Digester
    features: BlobFeatures
    compressed_size: int
    uncompressed_size: int
    blob_toc_size: int = 0
    ci_compressor: Compressor = Compressor.NONE
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_digest: bytes = bytes(32)
    blob_meta_digest: bytes = bytes(32)
    blob_meta_size: int = 0
    cipher_iv: bytes = bytes(8)
    cipher: Cipher = Cipher.NONE
    # v5 blob table fields
    prefetch_offset: int = 0
    prefetch_size: int = 0
    # v6 device slot: start block when all devices are concatenated after the bootstrap
    mapped_blkaddr: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def has(self, feature: BlobFeatures) -> bool:
        return bool(self.features & feature)


@dataclass(frozen=True, slots=True)
class BlobIoDesc:
    """One piece of a read: ``size`` bytes at ``offset`` in ``chunk``'s *uncompressed* data.

    Upstream's ``BlobIoDesc`` (``storage/src/device.rs``) without the ``user_io`` flag: every
    descriptor RAFS passes is user I/O; read amplification is the cache's business.
    ``chunk.blob_index`` must equal ``blob.blob_index`` and ``offset + size`` must not pass
    ``chunk.uncompressed_size``; ``BlobDevice.read`` checks both.
    """

    blob: BlobInfo
    chunk: ChunkInfo
    offset: int
    size: int


def __getattr__(name: str) -> Any:
    # ``BlobDevice`` lives in blobdevice.py, which imports this module; resolving it lazily keeps
    # ``from nydusfs.storage.device import BlobDevice`` working without an import cycle.
    if name == "BlobDevice":
        from nydusfs.storage.blobdevice import BlobDevice

        return BlobDevice
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
