"""Chunk and metadata (de)compression with upstream's algorithms and keep-or-discard rule.

``compress`` is what the builder applies to every chunk, to the chunk-info array and to an
inlined bootstrap; ``decompress`` is what the cache applies to every payload it fetches. Both
follow ``nydus-utils::compress``:

* lz4_block is a raw LZ4 block without a size prefix (``LZ4_compress_default``), so a reader must
  know the uncompressed size, which the chunk info always records;
* zstd is one zstd frame at zstd's default level 3 (``zstd::DEFAULT_COMPRESSION_LEVEL``), with
  the content size in the frame header and no checksum;
* gzip is one gzip member (compressed at zlib's default level 6, mtime 0); native blobs do not
  use it, but stargz-converted chunks do;
* a compressed result is kept only if it is strictly smaller than its input, otherwise the raw
  data is stored and the chunk is flagged uncompressed.

``decompress`` never trusts its input: a corrupt payload, trailing garbage, or a payload that does
not inflate to exactly the expected size raises ``FormatError``, and no more than the expected
size is ever allocated for the output.

Concurrency: every function is thread-safe and releases the GIL inside the codec, so the builder
and the cache call them from worker threads. zstd (de)compression contexts are expensive to set
up and not thread-safe, so each thread keeps its own in a ``threading.local``.
"""

from __future__ import annotations

import threading
import zlib

import lz4.block
import zstandard

from nydusfs.errors import FormatError
from nydusfs.types import Compressor

__all__ = ["ZSTD_LEVEL", "compress", "decompress"]

ZSTD_LEVEL = 3
"""Upstream calls ``zstd::bulk::compress(src, zstd::DEFAULT_COMPRESSION_LEVEL)``, i.e. level 3."""

GZIP_LEVEL = 6
"""flate2's ``Compression::default()``."""

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_BLOCK_RLE = 1
_ZSTD_BLOCK_RESERVED = 3

Buffer = bytes | bytearray | memoryview

_local = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    cctx: zstandard.ZstdCompressor | None = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        _local.cctx = cctx
    return cctx


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = zstandard.ZstdDecompressor()
        _local.dctx = dctx
    return dctx


def compress(algo: Compressor, data: bytes) -> tuple[bytes, bool]:
    """Compress ``data``; return ``(payload, is_compressed)``.

    As upstream, the compressed form is returned only if it is strictly smaller than ``data``
    (``COMPRESSION_MINIMUM_RATIO`` is 100%); otherwise ``(data, False)``. Empty input and
    ``Compressor.NONE`` also give ``(data, False)``.
    """
    if not data or algo is Compressor.NONE:
        return data, False
    if algo is Compressor.LZ4_BLOCK:
        if len(data) > 0x7E00_0000:  # LZ4_MAX_INPUT_SIZE: upstream refuses larger input too
            raise ValueError(f"lz4_block cannot compress {len(data)} bytes in one block")
        payload = lz4.block.compress(data, mode="default", store_size=False)
    elif algo is Compressor.ZSTD:
        payload = _zstd_compressor().compress(data)
    elif algo is Compressor.GZIP:
        payload = _gzip_compress(data)
    else:  # pragma: no cover - Compressor is a closed enum
        raise ValueError(f"unknown compressor {algo!r}")
    if len(payload) >= len(data):
        return data, False
    return payload, True


def decompress(algo: Compressor, data: Buffer, uncompressed_size: int) -> bytes:
    """Inflate one payload to exactly ``uncompressed_size`` bytes.

    Raises ``FormatError`` if the payload is corrupt, is followed by trailing bytes (zstd,
    lz4_block), or inflates to any other size. gzip ignores bytes after the end of the member,
    because callers may hand it a generously sized window of a stargz layer, as upstream does.
    """
    if uncompressed_size < 0:
        raise FormatError(f"invalid uncompressed size {uncompressed_size}")
    if algo is Compressor.NONE:
        if len(data) != uncompressed_size:
            raise FormatError(
                f"uncompressed payload has {len(data)} bytes, expected {uncompressed_size}"
            )
        return bytes(data)
    if algo is Compressor.LZ4_BLOCK:
        out = _lz4_decompress(data, uncompressed_size)
    elif algo is Compressor.ZSTD:
        out = _zstd_decompress(data, uncompressed_size)
    elif algo is Compressor.GZIP:
        out = _gzip_decompress(data, uncompressed_size)
    else:  # pragma: no cover - Compressor is a closed enum
        raise FormatError(f"unknown compressor {algo!r}")
    if len(out) != uncompressed_size:
        raise FormatError(
            f"{algo.label} payload inflates to {len(out)} bytes, expected {uncompressed_size}"
        )
    return out


