"""The headline workflow on real tools: an OCI image built with debootstrap and umoci, pushed by
skopeo to Debian's docker-registry, converted by ``nydusify convert``, mounted by
``nydusd --image`` straight from the registry; the mounted tree must equal ``umoci unpack``."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import requests

from nydusfs.cli.nydusify import progress_bars
from nydusfs.oci import (
    ANNOTATION_NYDUS_BLOB,
    ANNOTATION_NYDUS_BOOTSTRAP,
    ANNOTATION_NYDUS_FS_VERSION,
    ANNOTATION_UNCOMPRESSED,
    ARTIFACT_NYDUS_MANIFEST,
    MEDIA_NYDUS_BLOB,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
    OS_FEATURE_NYDUS,
)
from nydusfs.oci.bootstrap import bootstrap_descriptor, extract_bootstrap
from nydusfs.oci.reference import parse_reference
from nydusfs.oci.store import LayoutStore, RegistryStore
from tests.helpers.image import snapshot_image
from tests.helpers.oci_image import skopeo_copy
from tests.helpers.registry_servers import DockerRegistry, basic_auth
from tests.helpers.tree import diff_snapshots, snapshot
from tests.mount.nydusd_proc import nydusd, write_config
from tests.oci.conftest import NYDUS_TAG, SOURCE_REPO, DebianImage, run_cli

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]


def _manifest(registry: DockerRegistry, tag: str) -> dict:
    resp = requests.get(
        f"{registry.url}/v2/{SOURCE_REPO}/manifests/{tag}",
        headers={"Accept": MEDIA_OCI_MANIFEST}, timeout=10,
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == MEDIA_OCI_MANIFEST
    return resp.json()


def test_mounted_from_registry_equals_umoci_unpack(
    debian_image: DebianImage, nydus_ref: str, tmp_path: Path
) -> None:
    work = tmp_path / "cache"
    config = write_config(tmp_path / "nydusd.json", {
        "version": 2,
        "cache": {"type": "blobcache", "filecache": {"work_dir": str(work)}},
        "rafs": {"enable_xattr": True},
    })  # fmt: skip
    mnt = tmp_path / "mnt"
    with nydusd("--image", f"http://{nydus_ref}", "--config", str(config), mountpoint=mnt,
                timeout=60):  # fmt: skip
        mounted = snapshot(mnt)
    assert diff_snapshots(debian_image.reference, mounted) == []
    # The image is realistic: thousands of files, hard links, xattrs, special modes.
    ref = debian_image.reference
    assert len(ref) > 4000
    assert ref[b"/opt/app/blob.bin"]["hardlink"] == ref[b"/opt/app/blob.link"]["hardlink"]
    assert ref[b"/opt/app/blob.bin"]["xattrs"] == {b"user.origin": b"layer3"}
    assert ref[b"/opt/app/run"]["mode"] == 0o4755
    assert ref[b"/usr/share/locale/locale.alias"]["type"] == "reg"
    assert [p for p in ref if p.startswith(b"/usr/share/locale/")] == [
        b"/usr/share/locale/locale.alias"
    ]
    assert b"/etc/motd" not in ref and b"/etc/motd.renamed" in ref
    assert b"/usr/share/common-licenses" not in ref and b"/usr/share/licenses/GPL-3" in ref
    assert ref[b"/etc/cron.daily"]["type"] == "reg" and ref[b"/etc/hostname"]["type"] == "dir"
    assert not [p for p in ref if b"/.wh." in p]
    # Lazily: the cache holds what the walk read, fetched from the registry's blobs.
    assert any(p.name.endswith(".blob.data") for p in work.iterdir())


def test_manifest_has_upstream_media_types(
    source_ref: str, nydus_ref: str, registry: DockerRegistry
) -> None:
    manifest = _manifest(registry, NYDUS_TAG)
    source = _manifest(registry, source_ref.rsplit(":", 1)[1])
    layers = manifest["layers"]
    assert len(layers) == len(source["layers"]) + 1  # every layer has data here
    for desc in layers[:-1]:
        assert desc["mediaType"] == MEDIA_NYDUS_BLOB
        assert desc["annotations"] == {ANNOTATION_NYDUS_BLOB: "true"}
        data = requests.get(f"{registry.url}/v2/{SOURCE_REPO}/blobs/{desc['digest']}",
                            timeout=30).content  # fmt: skip
        assert len(data) == desc["size"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
    boot = layers[-1]
    assert boot["mediaType"] == MEDIA_OCI_LAYER_GZIP
    assert boot["annotations"][ANNOTATION_NYDUS_BOOTSTRAP] == "true"
    assert boot["annotations"][ANNOTATION_NYDUS_FS_VERSION] == "6"
    config = requests.get(
        f"{registry.url}/v2/{SOURCE_REPO}/blobs/{manifest['config']['digest']}", timeout=10
    ).json()
    assert config["rootfs"]["diff_ids"] == [
        *(d["digest"] for d in layers[:-1]), boot["annotations"][ANNOTATION_UNCOMPRESSED]
    ]
    assert config["config"]["Cmd"] == ["/bin/bash"]
    # A second real client reads it: skopeo sees the same layers.
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{nydus_ref}"],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert json.loads(out)["layers"] == layers


def test_nydusd_refuses_a_plain_oci_image(source_ref: str, tmp_path: Path) -> None:
    proc = run_cli("nydusd", "--image", f"http://{source_ref}", "--mountpoint",
                   str(tmp_path / "mnt"), check=False, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert b"is not a nydus image" in proc.stderr


def test_nydusd_reports_a_missing_tag(registry: DockerRegistry, tmp_path: Path) -> None:
    proc = run_cli("nydusd", "--image", f"http://{registry.host}/{SOURCE_REPO}:no-such-tag",
                   "--mountpoint", str(tmp_path / "mnt"), check=False, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert b"no such manifest" in proc.stderr


def test_convert_layout_to_layout(debian_image: DebianImage, tmp_path: Path) -> None:
    """No registry: an OCI layout directory in, a nydus image in another layout out."""
    out = tmp_path / "nydus-layout"
    run_cli("nydusify", "convert", "--source", f"oci:{debian_image.layout}:v1",
            "--target", f"oci:{out}:nydus", "--output-json", str(tmp_path / "sum.json"),
            )  # fmt: skip
    summary = json.loads((tmp_path / "sum.json").read_text())
    store = LayoutStore(parse_reference(f"oci:{out}:nydus"))
    manifest = store.get_manifest("nydus").json()
    assert manifest["layers"][-1]["digest"] not in summary["blobs"]
    desc = bootstrap_descriptor(manifest, "layout")
    extract_bootstrap(store.read_blob(desc["digest"], 1 << 30), str(tmp_path / "image.boot"), "x")
    image = snapshot_image(tmp_path / "image.boot", out / "blobs" / "sha256")
    assert diff_snapshots(debian_image.reference, image) == []


def test_push_with_credentials(
    debian_image: DebianImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pushes authenticate like lazy reads: IMAGE_PULL_AUTH against an htpasswd registry."""
    reg = DockerRegistry(tmp_path, auth="htpasswd", users={"alice": "s3cret"})
    try:
        target = f"http://{reg.host}/secure/debian:nydus"
        args = ("convert", "--source", f"oci:{debian_image.layout}:v1", "--target", target)
        monkeypatch.setenv("IMAGE_PULL_AUTH", "")
        proc = run_cli("nydusify", *args, check=False)
        assert proc.returncode == 1 and b"requires credentials" in proc.stderr
        assert b"layer 0" not in proc.stderr  # refused before any layer was built
        monkeypatch.setenv("IMAGE_PULL_AUTH", basic_auth("alice", "s3cret"))
        run_cli("nydusify", *args)
        resp = requests.get(f"{reg.url}/v2/secure/debian/manifests/nydus",
                            headers={"Accept": MEDIA_OCI_MANIFEST}, auth=("alice", "s3cret"),
                            timeout=10)  # fmt: skip
        assert resp.status_code == 200 and len(resp.json()["layers"]) == 4
    finally:
        reg.close()


