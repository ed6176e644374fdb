"""``nydus-image create``: turn a source into a RAFS v6 bootstrap and one data blob.

Steps, in upstream's order: build the tree; number and place inodes (which fixes the order file
data goes into the blob: prefetched files first, then inode order); write the blob; write the
bootstrap that references it. Output files appear atomically (written under a temporary name,
then renamed), so an interrupted build leaves no half-written image behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from nydusfs.atomicfile import atomic_write
from nydusfs.errors import BuildError
from nydusfs.rafs.builder import directory
from nydusfs.rafs.builder.blob import BlobOptions, BlobWriter
from nydusfs.rafs.builder.node import WHITEOUT_SPECS, Node
from nydusfs.rafs.builder.prefetch import Prefetch
from nydusfs.rafs.builder.v6 import V6Bootstrap, V6Options
from nydusfs.storage.device import BlobInfo
from nydusfs.types import Compressor, Digester

log = logging.getLogger(__name__)

SOURCE_TYPES = {
    "dir-rafs": "dir",
    "directory": "dir",
    "tar-rafs": "tar",
    "targz-rafs": "targz",
}
DEFAULT_CHUNK_SIZE = 0x10_0000


@dataclass(slots=True)
class BuildOptions:
    source: str
    source_type: str = "dir-rafs"
    bootstrap: str | None = None
    blob: str | None = None
    blob_dir: str | None = None
    fs_version: int = 6
    compressor: Compressor = Compressor.ZSTD
    digester: Digester = Digester.BLAKE3
    chunk_size: int = DEFAULT_CHUNK_SIZE
    whiteout_spec: str = "oci"
    prefetch_policy: str = "none"
    prefetch_patterns: list[bytes] = field(default_factory=list)
    repeatable: bool = False
    blob_toc: bool = False
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: Callable[[int, int], None] | None = None  # (bytes done, bytes total)


@dataclass(slots=True)
class BuildResult:
    bootstrap: str
    blobs: list[BlobInfo]
    blob_paths: list[str]
    files: int
    data_bytes: int
    deduplicated_bytes: int
    seconds: float


def validate(opts: BuildOptions) -> None:
    if opts.source_type not in SOURCE_TYPES:
        raise BuildError(
            f"unsupported source type {opts.source_type!r} "
            f"(supported: {', '.join(sorted(SOURCE_TYPES))})"
        )
    if opts.fs_version != 6:
        raise BuildError("only --fs-version 6 images can be built (version 5 is read only)")
    cs = opts.chunk_size
    if cs & (cs - 1) or not 0x1000 <= cs <= 0x100_0000:
        raise BuildError(
            f"invalid chunk size {cs:#x}: must be a power of two in [0x1000, 0x1000000]"
        )
    if opts.whiteout_spec not in WHITEOUT_SPECS:
        raise BuildError(f"invalid whiteout spec {opts.whiteout_spec!r}")
    if opts.blob is None and opts.blob_dir is None:
        raise BuildError("both --blob and --blob-dir are missing")
    if opts.bootstrap is None and opts.blob_dir is None:
        raise BuildError("both --bootstrap and --blob-dir are missing")
    if opts.blob_dir is not None and not os.path.isdir(opts.blob_dir):
        raise BuildError(f"directory to store blobs does not exist: {opts.blob_dir}")
    if opts.compressor is Compressor.GZIP:
        raise BuildError("native RAFS blobs cannot be gzip compressed")


def build(opts: BuildOptions) -> BuildResult:
    """Build the image described by ``opts``; raises ``BuildError`` on bad input."""
    validate(opts)
    started = time.monotonic()
    kind = SOURCE_TYPES[opts.source_type]
    prefetch = Prefetch(opts.prefetch_policy, opts.prefetch_patterns)
    blob_out, blob_tmp = _open_blob_output(opts)
    try:
        writer = BlobWriter(
            blob_out,
            BlobOptions(
                compressor=opts.compressor,
                digester=opts.digester,
                chunk_size=opts.chunk_size,
                blob_toc=opts.blob_toc,
                threads=opts.threads,
            ),
        )
        try:
            if kind == "dir":
                root = directory.build_tree(opts.source, opts.whiteout_spec)
                boot = _assign(root, opts, prefetch)
                _dump_directory_data(boot, prefetch, writer, opts.progress)
            else:
                from nydusfs.rafs.builder import tarball

                root = tarball.build_tree(
                    opts.source, writer, opts.whiteout_spec, gzipped=kind == "targz",
                    progress=opts.progress,
                )  # fmt: skip
                boot = _assign(root, opts, prefetch)
            writer.flush()
            _share_hardlink_chunks(boot.nodes)
            info = writer.finish()
        except BaseException:
            writer.abort()
            raise
        blob_out.close()
        blobs, blob_paths = _publish_blob(opts, info, blob_tmp)
        bootstrap = boot.dump(blobs)
        boot_path = _publish_bootstrap(opts, bootstrap)
    except BaseException:
        blob_out.close()
        if blob_tmp is not None and os.path.exists(blob_tmp):
            os.unlink(blob_tmp)
        raise
    files = sum(1 for n in boot.nodes if n.is_reg())
    data = sum(n.size for n in boot.nodes if n.is_reg() and n.hardlink_of is None)
    return BuildResult(
        bootstrap=boot_path,
        blobs=blobs,
        blob_paths=blob_paths,
        files=files,
        data_bytes=data,
        deduplicated_bytes=writer.deduplicated_bytes,
        seconds=time.monotonic() - started,
    )


def _assign(root: Node, opts: BuildOptions, prefetch: Prefetch) -> V6Bootstrap:
    if opts.repeatable:
        for node in root.walk():
            node.uid = node.gid = 0
    boot = V6Bootstrap(
        root,
        V6Options(
            compressor=opts.compressor,
            digester=opts.digester,
            chunk_size=opts.chunk_size,
            explicit_uidgid=not opts.repeatable,
        ),
        prefetch,
    )
    boot.assign()
    return boot


def _dump_directory_data(
    boot: V6Bootstrap,
    prefetch: Prefetch,
    writer: BlobWriter,
    progress: Callable[[int, int], None] | None,
) -> None:
    order, _ = prefetch.data_order()
    total = sum(n.size for n in order if n.is_reg() and n.hardlink_of is None)
    done = 0
    for node in order:
        if not node.is_reg() or node.hardlink_of is not None or node.size == 0:
            continue
        assert node.src_path is not None
        writer.add_path(node, node.src_path)
        done += node.size
        if progress is not None:
            progress(done, total)


def _share_hardlink_chunks(nodes: Iterable[Node]) -> None:
    for node in nodes:
        if node.hardlink_of is not None:
            node.chunks = node.hardlink_of.chunks


def _open_blob_output(opts: BuildOptions) -> tuple[BinaryIO, str | None]:
    if opts.blob is not None:
        path = opts.blob
        if os.path.exists(path) and stat.S_ISFIFO(os.stat(path).st_mode):
            return open(path, "wb"), None
        directory_ = os.path.dirname(os.path.abspath(path))
    else:
        assert opts.blob_dir is not None
        directory_ = opts.blob_dir
    fd, tmp = tempfile.mkstemp(prefix=".nydus-blob-", dir=directory_)
    return os.fdopen(fd, "wb", buffering=1 << 20), tmp


def _publish_blob(
    opts: BuildOptions, info: BlobInfo | None, tmp: str | None
) -> tuple[list[BlobInfo], list[str]]:
    if info is None:
        # No file data: upstream writes no blob and leaves the blob table empty.
        if tmp is not None:
            os.unlink(tmp)
        return [], []
    if tmp is None:
        assert opts.blob is not None
        return [info], [opts.blob]
    target = (
        opts.blob if opts.blob is not None else os.path.join(opts.blob_dir or ".", info.blob_id)
    )
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return [info], [target]


def _publish_bootstrap(opts: BuildOptions, data: bytes) -> str:
    if opts.bootstrap is not None:
        target = opts.bootstrap
    else:
        assert opts.blob_dir is not None
        target = os.path.join(opts.blob_dir, hashlib.sha256(data).hexdigest())
    with atomic_write(target) as f:
        f.write(data)
    return target
