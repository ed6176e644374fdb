"""``nydus-image inspect`` and ``stat``: what an image contains, in upstream's words.

``Inspector`` runs the commands of upstream's inspect REPL (``inspect.rs``) against a loaded
bootstrap and keeps the current directory between them. Each command returns the text upstream
prints and, in request mode (``-R``), the JSON value upstream serialises (``stats``, ``blobs`` and
``prefetch`` have one; the others print text and have none). ``ImageStat`` computes
``stat.rs``'s statistics over one or more bootstraps, with its chunk deduplication table.

Formats are upstream's, including its Rust ``Debug`` renderings: names are quoted with Rust's
escapes (``rust_debug_str``) and flag sets use the ``bitflags`` 1.x ``A | B`` form. Where upstream
is wrong the output is right instead: a chunk's file offset is its recorded offset (not
``index * chunk_size``, which is wrong for v5 files with holes).

The module never prints; the CLI does. Nothing here blocks beyond reading the mapped bootstrap.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nydusfs.errors import NydusError
from nydusfs.rafs.check import rust_debug_str
from nydusfs.rafs.inode import RafsInode
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage.device import ChunkInfo
from nydusfs.storage.meta import compressed_data_size
from nydusfs.types import Cipher, Digester, SuperFlags

# bitflags 1.x prints set flags in declaration order; these are upstream's declarations.
_SUPER_FLAG_NAMES = [(int(f), f.name or "") for f in SuperFlags] + [
    (0x0400_0000 << i, f"PRESERVED_COMPAT_{5 - i}") for i in range(6)
]
_BLOB_FEATURE_NAMES = [
    (0x1, "ALIGNED"), (0x2, "INLINED_FS_META"), (0x4, "CHUNK_INFO_V2"), (0x8, "ZRAN"),
    (0x10, "SEPARATE"), (0x20, "INLINED_CHUNK_DIGEST"), (0x40, "TARFS"), (0x80, "BATCH"),
    (0x100, "ENCRYPTED"), (0x1000_0000, "HAS_TAR_HEADER"), (0x2000_0000, "HAS_TOC"),
    (0x4000_0000, "CAP_TAR_TOC"), (0x8000_0000, "_V5_NO_EXT_BLOB_TABLE"),
    (0x200, "IS_CHUNKDICT_GENERATED"), (0x400, "IS_SEPARATED_WITH_PREFETCH_FILES"),
    (0x800, "EXTERNAL"),
]  # fmt: skip
_CIPHER_NAMES = {
    Cipher.NONE: "None",
    Cipher.AES128_XTS: "Aes128Xts",
    Cipher.AES256_XTS: "Aes256Xts",
    Cipher.AES256_GCM: "Aes256Gcm",
}
_DIGESTER_NAMES = {Digester.BLAKE3: "Blake3", Digester.SHA256: "Sha256"}

# Upstream's help text, typo and trailing blanks included.
USAGE = (
    "\n"
    "    stats:              Display RAFS filesystesm metadata\n"
    "    ls:                 Show files in current directory\n"
    "    cd DIR:             Change current directory\n"
    "    stat FILE_NAME:     Show particular information of RAFS file\n"
    "    blobs:              Show blob table\n"
    "    prefetch:           Show prefetch table\n"
    "    chunk OFFSET:       List basic info of a single chunk together with a list of files "
    "that share it\n"
    "    icheck INODE:       Show path of the inode and basic information\n"
    "    exit:               Exit\n"
    "        \n"
)
_LS_SIGNS = {stat.S_IFREG: "-", stat.S_IFDIR: "d", stat.S_IFLNK: "l"}


def bitflags_debug(value: int, names: Iterable[tuple[int, str]]) -> str:
    """Render a flag set as Rust's bitflags 1.x ``Debug``: ``A | B | 0x40`` or ``(empty)``."""
    parts = []
    known = 0
    for bit, name in names:
        known |= bit
        if bit and value & bit == bit:
            parts.append(name)
    if value & ~known:
        parts.append(f"0x{value & ~known:x}")
    return " | ".join(parts) or "(empty)"