def _lz4_decompress(data: Buffer, size: int) -> bytes:
    if size == 0:
        # python-lz4 rejects a zero-sized destination; the only valid empty block is one token.
        if bytes(data) != b"\x00":
            raise FormatError("corrupt lz4_block payload for an empty chunk")
        return b""
    try:
        # LZ4_decompress_safe: must consume the whole input and never writes past ``size``.
        out: bytes = lz4.block.decompress(data, uncompressed_size=size)
    except (lz4.block.LZ4BlockError, ValueError, OverflowError) as err:
        raise FormatError(f"corrupt lz4_block payload: {err}") from None
    return out


def _zstd_frame_size(data: Buffer, has_checksum: bool) -> int:
    """Length of the zstd frame at the start of ``data``, found by walking its block headers."""
    view = memoryview(data)
    pos = zstandard.frame_header_size(data)
    while True:
        if pos + 3 > len(view):
            raise FormatError("zstd frame is truncated")
        header = int.from_bytes(view[pos : pos + 3], "little")
        kind = (header >> 1) & 0x3
        if kind == _ZSTD_BLOCK_RESERVED:
            raise FormatError("zstd frame has a reserved block type")
        pos += 3 + (1 if kind == _ZSTD_BLOCK_RLE else header >> 3)
        if header & 1:
            return pos + (4 if has_checksum else 0)


def _zstd_decompress(data: Buffer, size: int) -> bytes:
    if bytes(data[:4]) != _ZSTD_MAGIC:
        raise FormatError("payload is not a zstd frame")
    try:
        params = zstandard.get_frame_parameters(data)
        if params.dict_id:
            raise FormatError("zstd frame needs a dictionary")
        # python-zstandard ignores whatever follows the first frame; upstream's one-shot
        # decompression would not, and nothing writes more than one frame per payload.
        frame_size = _zstd_frame_size(data, params.has_checksum)
        if frame_size != len(data):
            raise FormatError(f"zstd payload has {len(data) - frame_size} bytes after its frame")
        # A known content size is what python-zstandard allocates, whatever max_output_size
        # says, so a lying header must be caught before decompressing.
        if params.content_size not in (size, zstandard.CONTENTSIZE_UNKNOWN):
            raise FormatError(f"zstd frame holds {params.content_size} bytes, expected {size}")
        out: bytes = _zstd_decompressor().decompress(data, max_output_size=max(size, 1))
    except zstandard.ZstdError as err:
        raise FormatError(f"corrupt zstd payload: {err}") from None
    return out


def _gzip_compress(data: bytes) -> bytes:
    # Header as flate2's GzEncoder writes it: no name, mtime 0, XFL 0, OS 255 (unknown).
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(data) + deflate.flush()
    trailer = (zlib.crc32(data) & 0xFFFF_FFFF).to_bytes(4, "little") + (
        len(data) & 0xFFFF_FFFF
    ).to_bytes(4, "little")
    return header + body + trailer


def _gzip_decompress(data: Buffer, size: int) -> bytes:
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        # One byte of headroom tells "exactly size" apart from "longer than size".
        out = inflate.decompress(data, size + 1)
    except zlib.error as err:
        raise FormatError(f"corrupt gzip payload: {err}") from None
    if len(out) > size:
        raise FormatError(f"gzip payload inflates to more than {size} bytes")
    if not inflate.eof:
        raise FormatError("gzip payload is truncated")
    return out
