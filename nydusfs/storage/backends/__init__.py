"""Blob backends by upstream type name, and ``new_backend(config)``.

``BACKENDS`` maps an upstream ``backend.type`` (``localfs``, ``localdisk``, ``http-proxy``,
``registry``, ``s3``, ``oss``) to its ``BlobBackend`` class. The network backends with heavier
code paths are imported on first use from ``LAZY_BACKENDS`` (``"module:Class"`` strings), so
importing this package stays cheap and a backend module that fails to import breaks only
configs that use it. Look classes up with ``BACKENDS[name]`` or ``backend_class(name)``:
a lazy entry is loaded and cached by either (``name in BACKENDS`` and ``BACKENDS.get`` only
see what is loaded).

Constructor convention, which every backend class follows so that ``new_backend`` can build
any of them: ``Cls(settings, id="")`` where ``settings`` is the type's config dataclass from
``nydusfs.config`` (``LocalFsConfig``, ``RegistryConfig``, ...) and ``id`` the mount/blob id
used in logs and metrics. Construction validates the settings (``ConfigError``) and may open
files or start health-check threads; ``close()`` releases them.

Thread safety: the registry is filled at import and by lazy loads, which are idempotent.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from nydusfs.config import BackendConfig
from nydusfs.errors import ConfigError, UnsupportedError
from nydusfs.storage.backends.base import BlobBackend, BlobReader
from nydusfs.storage.backends.http_proxy import HttpProxyBackend
from nydusfs.storage.backends.localdisk import LocalDiskBackend
from nydusfs.storage.backends.localfs import LocalFsBackend

__all__ = [
    "BACKENDS",
    "LAZY_BACKENDS",
    "BlobBackend",
    "BlobReader",
    "backend_class",
    "backend_types",
    "new_backend",
]

LAZY_BACKENDS: dict[str, str] = {
    "registry": "nydusfs.storage.backends.registry:RegistryBackend",
    "s3": "nydusfs.storage.backends.s3:S3Backend",
    "oss": "nydusfs.storage.backends.oss:OssBackend",
}


class _Backends(dict[str, type[BlobBackend]]):
    """A dict that imports ``LAZY_BACKENDS`` entries when first indexed."""

    def __missing__(self, name: str) -> type[BlobBackend]:
        target = LAZY_BACKENDS.get(name)
        if target is None:
            known = ", ".join(backend_types())
            raise KeyError(f"unknown backend type {name!r} (expected one of {known})")
        module_name, _, class_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UnsupportedError(f"backend type {name!r} is not available: {e}") from e
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, BlobBackend)):
            raise UnsupportedError(f"backend type {name!r}: {target} is not a BlobBackend class")
        self[name] = cls
        return cls


BACKENDS: dict[str, type[BlobBackend]] = _Backends(
    {
        LocalFsBackend.type: LocalFsBackend,
        LocalDiskBackend.type: LocalDiskBackend,
        HttpProxyBackend.type: HttpProxyBackend,
    }
)


def backend_types() -> list[str]:
    """Every type name, loaded or not."""
    return sorted({*BACKENDS, *LAZY_BACKENDS})


def backend_class(name: str) -> type[BlobBackend]:
    """The class for ``backend.type`` ``name``; ``ConfigError`` if there is no such type."""
    try:
        return BACKENDS[name]
    except KeyError as e:
        raise ConfigError(f"backend.type: {e.args[0]}") from None


def new_backend(config: BackendConfig, id: str = "") -> BlobBackend:
    """The backend ``config`` describes, ready to hand out readers."""
    factory = cast(Callable[..., BlobBackend], backend_class(config.type))
    return factory(config.settings, id=id)