def table_layout(sup: RafsSuper) -> dict[str, int]:
    """Offsets and sizes of the bootstrap's tables, as upstream's ``RafsSuperMeta`` has them."""
    from nydusfs.rafs.v5 import RafsV5Super
    from nydusfs.rafs.v6 import RafsV6Super

    if isinstance(sup, RafsV6Super):
        return {
            "blob_table_offset": sup.blob_table_offset,
            "blob_table_size": sup.blob_table_size,
            "prefetch_table_offset": sup.prefetch_table_offset,
            "prefetch_table_entries": sup.prefetch_table_size // 4,
            "chunk_table_offset": sup.chunk_table_offset,
            "chunk_table_size": sup.chunk_table_size,
        }
    if isinstance(sup, RafsV5Super):
        sb = sup.superblock
        return {
            "blob_table_offset": sb.blob_table_offset,
            "blob_table_size": sb.blob_table_size,
            "prefetch_table_offset": sb.prefetch_table_offset,
            "prefetch_table_entries": sb.prefetch_table_entries,
            "chunk_table_offset": 0,
            "chunk_table_size": 0,
        }
    raise NydusError(f"unknown bootstrap reader {type(sup).__name__}")


class InspectExit(Exception):
    """``exit`` or ``q``: leave the REPL."""


