"""Start from a registry: fetch a nydus image's bootstrap and make the config that mounts it.

``nydusd --image REF`` (our flag; upstream leaves this to nydus-snapshotter) calls
``prepare_image``: it reads the image manifest, finds the bootstrap layer (annotation
``containerd.io/snapshot/nydus-bootstrap: "true"``, else the last layer when every other one is
a nydus blob), downloads that small layer, and extracts ``image/image.boot`` into the cache work
directory as ``<manifest digest>.boot``. Data blobs are not downloaded: the returned config has
a ``registry`` backend for the image's repository, so file data is fetched lazily, chunk by
chunk, through the blob cache.

Config rules: with a user config (``load_image_config``: its registry section may leave out
``host`` and ``repo``), its registry settings (scheme, auth, TLS, timeouts, proxy,
mirrors), cache and rafs sections are kept, and the host and repository come from the
reference; a config with another backend type is an error. Without one, a registry backend, a
``blobcache`` in ``$TMPDIR/nydusd-<image>`` and xattrs on (images carry file capabilities) are
used. A reference with ``http://`` selects
plain http; ``insecure`` (or the config's ``skip_verify``) lets https fall back to http.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
import tomllib
import zlib
from typing import Any

from nydusfs.atomicfile import atomic_write
from nydusfs.config import (
    MAX_CONFIG_SIZE,
    BackendConfig,
    CacheConfig,
    ConfigV2,
    FileCacheConfig,
    RafsConfig,
    RegistryConfig,
    load_config,
)
from nydusfs.errors import ConfigError
from nydusfs.oci import (
    ANNOTATION_NYDUS_BOOTSTRAP,
    BOOTSTRAP_NAME_IN_LAYER,
    MEDIA_NYDUS_BLOB,
)
from nydusfs.oci.reference import ImageRef
from nydusfs.oci.store import ImageError, RegistryStore

log = logging.getLogger(__name__)

BOOTSTRAP_LAYER_LIMIT = 512 << 20  # a bootstrap is metadata; anything this big is not one


def bootstrap_descriptor(manifest: dict[str, Any], what: str) -> dict[str, Any]:
    """The bootstrap layer's descriptor in a nydus manifest; ``ImageError`` if there is none."""
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ImageError(f"{what}: manifest has no layers")
    for desc in layers:
        if (desc.get("annotations") or {}).get(ANNOTATION_NYDUS_BOOTSTRAP) == "true":
            return dict(desc)
    if len(layers) > 1 and all(d.get("mediaType") == MEDIA_NYDUS_BLOB for d in layers[:-1]):
        return dict(layers[-1])
    raise ImageError(
        f"{what} is not a nydus image (no layer annotated {ANNOTATION_NYDUS_BOOTSTRAP})"
    )


def extract_bootstrap(layer: bytes, dest: str, what: str) -> None:
    """Write ``image/image.boot`` of a (gzipped) bootstrap layer tar to ``dest``."""
    data = layer
    if layer[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(layer)
        except (OSError, EOFError, zlib.error) as e:
            raise ImageError(f"{what}: bootstrap layer is not valid gzip: {e}") from e
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.name.lstrip("./") == BOOTSTRAP_NAME_IN_LAYER and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    with atomic_write(dest) as out:
                        out.write(f.read())
                    return
    except tarfile.TarError as e:
        raise ImageError(f"{what}: bootstrap layer is not a valid tar: {e}") from e
    raise ImageError(f"{what}: bootstrap layer has no {BOOTSTRAP_NAME_IN_LAYER}")


def image_config(ref: ImageRef, base: ConfigV2 | None, insecure: bool = False) -> ConfigV2:
    """The config that mounts ``ref`` lazily (see the module docstring for the rules)."""
    if ref.is_layout:
        raise ConfigError(f"--image {ref}: an OCI layout cannot be mounted lazily, push it first")
    scheme = ref.scheme or ("" if insecure else "https")
    if base is None:
        digest = hashlib.sha256(f"{ref.host}/{ref.repo}".encode()).hexdigest()[:16]
        work_dir = os.path.join(tempfile.gettempdir(), f"nydusd-{digest}")
        registry = RegistryConfig(scheme=scheme, host=ref.host, repo=ref.repo,
                                  skip_verify=insecure)  # fmt: skip
        return ConfigV2(
            backend=BackendConfig("registry", registry),
            cache=CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir=work_dir)),
            rafs=RafsConfig(enable_xattr=True),
        )
    if base.backend is None:
        registry = RegistryConfig(scheme=scheme, host=ref.host, repo=ref.repo,
                                  skip_verify=insecure)  # fmt: skip
    elif isinstance(base.backend.settings, RegistryConfig):
        registry = dataclasses.replace(base.backend.settings, host=ref.host, repo=ref.repo)
        if ref.scheme:
            registry.scheme = ref.scheme
        if insecure:
            registry.skip_verify = True
            registry.scheme = ref.scheme or ""
    else:
        raise ConfigError(
            f"--image needs a registry backend, the config has backend.type = "
            f"{base.backend.type!r}"
        )
    return dataclasses.replace(base, backend=BackendConfig("registry", registry))


