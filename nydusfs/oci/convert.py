"""Convert an OCI image into a nydus image, as upstream's ``nydusify convert`` does.

Steps: read the source manifest and config; for each layer, download it (a layout's blobs are
read in place) and build one RAFS blob and a per-layer bootstrap from the tar stream
(``nydus-image create --type targz-rafs``); merge the bootstraps with the OCI whiteout rules
(``nydus-image merge``); pack the merged bootstrap as ``image/image.boot`` in a tar.gz layer;
push the blobs, the bootstrap layer, a config and a manifest.

The target manifest is what a nydus-aware runtime (nydus-snapshotter) recognises: one layer per
data blob, media type ``application/vnd.oci.image.layer.nydus.blob.v1``, annotated
``containerd.io/snapshot/nydus-blob: "true"``, digest = the blob id (sha256 of the blob file);
then the bootstrap layer, ``application/vnd.oci.image.layer.v1.tar+gzip``, annotated
``containerd.io/snapshot/nydus-bootstrap: "true"``, ``containerd.io/snapshot/nydus-fs-version``
and ``containerd.io/uncompressed`` (its diff id). The config is the source's with
``rootfs.diff_ids`` naming the new layers (a nydus blob is its own diff id, as upstream's
converter writes it). Layers whose tar holds no file data give no blob, as in upstream.

Concurrency: one thread drives the steps; the blob writer compresses on its own thread pool.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nydusfs.errors import BuildError, NydusError
from nydusfs.oci import (
    ANNOTATION_NYDUS_BLOB,
    ANNOTATION_NYDUS_BOOTSTRAP,
    ANNOTATION_NYDUS_FS_VERSION,
    ANNOTATION_UNCOMPRESSED,
    ARTIFACT_NYDUS_MANIFEST,
    BOOTSTRAP_NAME_IN_LAYER,
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LAYER_GZIP,
    MEDIA_NYDUS_BLOB,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
    OS_FEATURE_NYDUS,
)
from nydusfs.oci.reference import ImageRef
from nydusfs.oci.store import (
    ImageError,
    ImageStore,
    LayoutStore,
    Manifest,
    RegistryStore,
    open_store,
    sha256_digest,
)
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.rafs.builder.merge import MergeOptions, merge
from nydusfs.types import Compressor, Digester

log = logging.getLogger(__name__)

_TAR_TYPES = {
    MEDIA_OCI_LAYER: "tar-rafs",
    MEDIA_OCI_LAYER_GZIP: "targz-rafs",
    MEDIA_DOCKER_LAYER_GZIP: "targz-rafs",
    "application/vnd.docker.image.rootfs.diff.tar": "tar-rafs",
}

# A progress reporter: (what, total bytes) -> callback taking the bytes done so far.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass(slots=True)
class ConvertOptions:
    source: ImageRef
    target: ImageRef
    work_dir: str | None = None  # default: a temporary directory, removed afterwards
    source_insecure: bool = False
    target_insecure: bool = False
    platform: str = "linux/amd64"
    compressor: Compressor = Compressor.ZSTD
    digester: Digester = Digester.BLAKE3
    chunk_size: int = 0x10_0000
    prefetch_patterns: list[bytes] = field(default_factory=list)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: ProgressFactory | None = None
    keep_work_dir: bool = False
    # Push an index holding the source manifest and the nydus one (nydusify --merge-platform).
    merge_platform: bool = False


@dataclass(slots=True)
class ConvertResult:
    manifest_digest: str
    manifest: dict[str, Any]
    blob_ids: list[str]
    bootstrap_size: int
    source_compressed_size: int  # sum of the source layers' sizes
    target_compressed_size: int  # sum of the nydus blobs and the bootstrap layer
    seconds: dict[str, float]


def _quiet(_what: str, _total: int) -> Callable[[int], None]:
    return lambda _done: None


def _scaled(bar: Callable[[int], None]) -> Callable[[int, int], None]:
    """The builder reports (done, total) bytes; a bar made with a total of 1 MiB wants parts."""
    return lambda done, total: bar(done * (1 << 20) // max(total, 1))


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def bootstrap_layer(bootstrap: str) -> tuple[bytes, str]:
    """The bootstrap as a tar.gz layer holding ``image/image.boot``; returns (layer bytes,
    diff id of the uncompressed tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(os.path.dirname(BOOTSTRAP_NAME_IN_LAYER))
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        info = tarfile.TarInfo(BOOTSTRAP_NAME_IN_LAYER)
        info.size, info.mode = os.path.getsize(bootstrap), 0o644
        with open(bootstrap, "rb") as f:
            tar.addfile(info, f)
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha256_digest(tar_bytes)


class Converter:
    """One conversion; ``run`` does it all."""

    def __init__(self, opts: ConvertOptions) -> None:
        self.opts = opts
        self.progress = opts.progress or _quiet
        self.seconds: dict[str, float] = {}

    def _timed(self, step: str, started: float) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + time.monotonic() - started

    def run(self) -> ConvertResult:
        opts = self.opts
        if opts.work_dir:
            os.makedirs(opts.work_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="nydusify-", dir=opts.work_dir)
        try:
            src = open_store(opts.source, insecure=opts.source_insecure)
            with src, open_store(opts.target, insecure=opts.target_insecure, create=True) as dst:
                return self._convert(src, dst, work)
        finally:
            if not opts.keep_work_dir:
                shutil.rmtree(work, ignore_errors=True)

    def _convert(self, src: ImageStore, dst: ImageStore, work: str) -> ConvertResult:
        opts = self.opts
        started = time.monotonic()
        if isinstance(dst, RegistryStore):
            dst.check_push()
        source_manifest = src.get_manifest(opts.source.reference, opts.platform)
        manifest = source_manifest.json()
        config_desc = manifest.get("config") or {}
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ImageError(f"{opts.source}: manifest has no layers")
        source_config = src.read_blob(str(config_desc.get("digest", "")))
        config = json.loads(source_config)
        layer_files: list[str] = []
        self._timed("manifest", started)

        blob_dir = os.path.join(work, "blobs")
        os.makedirs(blob_dir)
        boots: list[str] = []
        blobs: list[tuple[str, str]] = []  # (sha256 of the blob file, path)
        digests: list[str] = []
        sizes: list[int] = []
        source_size = 0
        for i, desc in enumerate(layers):
            media = str(desc.get("mediaType", ""))
            source_type = _TAR_TYPES.get(media)
            if source_type is None:
                raise ImageError(f"{opts.source}: layer {i} has unsupported media type {media!r}")
            digest, size = str(desc.get("digest", "")), int(desc.get("size", 0))
            source_size += size
            tar_path = self._layer_source(src, digest, size, work, i)
            started = time.monotonic()
            boot = os.path.join(work, f"layer{i}.boot")
            bar = self.progress(f"build layer {i + 1}/{len(layers)}", 1 << 20)  # in parts
            build_opts = BuildOptions(
                source=tar_path, source_type=source_type, bootstrap=boot, blob_dir=blob_dir,
                compressor=opts.compressor, digester=opts.digester, chunk_size=opts.chunk_size,
                whiteout_spec="oci", blob_toc=True,
                prefetch_policy="fs" if opts.prefetch_patterns else "none",
                prefetch_patterns=list(opts.prefetch_patterns), threads=opts.threads,
                progress=_scaled(bar),
            )  # fmt: skip
            try:
                result = build(build_opts)
            except BuildError as e:
                raise ImageError(f"{opts.source}: layer {i} ({digest}): {e}") from e
            self._timed("build", started)
            layer_files.append(tar_path)
            if tar_path.startswith(work) and not opts.merge_platform:
                os.unlink(tar_path)
            boots.append(boot)
            # With a ToC the builder's blob id is not the sha256 of the file (upstream's
            # quirk), but a registry names blobs by content: the merge takes the real digest
            # and size, as nydusify passes them (--blob-digests, --blob-sizes).
            layer_digest, layer_size = "0" * 64, 0  # for a layer without a blob: unused
            for path in result.blob_paths:
                layer_digest, layer_size = _file_sha256(path), os.path.getsize(path)
                blobs.append((layer_digest, path))
            digests.append(layer_digest)
            sizes.append(layer_size)
            log.info("layer %d: %s -> %d files, blob %s", i, digest, result.files,
                     result.blobs[0].blob_id if result.blobs else "(none)")  # fmt: skip

        started = time.monotonic()
        image_boot = os.path.join(work, "image.boot")
        merged = merge(MergeOptions(sources=boots, bootstrap=image_boot,
                                    blob_digests=digests, blob_sizes=sizes,
                                    prefetch_policy="fs" if opts.prefetch_patterns else "none",
                                    prefetch_patterns=list(opts.prefetch_patterns)))  # fmt: skip
        used = {b.blob_id for b in merged.blobs}
        self._timed("merge", started)

        started = time.monotonic()
        descs, diff_ids = [], []
        target_size = 0
        for blob_id, path in blobs:
            if blob_id not in used:
                log.info("blob %s: every file of it was deleted by upper layers, dropped", blob_id)
                continue
            digest, size = f"sha256:{blob_id}", os.path.getsize(path)
            dst.push_blob(path, digest, self.progress(f"push blob {blob_id[:12]}", size))
            descs.append({"mediaType": MEDIA_NYDUS_BLOB, "digest": digest, "size": size,
                          "annotations": {ANNOTATION_NYDUS_BLOB: "true"}})  # fmt: skip
            diff_ids.append(digest)
            target_size += size
        layer, diff_id = bootstrap_layer(image_boot)
        boot_digest = dst.push_bytes(layer)
        descs.append({
            "mediaType": MEDIA_OCI_LAYER_GZIP, "digest": boot_digest, "size": len(layer),
            "annotations": {ANNOTATION_NYDUS_BOOTSTRAP: "true", ANNOTATION_NYDUS_FS_VERSION: "6",
                            ANNOTATION_UNCOMPRESSED: diff_id},
        })  # fmt: skip
        diff_ids.append(diff_id)
        target_size += len(layer)

        config.setdefault("rootfs", {})["type"] = "layers"
        config["rootfs"]["diff_ids"] = diff_ids
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        config_digest = dst.push_bytes(config_bytes)
        config_media = MEDIA_OCI_CONFIG
        if config_desc.get("mediaType") == MEDIA_DOCKER_CONFIG:
            config_media = MEDIA_OCI_CONFIG  # the manifest is OCI, so is its config
        new_manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": config_media, "digest": config_digest,
                       "size": len(config_bytes)},
            "layers": descs,
        }  # fmt: skip
        data = json.dumps(new_manifest, indent=2).encode()
        if opts.merge_platform:
            digest = dst.push_manifest(data, MEDIA_OCI_MANIFEST)
            index = self._merge_platform(dst, source_manifest, source_config, layer_files,
                                         config, digest, len(data))  # fmt: skip
            dst.put_manifest(opts.target.tag, index, MEDIA_OCI_INDEX)
        else:
            digest = dst.put_manifest(opts.target.tag, data, MEDIA_OCI_MANIFEST)
        self._timed("push", started)
        return ConvertResult(
            manifest_digest=digest,
            manifest=new_manifest,
            blob_ids=[str(d["digest"]).removeprefix("sha256:") for d in descs[:-1]],
            bootstrap_size=os.path.getsize(image_boot),
            source_compressed_size=source_size,
            target_compressed_size=target_size,
            seconds=self.seconds,
        )

    def _merge_platform(self, dst: ImageStore, source: Manifest, source_config: bytes,
                        layer_files: list[str], config: dict[str, Any], nydus_digest: str,
                        nydus_size: int) -> bytes:  # fmt: skip
        """Copy the source image into the target repository (what is missing) and return the
        index that lists it next to the nydus manifest, as nydusify's ``--merge-platform``."""
        src_json = source.json()
        dst.push_bytes(source_config)
        for desc, path in zip(src_json["layers"], layer_files, strict=True):
            digest = str(desc["digest"])
            dst.push_blob(path, digest, self.progress(f"push layer {digest[7:19]}",
                                                      int(desc.get("size", 0))))  # fmt: skip
        dst.push_manifest(source.data, source.media_type)
        platform = {"architecture": config.get("architecture", ""), "os": config.get("os", "")}
        if config.get("variant"):
            platform["variant"] = config["variant"]
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_INDEX,
            "manifests": [
                {"mediaType": source.media_type, "digest": source.digest,
                 "size": len(source.data), "platform": platform},
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": nydus_digest, "size": nydus_size,
                 "platform": {**platform, "os.features": [OS_FEATURE_NYDUS]},
                 "artifactType": ARTIFACT_NYDUS_MANIFEST},
            ],
        }  # fmt: skip
        return json.dumps(index, indent=2).encode()

    def _layer_source(self, src: ImageStore, digest: str, size: int, work: str, i: int) -> str:
        """A local path of the layer tar: the layout's own blob file, or a download."""
        started = time.monotonic()
        if isinstance(src, LayoutStore):
            path = src.blob_path(digest)
            if not os.path.exists(path):
                raise ImageError(f"{src.root}: layer blob {digest} is missing")
            return path
        path = os.path.join(work, f"layer{i}.tar")
        src.fetch_blob(digest, path, size, self.progress(f"pull layer {digest[7:19]}", size))
        self._timed("pull", started)
        return path


def convert(opts: ConvertOptions) -> ConvertResult:
    """Convert ``opts.source`` to a nydus image at ``opts.target``; ``NydusError`` on failure."""
    if opts.target.is_layout and str(opts.source) == str(opts.target):
        raise NydusError("source and target name the same image")
    return Converter(opts).run()