class InspectUsageError(NydusError):
    """A command the inspector does not know, or a bad argument. ``text`` is what upstream shows."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


class Inspector:
    """The state (current directory) and commands of ``nydus-image inspect``."""

    def __init__(self, sup: RafsSuper, *, request_mode: bool = False) -> None:
        self.sup = sup
        self.request_mode = request_mode
        self.cwd: list[tuple[bytes, int]] = [(b"/", sup.meta.root_ino)]
        self._paths: dict[int, list[bytes]] | None = None

    # --- dispatch ---------------------------------------------------------------------------
    def execute(self, line: str) -> tuple[str, Any]:
        """Run one command line; return the text to print and the JSON value (or None)."""
        words = line.split()
        if not words:
            return "", None
        cmd, arg = words[0], (words[1] if len(words) > 1 else None)
        if cmd == "help":
            raise InspectUsageError("help is not supported in inspect request mode", USAGE + "\n")
        if cmd in ("exit", "q"):
            raise InspectExit
        if arg is None and cmd in ("stats", "ls", "blobs", "prefetch"):
            return {
                "stats": self.cmd_stats,
                "ls": self.cmd_ls,
                "blobs": self.cmd_blobs,
                "prefetch": self.cmd_prefetch,
            }[cmd]()
        if arg is not None and cmd in ("cd", "stat"):
            return self.cmd_cd(arg) if cmd == "cd" else self.cmd_stat(arg)
        if arg is not None and cmd in ("chunk", "icheck"):
            try:
                number = int(arg)
                if number < 0:
                    raise ValueError(arg)
            except ValueError:
                what = "OFFSET" if cmd == "chunk" else "INODE"
                hint = "Is it a valid u64 value?" if cmd == "chunk" else "Is it a inode number?"
                raise InspectUsageError(
                    f"invalid arguments in inspect request `{line.strip()}`",
                    f"Wrong {what} is specified. {hint}\n",
                ) from None
            return self.cmd_chunk(number) if cmd == "chunk" else self.cmd_icheck(number)
        raise InspectUsageError(
            f"unsupported inspect request `{line.strip()}`",
            f"Unsupported command: {cmd}\n{USAGE}\n",
        )

    @property
    def cwd_inode(self) -> RafsInode:
        return self.sup.inode(self.cwd[-1][1])

    # --- commands ---------------------------------------------------------------------------
    def cmd_stats(self) -> tuple[str, Any]:
        meta = self.sup.meta
        if self.request_mode:
            return "", {"inodes_count": meta.inodes_count}
        t = table_layout(self.sup)
        text = (
            "\n"
            f"    Version:                {meta.version}\n"
            f"    Inodes Count:           {meta.inodes_count}\n"
            f"    Chunk Size:             {meta.chunk_size // 1024}KB\n"
            f"    Root Inode:             {meta.root_ino}\n"
            f"    Flags:                  {bitflags_debug(meta.flags, _SUPER_FLAG_NAMES)}\n"
            f"    Blob table offset:      0x{t['blob_table_offset']:x}\n"
            f"    Blob table size:        0x{t['blob_table_size']:x}\n"
            f"    Prefetch table offset:  0x{t['prefetch_table_offset']:x}\n"
            f"    Prefetch table entries: 0x{t['prefetch_table_entries']:x}\n"
            f"    Chunk table offset:     0x{t['chunk_table_offset']:x}\n"
            f"    Chunk table size:       0x{t['chunk_table_size']:x}\n"
            "    \n"
        )
        return text, None

    def cmd_ls(self) -> tuple[str, Any]:
        lines = []
        for name, ino in self.cwd_inode.children():
            child = self.sup.inode(ino)
            sign = _LS_SIGNS.get(stat.S_IFMT(child.mode), " ")
            lines.append(f"{sign}    {ino:<8} {rust_debug_str(name)}\n")
        return "".join(lines), None

    def cmd_cd(self, name: str) -> tuple[str, Any]:
        if name == ".":
            return "", None
        if name == "..":
            if len(self.cwd) > 1:
                self.cwd.pop()
            return "", None
        raw = os.fsencode(name)
        ino = self.cwd_inode.lookup(raw)
        if ino is not None and self.sup.inode(ino).is_dir():
            self.cwd.append((raw, ino))
            return "", None
        # Upstream's message, with its empty reason when the name does not exist.
        return f"{name} is {'not a directory' if ino is not None else ''}\n", None

    def cmd_stat(self, name: str) -> tuple[str, Any]:
        if name == ".":
            inode = self.cwd_inode
            return self._stat_text(self.cwd[-1][0], inode, inode.parent), None
        raw = os.fsencode(name)
        ino = self.cwd_inode.lookup(raw)
        if ino is None:
            raise NydusError(f"no file named {name!r} in the current directory")
        inode = self.sup.inode(ino)
        text = self._stat_text(raw, inode, self.cwd[-1][1])
        if inode.is_reg():
            text += "  Chunk list:\n" + "".join(
                self._chunk_text(i, c) for i, c in enumerate(inode.chunks())
            )
        return text, None

    def cmd_blobs(self) -> tuple[str, Any]:
        if self.request_mode:
            return "", [
                {
                    "blob_id": b.blob_id,
                    "readahead_offset": b.prefetch_offset,
                    "readahead_size": b.prefetch_size,
                    "decompressed_size": b.uncompressed_size,
                    "compressed_size": b.compressed_size,
                }
                for b in self.sup.blobs
            ]
        parts = []
        for b in self.sup.blobs:
            parts.append(
                "\n"
                f"Blob Index:             {b.blob_index}\n"
                f"Blob ID:                {b.blob_id}\n"
                f"Raw Blob ID:            {b.blob_id}\n"
                f"Blob Size:              {b.compressed_size}\n"
                f"Compressed Data Size:   {compressed_data_size(b)}\n"
                f"Uncompressed Data Size: {b.uncompressed_size}\n"
                f"Mapped Block Address:   {b.mapped_blkaddr}\n"
                f"Features:               {bitflags_debug(b.features, _BLOB_FEATURE_NAMES)}\n"
                f"Compressor:             {b.compressor.label}\n"
                f"Digester:               {_DIGESTER_NAMES[b.digester]}\n"
                f"Cipher:                 {_CIPHER_NAMES[b.cipher]}\n"
                f"Chunk Size:             0x{b.chunk_size:x}\n"
                f"Chunk Count:            {b.chunk_count}\n"
                f"Prefetch Table Offset:  {b.prefetch_offset}\n"
                f"Prefetch Table Size:    {b.prefetch_size}\n"
                f"Meta Compressor:        {b.ci_compressor.label}\n"
                f"Meta Offset:            {b.ci_offset}\n"
                f"Meta Compressed Size:   {b.ci_compressed_size}\n"
                f"Meta Uncompressed Size: {b.ci_uncompressed_size}\n"
                f"ToC Digest:             {b.blob_toc_digest.hex()}\n"
                f"ToC Size:               {b.blob_toc_size}\n"
                f"RAFS Blob Digest:       {b.blob_meta_digest.hex()}\n"
                f"RAFS Blob Size:         {b.blob_meta_size}\n"
            )
        return "".join(parts), None

    def cmd_prefetch(self) -> tuple[str, Any]:
        inos = self.sup.prefetch_table
        if self.request_mode:
            return "", [
                {"inode": ino, "path": [os.fsdecode(p) for p in self.paths_of(ino)]} for ino in inos
            ]
        entries = table_layout(self.sup)["prefetch_table_entries"]
        lines = [f"Total Prefetching Files: {entries}\n"]
        for ino in inos:
            joined = b" ".join(self.paths_of(ino))
            lines.append(f"Inode Number:{ino:10} | Path: {rust_debug_str(joined)} \n")
        return "".join(lines), None

    def cmd_chunk(self, offset: int) -> tuple[str, Any]:
        parts = []
        for path, inode in self.sup.walk():
            if not inode.is_reg():
                continue
            for c in inode.chunks():
                if c.compressed_offset != offset:
                    continue
                parent, _, name = path.rpartition(b"/")
                parts.append(
                    "\n"
                    f"File: {os.fsdecode(name):32} Parent Path: {os.fsdecode(parent or b'/'):32}\n"
                    f"Compressed Offset: {c.compressed_offset}, "
                    f"Compressed Size: {c.compressed_size}\n"
                    f"Decompressed Offset: {c.uncompressed_offset}, "
                    f"Decompressed Size: {c.uncompressed_size}\n"
                    f"Chunk ID: {c.digest.hex():50},\n"
                    f"Blob ID: {self._blob_id(c)}\n"
                    "\n"
                )
        return "".join(parts), None

    def cmd_icheck(self, ino: int) -> tuple[str, Any]:
        inode = self.sup.inode(ino)
        parts = []
        for path in self.paths_of(ino):
            parent_ino = inode.parent if inode.is_dir() else self._parent_of(path)
            parts.append(os.fsdecode(path) + "\n")
            parts.append(self._stat_text(path.rpartition(b"/")[2] or b"/", inode, parent_ino))
        return "".join(parts), None

    # --- helpers ----------------------------------------------------------------------------
    def paths_of(self, ino: int) -> list[bytes]:
        """Every path of ``ino`` (hard links have several), from one cached walk."""
        if self._paths is None:
            paths: dict[int, list[bytes]] = {}
            for path, inode in self.sup.walk():
                paths.setdefault(inode.ino, []).append(path)
            self._paths = paths
        return self._paths.get(ino, [])

    def _parent_of(self, path: bytes) -> int:
        return self.sup.lookup_path(path.rpartition(b"/")[0] or b"/").ino

    def _blob_id(self, c: ChunkInfo) -> str:
        if not 0 <= c.blob_index < len(self.sup.blobs):
            raise NydusError(f"can not find blob by index: {c.blob_index}")
        return self.sup.blobs[c.blob_index].blob_id

    def _stat_text(self, name: bytes, inode: RafsInode, parent: int) -> str:
        return (
            "\n"
            f"Inode Number:       {inode.ino}\n"
            f"Name:               {rust_debug_str(name)}\n"
            f"Size:               {inode.size}\n"
            f"Parent:             {parent}\n"
            f"Mode:               0x{inode.mode:X}\n"
            f"Permissions:        {inode.mode:o}\n"
            f"Nlink:              {inode.nlink}\n"
            f"UID:                {inode.uid}\n"
            f"GID:                {inode.gid}\n"
            f"Mtime:              {inode.mtime}\n"
            f"MtimeNsec:          {inode.mtime_nsec}\n"
            f"Blocks:             {inode.blocks}\n"
        )

    def _chunk_text(self, i: int, c: ChunkInfo) -> str:
        return (
            f"        {i} ->\n"
            f"        file offset: {c.file_offset}, chunk index: {c.index}\n"
            f"        compressed size: {c.compressed_size}, "
            f"decompressed size: {c.uncompressed_size}\n"
            f"        compressed offset: {c.compressed_offset}, "
            f"decompressed offset: {c.uncompressed_offset}\n"
            f"        blob id: {self._blob_id(c)}\n"
            f"        chunk id: {c.digest.hex()}\n"
            "    \n"
        )


# --- nydus-image stat ---------------------------------------------------------------------------


@dataclass(slots=True)
class BlobUsage:
    """How one image uses one blob (nydusfs addition to upstream's statistics)."""

    blob_id: str
    chunk_count: int = 0  # from the blob table
    chunks: set[tuple[int, int, bytes]] = field(default_factory=set)  # distinct referenced
    chunk_refs: int = 0
    comp_size: int = 0
    uncomp_size: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "blob_id": self.blob_id,
            "chunk_count": self.chunk_count,
            "referenced_chunks": len(self.chunks),
            "chunk_refs": self.chunk_refs,
            "comp_size": self.comp_size,
            "uncomp_size": self.uncomp_size,
        }


