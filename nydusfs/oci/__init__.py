"""OCI images: references, a registry and layout-directory client, and the nydus converter.

``reference`` parses image references, ``store`` reads and writes images in a registry (through
the registry backend's authentication) or an OCI layout directory, ``convert`` turns an OCI
image into a nydus image (one RAFS blob per layer plus a merged bootstrap layer) with
upstream's media types and annotations, and ``bootstrap`` fetches the bootstrap of a nydus
image for ``nydusd --image``.
"""

from __future__ import annotations

# Media types and annotations, as upstream's nydusify and nydus-snapshotter write them.
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
ARTIFACT_NYDUS_MANIFEST = "application/vnd.nydus.image.manifest.v1+json"
OS_FEATURE_NYDUS = "nydus.remoteimage.v1"
BOOTSTRAP_NAME_IN_LAYER = "image/image.boot"

ANNOTATION_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANNOTATION_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANNOTATION_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
ANNOTATION_UNCOMPRESSED = "containerd.io/uncompressed"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
