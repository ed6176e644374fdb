"""``nydus-image check``: validate a bootstrap completely and, given its blobs, all of its data.

Upstream's validator rebuilds the builder tree from the bootstrap, which reads every inode,
attribute, symlink, xattr and chunk record (``validator.rs``). ``check_image`` does the same walk
through the ``RafsInode`` views and adds the cross-checks a reader needs to trust an image:

- every directory is reached once (``RafsSuper.walk`` refuses a cycle or a shared directory);
- chunk records point into the blob table, inside the blob's data and below its chunk count, with
  sizes no larger than the chunk size; uncompressed chunks have equal sizes;
- a file's chunks are ordered, do not overlap, stay inside the file and (unless the v5 inode
  records holes) cover it exactly;
- all paths of one hard-linked inode agree on its attributes and chunks, and there are no more
  of them than its link count.

With a ``LocalBlobReader`` each referenced blob file must exist with the size the blob table
records, and every distinct chunk is read, decompressed and digest-checked.

The first problem raises ``FormatError`` (``DigestMismatch`` for data) with a one-line message
naming the path, inode, blob or chunk. Errors other than ``NydusError`` coming out of a reader
(``struct.error``, ``IndexError``...) are reader bugs on malformed input; they are turned into
``FormatError`` here so the CLI still reports one line.

Nothing here blocks on anything but local file reads; it is meant for the CLI and tests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from nydusfs.errors import DigestMismatch, FormatError, NydusError
from nydusfs.rafs.inode import RafsInode
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage import meta
from nydusfs.storage import toc as blob_toc
from nydusfs.storage.device import BlobInfo, ChunkInfo
from nydusfs.storage.localblob import LocalBlobReader
from nydusfs.types import BlobFeatures, ChunkFlags

log = logging.getLogger(__name__)

# ``format_blob_features`` in upstream's storage/src/meta/mod.rs: fixed order, short names.
_FEATURE_WORDS = (
    (BlobFeatures.ALIGNED, "aligned"),
    (BlobFeatures.BATCH, "batch"),
    (BlobFeatures.CAP_TAR_TOC, "cap_toc"),
    (BlobFeatures.INLINED_CHUNK_DIGEST, "chunk-digest"),
    (BlobFeatures.CHUNK_INFO_V2, "chunk-v2"),
    (BlobFeatures.INLINED_FS_META, "fs-meta"),
    (BlobFeatures.SEPARATE, "separate"),
    (BlobFeatures.HAS_TAR_HEADER, "tar-header"),
    (BlobFeatures.HAS_TOC, "toc"),
    (BlobFeatures.ZRAN, "zran"),
    (BlobFeatures.ENCRYPTED, "encrypted"),
    (BlobFeatures.IS_CHUNKDICT_GENERATED, "is-chunkdict-generated"),
)
_FILE_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
_RUST_ESCAPES = {"\t": "\\t", "\r": "\\r", "\n": "\\n", "\\": "\\\\", '"': '\\"', "\0": "\\0"}
# ToC sections whose recorded sha256 check reads them whole (image.blob is hashed in pieces).
_TOC_SECTIONS = frozenset(
    {
        blob_toc.TOC_ENTRY_BLOB_META,
        blob_toc.TOC_ENTRY_BLOB_META_HEADER,
        blob_toc.TOC_ENTRY_BLOB_DIGEST,
        blob_toc.TOC_ENTRY_BOOTSTRAP,
    }
)
_HASH_PIECE = 1 << 20
# Failures a reader may leak on malformed input instead of FormatError.
_READER_BUGS = (struct.error, IndexError, KeyError, ValueError, OverflowError, RecursionError)


def format_blob_features(features: BlobFeatures) -> str:
    """Upstream's one-line feature list, e.g. ``aligned cap_toc chunk-digest tar-header toc``."""
    return " ".join(word for flag, word in _FEATURE_WORDS if features & flag)


