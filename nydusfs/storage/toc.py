"""Sections of a blob-toc blob: GNU tar headers, the table of contents and the digest table.

A blob built with ``--features blob-toc`` is a "reverse tar": each section is followed by a
512-byte GNU tar header that names it, and the last one names the ToC, so a reader finds
everything from the blob's end. The ToC lists sections by name with their sha256;
``blob_toc_digest`` in the blob table is the sha256 of the ToC entries plus their tar header.
The chunk digest table (``blob.digest``) holds one 32-byte digest per chunk, in CI order.

Decoders raise ``FormatError``/``DigestMismatch`` on malformed input; functions are pure or take
a ``read_at(offset, size)`` callable, so they run in any thread.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nydusfs.errors import DigestMismatch, FormatError
from nydusfs.storage import compress
from nydusfs.storage.meta import DIGEST_SIZE, MAX_CHUNKS_PER_BLOB, TAR_HEADER_SIZE, ReadAt
from nydusfs.types import Compressor

TOC_ENTRY_SIZE = 128

TOC_ENTRY_BLOB_RAW = "image.blob"
TOC_ENTRY_BOOTSTRAP = "image.boot"
TOC_ENTRY_BLOB_META = "blob.meta"
TOC_ENTRY_BLOB_META_HEADER = "blob.meta.header"
TOC_ENTRY_BLOB_DIGEST = "blob.digest"
TOC_ENTRY_BLOB_TOC = "rafs.blob.toc"

# --- tar headers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TarHeader:
    name: str
    size: int


def _octal(value: int, width: int) -> bytes:
    # tar-rs ``octal_into``: zero-padded digits, NUL in the last byte.
    return f"{value:0{width - 1}o}".encode() + b"\0"


def make_tar_header(name: str, size: int) -> bytes:
    """The 512-byte header upstream writes after a section (``write_tar_header``).

    It is tar-rs ``Header::new_gnu()`` + ``set_path`` + ``set_entry_type(Regular)`` +
    ``set_size`` + ``set_cksum``: name, size, mtime 0 ("00000000000"), type '0', GNU magic
    "ustar  \\0", checksum as 7 octal digits and NUL; mode, uid, gid and the rest stay NUL bytes.
    """
    raw = name.encode()
    if not raw or len(raw) > 100 or b"\0" in raw:
        raise FormatError(f"invalid tar entry name {name!r}")
    if size < 0 or size >= 1 << 64:
        raise FormatError(f"invalid tar entry size {size}")
    # Sizes of 8 GiB and more do not fit 11 octal digits: GNU base-256, as tar-rs writes them.
    size_field = _octal(size, 12) if size < 8**11 else b"\x80\0\0\0" + size.to_bytes(8, "big")
    header = bytearray(TAR_HEADER_SIZE)
    header[0 : len(raw)] = raw
    header[124:136] = size_field
    header[136:148] = _octal(0, 12)
    header[156:157] = b"0"
    header[257:265] = b"ustar  \0"
    header[148:156] = b" " * 8
    header[148:156] = _octal(sum(header), 8)
    return bytes(header)


def parse_tar_header(buf: bytes | memoryview) -> TarHeader:
    """Parse a header as upstream's ToC reader does: GNU, regular file; returns name and size.

    The checksum is verified when present (builders before nydus 2.2 left it empty).
    """
    block = bytes(buf)
    if len(block) != TAR_HEADER_SIZE:
        raise FormatError(f"tar header must be 512 bytes, got {len(block)}")
    if block[257:265] != b"ustar  \0":
        raise FormatError("not a GNU tar header")
    if block[156:157] not in (b"0", b"\0"):
        raise FormatError(f"tar entry type {block[156:157]!r} is not a regular file")
    cksum = block[148:156].strip(b" \0")
    if cksum:
        expected = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        if not cksum.isdigit() or int(cksum, 8) != expected:
            raise FormatError("tar header checksum mismatch")
    field = block[124:136]
    if field[0] & 0x80:
        size = int.from_bytes(field[1:], "big")
    else:
        digits = field.strip(b" \0")
        if not digits or not all(0x30 <= c <= 0x37 for c in digits):
            raise FormatError(f"invalid tar size field {field!r}")
        size = int(digits, 8)
    try:
        name = block[:100].split(b"\0", 1)[0].decode()
    except UnicodeDecodeError:
        raise FormatError("tar entry name is not UTF-8") from None
    return TarHeader(name, size)


# --- table of contents ---------------------------------------------------------------------------

_TOC = struct.Struct("<II16s32sQQQ48x")
_TOC_FLAGS = {Compressor.NONE: 0x1, Compressor.ZSTD: 0x2, Compressor.LZ4_BLOCK: 0x4}
_TOC_COMPRESSORS = {flag: algo for algo, flag in _TOC_FLAGS.items()}


@dataclass(frozen=True, slots=True)
class TocEntry:
    """One 128-byte ToC entry: flags u32 (compressor), u32 reserved, name[16],
    sha256 of the uncompressed section, compressed offset/size, uncompressed size, 48 reserved."""

    name: str
    compressor: Compressor
    uncompressed_digest: bytes
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int

    def pack(self) -> bytes:
        raw = self.name.encode()
        if len(raw) > 16:
            raise FormatError(f"ToC entry name {self.name!r} is longer than 16 bytes")
        if self.compressor not in _TOC_FLAGS:
            raise FormatError(f"ToC entries cannot record compressor {self.compressor.label}")
        if len(self.uncompressed_digest) != DIGEST_SIZE:
            raise FormatError("ToC entry digest must be 32 bytes")
        try:
            return _TOC.pack(
                _TOC_FLAGS[self.compressor],
                0,
                raw,
                self.uncompressed_digest,
                self.compressed_offset,
                self.compressed_size,
                self.uncompressed_size,
            )
        except struct.error as err:
            raise FormatError(f"ToC entry {self.name!r} out of range: {err}") from None

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> TocEntry:
        if len(buf) != TOC_ENTRY_SIZE:
            raise FormatError(f"ToC entry must be 128 bytes, got {len(buf)}")
        flags, _, raw, digest, c_off, c_size, u_size = _TOC.unpack(buf)
        try:
            name = raw.rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise FormatError("ToC entry name is not UTF-8") from None
        algo = _TOC_COMPRESSORS.get(flags)
        if algo is None:
            raise FormatError(f"ToC entry {name!r} has unknown flags {flags:#x}")
        return cls(name, algo, digest, c_off, c_size, u_size)


def encode_toc(entries: Iterable[TocEntry]) -> bytes:
    return b"".join(e.pack() for e in entries)


def decode_toc(buf: bytes | memoryview) -> list[TocEntry]:
    if len(buf) % TOC_ENTRY_SIZE:
        raise FormatError(f"ToC of {len(buf)} bytes is not a multiple of 128")
    view = memoryview(buf)
    return [TocEntry.unpack(view[i : i + TOC_ENTRY_SIZE]) for i in range(0, len(view), 128)]


@dataclass(frozen=True, slots=True)
class Toc:
    """A blob's ToC. ``data`` (entries + tar header) is what ends the blob; ``digest`` and
    ``size`` are the blob table's ``blob_toc_digest`` and ``blob_toc_size``."""

    entries: list[TocEntry]
    data: bytes

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.data).digest()

    @property
    def size(self) -> int:
        return len(self.data)

    def get(self, name: str) -> TocEntry | None:
        return next((e for e in self.entries if e.name == name), None)


