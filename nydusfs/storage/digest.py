"""Chunk and blob digests: blake3 or sha256, always 32 bytes (``nydus-utils::digest``).

Chunk digests (the RAFS "block id") use the image's digester, blake3 by default, computed over
the *uncompressed* chunk data. Everything that identifies a blob or a ToC section (blob ids,
``blob_toc_digest``, ToC entry digests) is sha256 whatever the image's digester.

Concurrency: functions are pure; a ``Hasher`` belongs to one thread at a time. Both hashlib and
blake3 release the GIL on large inputs, so digests scale on the builder's thread pool.
"""

from __future__ import annotations

import hashlib

import blake3

from nydusfs.types import Digester

__all__ = ["DIGEST_SIZE", "Hasher", "digest", "hexdigest"]

DIGEST_SIZE = 32

Data = bytes | bytearray | memoryview


def digest(algo: Digester, data: Data) -> bytes:
    """The 32-byte digest of ``data``."""
    if algo is Digester.BLAKE3:
        out: bytes = blake3.blake3(data).digest()
        return out
    return hashlib.sha256(data).digest()


def hexdigest(algo: Digester, data: Data) -> str:
    """The digest of ``data`` as 64 lowercase hex digits (how blob ids are spelled)."""
    return digest(algo, data).hex()


class Hasher:
    """Incremental digest: ``update`` any number of times, then ``digest``.

    ``digest`` does not end the hasher (both algorithms support reading the value so far and
    continuing), which the builder relies on to record a digest of "everything written so far".
    """

    __slots__ = ("_algo", "_impl")

    def __init__(self, algo: Digester, data: Data | None = None) -> None:
        self._algo = algo
        self._impl: blake3.blake3 | hashlib._Hash = (
            blake3.blake3() if algo is Digester.BLAKE3 else hashlib.sha256()
        )
        if data is not None:
            self._impl.update(data)

    @property
    def algorithm(self) -> Digester:
        return self._algo

    def update(self, data: Data) -> None:
        self._impl.update(data)

    def digest(self) -> bytes:
        out: bytes = self._impl.digest()
        return out

    def hexdigest(self) -> str:
        return self.digest().hex()

    def copy(self) -> Hasher:
        clone = Hasher.__new__(Hasher)
        clone._algo = self._algo
        clone._impl = self._impl.copy()
        return clone
