"""Contract-suite factories for the remote backends: registry (anonymous, htpasswd, token with
POST, token with the GET fallback, behind a redirecting front), s3 (moto) and oss (the
signature-checking look-alike). Servers listen on 127.0.0.1 only (``registry_servers``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydusfs.config import OssConfig, RegistryConfig, S3Config
from nydusfs.storage.backends import BlobBackend
from nydusfs.storage.backends.oss import OssBackend
from nydusfs.storage.backends.registry import RegistryBackend
from nydusfs.storage.backends.s3 import S3Backend
from tests.contract import Blobs, backend_factory
from tests.helpers.registry_servers import (
    DockerRegistry,
    MotoS3,
    OssServer,
    RedirectFront,
    TokenService,
    basic_auth,
    have_moto,
    have_registry,
)

REPO = "contract/blobs"
USERS = {"contract": "s3cret"}


@contextlib.contextmanager
def _registry(
    blobs: Blobs, workdir: Path, auth: str | None, token: TokenService | None = None
) -> Iterator[DockerRegistry]:
    if not have_registry():
        pytest.skip("needs /usr/bin/docker-registry (make deps installs docker-registry)")
    registry = DockerRegistry(workdir, auth=auth, users=USERS, token_service=token)
    try:
        for blob_id, data in blobs.items():
            assert registry.push_blob(REPO, data) == blob_id
        yield registry
    finally:
        registry.close()


def _registry_backend(host: str, **kw: object) -> Iterator[BlobBackend]:
    config = RegistryConfig(scheme="http", host=host, repo=REPO, retry_limit=1, **kw)  # type: ignore[arg-type]
    backend = RegistryBackend(config, id="contract")
    try:
        yield backend
    finally:
        backend.close()


@backend_factory("registry-anonymous")
def registry_anonymous(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    with _registry(blobs, workdir, None) as registry:
        yield from _registry_backend(registry.host)


@backend_factory("registry-htpasswd")
def registry_htpasswd(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    with _registry(blobs, workdir, "htpasswd") as registry:
        yield from _registry_backend(registry.host, auth=basic_auth("contract", "s3cret"))


@backend_factory("registry-token-post")
def registry_token_post(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    token = TokenService(workdir, USERS)
    try:
        with _registry(blobs, workdir, "token", token) as registry:
            yield from _registry_backend(registry.host, auth=basic_auth("contract", "s3cret"))
    finally:
        token.close()


@backend_factory("registry-token-get-fallback")
def registry_token_get(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    token = TokenService(workdir, USERS)
    token.allow_post, token.token_field, token.expires_in = False, "access_token", None
    try:
        with _registry(blobs, workdir, "token", token) as registry:
            yield from _registry_backend(registry.host, auth=basic_auth("contract", "s3cret"))
    finally:
        token.close()


@backend_factory("registry-redirected")
def registry_redirected(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    with _registry(blobs, workdir, None) as registry:
        front = RedirectFront(registry, location_host="localhost", scheme="https")
        try:
            yield from _registry_backend(
                front.host, blob_url_scheme="http", blob_redirected_host="127.0.0.1"
            )
        finally:
            front.close()


@backend_factory("s3-moto")
def s3_moto(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    if not have_moto():
        pytest.skip("needs moto[server] (test extras)")
    moto = MotoS3(workdir)
    try:
        moto.create_bucket("contract-bucket")
        for blob_id, data in blobs.items():
            moto.put_object("contract-bucket", f"nydus/{blob_id}", data)
        config = S3Config(
            scheme="http",
            endpoint=moto.endpoint,
            region=moto.region,
            bucket_name="contract-bucket",
            object_prefix="nydus/",
            access_key_id=moto.access_key,
            access_key_secret=moto.secret_key,
            retry_limit=1,
        )
        backend = S3Backend(config, id="contract")
        try:
            yield backend
        finally:
            backend.close()
    finally:
        moto.close()


@backend_factory("oss-signed")
def oss_signed(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    server = OssServer()
    try:
        for blob_id, data in blobs.items():
            server.objects[("contract-bucket", f"nydus/{blob_id}")] = data
        config = OssConfig(
            scheme="http",
            endpoint=server.endpoint,
            bucket_name="contract-bucket",
            object_prefix="nydus/",
            access_key_id=server.key_id,
            access_key_secret=server.key_secret,
            retry_limit=1,
        )
        backend = OssBackend(config, id="contract")
        try:
            yield backend
        finally:
            backend.close()
        assert server.hits["bad-signature"] == 0
    finally:
        server.close()