def build_toc(entries: Sequence[TocEntry]) -> Toc:
    """Serialize ToC entries and their ``rafs.blob.toc`` tar header (upstream ``dump_toc``).

    Upstream records, in this order (blob_offset is 0 except when several layers share a blob):

    * ``image.blob``: none; sha256 of everything written so far *including* the image.blob tar
      header; offset blob_offset; size of the chunk data; the blob's uncompressed size. (nydus
      2.2 wrote the end of the chunk data as offset; fixed upstream in PR #1096.)
    * ``blob.meta``: the CI compressor; sha256 of the uncompressed CI data; at ci_offset, the CI
      payload's compressed and uncompressed sizes (see ``blob_meta_toc_entries``).
    * ``blob.meta.header``: none; sha256 of the 4 KiB header; right after the CI payload.
    * ``blob.digest``: none; sha256 of the digest table; its offset and size.
    * ``image.boot`` (inlined bootstrap only): zstd unless that does not shrink it; sha256 of
      the uncompressed bootstrap; its offset, stored and uncompressed sizes.
    """
    body = encode_toc(entries)
    return Toc(list(entries), body + make_tar_header(TOC_ENTRY_BLOB_TOC, len(body)))


def blob_meta_toc_entries(
    ci_data: bytes, ci_offset: int, ci_payload_size: int, ci_compressor: Compressor, header: bytes
) -> tuple[TocEntry, TocEntry]:
    """The ``blob.meta`` and ``blob.meta.header`` entries for a CI array written at
    ``ci_offset`` as a payload of ``ci_payload_size`` bytes followed by ``header``."""
    return (
        TocEntry(
            TOC_ENTRY_BLOB_META,
            ci_compressor,
            hashlib.sha256(ci_data).digest(),
            ci_offset,
            ci_payload_size,
            len(ci_data),
        ),
        TocEntry(
            TOC_ENTRY_BLOB_META_HEADER,
            Compressor.NONE,
            hashlib.sha256(header).digest(),
            ci_offset + ci_payload_size,
            len(header),
            len(header),
        ),
    )


