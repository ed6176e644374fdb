"""Every API route against a real ``nydusd --apisock`` process, bad inputs, nydusctl and exit."""

from __future__ import annotations

import json
import os
import random
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nydusfs.api.client import ApiClientError, NydusdClient
from tests.api.daemon import ApiDaemon, api_daemon, make_image, mount_config, write_tree
from tests.mount.nydusd_proc import is_mounted

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

BIG = random.Random(7).randbytes(300_000)


@dataclass
class Images:
    a: Path
    b: Path
    a_dir: Path
    b_dir: Path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    root = tmp_path_factory.mktemp("images")
    src_a = write_tree(root / "src-a", {"hello": b"A\n", "dir/big": BIG, "same": b"same\n"})
    src_b = write_tree(root / "src-b", {"hello": b"B\n", "only-b": b"b\n", "same": b"same\n"})
    return Images(
        make_image(src_a, root / "a"), make_image(src_b, root / "b"), root / "a", root / "b"
    )


def config_a(images: Images, **rafs: Any) -> str:
    return mount_config(images.a_dir, **rafs)


def expect_error(
    client: NydusdClient,
    status: int,
    fragment: str,
    method: str,
    path: str,
    query: dict[str, str] | None = None,
    body: Any = None,
) -> None:
    with pytest.raises(ApiClientError) as e:
        client.call(method, path, query=query, body=body)
    assert e.value.status == status, e.value
    assert fragment.lower() in e.value.message.lower(), e.value.message
    assert e.value.code


def test_daemon_info_mounts_and_metrics(images: Images, tmp_path: Path) -> None:
    with api_daemon(tmp_path) as d:
        c = d.client
        assert stat.S_IMODE(os.stat(d.sock).st_mode) == 0o600
        info = c.daemon_info()
        assert set(info) == {"version", "id", "supervisor", "state", "backend_collection"}
        assert set(info["version"]) == {
            "package_ver",
            "git_commit",
            "build_time",
            "profile",
            "rustc",
        }
        assert info["state"] == "RUNNING" and info["backend_collection"] == {}
        assert os.listdir(d.mnt) == []  # no --bootstrap: an empty pseudo root

        rafs = {"iostats_files": True, "access_pattern": True, "latest_read_files": True}
        c.mount("/a", str(images.a), config_a(images, **rafs))
        assert (d.mnt / "a" / "hello").read_bytes() == b"A\n"
        assert (d.mnt / "a" / "dir" / "big").read_bytes() == BIG

        info = c.daemon_info()
        desc = info["backend_collection"]["/a"]
        assert desc["backend_type"] == "Rafs" and desc["mountpoint"] == "/a"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \+00:00:00", desc["mounted_time"])
        assert desc["config"]["backend"]["type"] == "localfs"
        assert desc["config"]["rafs"]["iostats_files"] is True
        assert "backend_collection" not in c.get("/api/v2/daemon")

        meta = c.get("/api/v1/daemon/backend", {"mountpoint": "/a"})
        assert meta["version"] == 0x600 and meta["inodes_count"] >= 4
        expect_error(c, 400, "mountpoint", "GET", "/api/v1/daemon/backend")
        expect_error(
            c, 404, "nothing is mounted", "GET", "/api/v1/daemon/backend", {"mountpoint": "/zz"}
        )

        fs = c.get("/api/v1/metrics")
        assert fs["id"] == "/a" and fs["data_read"] >= len(BIG) and fs["files_account_enabled"]
        assert c.get("/api/v1/metrics", {"id": "/a"}) == c.get("/api/v1/metrics")
        files = c.get("/api/v1/metrics/files")
        assert any(v["data_read"] >= len(BIG) for v in files.values())
        latest = c.get("/api/v1/metrics/files", {"latest": "true"})
        assert latest and all(isinstance(r, list) for r in latest)
        assert c.get("/api/v1/metrics/files", {"latest": "true"}) == []  # taken: now empty
        patterns = c.get("/api/v1/metrics/pattern")
        assert {"ino", "nr_read", "first_access_time_secs", "first_access_time_nanos"} <= set(
            patterns[0]
        )
        backend = c.get("/api/v1/metrics/backend")
        assert backend["backend_type"] == "localfs" and backend["read_amount_total"] > 0
        cache = c.get("/api/v1/metrics/blobcache")
        assert cache["total"] > 0 and cache["underlying_files"]
        assert c.get("/api/v1/metrics/inflight") is None  # idle: 204

        # Two instances: a metrics route needs ?id=, as upstream (404 NoCounter without).
        c.mount("/b", str(images.b), mount_config(images.b_dir))
        assert sorted(os.listdir(d.mnt)) == ["a", "b"]
        for route in ("", "/files", "/pattern", "/backend", "/blobcache"):
            expect_error(c, 404, "?id=", "GET", f"/api/v1/metrics{route}")
            assert c.get(f"/api/v1/metrics{route}", {"id": "/b"}) is not None
            expect_error(c, 404, "no", "GET", f"/api/v1/metrics{route}", {"id": "/nope"})

        text = c.get("/api/v1/metrics/prometheus")
        assert "# TYPE nydusd_fs_fop_total counter" in text
        assert 'nydusd_fs_read_bytes_total{mountpoint="/a"}' in text
        assert 'nydusd_fs_read_latency_seconds_bucket{mountpoint="/a",le="+Inf"}' in text
        assert 'nydusd_state{state="RUNNING"} 1' in text
        for line in text.splitlines():  # every sample belongs to a declared family
            assert line.startswith("#") or re.match(r"^[a-z_]+(\{[^}]*\})? [-+0-9.eInf]+$", line)

        events = c.get("/api/v1/daemon/events")
        assert events["max_errors"] == 500 and events["max_size"] == 51200

        # Remount /a with image B: new content at the same place, old mount keeps no table slot.
        c.mount("/a", str(images.b), mount_config(images.b_dir), remount=True)
        deadline = time.monotonic() + 5
        while (d.mnt / "a" / "hello").read_bytes() != b"B\n":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (d.mnt / "a" / "only-b").exists()
        expect_error(
            c,
            404,
            "nothing is mounted",
            "PUT",
            "/api/v1/mount",
            {"mountpoint": "/x"},
            {"source": str(images.a), "config": config_a(images)},
        )

        c.umount("/a")
        c.umount("/b")
        assert c.daemon_info()["backend_collection"] == {}
        expect_error(c, 404, "nothing is mounted", "DELETE", "/api/v1/mount", {"mountpoint": "/a"})


