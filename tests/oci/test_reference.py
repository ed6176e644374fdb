"""Image references and the OCI layout store: parsing rules and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nydusfs.errors import ConfigError
from nydusfs.oci import MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST
from nydusfs.oci.bootstrap import (
    bootstrap_descriptor,
    extract_bootstrap,
    image_config,
    load_image_config,
)
from nydusfs.oci.reference import DOCKER_HUB, ImageRef, parse_reference
from nydusfs.oci.store import ImageError, LayoutStore, pick_platform, sha256_digest

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ubuntu", ImageRef(DOCKER_HUB, "library/ubuntu", "latest")),
        ("library/ubuntu:22.04", ImageRef(DOCKER_HUB, "library/ubuntu", "22.04")),
        ("127.0.0.1:5000/a/b:v1", ImageRef("127.0.0.1:5000", "a/b", "v1")),
        ("localhost/app", ImageRef("localhost", "app", "latest")),
        ("http://127.0.0.1:5000/app:v1", ImageRef("127.0.0.1:5000", "app", "v1", None, "http")),
        ("docker://ghcr.io/o/r@" + DIGEST, ImageRef("ghcr.io", "o/r", "latest", DIGEST)),
        ("oci:/tmp/layout:v2", ImageRef(tag="v2", layout="/tmp/layout")),
        ("oci:/tmp/layout", ImageRef(tag="latest", layout="/tmp/layout")),
    ],
)
def test_parse(text: str, expected: ImageRef) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty image reference"),
        ("host.io/UPPER:v1", "invalid repository component 'UPPER'"),
        ("host.io/app:bad tag", "invalid tag"),
        ("host.io/app@sha256:123", "invalid digest"),
        ("oci:", "no layout directory"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_reference(text)


def test_reference_round_trips() -> None:
    for text in ("http://127.0.0.1:5000/a/b:v1", "oci:/x/y:t", "ghcr.io/o/r@" + DIGEST):
        assert str(parse_reference(text)).removeprefix("docker://") == text


def test_layout_store(tmp_path: Path) -> None:
    ref = parse_reference(f"oci:{tmp_path}/lay:v1")
    with pytest.raises(ImageError, match="not an OCI image layout"):
        LayoutStore(ref)
    store = LayoutStore(ref, create=True)
    config = store.push_bytes(b"{}")
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": config}, "layers": []})
    digest = store.put_manifest("v1", manifest.encode(), MEDIA_OCI_MANIFEST)
    got = store.get_manifest("v1")
    assert got.digest == digest and got.media_type == MEDIA_OCI_MANIFEST
    assert store.get_manifest(digest).data == manifest.encode()
    with pytest.raises(ImageError, match="no image tagged 'v2'"):
        store.get_manifest("v2")
    # Re-tagging replaces the index entry; a corrupt blob is reported, not served.
    store.put_manifest("v1", manifest.encode(), MEDIA_OCI_MANIFEST)
    assert len(json.loads((tmp_path / "lay/index.json").read_text())["manifests"]) == 1
    Path(store.blob_path(config)).write_bytes(b"{ }")
    with pytest.raises(ImageError, match="corrupt"):
        store.read_blob(config)
    with pytest.raises(ImageError, match="malformed digest"):
        store.has_blob("md5:00")
    out = tmp_path / "copy"
    with pytest.raises(ImageError, match="content digest"):
        store.fetch_blob(config, str(out))
    assert not out.exists()


def test_platform_and_bootstrap_selection(tmp_path: Path) -> None:
    index = {"mediaType": MEDIA_OCI_INDEX, "manifests": [
        {"digest": "sha256:1", "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "sha256:2", "platform": {"os": "linux", "architecture": "amd64"}},
    ]}  # fmt: skip
    assert pick_platform(index, "x", "linux/amd64")["digest"] == "sha256:2"
    both = {"manifests": [
        {"digest": "sha256:n", "platform": {"os": "linux", "architecture": "amd64",
                                            "os.features": ["nydus.remoteimage.v1"]}},
        {"digest": "sha256:o", "platform": {"os": "linux", "architecture": "amd64"}},
    ]}  # fmt: skip
    assert pick_platform(both, "x", "linux/amd64")["digest"] == "sha256:o"
    assert pick_platform(both, "x", "linux/amd64", nydus=True)["digest"] == "sha256:n"
    with pytest.raises(ImageError, match="no manifest for platform linux/s390x"):
        pick_platform(index, "x", "linux/s390x")
    with pytest.raises(ImageError, match="is not a nydus image"):
        bootstrap_descriptor({"layers": [{"mediaType": "application/x"}] * 2}, "img")
    with pytest.raises(ImageError, match="not valid gzip"):
        extract_bootstrap(b"\x1f\x8bgarbage", str(tmp_path / "b"), "img")
    with pytest.raises(ImageError, match="not a valid tar"):
        extract_bootstrap(b"not a tar" * 100, str(tmp_path / "b"), "img")
    assert sha256_digest(b"") == "sha256:" + (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_image_config_rules() -> None:
    ref = parse_reference("http://127.0.0.1:5000/app:v1")
    config = image_config(ref, None)
    assert config.backend is not None and config.backend.type == "registry"
    settings = config.backend.settings
    assert (settings.scheme, settings.host, settings.repo) == ("http", "127.0.0.1:5000", "app")
    assert config.rafs.enable_xattr and config.cache.type == "blobcache"
    with pytest.raises(ConfigError, match="cannot be mounted lazily"):
        image_config(parse_reference("oci:/x"), None)
    from nydusfs.config import localfs_config

    with pytest.raises(ConfigError, match="needs a registry backend"):
        image_config(ref, localfs_config("/tmp"))


def test_image_config_file_may_leave_out_host_and_repo(tmp_path: Path) -> None:
    ref = parse_reference("http://127.0.0.1:5000/app:v1")
    toml = tmp_path / "c.toml"
    toml.write_text('version = 2\n[backend]\ntype = "registry"\n[backend.registry]\n'
                    'timeout = 9\n[cache]\ntype = "blobcache"\n')  # fmt: skip
    v1 = tmp_path / "c.json"
    v1.write_text(json.dumps({"device": {"backend": {"type": "registry", "config": {}}}}))
    for path in (toml, v1):
        config = image_config(ref, load_image_config(str(path), ref))
        assert config.backend is not None
        assert (config.backend.settings.host, config.backend.settings.repo) == (
            "127.0.0.1:5000", "app"
        )
    assert config.backend.settings.timeout != 9  # the v1 file did not set it
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 2, "cache": {"type": "nope"}}')
    with pytest.raises(ConfigError, match=r"bad\.json: cache\.type"):
        load_image_config(str(bad), ref)