def parse_toc(buf: bytes, expected_digest: bytes | None = None) -> Toc:
    """Parse a ToC from a tail of its blob whose last 512 bytes are the ``rafs.blob.toc`` header.

    ``expected_digest`` (the blob table's ``blob_toc_digest``) is checked unless absent or zero.
    """
    if len(buf) < TAR_HEADER_SIZE:
        raise FormatError(f"blob ToC area of {len(buf)} bytes is too small")
    end = len(buf) - TAR_HEADER_SIZE
    header = parse_tar_header(buf[end:])
    if header.name != TOC_ENTRY_BLOB_TOC:
        raise FormatError(f"last tar header names {header.name!r}, not {TOC_ENTRY_BLOB_TOC!r}")
    if header.size > end or header.size % TOC_ENTRY_SIZE:
        raise FormatError(f"invalid ToC size {header.size} in tar header")
    start = end - header.size
    toc = Toc(decode_toc(buf[start:end]), bytes(buf[start:]))
    if expected_digest and any(expected_digest) and toc.digest != expected_digest:
        raise DigestMismatch(
            f"blob ToC digest {toc.digest.hex()} does not match {expected_digest.hex()}"
        )
    return toc


def read_toc_area(blob_size: int, read_at: ReadAt, toc_size: int = 0) -> bytes:
    """Read the blob tail holding the ToC: ``toc_size`` bytes if the blob table gives it, else
    (auto-detect, as ``read_toc_header``) the last 4 KiB, or all of a smaller blob rounded
    down to 128 bytes."""
    if toc_size:
        if not 512 <= toc_size <= 0x10000 or toc_size % 128 or toc_size > blob_size:
            raise FormatError(f"invalid blob ToC size {toc_size}")
        size = toc_size
    else:
        size = 0x1000 if blob_size > 0x1000 else blob_size >> 7 << 7
    data = read_at(blob_size - size, size)
    if len(data) != size:
        raise FormatError(f"short read of blob ToC ({len(data)}/{size} bytes)")
    return data


def read_toc(
    blob_size: int, read_at: ReadAt, toc_size: int = 0, expected_digest: bytes | None = None
) -> list[TocEntry]:
    """The ToC entries of a blob, found through its trailing ``rafs.blob.toc`` tar header."""
    return parse_toc(read_toc_area(blob_size, read_at, toc_size), expected_digest).entries


def extract_toc_entry(entry: TocEntry, read_at: ReadAt, limit: int = 1 << 30) -> bytes:
    """Read, inflate and verify one ToC section (``blob.digest``, ``image.boot``, ...).

    The sha256 is checked unless recorded as zero. (``image.blob`` describes the chunk data, it
    is not an extractable section.)
    """
    if entry.uncompressed_size > limit or entry.compressed_size > limit:
        raise FormatError(f"ToC entry {entry.name!r} is larger than {limit} bytes")
    if entry.compressor is Compressor.NONE and entry.compressed_size != entry.uncompressed_size:
        raise FormatError(f"invalid ToC entry {entry.name!r}: sizes differ but not compressed")
    payload = read_at(entry.compressed_offset, entry.compressed_size)
    if len(payload) != entry.compressed_size:
        raise FormatError(f"short read of ToC entry {entry.name!r}")
    data = compress.decompress(entry.compressor, payload, entry.uncompressed_size)
    if any(entry.uncompressed_digest) and hashlib.sha256(data).digest() != (
        entry.uncompressed_digest
    ):
        raise DigestMismatch(f"ToC entry {entry.name!r}: content digest mismatch")
    return data


# --- chunk digest table --------------------------------------------------------------------------


def encode_digest_table(digests: Iterable[bytes]) -> bytes:
    """``blob.digest``: each chunk's 32-byte digest, in CI order, uncompressed."""
    table = list(digests)
    if any(len(d) != DIGEST_SIZE for d in table):
        raise FormatError("chunk digests must be 32 bytes")
    return b"".join(table)


def decode_digest_table(buf: bytes, chunk_count: int) -> list[bytes]:
    if len(buf) != chunk_count * DIGEST_SIZE:
        raise FormatError(f"digest table has {len(buf)} bytes, expected {chunk_count} x 32")
    return [buf[i : i + DIGEST_SIZE] for i in range(0, len(buf), DIGEST_SIZE)]


def read_digest_table(toc: Iterable[TocEntry], read_at: ReadAt, chunk_count: int) -> list[bytes]:
    """The chunk digests of a blob with ``INLINED_CHUNK_DIGEST``, through its ToC."""
    entry = next((e for e in toc if e.name == TOC_ENTRY_BLOB_DIGEST), None)
    if entry is None:
        raise FormatError("blob ToC has no blob.digest entry")
    limit = MAX_CHUNKS_PER_BLOB * DIGEST_SIZE
    return decode_digest_table(extract_toc_entry(entry, read_at, limit), chunk_count)
