"""The tree generator and snapshot helpers that the mount and builder tests trust."""

from __future__ import annotations

import os
import shutil
import stat
from collections import Counter
from pathlib import Path

from tests.helpers.tree import diff_snapshots, make_tree, snapshot


def test_same_seed_same_tree_other_seed_other_tree(tmp_path: Path) -> None:
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_tree(tmp_path / name, files=80, total_bytes=1 << 20, seed=seed)
    a, b, c = (snapshot(tmp_path / n, mtime=True) for n in "abc")
    assert diff_snapshots(a, b) == []
    assert diff_snapshots(a, c) != []


def test_tree_has_the_corner_cases(tmp_path: Path) -> None:
    root = tmp_path / "t"
    make_tree(root, files=100, total_bytes=2 << 20, seed=3)
    snap = snapshot(root)
    types = {e["type"] for e in snap.values()}
    assert {"reg", "dir", "lnk", "fifo", "sock"} <= types
    if os.geteuid() == 0:
        assert {"chr", "blk"} <= types
        assert any(b"security.capability" in e["xattrs"] for e in snap.values())
        assert snap[b"/special/rel-link"]["xattrs"] == {b"trusted.label": b"on a symlink"}
    assert b"/special/\xff\xfe" in snap
    assert b"/special/" + b"L" * 255 in snap
    assert max(p.count(b"/") for p in snap) >= 40
    assert not (root / "special" / "dangling").exists()  # exists() follows the link
    groups = Counter(e["hardlink"] for e in snap.values() if "hardlink" in e)
    assert sorted(groups.values()) == [2, 3] and set(groups) == {0, 1}
    sparse = os.stat(root / "special" / "sparse")
    assert sparse.st_blocks * 512 < sparse.st_size
    assert sum(e.get("size", 0) for e in snap.values() if e["type"] == "reg") > 1_500_000
    assert snap[b"/special/rel-link"]["symlink"].startswith(b"../")


def test_diff_reports_each_kind_of_change(tmp_path: Path) -> None:
    make_tree(tmp_path / "a", files=30, total_bytes=100_000, seed=9, with_special=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    before = snapshot(tmp_path / "a")
    files = sorted(p for p, e in before.items() if e["type"] == "reg" and e["size"] > 0)
    b = os.fsencode(tmp_path / "b")
    with open(b + files[0], "ab") as f:
        f.write(b"x")
    os.chmod(b + files[1], 0o600 if before[files[1]]["mode"] != 0o600 else 0o640)
    os.setxattr(b + files[2], "user.new", b"1")
    os.unlink(b + files[3])
    os.mkfifo(b + b"/new-fifo")
    diffs = diff_snapshots(before, snapshot(tmp_path / "b"))
    text = "\n".join(diffs)
    assert "sha256" in text and "size" in text and "mode" in text and "xattrs" in text
    assert "only in first" in text and "only in second (fifo)" in text
    assert diff_snapshots(before, snapshot(tmp_path / "b"), ignore_paths=[b"/new-fifo"]) != []


def test_ignore_fields_and_dir_size(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"data")
    a = snapshot(tmp_path / "a", mtime=True, dir_size=True)
    b = {p: dict(e) for p, e in a.items()}
    b[b"/"]["size"] += 4096
    b[b"/f"]["mtime"] += 1
    assert len(diff_snapshots(a, b)) == 2
    assert diff_snapshots(a, b, ignore=("mtime", "dir_size")) == []
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == a[b"/"]["mode"]