def test_progress_bars_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_bars(io.StringIO()) is None
    out = Tty()
    factory = progress_bars(out)
    assert factory is not None
    show = factory("push blob", 4 << 20)
    show(1 << 20)
    show(4 << 20)
    assert "push blob" in out.getvalue() and "100.0%" in out.getvalue()


def test_insecure_registry_falls_back_to_http(
    debian_image: DebianImage, registry: DockerRegistry, tmp_path: Path
) -> None:
    """No scheme in the references: https first, plain http after the TLS failure, for the
    push (--target-insecure) and for nydusd (a config with skip_verify)."""
    target = f"{registry.host}/test/insecure:nydus"
    run_cli("nydusify", "convert", "--source", f"oci:{debian_image.layout}:v1", "--target",
            target, "--target-insecure")  # fmt: skip
    config = write_config(tmp_path / "nydusd.json", {
        "version": 2,
        "backend": {"type": "registry", "registry": {"scheme": "", "skip_verify": True}},
        "cache": {"type": "blobcache", "filecache": {"work_dir": str(tmp_path / "cache")}},
        "rafs": {"enable_xattr": True},
    })  # fmt: skip
    with nydusd("--image", target, "--config", str(config), mountpoint=tmp_path / "mnt",
                timeout=60):  # fmt: skip
        data = (tmp_path / "mnt/opt/app/blob.bin").read_bytes()
        release = (tmp_path / "mnt/etc/os-release").read_bytes()
    expected = debian_image.reference[b"/opt/app/blob.bin"]["sha256"]
    assert hashlib.sha256(data).hexdigest() == expected
    assert release.endswith(b'VARIANT="nydusfs test layer"\n')


