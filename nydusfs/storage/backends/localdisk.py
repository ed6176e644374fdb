"""The ``localdisk`` backend: blobs are regions of a raw disk or disk image (``localdisk.rs``).

By default the device carries a GPT partition table and every partition is one blob. Upstream
(``scan_blobs_by_gpt``) names partitions like this, and so do we:

- Partition type *Microsoft basic data* (``EBD0A0A2-…``): the legacy layout. The partition
  name (at most 36 UTF-16 units, so not a whole 64-hex-digit blob id) is the first 32
  characters of the blob id; a lookup with a full id of 32 characters or more falls back to
  its 32-character prefix when the device has such partitions.
- Any other type: the 64-character blob id is stored in two halves, the partition name (first
  32 characters) followed by the partition's unique GUID as 32 lowercase hex digits (the
  GUID's text form without dashes, i.e. mixed-endian on disk as every GPT GUID).

Sectors are 512 bytes (upstream's ``DEFAULT_SECTOR_SIZE``). A blob's size is its partition's
size, so it is rounded up to whole sectors; RAFS never reads past the data it recorded, so the
padding is harmless. The primary header (LBA 1) is used when its signature and CRCs are valid,
else the backup header (last LBA), as the ``gpt`` crate does; entries that are all zero or of
type zero are unused. A partition extending past the device, a partition without a name, or two
partitions with the same blob id make the device unusable (upstream: EINVAL).

``disable_gpt``: the table is not read. Upstream then knows no blob at all unless
``add_blob(blob_id, offset, length)`` is called (nothing in upstream calls it, so such a config
serves nothing); we keep ``add_blob`` and, for ids it did not register, serve the whole device
as the blob, which is what a single-blob device or image file configured this way is for.

The device size comes from ``lseek(SEEK_END)``, which is right for block devices too (upstream
uses the file metadata length, which is 0 for a block device, so its bounds check rejects every
partition of a real disk).

Thread safety: one read-only descriptor is shared by all readers; reads are ``os.pread``. The
blob table is filled at construction and by ``add_blob`` under the backend lock.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid
import zlib
from dataclasses import dataclass

from nydusfs.config import LocalDiskConfig
from nydusfs.errors import BackendError, ConfigError, FormatError
from nydusfs.storage.backends.base import BlobBackend, BlobReader
from nydusfs.storage.backends.localfs import pread_full

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
GPT_SIGNATURE = b"EFI PART"
BASIC_DATA_GUID = uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")
BLOB_ID_PREFIX_LEN = 32  # what a legacy partition name holds of a blob id
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # 92 bytes
_ENTRY = struct.Struct("<16s16sQQQ72s")  # 128 bytes; larger entries have reserved tails
_MAX_TABLE_BYTES = 16 << 20  # sanity bound on num_entries * entry_size from a corrupt header


@dataclass(frozen=True, slots=True)
class GptHeader:
    current_lba: int
    backup_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: uuid.UUID
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int


@dataclass(frozen=True, slots=True)
class GptPartition:
    """One used partition entry (``index`` counts from 1, as partition numbers do)."""

    index: int
    type_guid: uuid.UUID
    part_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str

    @property
    def offset(self) -> int:
        return self.first_lba * SECTOR_SIZE

    @property
    def length(self) -> int:
        return (self.last_lba - self.first_lba + 1) * SECTOR_SIZE

    @property
    def blob_id(self) -> str:
        """Upstream's blob id for this partition (see the module docstring)."""
        if self.type_guid == BASIC_DATA_GUID:
            return self.name
        return self.name + self.part_guid.hex


def parse_gpt_header(block: bytes, lba: int) -> GptHeader:
    """Validate and decode the header sector read at ``lba``. Raises ``FormatError``."""
    if len(block) < _HEADER.size:
        raise FormatError(f"GPT header at LBA {lba}: device too small")
    (sig, _rev, hsize, crc, _res, current, backup, first, last, guid, entries_lba, count,
     esize, ecrc) = _HEADER.unpack_from(block)  # fmt: skip
    if sig != GPT_SIGNATURE:
        raise FormatError(f"GPT header at LBA {lba}: no 'EFI PART' signature")
    if not _HEADER.size <= hsize <= min(len(block), SECTOR_SIZE):
        raise FormatError(f"GPT header at LBA {lba}: invalid header size {hsize}")
    raw = bytearray(block[:hsize])
    raw[16:20] = b"\0\0\0\0"
    if zlib.crc32(raw) != crc:
        raise FormatError(f"GPT header at LBA {lba}: header CRC mismatch")
    if current != lba:
        raise FormatError(f"GPT header at LBA {lba}: says it is at LBA {current}")
    if esize < _ENTRY.size or esize % 8 or count * esize > _MAX_TABLE_BYTES:
        raise FormatError(f"GPT header at LBA {lba}: invalid table ({count} x {esize} bytes)")
    return GptHeader(
        current, backup, first, last, uuid.UUID(bytes_le=guid), entries_lba, count, esize, ecrc
    )


def parse_gpt_entries(table: bytes, header: GptHeader) -> list[GptPartition]:
    """Validate the entry array's CRC and decode the used entries. Raises ``FormatError``."""
    if zlib.crc32(table) != header.entries_crc:
        raise FormatError(f"GPT partition table at LBA {header.entries_lba}: CRC mismatch")
    parts = []
    for i in range(header.num_entries):
        entry = table[i * header.entry_size : i * header.entry_size + _ENTRY.size]
        type_le, guid_le, first, last, attrs, name_raw = _ENTRY.unpack(entry)
        if not any(type_le):
            continue  # unused entry (UEFI: type GUID zero)
        if last < first:
            raise FormatError(f"GPT partition {i + 1}: last LBA {last} before first LBA {first}")
        name = name_raw.decode("utf-16-le", "replace")
        name = name.split("\0", 1)[0]  # as the gpt crate: the name ends at the first NUL
        type_guid, part_guid = uuid.UUID(bytes_le=type_le), uuid.UUID(bytes_le=guid_le)
        parts.append(GptPartition(i + 1, type_guid, part_guid, first, last, attrs, name))
    return parts


