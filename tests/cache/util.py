"""Shared helpers for the cache tests: a built image, RAFS-like descriptor lists, configs."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from nydusfs.config import CacheConfig, ConfigV2, FileCacheConfig, PrefetchConfig, RafsConfig
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage.device import BlobInfo, BlobIoDesc, ChunkInfo
from nydusfs.types import Compressor

CHUNK_SIZE = 0x10000


def source_files() -> dict[str, bytes]:
    rng = random.Random(7)
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(300)
    ]
    text = b" ".join(rng.choice(words) for _ in range(120_000))[: 640 << 10]
    rand = rng.randbytes((4 << 20) + 1234)
    return {
        "rand": rand,  # 65 incompressible chunks, stored uncompressed
        "text": text,  # 10 compressible chunks, stored zstd-compressed
        "small": rng.randbytes(3000),
        "dup": rand[: 2 * CHUNK_SIZE],  # deduplicated against rand's first two chunks
    }


@dataclass
class Image:
    bootstrap: Path
    blob_dir: Path
    files: dict[str, bytes]

    def load(self) -> RafsSuper:
        return RafsSuper.load(self.bootstrap)


def build_image(root: Path) -> Image:
    src = root / "src"
    src.mkdir(parents=True)
    files = source_files()
    for name, data in files.items():
        (src / name).write_bytes(data)
    blob_dir = root / "blobs"
    blob_dir.mkdir()
    bootstrap = root / "bootstrap"
    build(
        BuildOptions(
            source=str(src),
            bootstrap=str(bootstrap),
            blob_dir=str(blob_dir),
            compressor=Compressor.ZSTD,
            chunk_size=CHUNK_SIZE,
            threads=2,
        )
    )
    return Image(bootstrap, blob_dir, files)


def chunks_of(sup: RafsSuper, name: str) -> list[ChunkInfo]:
    return list(sup.lookup_path("/" + name).chunks())


def descs_for(
    sup: RafsSuper, name: str, offset: int = 0, size: int | None = None
) -> list[BlobIoDesc]:
    """What RAFS would pass for ``read(name, offset, size)`` (files here have no holes)."""
    inode = sup.lookup_path("/" + name)
    end = inode.size if size is None else min(inode.size, offset + size)
    out = []
    for c in inode.chunks():
        start, stop = max(offset, c.file_offset), min(end, c.file_offset + c.uncompressed_size)
        if start < stop:
            out.append(BlobIoDesc(sup.blobs[c.blob_index], c, start - c.file_offset, stop - start))
    return out


def chunk_desc(blob: BlobInfo, chunk: ChunkInfo) -> list[BlobIoDesc]:
    return [BlobIoDesc(blob, chunk, 0, chunk.uncompressed_size)]


def make_config(
    cache_type: str = "blobcache",
    work_dir: Path | str | None = None,
    *,
    compressed: bool = False,
    validate: bool = False,
    batch_size: int = 0,
    prefetch: PrefetchConfig | None = None,
) -> ConfigV2:
    return ConfigV2(
        cache=CacheConfig(
            type=cache_type,
            compressed=compressed,
            validate=validate,
            prefetch=prefetch or PrefetchConfig(),
            filecache=FileCacheConfig(work_dir=str(work_dir)) if work_dir is not None else None,
        ),
        rafs=RafsConfig(batch_size=batch_size),
    )