def test_control_routes(images: Images, tmp_path: Path) -> None:
    with api_daemon(tmp_path) as d:
        c = d.client
        assert c.put("/api/v1/daemon", {"log_level": "debug"}) is None
        assert c.put("/api/v2/daemon", {"log_level": "info"}) is None
        expect_error(c, 400, "start in state running", "PUT", "/api/v1/daemon/start")
        expect_error(c, 501, "hot upgrade", "PUT", "/api/v1/daemon/fuse/sendfd")
        expect_error(c, 501, "hot upgrade", "PUT", "/api/v1/daemon/fuse/takeover")
        expect_error(c, 501, "blob cache", "GET", "/api/v2/blobs", {"domain_id": "x"})
        expect_error(c, 501, "blob cache", "DELETE", "/api/v2/blobs", {"blob_id": "x"})
        expect_error(c, 400, "not allowed", "DELETE", "/api/v1/daemon")  # upstream: 400
        expect_error(c, 400, "not allowed", "POST", "/api/v1/metrics")
        expect_error(c, 404, "no api route", "GET", "/api/v1/daemonx")
        expect_error(c, 404, "no api route", "GET", "/api/v3/daemon")

        assert c.get("/api/v1/config") == {}
        assert c.put("/api/v1/config", {"registry_auth": "dXNlcjpwYXNz"}) is None
        assert c.get("/api/v1/config") == {"registry_auth": "dXNlcjpwYXNz"}
        assert c.put("/api/v1/config", {"registry_auth": "b3RoZXI6cHc="}, {"id": "/m"}) is None
        assert c.get("/api/v1/config", {"id": "/m"}) == {"registry_auth": "b3RoZXI6cHc="}
        expect_error(c, 400, "not base64", "PUT", "/api/v1/config", body={"registry_auth": "%%"})
        expect_error(c, 400, "unknown key", "PUT", "/api/v1/config", body={"auth": "x"})
        expect_error(c, 501, "proxy_url", "PUT", "/api/v1/config", body={"proxy_url": "http://p"})
        assert c.get("/api/v1/daemon")["state"] == "RUNNING"


MOUNT = "/api/v1/mount"