def load_image_config(path: str, ref: ImageRef) -> ConfigV2:
    """A config file for ``--image``: the registry backend may leave out ``host`` and ``repo``
    (the reference gives them), which a config file for a plain mount must have."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_SIZE + 1).decode()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            data = None  # let the config loader report what is wrong with it
    if isinstance(data, dict):
        if "version" in data:  # v2: backend.registry
            backend = data.get("backend")
            section = backend.get("registry") if isinstance(backend, dict) else None
        else:  # v1: device.backend.config
            backend = (data.get("device") or {}).get("backend")
            section = backend.get("config") if isinstance(backend, dict) else None
        if isinstance(backend, dict) and backend.get("type") == "registry":
            if not isinstance(section, dict):
                section = {}
                backend["registry" if "version" in data else "config"] = section
            section.setdefault("host", ref.host)
            section.setdefault("repo", ref.repo)
            text = json.dumps(data)
    try:
        return load_config(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _work_dir(config: ConfigV2) -> str:
    filecache = config.cache.filecache
    if filecache is not None and filecache.work_dir:
        return filecache.work_dir
    return tempfile.gettempdir()


def prepare_image(
    ref: ImageRef, base: ConfigV2 | None = None, *, insecure: bool = False,
    platform: str = "linux/amd64",
) -> tuple[str, ConfigV2]:  # fmt: skip
    """Fetch the bootstrap of nydus image ``ref``; returns (bootstrap path, mount config)."""
    config = image_config(ref, base, insecure)
    assert config.backend is not None and isinstance(config.backend.settings, RegistryConfig)
    settings = config.backend.settings
    store = RegistryStore(ref, insecure=insecure or settings.skip_verify, auth=settings.auth,
                          timeout=max(settings.timeout, 30))  # fmt: skip
    with store:
        manifest = store.get_manifest(ref.reference, platform, nydus=True)
        desc = bootstrap_descriptor(manifest.json(), str(ref))
        size = int(desc.get("size", 0))
        if size > BOOTSTRAP_LAYER_LIMIT:
            raise ImageError(f"{ref}: bootstrap layer of {size} bytes is too large")
        layer = store.read_blob(str(desc.get("digest", "")), BOOTSTRAP_LAYER_LIMIT)
        # The backend followed the scheme decision (https, or http after a fallback).
        if not store.https and settings.scheme != "http":
            settings.scheme = "http"
    work_dir = _work_dir(config)
    os.makedirs(work_dir, exist_ok=True)
    dest = os.path.join(work_dir, manifest.digest.removeprefix("sha256:") + ".boot")
    extract_bootstrap(layer, dest, str(ref))
    log.info("image %s: bootstrap %s (%d bytes) in %s", ref, manifest.digest,
             os.path.getsize(dest), dest)  # fmt: skip
    return dest, config