def rust_debug_str(raw: bytes | str) -> str:
    """A name as Rust's ``{:?}`` shows an ``OsStr``: quoted, escaped, invalid bytes as ``\\xNN``."""
    if isinstance(raw, str):
        raw = os.fsencode(raw)
    out = ['"']
    text = raw.decode("utf-8", "surrogateescape")
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02X}")
        elif ch in _RUST_ESCAPES:
            out.append(_RUST_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cn", "Co", "Cs"):
            out.append(f"\\u{{{code:x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


@dataclass(slots=True)
class CheckReport:
    """What a successful check saw."""

    version: int
    blobs: list[BlobInfo]
    inodes: int = 0
    dirs: int = 0
    files: int = 0
    symlinks: int = 0
    others: int = 0
    hardlinks: int = 0
    chunks: int = 0
    data_checked: bool = False
    chunks_read: int = 0
    bytes_read: int = 0
    blob_sizes: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Seen:
    """The first path of an inode reached by several paths, and what it looked like there."""

    path: bytes
    paths: int
    signature: tuple[object, ...]


def check_image(
    sup: RafsSuper,
    reader: LocalBlobReader | None = None,
    *,
    verbose: Callable[[str], None] | None = None,
) -> CheckReport:
    """Validate ``sup`` (and its data through ``reader``); raise ``FormatError`` on a problem."""
    report = CheckReport(version=sup.meta.version, blobs=list(sup.blobs))
    chunks: dict[tuple[int, int, int, int, bytes], ChunkInfo] = {}
    try:
        _check_metadata(sup, report, chunks, verbose)
    except NydusError:
        raise
    except _READER_BUGS as e:
        raise FormatError(f"malformed bootstrap ({type(e).__name__}: {e})") from e
    if reader is not None:
        _check_data(sup, reader, report, chunks)
    return report


def _check_metadata(
    sup: RafsSuper,
    report: CheckReport,
    chunks: dict[tuple[int, int, int, int, bytes], ChunkInfo],
    verbose: Callable[[str], None] | None,
) -> None:
    shared: dict[int, _Seen] = {}
    for path, inode in sup.walk():
        where = f"{os.fsdecode(path)!r} (inode {inode.ino})"
        try:
            sig, nchunks = _check_inode(sup, inode, chunks, verbose, path)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        report.inodes += 1
        kind = stat.S_IFMT(inode.mode)
        if kind == stat.S_IFDIR:
            report.dirs += 1
            continue
        if kind == stat.S_IFREG:
            report.files += 1
        elif kind == stat.S_IFLNK:
            report.symlinks += 1
        else:
            report.others += 1
        seen = shared.get(inode.ino)
        if seen is None:
            shared[inode.ino] = _Seen(path, 1, sig)
            report.chunks += nchunks
            continue
        # The same inode again: only hard links of non-directories may do that.
        seen.paths += 1
        report.hardlinks += 1
        first = os.fsdecode(seen.path)
        if sig != seen.signature:
            raise FormatError(f"{where}: hard link of {first!r} with different attributes or data")
        if seen.paths > inode.nlink:
            raise FormatError(
                f"{where}: inode is reached by {seen.paths} paths but its link count is "
                f"{inode.nlink}"
            )


def _check_inode(
    sup: RafsSuper,
    inode: RafsInode,
    chunks: dict[tuple[int, int, int, int, bytes], ChunkInfo],
    verbose: Callable[[str], None] | None,
    path: bytes,
) -> tuple[tuple[object, ...], int]:
    """Read and check everything about one inode; return what its hard links must share and
    its number of chunks. Its distinct chunks are added to ``chunks``."""
    mode, uid, gid, nlink, size = inode.mode, inode.uid, inode.gid, inode.nlink, inode.size
    rdev, mtime, mtime_nsec = inode.rdev, inode.mtime, inode.mtime_nsec
    kind = stat.S_IFMT(mode)
    if kind not in _FILE_TYPES:
        raise FormatError(f"unknown file type in mode {mode:#o}")
    if nlink == 0:
        raise FormatError("link count is 0")
    if not 0 <= mtime_nsec < 1_000_000_000:
        raise FormatError(f"invalid mtime nanoseconds {mtime_nsec}")
    xattrs = inode.xattrs()
    target: bytes | None = None
    file_chunks: list[ChunkInfo] = []
    if kind == stat.S_IFLNK:
        target = inode.symlink()
        if not target:
            raise FormatError("symlink with an empty target")
    elif kind == stat.S_IFDIR:
        for name, _ino in inode.children():
            if not name or b"/" in name or name in (b".", b".."):
                raise FormatError(f"invalid directory entry name {name!r}")
    elif kind == stat.S_IFREG:
        file_chunks = list(inode.chunks())
        _check_chunks(sup, inode, file_chunks)
        for c in file_chunks:
            key = (c.blob_index, c.compressed_offset, c.compressed_size, c.uncompressed_size,
                   c.digest)  # fmt: skip
            chunks.setdefault(key, c)
    elif inode.chunks():
        raise FormatError(f"{_FILE_TYPES[kind]} inode has data chunks")
    if verbose is not None:
        link = "None" if target is None else f"Some({rust_debug_str(target)})"
        verbose(
            f"inode: {_FILE_TYPES[kind]} {rust_debug_str(path)}: ino {inode.ino} i_nlink {nlink} "
            f"i_size {size} i_blocks {inode.blocks} has_xattr {str(bool(xattrs)).lower()} "
            f"link {link} i_mtime {mtime} i_mtime_nsec {mtime_nsec}"
        )
        for c in file_chunks:
            verbose(f"\t chunk: {format_chunk(c)}")
    # What all hard links of one inode must agree on.
    digests = tuple((c.blob_index, c.digest, c.file_offset) for c in file_chunks)
    signature = (mode, uid, gid, nlink, size, rdev, mtime, mtime_nsec, tuple(xattrs), target,
                 digests)  # fmt: skip
    return signature, len(file_chunks)


def format_chunk(c: ChunkInfo) -> str:
    """Upstream's ``ChunkWrapper`` display."""
    text = (
        f"id {c.digest.hex()}, index {c.index}, blob_index {c.blob_index}, "
        f"file_offset {c.file_offset}, compressed {c.compressed_offset}/{c.compressed_size}, "
        f"uncompressed {c.uncompressed_offset}/{c.uncompressed_size}"
    )
    if c.flags & ChunkFlags.HAS_CRC32:
        text += f", crc32 {c.crc32:#x}"
    return text


def _check_chunks(sup: RafsSuper, inode: RafsInode, chunks: list[ChunkInfo]) -> None:
    size = inode.size
    # Only v5 inodes can record holes (RafsV5InodeFlags.HAS_HOLE); v6 files are dense.
    holes = bool(getattr(inode, "has_hole", False))
    pos = 0
    for i, c in enumerate(chunks):
        what = f"chunk {i} (blob index {c.blob_index}, chunk index {c.index})"
        if not 0 <= c.blob_index < len(sup.blobs):
            raise FormatError(f"{what} names a blob the image does not have")
        blob = sup.blobs[c.blob_index]
        if c.uncompressed_size == 0 or c.uncompressed_size > blob.chunk_size:
            raise FormatError(
                f"{what}: uncompressed size {c.uncompressed_size} is not in 1..{blob.chunk_size}"
            )
        if c.compressed_size == 0 and not c.flags & ChunkFlags.HOLECHUNK:
            raise FormatError(f"{what}: compressed size is 0")
        if not c.is_compressed and c.compressed_size != c.uncompressed_size:
            raise FormatError(
                f"{what}: uncompressed chunk has compressed size {c.compressed_size} and "
                f"uncompressed size {c.uncompressed_size}"
            )
        if blob.chunk_count and c.index >= blob.chunk_count:
            raise FormatError(f"{what}: index beyond the blob's {blob.chunk_count} chunks")
        data_end = meta.compressed_data_size(blob)
        if data_end and c.compressed_offset + c.compressed_size > data_end:
            raise FormatError(
                f"{what}: compressed extent {c.compressed_offset:#x}+{c.compressed_size:#x} "
                f"runs past the blob's data ({data_end:#x} bytes)"
            )
        if blob.uncompressed_size and (
            c.uncompressed_offset + c.uncompressed_size > blob.uncompressed_size
        ):
            raise FormatError(
                f"{what}: uncompressed extent {c.uncompressed_offset:#x}+"
                f"{c.uncompressed_size:#x} runs past the blob's {blob.uncompressed_size:#x} bytes"
            )
        if c.file_offset < pos or (not holes and c.file_offset != pos):
            raise FormatError(
                f"{what}: file offset {c.file_offset:#x}, expected "
                f"{'at least ' if holes else ''}{pos:#x}"
            )
        pos = c.file_offset + c.uncompressed_size
        if pos > size:
            raise FormatError(f"{what}: ends at {pos:#x}, beyond the file size {size:#x}")
    if not holes and pos != size:
        raise FormatError(f"chunks cover {pos} bytes of a {size}-byte file")


def _check_data(
    sup: RafsSuper,
    reader: LocalBlobReader,
    report: CheckReport,
    chunks: dict[tuple[int, int, int, int, bytes], ChunkInfo],
) -> None:
    by_blob: dict[int, list[ChunkInfo]] = {}
    for c in chunks.values():
        by_blob.setdefault(c.blob_index, []).append(c)
    for blob in sup.blobs:
        actual = reader.blob_size(blob)
        report.blob_sizes[blob.blob_id] = actual
        if blob.compressed_size and actual != blob.compressed_size:
            raise FormatError(
                f"blob {blob.blob_id}: file {reader.path_for(blob.blob_id)} is {actual} bytes, "
                f"the blob table records {blob.compressed_size}"
            )
    # Chunks first, so that corrupt data is reported as the chunk it breaks. Blob order keeps
    # the reads sequential within each file.
    for c in sorted(chunks.values(), key=lambda c: (c.blob_index, c.compressed_offset)):
        blob = sup.blobs[c.blob_index]
        data = reader.read_chunk(blob, c, validate=True)
        report.chunks_read += 1
        report.bytes_read += len(data)
    for blob in sup.blobs:
        try:
            _check_blob_meta(
                blob, reader, report.blob_sizes[blob.blob_id], by_blob.get(blob.blob_index, [])
            )
        except NydusError:
            raise
        except _READER_BUGS as e:
            raise FormatError(f"blob {blob.blob_id}: malformed blob meta ({e})") from e
    report.data_checked = True


def _check_blob_meta(
    blob: BlobInfo, reader: LocalBlobReader, size: int, chunks: list[ChunkInfo]
) -> None:
    """Check the blob's own metadata against the bootstrap's chunk records.

    nydusd locates v6 chunk data through the blob's chunk-info (CI) array, not the bootstrap,
    and takes chunk digests from the blob's digest table: both must agree with the bootstrap.
    The ToC, when there is one, must match the blob table's ``blob_toc_digest``.
    """

    def read_at(offset: int, length: int) -> bytes:
        return reader.read_at(blob, offset, length)

    where = f"blob {blob.blob_id}"
    toc: list[blob_toc.TocEntry] | None = None
    if blob.has(BlobFeatures.HAS_TOC):
        try:
            toc = blob_toc.read_toc(size, read_at, blob.blob_toc_size, blob.blob_toc_digest)
            for entry in toc:
                if entry.name == blob_toc.TOC_ENTRY_BLOB_RAW:
                    _check_raw_data_digest(blob, reader, entry)
                elif entry.name in _TOC_SECTIONS:
                    blob_toc.extract_toc_entry(entry, read_at)  # checks the section's sha256
        except FormatError as e:
            raise type(e)(f"{where}: ToC: {e}") from None
    if blob.ci_compressed_size and blob.ci_uncompressed_size:
        entries = meta.read_ci_entries(blob, read_at)
        for c in chunks:
            if c.index >= len(entries):
                raise FormatError(f"{where}: chunk {c.index} is missing from the chunk info")
            ent = entries[c.index]
            theirs = (ent.compressed_offset, ent.compressed_size, ent.uncompressed_offset,
                      ent.uncompressed_size)  # fmt: skip
            ours = (c.compressed_offset, c.compressed_size, c.uncompressed_offset,
                    c.uncompressed_size)  # fmt: skip
            if theirs != ours:
                raise FormatError(
                    f"{where}: chunk {c.index} is {ours} in the bootstrap but {theirs} in the "
                    "blob's chunk info (compressed offset/size, uncompressed offset/size)"
                )
    if toc is not None and blob.has(BlobFeatures.INLINED_CHUNK_DIGEST):
        digests = blob_toc.read_digest_table(toc, read_at, blob.chunk_count)
        for c in chunks:
            if c.index >= len(digests) or digests[c.index] != c.digest:
                raise FormatError(
                    f"{where}: digest of chunk {c.index} differs between the bootstrap and the "
                    "blob's digest table"
                )


def _check_raw_data_digest(
    blob: BlobInfo, reader: LocalBlobReader, entry: blob_toc.TocEntry
) -> None:
    """The ToC's ``image.blob`` digest: sha256 of the chunk data area and its tar header.

    Upstream's builder hashes everything it writes up to and including that tar header, so this
    covers the bytes between and around chunks that the per-chunk digests do not.
    """
    end = meta.compressed_data_size(blob)
    if blob.has(BlobFeatures.HAS_TAR_HEADER):
        end += meta.TAR_HEADER_SIZE
    h = hashlib.sha256()
    for offset in range(0, end, _HASH_PIECE):
        piece = reader.read_at(blob, offset, min(_HASH_PIECE, end - offset))
        if not piece:
            raise FormatError(f"blob data ends at {offset:#x}, the ToC covers {end:#x} bytes")
        h.update(piece)
    if any(entry.uncompressed_digest) and h.digest() != entry.uncompressed_digest:
        raise DigestMismatch(
            f"sha256 of the chunk data area [0, {end:#x}) does not match the ToC's image.blob "
            "digest"
        )
