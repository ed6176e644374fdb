"""``nydus-image merge`` against ``umoci unpack`` as the oracle of OCI layer semantics, plus the
merge's own contracts (blob table, parent bootstrap, errors and exit codes)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.rafs.superblock import RafsSuper
from nydusfs.types import Compressor
from tests.helpers.image import snapshot_image
from tests.helpers.tree import diff_snapshots, snapshot
from tests.oci.conftest import run_cli

Entry = tuple[str, str, dict]  # (kind, path, tarinfo attributes); kind: file dir sym link fifo


def _tar(path: Path, entries: list[Entry]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, attrs in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            info.mode = {"dir": 0o755, "sym": 0o777}.get(kind, 0o644)
            data = attrs.pop("data", b"")
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
                         "sym": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]  # fmt: skip
            for key, value in attrs.items():
                setattr(info, key, value)
            info.size = len(data) if kind == "file" else 0
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return path


def f(name: str, data: bytes = b"x", **attrs: object) -> Entry:
    return ("file", name, {"data": data, **attrs})


def d(name: str, **attrs: object) -> Entry:
    return ("dir", name, dict(attrs))


LAYERS: list[list[Entry]] = [
    [
        d("etc"), f("etc/passwd", b"root:x:0:0\n"), f("etc/group", b"root:x:0\n"),
        d("usr"), d("usr/lib"), f("usr/lib/big", bytes(range(256)) * 5000),
        f("usr/lib/a", b"a" * 70000), ("link", "usr/lib/a-link", {"linkname": "usr/lib/a"}),
        d("var"), d("var/cache"), f("var/cache/x", b"cache"), d("var/cache/sub"),
        f("var/cache/sub/y", b"y"), ("sym", "usr/lib/sym", {"linkname": "a"}),
        f("gone-later", b"removed by layer 3\n"), f(".wh.nothing-below"),
        d("data"), f("data/only", b"only in layer 0, deleted later\n" * 1000),
    ],
    [
        d("etc"), f("etc/passwd", b"root:x:0:0\nuser:x:1000:1000\n", mode=0o600),
        f("etc/.wh.group"), f("etc/group.new", b"group\n"),
        d("var/cache", mode=0o700, uid=7, gid=8),
        f("var/cache/.wh..wh..opq"), f("var/cache/fresh", b"fresh"),
        d("usr/lib"), f("usr/lib/.wh.a-link"), f("usr/lib/a", b"new a\n"),
        ("sym", "usr/lib/sym", {"linkname": "big"}),
        ("fifo", "usr/lib/pipe", {}), f("usr/lib/.wh.pipe"),  # same layer: the pipe stays
        f(".wh.data"),
    ],
    [
        # Parents come with their children, as docker and umoci write layers: the merge takes
        # a directory's attributes from the top layer listing it (an implied parent counts).
        f(".wh.gone-later"), f("etc", b"etc is a file now\n"), d("var"),
        d("var/cache", mode=0o700, uid=7, gid=8), d("var/cache/fresh"),
        f("var/cache/fresh/inside", b"in", uid=1000, gid=1000,
          pax_headers={"SCHILY.xattr.user.k": "v"}),
    ],
]


@pytest.fixture(scope="module")
def layer_tars(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    work = tmp_path_factory.mktemp("merge-layers")
    return [_tar(work / f"layer{i}.tar", [(k, n, dict(a)) for k, n, a in layer])
            for i, layer in enumerate(LAYERS)]  # fmt: skip


@pytest.fixture(scope="module")
def built(
    layer_tars: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[str], Path]:
    """Per-layer bootstraps and the blob directory (blobs named by digest)."""
    work = tmp_path_factory.mktemp("merge-built")
    blobs = work / "blobs"
    blobs.mkdir()
    boots = []
    for i, tar in enumerate(layer_tars):
        boot = work / f"layer{i}.boot"
        build(BuildOptions(source=str(tar), source_type="tar-rafs", bootstrap=str(boot),
                           blob_dir=str(blobs), chunk_size=0x10000))  # fmt: skip
        boots.append(str(boot))
    return boots, blobs


@pytest.fixture(scope="module")
def umoci_tree(layer_tars: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed (make deps installs it)")
    work = tmp_path_factory.mktemp("merge-umoci")
    layout = work / "layout"
    for cmd in (["init", "--layout", str(layout)], ["new", "--image", f"{layout}:t"]):
        subprocess.run(["umoci", *cmd], check=True, capture_output=True)
    for tar in layer_tars:
        subprocess.run(["umoci", "raw", "add-layer", "--image", f"{layout}:t", str(tar)],
                       check=True, capture_output=True)  # fmt: skip
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", str(work / "bundle")],
                   check=True, capture_output=True)  # fmt: skip
    return snapshot(work / "bundle" / "rootfs")


@pytest.mark.root
def test_merge_equals_umoci_unpack(built: tuple[list[str], Path], umoci_tree: dict,
                                   tmp_path: Path) -> None:  # fmt: skip
    boots, blobs = built
    out = tmp_path / "merged.boot"
    run_cli("nydus_image", "merge", "-B", str(out), *boots)
    merged = snapshot_image(out, blobs)
    # umoci gives the root the attributes of its bundle directory, not of a layer.
    assert diff_snapshots(umoci_tree, merged, ignore_paths=[b"/"]) == []
    assert merged[b"/usr/lib/pipe"]["type"] == "fifo"
    assert b"/.wh.nothing-below" not in merged and b"/data" not in merged


def test_blob_table_lists_used_blobs_in_first_use_order(built: tuple[list[str], Path],
                                                        tmp_path: Path) -> None:  # fmt: skip
    boots, _ = built
    ids = [RafsSuper.load(b).blobs[0].blob_id for b in boots]
    out = tmp_path / "merged.boot"
    run_cli("nydus_image", "merge", "-B", str(out), "-J", str(tmp_path / "out.json"), *boots)
    with RafsSuper.load(out) as sup:
        got = [b.blob_id for b in sup.blobs]
        assert [b.blob_index for b in sup.blobs] == list(range(len(got)))
        used = {c.blob_index for _, n in sup.walk() if n.is_reg() for c in n.chunks()}
    assert sorted(got) == sorted(ids) and used == set(range(len(got)))
    assert json.loads((tmp_path / "out.json").read_text())["blobs"] == got
    # Deleting every file of the top layer's blob drops that blob from the table.
    top = _tar(tmp_path / "l3.tar", [f(".wh.var"), f(".wh.etc")])
    top_boot = tmp_path / "l3.boot"
    build(BuildOptions(source=str(top), source_type="tar-rafs", bootstrap=str(top_boot),
                       blob_dir=str(tmp_path), chunk_size=0x10000))  # fmt: skip
    run_cli("nydus_image", "merge", "-B", str(out), *boots, str(top_boot))
    with RafsSuper.load(out) as sup:
        assert ids[2] not in [b.blob_id for b in sup.blobs]


def test_parent_bootstrap_gives_the_same_tree(built: tuple[list[str], Path],
                                              tmp_path: Path) -> None:  # fmt: skip
    boots, blobs = built
    parent, whole, stepped = tmp_path / "p.boot", tmp_path / "all.boot", tmp_path / "s.boot"
    run_cli("nydus_image", "merge", "-B", str(parent), *boots[:2])
    run_cli("nydus_image", "merge", "-B", str(stepped), "--parent-bootstrap", str(parent),
            boots[2])  # fmt: skip
    run_cli("nydus_image", "merge", "-B", str(whole), *boots)
    assert diff_snapshots(snapshot_image(whole, blobs), snapshot_image(stepped, blobs)) == []


def test_blob_dir_output_and_digest_override(built: tuple[list[str], Path],
                                             tmp_path: Path) -> None:  # fmt: skip
    boots, _ = built
    digests = [f"{i:064x}" for i in range(1, 4)]
    run_cli("nydus_image", "merge", "-D", str(tmp_path), "--blob-digests", ",".join(digests),
            "--blob-sizes", "1,2,3", *boots)  # fmt: skip
    (out,) = [p for p in tmp_path.iterdir() if len(p.name) == 64]
    with RafsSuper.load(out) as sup:
        assert sorted(b.blob_id for b in sup.blobs) == digests
        assert sorted(b.compressed_size for b in sup.blobs) == [1, 2, 3]


def test_errors_are_one_line_with_upstream_exit_codes(built: tuple[list[str], Path],
                                                      tmp_path: Path) -> None:  # fmt: skip
    boots, _ = built
    other = tmp_path / "other.boot"
    tar = _tar(tmp_path / "o.tar", [f("file", b"data")])
    build(BuildOptions(source=str(tar), source_type="tar-rafs", bootstrap=str(other),
                       blob_dir=str(tmp_path), compressor=Compressor.NONE))  # fmt: skip
    proc = run_cli("nydus_image", "merge", "-B", str(tmp_path / "x"), boots[0], str(other),
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and b"inconsistent chunk size" in proc.stderr
    proc = run_cli("nydus_image", "merge", "-B", str(tmp_path / "x"), "--blob-sizes", "1",
                   *boots, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert b"number of blob size entries 1 doesn't match number of sources 3" in proc.stderr
    proc = run_cli("nydus_image", "merge", "-B", str(tmp_path / "x"), str(tar), check=False)
    assert proc.returncode == 1 and b"not a RAFS image" in proc.stderr
    assert proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_prefetch_list_goes_into_the_merged_bootstrap(built: tuple[list[str], Path],
                                                      tmp_path: Path) -> None:  # fmt: skip
    boots, _ = built
    out = tmp_path / "merged.boot"
    run_cli("nydus_image", "merge", "-B", str(out), "--prefetch-policy", "fs", *boots,
            stdin=b"/usr/lib/big\n/var/cache\n/not/there\n")  # fmt: skip
    with RafsSuper.load(out) as sup:
        wanted = {sup.lookup_path(p).ino for p in ("/usr/lib/big", "/var/cache")}
        assert set(sup.prefetch_table) == wanted
