"""``nydusify convert`` on small hand-made OCI layouts: layers without data, the config, the
bootstrap layer, and clear errors for what cannot be converted."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from nydusfs.oci import (
    MEDIA_NYDUS_BLOB,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_LAYER_ZSTD,
    MEDIA_OCI_MANIFEST,
)
from nydusfs.oci.bootstrap import bootstrap_descriptor, extract_bootstrap
from nydusfs.oci.convert import ConvertOptions, convert
from nydusfs.oci.reference import parse_reference
from nydusfs.oci.store import LayoutStore, sha256_digest
from nydusfs.rafs.superblock import RafsSuper
from tests.helpers.image import snapshot_image
from tests.oci.conftest import run_cli


def _layer(entries: list[tuple[str, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


def _image(root: Path, layers: list[bytes], media: str = MEDIA_OCI_LAYER_GZIP) -> None:
    store = LayoutStore(parse_reference(f"oci:{root}:v1"), create=True)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["A=1"]}, "rootfs": {"type": "layers"}}).encode()
    descs = [{"mediaType": media, "digest": store.push_bytes(x), "size": len(x)} for x in layers]
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
                "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": store.push_bytes(config),
                           "size": len(config)}, "layers": descs}  # fmt: skip
    store.put_manifest("v1", json.dumps(manifest).encode(), MEDIA_OCI_MANIFEST)


def test_layers_without_data_and_the_config(tmp_path: Path) -> None:
    _image(tmp_path / "src", [
        _layer([("etc", None), ("etc/a", b"a" * 5000), ("etc/b", b"b")]),
        _layer([("etc", None), ("etc/.wh.b", b""), ("var", None)]),  # no file data: no blob
        _layer([("etc", None), ("etc/c", b"c" * 100)]),
    ])  # fmt: skip
    run_cli("nydusify", "convert", "--source", f"oci:{tmp_path / 'src'}:v1",
            "--target", f"oci:{tmp_path / 'out'}:v1-nydus")  # fmt: skip
    store = LayoutStore(parse_reference(f"oci:{tmp_path / 'out'}:v1-nydus"))
    manifest = store.get_manifest("v1-nydus").json()
    media = [layer["mediaType"] for layer in manifest["layers"]]
    assert media == [MEDIA_NYDUS_BLOB, MEDIA_NYDUS_BLOB, MEDIA_OCI_LAYER_GZIP]
    config = json.loads(store.read_blob(manifest["config"]["digest"]))
    assert config["config"] == {"Env": ["A=1"]}
    assert len(config["rootfs"]["diff_ids"]) == 3
    desc = bootstrap_descriptor(manifest, "out")
    layer = store.read_blob(desc["digest"], 1 << 30)
    assert sha256_digest(gzip.decompress(layer)) == config["rootfs"]["diff_ids"][-1]
    boot = tmp_path / "image.boot"
    extract_bootstrap(layer, str(boot), "out")
    with RafsSuper.load(boot) as sup:
        assert [f"sha256:{b.blob_id}" for b in sup.blobs] == [
            d["digest"] for d in manifest["layers"][:2]
        ]
    image = snapshot_image(boot, tmp_path / "out" / "blobs" / "sha256")
    assert sorted(image) == [b"/", b"/etc", b"/etc/a", b"/etc/c", b"/var"]
    assert image[b"/etc/c"]["size"] == 100


def test_unsupported_layers_and_missing_images(tmp_path: Path) -> None:
    _image(tmp_path / "zstd", [b"\x28\xb5\x2f\xfd"], media=MEDIA_OCI_LAYER_ZSTD)
    proc = run_cli("nydusify", "convert", "--source", f"oci:{tmp_path / 'zstd'}:v1",
                   "--target", f"oci:{tmp_path / 'out'}:x", check=False)  # fmt: skip
    assert proc.returncode == 1 and b"unsupported media type" in proc.stderr
    proc = run_cli("nydusify", "convert", "--source", f"oci:{tmp_path / 'zstd'}:v9",
                   "--target", f"oci:{tmp_path / 'out'}:x", check=False)  # fmt: skip
    assert proc.returncode == 1 and b"no image tagged 'v9'" in proc.stderr
    _image(tmp_path / "bad", [b"this is not a tar archive at all" * 40])
    proc = run_cli("nydusify", "convert", "--source", f"oci:{tmp_path / 'bad'}:v1",
                   "--target", f"oci:{tmp_path / 'out'}:x", check=False)  # fmt: skip
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert last.startswith(b"nydusify: ") and b"layer 0 (sha256:" in last
    assert b"bad tar header checksum" in last


@pytest.mark.parametrize("target", ["oci:{src}:v1"])
def test_refuses_to_overwrite_its_source(tmp_path: Path, target: str) -> None:
    _image(tmp_path / "src", [_layer([("a", b"a")])])
    proc = run_cli("nydusify", "convert", "--source", f"oci:{tmp_path / 'src'}:v1",
                   "--target", target.format(src=tmp_path / "src"), check=False)  # fmt: skip
    assert proc.returncode == 1 and b"same image" in proc.stderr


def test_progress_is_reported_for_build_and_push(tmp_path: Path) -> None:
    _image(tmp_path / "src", [_layer([("f", bytes(300_000))]), _layer([("g", b"g" * 9000)])])
    seen: dict[str, list[int]] = {}

    def factory(what: str, total: int) -> Callable[[int], None]:
        seen[what] = [total]
        return seen[what].append

    convert(ConvertOptions(source=parse_reference(f"oci:{tmp_path / 'src'}:v1"),
                           target=parse_reference(f"oci:{tmp_path / 'out'}:v1"),
                           progress=factory))  # fmt: skip
    builds = [v for k, v in seen.items() if k.startswith("build layer")]
    pushes = [v for k, v in seen.items() if k.startswith("push blob")]
    assert len(builds) == 2 and len(pushes) == 2
    for total, *done in builds + pushes:
        assert done and done[-1] == total and done == sorted(done)
