"""``nydusd`` mounts of overlays and passthrough directories: the read-only overlay (no
``--writable``), passthrough mounts through the API, and the CLI's config handling."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from tests.api.daemon import api_daemon, make_image
from tests.helpers.overlay import make_lower
from tests.mount.nydusd_proc import localfs_config, nydusd

pytestmark = pytest.mark.root


def _overlay_config(tmp_path: Path, blobs: Path) -> Path:
    config = localfs_config(blobs, None, cache="dummycache")
    config["overlay"] = {"upper_dir": str(tmp_path / "upper"), "work_dir": str(tmp_path / "work")}
    (tmp_path / "upper").mkdir(exist_ok=True)
    (tmp_path / "work").mkdir(exist_ok=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_overlay_without_writable_is_read_only(tmp_path: Path) -> None:
    lower = make_lower(tmp_path / "lower")
    boot = make_image(lower, tmp_path / "image")
    config = _overlay_config(tmp_path, tmp_path / "image")
    upper = tmp_path / "upper"
    (upper / "new").write_bytes(b"from the upper layer")
    os.mknod(upper / "b", stat.S_IFCHR, 0)  # a whiteout hides the lower "b"
    (upper / "a").mkdir()
    os.setxattr(upper / "a", "trusted.overlay.opaque", b"y")  # hides a/b and a/c
    (upper / "a" / "only").write_bytes(b"x")
    mnt = tmp_path / "mnt"
    with nydusd("--bootstrap", str(boot), "--config", str(config), mountpoint=mnt):
        assert sorted(os.listdir(mnt)) == ["a", "c", "d", "new"]
        assert os.listdir(mnt / "a") == ["only"]
        assert (mnt / "new").read_bytes() == b"from the upper layer"
        assert (mnt / "d" / "b").is_dir()
        assert "trusted.overlay.opaque" not in os.listxattr(mnt / "a")
        for write in (lambda: (mnt / "x").write_bytes(b"1"), lambda: os.unlink(mnt / "new")):
            with pytest.raises(OSError) as info:
                write()
            assert info.value.errno == errno.EROFS


def test_writable_overlay_cli(tmp_path: Path) -> None:
    lower = make_lower(tmp_path / "lower")
    boot = make_image(lower, tmp_path / "image")
    config = _overlay_config(tmp_path, tmp_path / "image")
    mnt = tmp_path / "mnt"
    with nydusd("--bootstrap", str(boot), "--config", str(config), "--writable", mountpoint=mnt):
        (mnt / "a" / "b").write_bytes(b"changed")  # copy-up of a lower file
        os.unlink(mnt / "b")
        os.rename(mnt / "d", mnt / "e")  # a directory with lower parts
        assert sorted(os.listdir(mnt)) == ["a", "c", "e"]
    upper = tmp_path / "upper"
    assert (upper / "a" / "b").read_bytes() == b"changed"
    st = os.lstat(upper / "b")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(upper / "e", "trusted.overlay.opaque") == b"y"
    assert (lower / "a" / "b").read_bytes() == b"lower a/b\n"  # the lower tree is untouched
    assert os.listdir(tmp_path / "work" / "work") == []


def test_passthrough_through_the_api(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_bytes(b"hi")
    with api_daemon(tmp_path, "--writable") as d:
        d.client.mount("/share", str(share), "", fs_type="passthrough_fs")
        mnt = d.mnt / "share"
        assert (mnt / "hello").read_bytes() == b"hi"
        (mnt / "sub").mkdir()
        (mnt / "sub" / "f").write_bytes(b"written through nydusd")
        os.rename(mnt / "hello", mnt / "sub" / "moved")
        info = d.client.get("/api/v1/daemon")
        assert info["backend_collection"]["/share"]["backend_type"] == "PassthroughFs"
        d.client.umount("/share")
    assert (share / "sub" / "f").read_bytes() == b"written through nydusd"
    assert (share / "sub" / "moved").read_bytes() == b"hi"


def test_passthrough_read_only_without_writable(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"data")
    with nydusd("--shared-dir", str(share), mountpoint=tmp_path / "mnt"):
        assert (tmp_path / "mnt" / "f").read_bytes() == b"data"
        with pytest.raises(OSError) as info:
            (tmp_path / "mnt" / "g").write_bytes(b"")
        assert info.value.errno == errno.EROFS
