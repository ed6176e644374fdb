"""Where images live: a registry (distribution API v2) or an OCI image layout directory.

Both stores offer the same calls: resolve a reference to a manifest (an index is resolved to
the manifest of the wanted platform), download a blob to a file while checking its digest,
tell whether a blob exists, upload a blob from a file, and put a manifest under a tag.

``RegistryStore`` sends its requests through ``RegistryBackend.request``, so pushes and pulls
get the same authentication as nydusd's lazy reads (Basic, Bearer tokens with refresh,
``IMAGE_PULL_AUTH``), TLS settings and proxies. Blob uploads are monolithic (``POST`` an upload,
``PUT`` the body with ``?digest=``), which every registry accepts; a blob the registry already
has is not sent again.

Thread-safety: a store may be used from several threads (the registry backend is thread-safe;
the layout store writes each blob under a temporary name and renames it).
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from nydusfs.atomicfile import atomic_write
from nydusfs.config import RegistryConfig
from nydusfs.errors import BackendError, NydusError
from nydusfs.oci import (
    ANNOTATION_REF_NAME,
    ARTIFACT_NYDUS_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    OS_FEATURE_NYDUS,
)
from nydusfs.oci.reference import ImageRef
from nydusfs.storage.backends.http import body_excerpt
from nydusfs.storage.backends.registry import RegistryBackend

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # bytes done so far
_PIECE = 1 << 20
_MANIFEST_LIMIT = 4 << 20  # the distribution spec's limit on manifest size
_ACCEPT = ", ".join((MEDIA_OCI_MANIFEST, MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_LIST))


class ImageError(NydusError):
    """An image, manifest or blob is missing, malformed or cannot be transferred."""


@dataclass(frozen=True, slots=True)
class Manifest:
    data: bytes
    media_type: str
    digest: str  # "sha256:<hex>" of ``data``

    def json(self) -> dict[str, Any]:
        return _parse_json(self.data, f"manifest {self.digest}")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as e:
        raise ImageError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a JSON object")
    return value


def _media_of(data: bytes, what: str) -> str:
    """The media type a manifest declares, or what its shape says (the field is optional)."""
    doc = _parse_json(data, what)
    media = doc.get("mediaType")
    if isinstance(media, str) and media:
        return media
    return MEDIA_OCI_INDEX if "manifests" in doc else MEDIA_OCI_MANIFEST


def _hex_of(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ImageError(f"unsupported or malformed digest {digest!r} (sha256 only)")
    return hexpart


def is_nydus_descriptor(desc: dict[str, Any]) -> bool:
    """An index entry for a nydus manifest: ``artifactType`` as nydusify's ``--merge-platform``
    sets it, or the ``nydus.remoteimage.v1`` OS feature older images carry."""
    features = (desc.get("platform") or {}).get("os.features") or []
    return desc.get("artifactType") == ARTIFACT_NYDUS_MANIFEST or OS_FEATURE_NYDUS in features


def pick_platform(
    index: dict[str, Any], what: str, platform: str, nydus: bool = False
) -> dict[str, Any]:
    """The descriptor for ``platform`` (``os/arch``) in an index, the nydus one when ``nydus``
    else the other (an index may hold both, see ``is_nydus_descriptor``); ``ImageError`` if
    there is none."""
    want_os, _, want_arch = platform.partition("/")
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{what}: index lists no manifests")
    matching = [
        d for d in manifests
        if (d.get("platform") or {}).get("os") == want_os
        and (d.get("platform") or {}).get("architecture") == want_arch
    ]  # fmt: skip
    if not matching and len(manifests) == 1 and not manifests[0].get("platform"):
        matching = [manifests[0]]
    if not matching:
        raise ImageError(f"{what}: no manifest for platform {platform}")
    preferred = [d for d in matching if is_nydus_descriptor(d) == nydus]
    return dict((preferred or matching)[0])


class _HashingWriter:
    def __init__(self, f: Any, what: str, progress: Progress | None) -> None:
        self.f = f
        self.what = what
        self.hash = hashlib.sha256()
        self.size = 0
        self.progress = progress

    def write(self, piece: bytes) -> None:
        self.f.write(piece)
        self.hash.update(piece)
        self.size += len(piece)
        if self.progress is not None:
            self.progress(self.size)

    def check(self, digest: str, size: int | None) -> None:
        got = "sha256:" + self.hash.hexdigest()
        if got != digest:
            raise ImageError(f"{self.what}: content digest is {got}, expected {digest}")
        if size is not None and size != self.size:
            raise ImageError(f"{self.what}: {self.size} bytes, expected {size}")


class ImageStore(abc.ABC):
    """The calls both stores implement."""

    ref: ImageRef

    def get_manifest(
        self, reference: str, platform: str = "linux/amd64", nydus: bool = False
    ) -> Manifest:
        """The image manifest for ``reference`` (a tag or digest), through an index if need be
        (where ``nydus`` picks the nydus manifest of the platform, see ``pick_platform``)."""
        top = self._get_manifest(reference)
        if top.media_type in MANIFEST_TYPES:
            return top
        if top.media_type not in INDEX_TYPES:
            raise ImageError(f"{self.ref}: unsupported manifest media type {top.media_type!r}")
        desc = pick_platform(top.json(), str(self.ref), platform, nydus)
        manifest = self._get_manifest(str(desc.get("digest", "")))
        if manifest.media_type not in MANIFEST_TYPES:
            raise ImageError(f"{self.ref}: index points at a {manifest.media_type!r}")
        return manifest

    @abc.abstractmethod
    def _get_manifest(self, reference: str) -> Manifest: ...

    @abc.abstractmethod
    def fetch_blob(
        self, digest: str, dest: str, size: int | None = None, progress: Progress | None = None
    ) -> None:
        """Write blob ``digest`` to ``dest`` (atomically), checking its digest and size."""

    @abc.abstractmethod
    def read_blob(self, digest: str, limit: int = _MANIFEST_LIMIT) -> bytes:
        """A small blob (a config) in memory, digest checked."""

    @abc.abstractmethod
    def has_blob(self, digest: str) -> bool: ...

    @abc.abstractmethod
    def push_blob(self, path: str, digest: str, progress: Progress | None = None) -> None:
        """Upload the file ``path`` whose content has ``digest`` (skipped if present)."""

    @abc.abstractmethod
    def push_bytes(self, data: bytes) -> str: ...

    @abc.abstractmethod
    def put_manifest(self, tag: str, data: bytes, media_type: str) -> str:
        """Store a manifest under ``tag``; returns its digest."""

    @abc.abstractmethod
    def push_manifest(self, data: bytes, media_type: str) -> str:
        """Store a manifest without a tag (an index will point at it); returns its digest."""

    def close(self) -> None:
        """Release connections."""
        return None

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RegistryStore(ImageStore):
    """A repository in a registry, ``ref.host``/``ref.repo``."""

    def __init__(self, ref: ImageRef, *, insecure: bool = False, auth: str | None = None,
                 timeout: int = 300) -> None:  # fmt: skip
        if ref.is_layout:
            raise ImageError(f"{ref} is an OCI layout, not a registry image")
        self.ref = ref
        scheme = ref.scheme or ("" if insecure else "https")
        config = RegistryConfig(
            scheme=scheme, host=ref.host, repo=ref.repo, auth=auth, skip_verify=insecure,
            timeout=timeout, connect_timeout=10, retry_limit=2,
        )  # fmt: skip
        self.backend = RegistryBackend(config, id=f"oci-{ref.host}/{ref.repo}")
        # Whether requests go over https; false from the start for http:// references, and
        # after a TLS failure of an insecure registry.
        self.https = scheme != "http"
        self._may_fall_back = insecure and not ref.scheme

    def _url(self, path: str) -> str:
        scheme = "https" if self.https else "http"
        return f"{scheme}://{self.ref.host}/v2/{self.ref.repo}/{path}"

    def _call(self, method: str, path_or_url: str, headers: dict[str, str] | None = None,
              *, data: Any = None, stream: bool = False) -> Any:  # fmt: skip
        url = path_or_url if "://" in path_or_url else self._url(path_or_url)
        try:
            return self.backend.request(method, url, headers or {}, data=data, stream=stream)
        except BackendError as e:
            text = str(e).lower()
            if self.https and self._may_fall_back and "://" not in path_or_url and any(
                m in text for m in ("wrong version number", "ssl", "connection refused")
            ):
                # An insecure registry without TLS: plain http from now on (the registry
                # backend does the same for blob reads).
                log.warning("%s: falling back to http after TLS error: %s", self.ref.host, e)
                self.https = False
                return self._call(method, path_or_url, headers, data=data, stream=stream)
            raise ImageError(f"{self.ref.host}/{self.ref.repo}: {method} failed: {e}") from e

    def check_push(self) -> None:
        """Fail early, before any work, when the repository refuses uploads: start one and
        cancel it."""
        resp = self._call("POST", "blobs/uploads/")
        if resp.status_code != 202 or "Location" not in resp.headers:
            raise ImageError(
                f"{self.ref.host}/{self.ref.repo}: cannot push here (starting an upload "
                f"answered {resp.status_code}: {body_excerpt(resp)})"
            )
        location = urljoin(self._url("blobs/uploads/"), resp.headers["Location"])
        self._call("DELETE", location).close()

    def _get_manifest(self, reference: str) -> Manifest:
        resp = self._call("GET", f"manifests/{reference}", {"Accept": _ACCEPT})
        if resp.status_code == 404:
            raise ImageError(f"{self.ref.host}/{self.ref.repo}:{reference}: no such manifest")
        if resp.status_code != 200:
            raise ImageError(
                f"{self.ref.host}/{self.ref.repo}: manifest {reference} answered "
                f"{resp.status_code}: {body_excerpt(resp)}"
            )
        data = resp.content
        media = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if not media or media in ("application/json", "text/plain"):
            media = _media_of(data, f"manifest {reference}")
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and reference != digest:
            raise ImageError(f"manifest {reference}: content digest is {digest}")
        return Manifest(data, media, digest)

    def _get_blob(self, digest: str) -> Any:
        _hex_of(digest)
        resp = self._call("GET", f"blobs/{digest}", stream=True)
        for _ in range(5):  # redirects (S3-backed registries) without registry credentials
            location = resp.headers.get("Location")
            if not (300 <= resp.status_code < 400 and location):
                break
            resp.close()
            resp = self._call("GET", urljoin(self._url(f"blobs/{digest}"), location),
                              stream=True)  # fmt: skip
        if resp.status_code != 200:
            status = resp.status_code
            resp.close()
            raise ImageError(f"{self.ref.host}/{self.ref.repo}: blob {digest} answered {status}")
        return resp

    def fetch_blob(
        self, digest: str, dest: str, size: int | None = None, progress: Progress | None = None
    ) -> None:
        resp = self._get_blob(digest)
        try:
            with atomic_write(dest, buffering=_PIECE) as f:
                writer = _HashingWriter(f, f"blob {digest}", progress)
                for piece in resp.iter_content(_PIECE):
                    writer.write(piece)
                writer.check(digest, size)
        except OSError as e:
            if isinstance(e, BackendError | ImageError):
                raise
            raise ImageError(f"blob {digest}: download failed: {e}") from e
        finally:
            resp.close()

    def read_blob(self, digest: str, limit: int = _MANIFEST_LIMIT) -> bytes:
        resp = self._get_blob(digest)
        try:
            data = b""
            for piece in resp.iter_content(_PIECE):
                data += piece
                if len(data) > limit:
                    raise ImageError(f"blob {digest} is larger than {limit} bytes")
        finally:
            resp.close()
        if sha256_digest(data) != digest:
            raise ImageError(f"blob {digest}: content digest is {sha256_digest(data)}")
        return data

    def has_blob(self, digest: str) -> bool:
        _hex_of(digest)
        resp = self._call("HEAD", f"blobs/{digest}")
        if resp.status_code in (200, 307):
            return True
        if resp.status_code == 404:
            return False
        raise ImageError(f"{self.ref.host}/{self.ref.repo}: HEAD blob {digest}: "
                         f"{resp.status_code}")  # fmt: skip

    def _upload(self, digest: str, body: Any, size: int) -> None:
        resp = self._call("POST", "blobs/uploads/")
        if resp.status_code != 202 or "Location" not in resp.headers:
            raise ImageError(
                f"{self.ref.host}/{self.ref.repo}: starting an upload answered "
                f"{resp.status_code}: {body_excerpt(resp)}"
            )
        location = urljoin(self._url("blobs/uploads/"), resp.headers["Location"])
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        resp = self._call("PUT", f"{location}{sep}digest={digest}", headers, data=body)
        if resp.status_code != 201:
            raise ImageError(
                f"{self.ref.host}/{self.ref.repo}: upload of blob {digest} answered "
                f"{resp.status_code}: {body_excerpt(resp)}"
            )

    def push_blob(self, path: str, digest: str, progress: Progress | None = None) -> None:
        size = os.path.getsize(path)
        if self.has_blob(digest):
            log.info("blob %s already in %s/%s", digest, self.ref.host, self.ref.repo)
            if progress is not None:
                progress(size)
            return
        with open(path, "rb") as f:
            self._upload(digest, _ProgressReader(f, progress), size)

    def push_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        if not self.has_blob(digest):
            self._upload(digest, data, len(data))
        return digest

    def push_manifest(self, data: bytes, media_type: str) -> str:
        return self.put_manifest(sha256_digest(data), data, media_type)

    def put_manifest(self, tag: str, data: bytes, media_type: str) -> str:
        resp = self._call("PUT", f"manifests/{tag}", {"Content-Type": media_type}, data=data)
        if resp.status_code not in (200, 201):
            raise ImageError(
                f"{self.ref.host}/{self.ref.repo}: manifest {tag} answered "
                f"{resp.status_code}: {body_excerpt(resp)}"
            )
        return sha256_digest(data)

    def close(self) -> None:
        self.backend.close()


class _ProgressReader:
    """A file upload body that reports progress (requests streams any object with ``read``)."""

    def __init__(self, f: Any, progress: Progress | None) -> None:
        self.f = f
        self.progress = progress
        self.done = 0

    def read(self, n: int = -1) -> bytes:
        piece: bytes = self.f.read(_PIECE if n is None or n < 0 else n)
        self.done += len(piece)
        if self.progress is not None and piece:
            self.progress(self.done)
        return piece

    def seek(self, offset: int) -> None:
        self.f.seek(offset)
        self.done = offset

    def __len__(self) -> int:
        return os.fstat(self.f.fileno()).st_size - self.done


class LayoutStore(ImageStore):
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/``);
    tags are ``org.opencontainers.image.ref.name`` annotations in ``index.json``."""

    def __init__(self, ref: ImageRef, *, create: bool = False) -> None:
        assert ref.layout is not None
        self.ref = ref
        self.root = ref.layout
        marker = os.path.join(self.root, "oci-layout")
        if not os.path.exists(marker):
            if not create:
                raise ImageError(f"{self.root} is not an OCI image layout (no oci-layout file)")
            os.makedirs(os.path.join(self.root, "blobs", "sha256"), exist_ok=True)
            with atomic_write(marker) as f:
                f.write(b'{"imageLayoutVersion":"1.0.0"}')
            with atomic_write(os.path.join(self.root, "index.json")) as f:
                f.write(json.dumps({"schemaVersion": 2, "manifests": []}).encode())

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", _hex_of(digest))

    def _index(self) -> dict[str, Any]:
        path = os.path.join(self.root, "index.json")
        try:
            with open(path, "rb") as f:
                return _parse_json(f.read(), path)
        except FileNotFoundError as e:
            raise ImageError(f"{self.root}: no index.json") from e

    def _get_manifest(self, reference: str) -> Manifest:
        desc: dict[str, Any] = {"digest": reference}
        if not reference.startswith("sha256:"):
            found = [
                d for d in self._index().get("manifests", [])
                if (d.get("annotations") or {}).get(ANNOTATION_REF_NAME) == reference
            ]  # fmt: skip
            if not found:
                raise ImageError(f"{self.root}: no image tagged {reference!r}")
            desc = found[-1]
        digest = str(desc.get("digest", ""))
        data = self.read_blob(digest)
        media = str(desc.get("mediaType") or _media_of(data, f"manifest {digest}"))
        return Manifest(data, media, digest)

    def fetch_blob(
        self, digest: str, dest: str, size: int | None = None, progress: Progress | None = None
    ) -> None:
        src = self.blob_path(digest)
        try:
            with open(src, "rb") as inp, atomic_write(dest, buffering=_PIECE) as f:
                writer = _HashingWriter(f, f"blob {digest}", progress)
                while piece := inp.read(_PIECE):
                    writer.write(piece)
                writer.check(digest, size)
        except FileNotFoundError as e:
            raise ImageError(f"{self.root}: blob {digest} is missing") from e

    def read_blob(self, digest: str, limit: int = _MANIFEST_LIMIT) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError as e:
            raise ImageError(f"{self.root}: blob {digest} is missing") from e
        if len(data) > limit:
            raise ImageError(f"blob {digest} is larger than {limit} bytes")
        if sha256_digest(data) != digest:
            raise ImageError(f"{self.root}: blob {digest} is corrupt")
        return data

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def push_blob(self, path: str, digest: str, progress: Progress | None = None) -> None:
        if not self.has_blob(digest):
            with open(path, "rb") as inp, atomic_write(self.blob_path(digest)) as f:
                while piece := inp.read(_PIECE):
                    f.write(piece)
        if progress is not None:
            progress(os.path.getsize(path))

    def push_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        if not self.has_blob(digest):
            with atomic_write(self.blob_path(digest)) as f:
                f.write(data)
        return digest

    def push_manifest(self, data: bytes, media_type: str) -> str:
        return self.push_bytes(data)

    def put_manifest(self, tag: str, data: bytes, media_type: str) -> str:
        digest = self.push_bytes(data)
        index = self._index()
        manifests = [
            d for d in index.get("manifests", [])
            if (d.get("annotations") or {}).get(ANNOTATION_REF_NAME) != tag
        ]  # fmt: skip
        manifests.append({"mediaType": media_type, "digest": digest, "size": len(data),
                          "annotations": {ANNOTATION_REF_NAME: tag}})  # fmt: skip
        index["manifests"] = manifests
        with atomic_write(os.path.join(self.root, "index.json")) as f:
            f.write(json.dumps(index, indent=2).encode())
        return digest


def open_store(ref: ImageRef, *, insecure: bool = False, auth: str | None = None,
               create: bool = False) -> ImageStore:  # fmt: skip
    """The store ``ref`` names; ``create`` makes a missing layout directory (push targets)."""
    if ref.is_layout:
        return LayoutStore(ref, create=create)
    return RegistryStore(ref, insecure=insecure, auth=auth)

