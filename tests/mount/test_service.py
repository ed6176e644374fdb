"""The embedding API: mount images in-process, several at once, added and removed live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nydusfs.config import localfs_config
from nydusfs.daemon.daemon import DaemonState
from nydusfs.errors import FormatError, NydusError
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.service import NydusService
from tests.helpers.tree import diff_snapshots, snapshot
from tests.mount.nydusd_proc import is_mounted

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _image(src: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    build(BuildOptions(source=str(src), bootstrap=str(out / "b"), blob_dir=str(out)))
    return out / "b"


def test_embedded_daemon_with_two_images(small_tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "hello").write_bytes(b"hello\n")
    boot_a = _image(small_tree, tmp_path / "a")
    boot_b = _image(other, tmp_path / "b")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with NydusService(str(mnt)) as svc:
        assert svc.state is DaemonState.RUNNING and os.listdir(mnt) == []
        svc.mount(str(boot_a), "/a", blob_dir=str(tmp_path / "a"))
        svc.mount(
            str(boot_b), "/b", config=localfs_config(str(tmp_path / "b"), str(tmp_path / "cache"))
        )
        assert sorted(os.listdir(mnt)) == ["a", "b"]
        assert (mnt / "b" / "hello").read_bytes() == b"hello\n"
        diff = diff_snapshots(snapshot(small_tree), snapshot(mnt / "a"), ignore=("mtime", "xattrs"))
        assert diff == []
        with pytest.raises(FileExistsError):
            svc.mount(str(boot_b), "/b", blob_dir=str(tmp_path / "b"))
        with pytest.raises(FormatError):
            svc.mount(str(tmp_path / "missing.boot"), "/c", blob_dir=str(tmp_path))
        svc.umount("/a")
        assert svc.mounts() == ["/b"]
        assert (mnt / "b" / "hello").read_bytes() == b"hello\n"  # the other mount is untouched
        with pytest.raises(FileNotFoundError):
            svc.umount("/a")
    assert not is_mounted(mnt)
    with pytest.raises(NydusError):
        svc.mount(str(boot_b), "/b", blob_dir=str(tmp_path / "b"))


def test_prefetch_files_fill_the_cache(small_tree: Path, tmp_path: Path) -> None:
    boot = _image(small_tree, tmp_path / "img")
    config = localfs_config(str(tmp_path / "img"), str(tmp_path / "cache"))
    config.rafs.prefetch.enable = True
    files = sorted(p for p in small_tree.rglob("*") if p.is_file() and not p.is_symlink())
    wanted = [f"/{p.relative_to(small_tree)}" for p in files[:5]]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with NydusService(str(mnt)) as svc:
        svc.mount(str(boot), "/img", config=config, prefetch_files=[*wanted, "/not/there"])
        mounted = svc.daemon.service.mounts["/img"]
        device = mounted.device
        assert device is not None
        svc.call(device.wait_prefetch)
        expected = sum(p.stat().st_size for p in files[:5])
        assert device.metrics.prefetch_data_amount >= expected > 0
        fetched = device.backend.metrics.read_amount_total
        for rel in wanted:  # already cached: no backend traffic
            assert (mnt / "img" / rel.lstrip("/")).read_bytes() == (
                small_tree / rel[1:]
            ).read_bytes()
        assert device.backend.metrics.read_amount_total == fetched


def test_io_stats_and_access_patterns(small_tree: Path, tmp_path: Path) -> None:
    boot = _image(small_tree, tmp_path / "img")
    config = localfs_config(str(tmp_path / "img"))
    config.rafs.iostats_files = config.rafs.access_pattern = config.rafs.latest_read_files = True
    files = sorted(p for p in small_tree.rglob("*") if p.is_file() and not p.is_symlink())[:3]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with NydusService(str(mnt)) as svc:
        svc.mount(str(boot), "/img", config=config)
        stats = svc.daemon.service.mounts["/img"].fs.stats
        total = 0
        for p in files:
            total += len((mnt / "img" / p.relative_to(small_tree)).read_bytes())
        with pytest.raises(FileNotFoundError):
            (mnt / "img" / "no-such-file").stat()
        assert stats.data_read == total
        assert stats.fop_hits[4] >= len(files)  # read
        assert stats.fop_errors[9] >= 1  # the failed lookup
        read_inos = {ino for ino, c in stats.files.items() if c.data_read}
        assert len(read_inos) == len([p for p in files if p.stat().st_size])
        assert {p["ino"] for p in stats.pattern_list()} == read_inos
        latest = stats.take_latest_read()
        assert sum(len(range(r[0], r[-1] + 1)) for r in latest) == len(read_inos)
        assert stats.take_latest_read() == []  # cleared by reading it
        assert svc.metrics("/img")["data_read"] == total
        assert svc.metrics("/img", "backend")["read_amount_total"] > 0
        assert svc.metrics("/img", "blobcache")["total"] >= 1
        assert svc.info()["state"] == "RUNNING"
        assert "/img" in svc.info()["backend_collection"]