@dataclass(slots=True)
class ImageInfo:
    """Upstream's ``ImageInfo`` (field order is its JSON order), plus per-blob usage."""

    dirs: int = 0
    files: int = 0
    symlinks: int = 0
    chunks: int = 0
    file_size: int = 0
    comp_size: int = 0
    uncomp_size: int = 0
    padding_size: int = 0
    chunk_sizes: list[int] = field(default_factory=lambda: [0] * 9)
    file_sizes: list[int] = field(default_factory=lambda: [0] * 45)
    dedup_chunks: int = 0
    dedup_comp_size: int = 0
    dedup_uncomp_size: int = 0
    own_chunks: int = 0
    own_comp_size: int = 0
    own_uncomp_size: int = 0
    ref_chunks: int = 0
    ref_comp_size: int = 0
    ref_uncomp_size: int = 0
    blobs: dict[str, BlobUsage] = field(default_factory=dict)
    # For the dedup ratio: bytes of chunk data files reference, and distinct digests' sizes.
    referenced_bytes: int = 0
    distinct: dict[bytes, int] = field(default_factory=dict)

    @property
    def dedup_ratio(self) -> float:
        """Chunk data referenced by files / distinct chunk data (1.0 = nothing shared)."""
        distinct = sum(self.distinct.values())
        return self.referenced_bytes / distinct if distinct else 1.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in _IMAGE_INFO_FIELDS}
        out["dedup_ratio"] = round(self.dedup_ratio, 4)
        out["blobs"] = [b.to_json() for b in self.blobs.values()]
        return out

    def render(self) -> str:
        lines = [
            "",
            f"Directories:            {self.dirs}",
            f"Files:                  {self.files}",
            f"Symlinks:               {self.symlinks}",
            f"Chunks:                 {self.chunks}",
            f"File Size:              {self.file_size}",
            f"Padding Size:           {self.padding_size}",
            f"Uncompressed Size:      {self.uncomp_size}",
            f"Compressed Size:        {self.comp_size}",
            "",
            "File Size Bits:\t\tFile Count:",
        ]
        lines += [f"{bits}:\t\t\t{count}" for bits, count in enumerate(self.file_sizes)]
        lines += ["", "Chunk Size Bits:\tChunk Count:"]
        lines += [f"{bits + 12}:\t\t\t{count}" for bits, count in enumerate(self.chunk_sizes)]
        lines += [
            "",
            f"Raw Content Size:\t{self.file_size}",
            f"Comp Content Size:\t{self.comp_size}",
            f"Raw Chunk Count:\t{self.chunks}",
            f"Dedup Comp Size:\t{self.dedup_comp_size}",
            f"Dedup Uncomp Size:\t{self.dedup_uncomp_size}",
            f"Dedup Chunk Count:\t{self.dedup_chunks}",
            f"Owned Comp Size:\t{self.own_comp_size}",
            f"Owned Uncomp Size:\t{self.own_uncomp_size}",
            f"Owned Chunk Count:\t{self.own_chunks}",
            f"Referenced Comp Size:\t{self.ref_comp_size}",
            f"Referenced Uncomp Size:\t{self.ref_uncomp_size}",
            f"Referenced Chunk Count:\t{self.ref_chunks}",
            f"Dedup Ratio:\t\t{self.dedup_ratio:.2f}",
        ]
        if self.blobs:
            lines += ["", "Blob ID:\tChunk Count:\tReferenced Chunks:\tChunk References:"]
            lines += [
                f"{b.blob_id}\t{b.chunk_count}\t{len(b.chunks)}\t{b.chunk_refs}"
                for b in self.blobs.values()
            ]
        return "\n".join(lines) + "\n"