def test_merge_platform_index(
    debian_image: DebianImage, source_ref: str, registry: DockerRegistry, tmp_path: Path
) -> None:
    """--merge-platform: the target tag is an index of the OCI manifest and the nydus one;
    nydusd picks the nydus one, a converter reading the index picks the OCI one."""
    target = f"{registry.host}/test/merged:v1"
    run_cli("nydusify", "convert", "--source", f"http://{source_ref}", "--target",
            f"http://{target}", "--merge-platform")  # fmt: skip
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{target}"],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    index = json.loads(raw)
    assert index["mediaType"] == MEDIA_OCI_INDEX
    oci, nydus = index["manifests"]
    assert oci["platform"] == {"architecture": "amd64", "os": "linux"}
    assert nydus["platform"]["os.features"] == [OS_FEATURE_NYDUS]
    assert nydus["artifactType"] == ARTIFACT_NYDUS_MANIFEST
    # The source image was copied into the target repository: skopeo can copy it out.
    out = tmp_path / "copied"
    skopeo_copy(f"docker://{target}", f"oci:{out}:x")
    layout = LayoutStore(parse_reference(f"oci:{out}:x"))
    assert layout.get_manifest("x").digest == oci["digest"]
    with nydusd("--image", f"http://{target}", mountpoint=tmp_path / "mnt", timeout=60):
        release = (tmp_path / "mnt/etc/os-release").read_bytes()
    assert release.endswith(b'VARIANT="nydusfs test layer"\n')
    with RegistryStore(parse_reference(f"http://{target}")) as store:
        assert store.get_manifest("v1").digest == oci["digest"]  # what a converter reads
        assert store.get_manifest("v1", nydus=True).digest == nydus["digest"]


def test_mount_bootstrap_file_with_registry_backend(
    debian_image: DebianImage, nydus_ref: str, registry: DockerRegistry, tmp_path: Path
) -> None:
    """The other way in: the bootstrap as a file, the data from the registry by config."""
    manifest = _manifest(registry, NYDUS_TAG)
    desc = bootstrap_descriptor(manifest, nydus_ref)
    layer = requests.get(f"{registry.url}/v2/{SOURCE_REPO}/blobs/{desc['digest']}", timeout=30)
    boot = tmp_path / "image.boot"
    extract_bootstrap(layer.content, str(boot), nydus_ref)
    config = write_config(tmp_path / "nydusd.json", {
        "version": 2,
        "backend": {"type": "registry", "registry": {"scheme": "http", "host": registry.host,
                                                     "repo": SOURCE_REPO}},
        "cache": {"type": "blobcache", "filecache": {"work_dir": str(tmp_path / "cache")}},
        "rafs": {"enable_xattr": True},
    })  # fmt: skip
    paths = [b"/usr/bin/python3.11", b"/etc/os-release", b"/opt/app/blob.link", b"/usr/bin/bash"]
    with nydusd("--bootstrap", str(boot), "--config", str(config), mountpoint=tmp_path / "mnt",
                timeout=60):  # fmt: skip
        for path in paths:
            data = (tmp_path / "mnt" / path.decode().lstrip("/")).read_bytes()
            assert hashlib.sha256(data).hexdigest() == debian_image.reference[path]["sha256"]
