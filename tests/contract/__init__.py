"""Backend contract tests: every blob backend serves the same blobs the same way.

The registry of backend factories lives here (not in ``conftest.py``) so that any module can
import it without import cycles.

Adding a backend to the contract suite (``test_backends.py``): write a module
``tests/contract/factories_<name>.py``; ``conftest.py`` imports every such module before
collection, so its factories join the parametrization. A factory is a generator that gets the
blobs to serve (``{blob_id: bytes}``, ids are sha256 hex digests) and a private work directory,
starts whatever it needs, yields a ready ``BlobBackend`` and cleans up afterwards::

    from collections.abc import Iterator
    from pathlib import Path

    from nydusfs.storage.backends import BlobBackend
    from tests.contract import backend_factory


    @backend_factory("registry-token-auth")
    def registry_token(blobs: dict[str, bytes], workdir: Path) -> Iterator[BlobBackend]:
        with MyRegistry(workdir) as registry:          # start servers on 127.0.0.1 only
            for blob_id, data in blobs.items():
                registry.push(blob_id, data)
            backend = RegistryBackend(RegistryConfig(...), id="contract")
            try:
                yield backend
            finally:
                backend.close()

Options of ``backend_factory(name, *, granularity=1, empty=True)``: ``granularity`` is the
unit blob sizes are rounded up to (the backend serves zeros up to it; GPT partitions are whole
512-byte sectors), ``empty=False`` when the backend cannot hold an empty blob. A factory may
call ``pytest.skip(...)`` when a tool it needs is missing. One backend instance serves a
whole test module, so tests only ever read and compare metrics as deltas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nydusfs.storage.backends import BlobBackend

Blobs = dict[str, bytes]
FactoryFn = Callable[[Blobs, Path], Iterator[BlobBackend]]


@dataclass(frozen=True)
class BackendFactory:
    name: str
    make: Callable[[Blobs, Path], contextlib.AbstractContextManager[BlobBackend]]
    granularity: int = 1
    empty: bool = True

    def expected(self, data: bytes) -> bytes:
        """What the backend serves for a blob holding ``data``."""
        pad = -len(data) % self.granularity
        return data + b"\0" * pad

    def __str__(self) -> str:
        return self.name


BACKEND_FACTORIES: list[BackendFactory] = []


def backend_factory(
    name: str, *, granularity: int = 1, empty: bool = True
) -> Callable[[FactoryFn], FactoryFn]:
    """Register a generator-style backend factory under the test id ``name``."""

    def register(fn: FactoryFn) -> FactoryFn:
        if any(f.name == name for f in BACKEND_FACTORIES):
            raise ValueError(f"backend factory {name!r} registered twice")
        BACKEND_FACTORIES.append(
            BackendFactory(name, contextlib.contextmanager(fn), granularity, empty)
        )
        return fn

    return register