_IMAGE_INFO_FIELDS = [
    "dirs", "files", "symlinks", "chunks", "file_size", "comp_size", "uncomp_size",
    "padding_size", "chunk_sizes", "file_sizes", "dedup_chunks", "dedup_comp_size",
    "dedup_uncomp_size", "own_chunks", "own_comp_size", "own_uncomp_size", "ref_chunks",
    "ref_comp_size", "ref_uncomp_size",
]  # fmt: skip


@dataclass(slots=True)
class _DedupInfo:
    raw_chunks: int = 0
    dedup_chunks: int = 0
    comp_content_size: int = 0
    comp_base_size: int = 0
    comp_image_size: int = 0
    uncomp_content_size: int = 0
    uncomp_base_size: int = 0
    uncomp_image_size: int = 0


class ImageStat:
    """``stat.rs``'s ``ImageStat``: statistics of base images, a target image and their dedup."""

    def __init__(self, digester: Digester = Digester.BLAKE3) -> None:
        self.digester = digester
        self.dedup_enabled = False
        self.target_enabled = False
        self.base_image = ImageInfo()
        self.target_image = ImageInfo()
        # digest -> (chunk, number of images holding it), upstream's HashChunkDict.
        self._dedup: dict[bytes, tuple[ChunkInfo, int]] = {}
        self._dedup_info = [_DedupInfo() for _ in range(20)]

    def stat(self, sup: RafsSuper, *, is_base: bool = True) -> None:
        image = self.base_image if is_base else self.target_image
        image_digester = sup.meta.digester
        local: dict[bytes, ChunkInfo] = {}
        hardlinks: set[int] = set()
        for _path, inode in sup.walk():
            if inode.is_dir():
                image.dirs += 1
            elif inode.is_symlink():
                image.symlinks += 1
            if not inode.is_reg():
                continue
            image.files += 1
            chunks = inode.chunks()
            # Upstream's chunk dictionary sees every path, hard links included.
            for c in chunks:
                blob_ok = 0 <= c.blob_index < len(sup.blobs)
                if blob_ok and sup.blobs[c.blob_index].digester is image_digester:
                    local.setdefault(c.digest, c)
            if inode.is_hardlink():
                if inode.ino in hardlinks:
                    continue
                hardlinks.add(inode.ino)
            size = inode.size
            image.file_sizes[min(size.bit_length(), 44)] += 1
            image.file_size += size
            image.padding_size += -size % 0x1000
            image.chunks += len(chunks)
            for c in chunks:
                image.comp_size += c.compressed_size
                image.uncomp_size += c.uncompressed_size
                image.referenced_bytes += c.uncompressed_size
                image.distinct[c.digest] = c.uncompressed_size
                self._blob_usage(sup, image, c)
            for bits in range(12, 21):
                image.chunk_sizes[bits - 12] += -(-size // (1 << bits))
        for blob in sup.blobs:
            usage = image.blobs.setdefault(blob.blob_id, BlobUsage(blob.blob_id))
            usage.chunk_count = max(usage.chunk_count, blob.chunk_count)
        for c in local.values():
            known = self._dedup.get(c.digest)
            referenced = (
                not is_base
                and known is not None
                and (known[0].uncompressed_size in (0, c.uncompressed_size))
            )
            if referenced:
                image.ref_chunks += 1
                image.ref_comp_size += c.compressed_size
                image.ref_uncomp_size += c.uncompressed_size
            else:
                image.own_chunks += 1
                image.own_comp_size += c.compressed_size
                image.own_uncomp_size += c.uncompressed_size
            # Upstream only adds chunks of images using the requested digester.
            if is_base and image_digester is self.digester:
                self._dedup[c.digest] = (known[0], known[1] + 1) if known else (c, 1)

    @staticmethod
    def _blob_usage(sup: RafsSuper, image: ImageInfo, c: ChunkInfo) -> None:
        if not 0 <= c.blob_index < len(sup.blobs):
            return
        blob = sup.blobs[c.blob_index]
        usage = image.blobs.setdefault(blob.blob_id, BlobUsage(blob.blob_id, blob.chunk_count))
        usage.chunk_refs += 1
        key = (c.compressed_offset, c.uncompressed_size, c.digest)
        if key not in usage.chunks:
            usage.chunks.add(key)
            usage.comp_size += c.compressed_size
            usage.uncomp_size += c.uncompressed_size

    def finalize(self) -> None:
        self.base_image.uncomp_size += self.base_image.padding_size
        if self.target_enabled:
            self.target_image.uncomp_size += self.target_image.padding_size
        if not self.dedup_enabled:
            return
        for chunk, count in self._dedup.values():
            csize, usize = chunk.compressed_size, chunk.uncompressed_size
            thresh = min(len(self._dedup_info), count)
            for i, info in enumerate(self._dedup_info):
                info.raw_chunks += count
                info.uncomp_content_size += count * usize
                info.comp_content_size += count * csize
                if i < thresh:
                    info.dedup_chunks += 1
                    info.uncomp_base_size += usize
                    info.comp_base_size += csize
                else:
                    info.dedup_chunks += count
                    info.uncomp_image_size += count * usize
                    info.comp_image_size += count * csize
            self.base_image.dedup_chunks += 1
            self.base_image.dedup_comp_size += csize
            self.base_image.dedup_uncomp_size += usize

    def to_json(self) -> dict[str, Any]:
        return {
            "dedup_enabled": self.dedup_enabled,
            "target_enabled": self.target_enabled,
            "base_image": self.base_image.to_json(),
            "target_image": self.target_image.to_json(),
        }

    def render(self) -> str:
        out = []
        if self.target_enabled:
            out.append("Target Image Statistics:\n" + self.target_image.render())
        out.append("\n\nBase Image Statistics:\n" + self.base_image.render())
        if self.dedup_enabled:
            out.append(
                "\n\nChunk Deduplication Statistics:\n"
                "Global Dedup Thresh:\tRaw Chunks:\tDedup Chunks:\tComp Content Size:\t"
                "Comp Base Size:\tComp Image Size:\tUncomp Content Size:\tUncomp Base Size\t"
                "Uncomp Image Size\n"
            )
            for i, info in enumerate(self._dedup_info):
                if info.dedup_chunks == 0:
                    break
                values = (
                    info.raw_chunks, info.dedup_chunks, info.comp_content_size,
                    info.comp_base_size, info.comp_image_size, info.uncomp_content_size,
                    info.uncomp_base_size, info.uncomp_image_size,
                )  # fmt: skip
                out.append(f"{i + 1:<24}" + "".join(f"0x{v:<14x}" for v in values) + "\n")
        return "".join(out)