def bad_inputs(images: Images) -> list[tuple[str, int, str, dict[str, str] | None, Any]]:
    """(method, status, message fragment, query, body) of requests that must fail."""
    ok = {"source": str(images.a), "fs_type": "rafs", "config": config_a(images)}
    mp = {"mountpoint": "/bad"}
    return [
        ("POST", 400, "malformed json", mp, "{not json"),
        ("POST", 400, "malformed json", mp, '{"source": NaN}'),
        ("POST", 400, "duplicate key", mp, '{"source": "/a", "source": "/b", "config": "{}"}'),
        ("POST", 400, "expected a json object", mp, "[1, 2]"),
        ("POST", 400, "unknown field 'sourc'", mp, {**ok, "sourc": "/x"}),
        ("POST", 400, "'source' must be a string", mp, {**ok, "source": 1}),
        ("POST", 400, "'config' must be a string", mp, {**ok, "config": {"version": 2}}),
        ("POST", 400, "'config' is required", mp, {"source": str(images.a)}),
        ("POST", 400, "'prefetch_files' must be an array", mp, {**ok, "prefetch_files": "/a"}),
        ("POST", 400, "not an absolute path", mp, {**ok, "prefetch_files": ["rel"]}),
        ("POST", 400, "must be an absolute path", mp, {**ok, "source": "rel/boot"}),
        ("POST", 400, "'..'", {"mountpoint": "/a/../b"}, ok),
        ("POST", 400, "absolute path", {"mountpoint": "rel"}, ok),
        ("POST", 400, "'mountpoint' should be specified", None, ok),
        ("POST", 400, "cannot open bootstrap", mp, {**ok, "source": "/nonexistent/boot"}),
        ("POST", 400, "not a rafs image", mp, {**ok, "source": "/etc/hostname"}),
        (
            "POST",
            400,
            "unknown backend type",
            mp,
            {**ok, "config": json.dumps({"version": 2, "backend": {"type": "ftp", "ftp": {}}})},
        ),
        ("POST", 400, "invalid config", mp, {**ok, "config": "{{{"}),
        (
            "POST",
            400,
            "unknown key",
            mp,
            {**ok, "config": json.dumps({"version": 2, "rafs": {"mdoe": "direct"}})},
        ),
        ("POST", 400, "unknown fs_type", mp, {**ok, "fs_type": "ext4"}),
        ("POST", 400, "is not a directory", mp, {**ok, "fs_type": "passthrough_fs"}),
        ("POST", 409, "already mounted", {"mountpoint": "/good"}, ok),
        ("POST", 400, "inside another mount", {"mountpoint": "/good/sub"}, ok),
        ("POST", 400, "needs a json request body", mp, None),
        ("DELETE", 404, "nothing is mounted", {"mountpoint": "/never"}, None),
        ("DELETE", 400, "takes no request body", {"mountpoint": "/good"}, "{}"),
        ("PUT", 400, "unknown log_level", None, None),  # on /daemon, below
    ]


def test_bad_inputs_are_4xx_and_the_daemon_keeps_serving(images: Images, tmp_path: Path) -> None:
    with api_daemon(tmp_path) as d:
        c = d.client
        c.mount("/good", str(images.a), config_a(images))
        for method, status, fragment, query, body in bad_inputs(images):
            path = "/api/v1/daemon" if fragment == "unknown log_level" else MOUNT
            if path != MOUNT:
                body = {"log_level": "loud"}
            expect_error(c, status, fragment, method, path, query, body)
            assert c.get("/api/v1/daemon")["state"] == "RUNNING"  # still serving
        expect_error(
            c, 400, "unknown field", "PUT", "/api/v1/daemon", body={"log_level": "info", "x": 1}
        )
        expect_error(c, 400, "takes no request body", "GET", "/api/v1/daemon", body="{}")
        assert (d.mnt / "good" / "hello").read_bytes() == b"A\n"
        assert list(c.daemon_info()["backend_collection"]) == ["/good"]
        assert not (d.mnt / "bad").exists()


