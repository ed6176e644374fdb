"""Mount/umount churn through the API while other mounts are read: no errors, no leaks."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from nydusfs.api.client import NydusdClient
from tests.api.daemon import api_daemon, fd_count, make_image, mount_config, rss_kib, write_tree

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

CYCLES = 200
RSS_GROWTH_LIMIT_KIB = 64 * 1024  # generous: the allocator keeps freed arenas around


def test_mount_umount_churn_with_readers(small_tree: Path, tmp_path: Path) -> None:
    stable = make_image(small_tree, tmp_path / "stable")
    churn_src = write_tree(tmp_path / "churn-src", {"hello": b"churn\n", "d/x": b"x" * 10000})
    churn = make_image(churn_src, tmp_path / "churn")
    files = [p for p in small_tree.rglob("*") if p.is_file() and not p.is_symlink()]
    digests = {p.relative_to(small_tree): hashlib.sha256(p.read_bytes()).digest() for p in files}
    errors: list[str] = []
    reads = [0]
    stop = threading.Event()

    with api_daemon(tmp_path) as d:
        d.client.mount("/stable", str(stable), mount_config(tmp_path / "stable"))
        churn_config = mount_config(tmp_path / "churn")

        def reader() -> None:
            while not stop.is_set():
                for rel, digest in digests.items():
                    try:
                        data = (d.mnt / "stable" / rel).read_bytes()
                    except OSError as e:
                        errors.append(f"read {rel}: {e!r}")
                        continue
                    if hashlib.sha256(data).digest() != digest:
                        errors.append(f"wrong bytes in {rel}")
                    reads[0] += 1

        def churner(name: str, cycles: int) -> None:
            with NydusdClient(str(d.sock)) as client:
                for _ in range(cycles):
                    try:
                        client.mount(name, str(churn), churn_config)
                        if (d.mnt / name.lstrip("/") / "hello").read_bytes() != b"churn\n":
                            errors.append(f"wrong bytes in {name}/hello")
                        client.umount(name)
                    except Exception as e:  # collected: a failing cycle must not hang the test
                        errors.append(f"{name}: {e!r}")
                        return

        churner("/warm", 10)  # let caches, thread pools and the allocator settle first
        fds_before, rss_before = fd_count(d.proc.pid), rss_kib(d.proc.pid)
        readers = [threading.Thread(target=reader) for _ in range(4)]
        for t in readers:
            t.start()
        churners = [
            threading.Thread(target=churner, args=(f"/c{i}", CYCLES // 2)) for i in range(2)
        ]
        try:
            for t in churners:
                t.start()
            for t in churners:
                t.join()
        finally:
            stop.set()
            for t in readers:
                t.join()
        fds_after, rss_after = fd_count(d.proc.pid), rss_kib(d.proc.pid)
        info = d.client.daemon_info()

    assert errors == []
    assert reads[0] > len(digests)
    assert list(info["backend_collection"]) == ["/stable"]
    assert fds_after <= fds_before + 4, (fds_before, fds_after)
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KIB, (rss_before, rss_after)
