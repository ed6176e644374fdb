"""Guest memory: the regions QEMU shares with the back-end, mapped from the fds it passes.

Each region is known by three addresses: guest-physical (what descriptors carry), QEMU's own
user virtual address (what SET_VRING_ADDR carries) and the offset into the shared fd. Every
access is bounds-checked against one region: a guest (or front-end) naming memory outside a
region gets ``GuestMemoryError``, never an access outside the mapping.

Accesses go through ``struct.*_from``/slices of the ``mmap`` objects themselves, not long-lived
``memoryview``s, so a region can always be unmapped when the front-end replaces the table.
Request bytes are copied out of guest memory before they are parsed (the guest may change them
meanwhile). Single-threaded: used from the device's trio loop only.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class GuestMemoryError(ValueError):
    """An address range that is not inside one mapped region."""


@dataclass
class Region:
    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    mm: mmap.mmap = field(repr=False)
    base: int = 0  # where the region starts inside ``mm`` (mmap offsets are page-aligned)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # a view is still alive somewhere: the GC unmaps it later
            log.debug("guest memory region at %#x still in use", self.guest_phys_addr)


def map_region(fd: int, guest_phys_addr: int, size: int, user_addr: int, offset: int) -> Region:
    """mmap ``size`` bytes of ``fd`` at ``offset`` (shared, read-write); ``fd`` stays open."""
    if size <= 0 or size > 1 << 46 or offset < 0 or guest_phys_addr + size > 1 << 64:
        raise GuestMemoryError(f"invalid memory region gpa={guest_phys_addr:#x} size={size:#x}")
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mm = mmap.mmap(fd, size + offset - aligned, mmap.MAP_SHARED, offset=aligned)
    except (OSError, ValueError) as e:
        raise GuestMemoryError(f"cannot map guest memory (fd {fd}, size {size:#x}): {e}") from e
    return Region(guest_phys_addr, size, user_addr, offset, mm, offset - aligned)


class GuestMemory:
    """The current memory table."""

    def __init__(self) -> None:
        self.regions: list[Region] = []

    def add(self, region: Region) -> None:
        for r in self.regions:
            if (
                region.guest_phys_addr < r.guest_phys_addr + r.size
                and r.guest_phys_addr < region.guest_phys_addr + region.size
            ):
                region.close()
                raise GuestMemoryError(f"region at {region.guest_phys_addr:#x} overlaps another")
        self.regions.append(region)

    def remove(self, guest_phys_addr: int, size: int) -> None:
        for r in self.regions:
            if r.guest_phys_addr == guest_phys_addr and r.size == size:
                self.regions.remove(r)
                r.close()
                return
        raise GuestMemoryError(f"no region at {guest_phys_addr:#x} of size {size:#x}")

    def clear(self) -> None:
        regions, self.regions = self.regions, []
        for r in regions:
            r.close()

    def _find(self, addr: int, length: int, user: bool) -> tuple[mmap.mmap, int]:
        if length < 0:
            raise GuestMemoryError("negative length")
        for r in self.regions:
            start = r.user_addr if user else r.guest_phys_addr
            if start <= addr and addr + length <= start + r.size:
                return r.mm, r.base + addr - start
        kind = "user" if user else "guest-physical"
        raise GuestMemoryError(f"{kind} range {addr:#x}+{length:#x} is not in guest memory")

    def gpa(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        """The mapping and offset of ``length`` bytes at guest-physical ``addr``."""
        return self._find(addr, length, False)

    def uva(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        """The mapping and offset of ``length`` bytes at front-end virtual ``addr``."""
        return self._find(addr, length, True)

    def read(self, addr: int, length: int) -> bytes:
        mm, off = self.gpa(addr, length)
        return mm[off : off + length]

    def write(self, addr: int, data: bytes | memoryview) -> None:
        mm, off = self.gpa(addr, len(data))
        mm[off : off + len(data)] = data


def close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