def read_gpt(fd: int, device_size: int) -> tuple[GptHeader, list[GptPartition]]:
    """The partition table of the device open at ``fd``: primary header, else the backup."""
    last_lba = device_size // SECTOR_SIZE - 1
    errors = []
    for lba in (1, last_lba):
        if lba < 1:
            break
        try:
            header = parse_gpt_header(os.pread(fd, SECTOR_SIZE, lba * SECTOR_SIZE), lba)
            table_len = header.num_entries * header.entry_size
            table = pread_full(fd, table_len, header.entries_lba * SECTOR_SIZE)
            if len(table) != table_len:
                raise FormatError(f"GPT partition table at LBA {header.entries_lba}: truncated")
            return header, parse_gpt_entries(table, header)
        except FormatError as e:
            errors.append(str(e))
    raise FormatError("no valid GPT: " + "; ".join(errors or ["device too small"]))


class LocalDiskReader(BlobReader):
    """A region of the device."""

    def __init__(self, backend: LocalDiskBackend, blob_id: str, offset: int, length: int) -> None:
        super().__init__(backend, blob_id)
        self.disk = backend
        self.offset = offset
        self.length = length

    def try_blob_size(self) -> int:
        return self.length

    def try_read(self, offset: int, size: int) -> bytes:
        if offset >= self.length:
            return b""
        size = min(size, self.length - offset)
        try:
            return pread_full(self.disk.fd, size, self.offset + offset)
        except OSError as e:
            raise BackendError(
                f"localdisk: cannot read blob {self.blob_id} at offset {offset} size {size} "
                f"of {self.disk.device_path}: {e.strerror}",
                retryable=False,
            ) from e


class LocalDiskBackend(BlobBackend):
    """Blobs on one disk device or image file."""

    type = "localdisk"

    def __init__(self, config: LocalDiskConfig, id: str = "") -> None:
        if not isinstance(config, LocalDiskConfig):
            raise ConfigError(f"backend.localdisk: expected localdisk settings, got {config!r}")
        if not config.device_path:
            raise ConfigError("backend.localdisk.device_path: required")
        super().__init__(id, retry_limit=0)
        self.device_path = config.device_path
        self.disable_gpt = config.disable_gpt
        self.legacy_gpt = False  # some partition uses the truncated-id (basic data) layout
        self.regions: dict[str, tuple[int, int]] = {}
        try:
            self.fd = os.open(config.device_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(
                f"backend.localdisk.device_path: cannot open {config.device_path}: {e.strerror}"
            ) from None
        try:
            self.device_size = os.lseek(self.fd, 0, os.SEEK_END)
            if not config.disable_gpt:
                self._scan_gpt()
        except BaseException:
            os.close(self.fd)
            raise

    def _scan_gpt(self) -> None:
        where = f"localdisk {self.device_path}"
        try:
            header, parts = read_gpt(self.fd, self.device_size)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        log.info(
            "%s: %d partitions, disk GUID %s", where, len(parts), header.disk_guid
        )  # fmt: skip
        for p in parts:
            if p.offset + p.length > self.device_size:
                raise FormatError(
                    f"{where}: partition {p.index} ({p.part_guid}) ends past the device"
                )
            blob_id = p.blob_id
            if not p.name:
                raise FormatError(f"{where}: partition {p.index} ({p.part_guid}) has no name")
            if blob_id in self.regions:
                raise FormatError(f"{where}: two partitions hold blob {blob_id}")
            self.regions[blob_id] = (p.offset, p.length)
            self.legacy_gpt |= p.type_guid == BASIC_DATA_GUID
            log.debug("%s: partition %d is blob %s at %d+%d", where, p.index, blob_id,
                      p.offset, p.length)  # fmt: skip

    def add_blob(self, blob_id: str, offset: int, length: int) -> None:
        """Register ``blob_id`` as ``length`` bytes at ``offset`` (upstream's ``add_blob``)."""
        where = f"localdisk {self.device_path}"
        if self.legacy_gpt:
            raise BackendError(f"{where}: device is in legacy GPT mode", retryable=False)
        if offset < 0 or length < 0 or offset + length > self.device_size:
            raise BackendError(
                f"{where}: blob {blob_id} at offset {offset:#x} length {length:#x} does not fit "
                f"in the device ({self.device_size:#x} bytes)",
                retryable=False,
            )
        with self._lock:
            if blob_id in self.regions:
                raise BackendError(f"{where}: blob {blob_id} already exists", retryable=False)
            self.regions[blob_id] = (offset, length)

    def find(self, blob_id: str) -> tuple[int, int]:
        """``(offset, length)`` of ``blob_id`` on the device; raises ``BackendError``."""
        region = self.regions.get(blob_id)
        if region is None and self.legacy_gpt and len(blob_id) >= BLOB_ID_PREFIX_LEN:
            region = self.regions.get(blob_id[:BLOB_ID_PREFIX_LEN])
        if region is None and self.disable_gpt:
            region = (0, self.device_size)
        if region is None:
            raise BackendError(
                f"localdisk: no blob {blob_id} on {self.device_path}", retryable=False
            )
        return region

    def new_reader(self, blob_id: str) -> LocalDiskReader:
        offset, length = self.find(blob_id)
        return LocalDiskReader(self, blob_id, offset, length)

    def close(self) -> None:
        super().close()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