def test_nydusctl(images: Images, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(config_a(images))
    with api_daemon(tmp_path) as d:
        d.nydusctl("mount", "-s", str(images.a), "-c", str(config), "-m", "/img", "-t", "rafs")
        assert (d.mnt / "img" / "dir" / "big").read_bytes() == BIG
        out = d.nydusctl("info").stdout
        assert 'Status:                 "RUNNING"' in out
        assert "\tInstance Mountpoint:  /img\n\tType:  Rafs\n" in out
        assert "\tMode:  direct\n\tPrefetch:  false\n\tPrefetch Merging Size:  1048576\n" in out
        assert json.loads(d.nydusctl("-r", "info").stdout)["state"] == "RUNNING"
        assert json.loads(d.nydusctl("info", "--raw").stdout)["backend_collection"]

        out = d.nydusctl("metrics", "fsstats").stdout
        assert "Read Latency:   <1ms    ~20ms" in out and "FOP Counters:\nGetattr(" in out
        assert re.search(r"Read Data: \d+Bytes \(0MB\)", out)
        out = d.nydusctl("metrics", "backend").stdout
        assert 'Backend Type:       "localfs"' in out
        assert "Average Latency(millis): " in out and "Request Count:" in out
        out = d.nydusctl("metrics", "cache").stdout
        assert "Whole Hits:" in out and "Prefetch Bandwidth:         NaN MB/S" in out
        assert json.loads(d.nydusctl("-r", "metrics", "cache").stdout)["total"] > 0
        out = d.nydusctl("metrics", "backend", "-I", "1", "--count", "1").stdout
        assert ">>> >>> >>> >>> >>>" in out and "Backend Read Bandwidth:     0 KB/S" in out

        d.nydusctl("set", "log-level", "debug")
        bad = d.nydusctl("set", "log-level", "loud", check=False)
        assert bad.returncode == 1 and "unknown log_level" in bad.stderr
        bad = d.nydusctl(
            "mount",
            "-s",
            str(images.a),
            "-c",
            str(config),
            "-m",
            "/p",
            "-t",
            "passthrough_fs",
            check=False,
        )
        assert bad.returncode == 1 and "400" in bad.stderr and "not a directory" in bad.stderr
        bad = d.nydusctl(
            "mount",
            "-s",
            str(images.a),
            "-c",
            str(tmp_path / "missing"),
            "-m",
            "/p",
            "-t",
            "rafs",
            check=False,
        )
        assert bad.returncode == 1 and "failed to read mount config" in bad.stderr

        d.nydusctl("umount", "-m", "/img")
        assert os.listdir(d.mnt / "img") == []  # the pseudo directory stays, as upstream
        bad = d.nydusctl("umount", "-m", "/img", check=False)
        assert bad.returncode == 1 and "404" in bad.stderr and bad.stderr.count("\n") == 1
    gone = ApiDaemon(d.proc, tmp_path / "api.sock", d.mnt, d.client).nydusctl("info", check=False)
    assert gone.returncode == 1 and "cannot talk to nydusd" in gone.stderr


def test_exit_via_api_unmounts(images: Images, tmp_path: Path) -> None:
    boot = str(images.a)
    with api_daemon(tmp_path, "--bootstrap", boot, "--localfs-dir", str(images.a_dir)) as d:
        assert (d.mnt / "hello").read_bytes() == b"A\n"
        assert list(d.client.daemon_info()["backend_collection"]) == ["/"]
        assert d.client.exit() is None  # 204, sent before the daemon stops
        assert d.proc.wait(timeout=20) == 0
        assert not is_mounted(d.mnt)
        assert not d.sock.exists()


def test_remount_never_fails_a_read(images: Images, tmp_path: Path) -> None:
    errors: list[str] = []
    seen: set[bytes] = set()
    stop = threading.Event()
    with api_daemon(tmp_path) as d:
        d.client.mount("/r", str(images.a), config_a(images))

        def reader() -> None:
            while not stop.is_set():
                try:
                    seen.add((d.mnt / "r" / "hello").read_bytes())
                    if (d.mnt / "r" / "same").read_bytes() != b"same\n":
                        errors.append("wrong content in /r/same")
                except OSError as e:
                    errors.append(repr(e))

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for i in range(8):
                boot, blobs = (images.b, images.b_dir) if i % 2 == 0 else (images.a, images.a_dir)
                d.client.mount("/r", str(boot), mount_config(blobs), remount=True)
                time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert errors == []
        assert seen == {b"A\n", b"B\n"}
        time.sleep(1.2)  # past the pseudo entry timeout: the last image (A) is what is seen
        assert (d.mnt / "r" / "hello").read_bytes() == b"A\n"


def test_inflight_lists_a_stuck_read(images: Images, tmp_path: Path) -> None:
    from nydusfs.rafs.superblock import RafsSuper
    from tests.helpers.servers import FaultServer

    with RafsSuper.load(images.a) as sup:
        blob_ids = [b.blob_id for b in sup.blobs]
    blobs = {f"/blobs/{i}": (images.a_dir / i).read_bytes() for i in blob_ids}
    config = json.dumps(
        {
            "version": 2,
            "backend": {"type": "http-proxy", "http_proxy": {"addr": "", "path": "/blobs"}},
            "cache": {"type": "dummycache"},
        }
    )
    with FaultServer(blobs) as server, api_daemon(tmp_path) as d:
        c = d.client
        c.mount("/h", str(images.a), config.replace('"addr": ""', f'"addr": "{server.url}"'))
        server.stall_next(1, 3.0)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append((d.mnt / "h/dir/big").read_bytes()))
        reader.start()
        deadline = time.monotonic() + 3
        ops = None
        while ops is None and time.monotonic() < deadline:
            ops = c.get("/api/v1/metrics/inflight")
            time.sleep(0.05)
        reader.join()
        assert ops is not None, "the stuck read never showed up"
        (op,) = [o for o in ops if o["opcode_name"] == "read"]
        assert op["opcode"] == 15 and op["inode"] >> 56 > 0  # an inode of the mount, not pseudo
        assert abs(op["timestamp_secs"] - time.time()) < 10 and op["unique"] > 0
        assert got == [BIG]
        assert c.get("/api/v1/metrics/inflight") is None  # idle again: 204
