"""Config files: upstream's samples load, and every mistake names its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nydusfs.config import (
    ConfigError,
    HttpProxyConfig,
    LocalFsConfig,
    RegistryConfig,
    load_config,
    load_config_file,
)

V2_TOML = """
version = 2
id = "my_id"

[backend]
type = "registry"

[backend.registry]
scheme = "http"
host = "127.0.0.1:5000"
repo = "library/busybox"
auth = "dXNlcjpwYXNz"
timeout = 10
retry_limit = 3

[backend.registry.proxy]
url = "http://127.0.0.1:6789"
fallback = false

[cache]
type = "blobcache"
compressed = true

[cache.filecache]
work_dir = "/var/cache/nydus"

[cache.prefetch]
enable = true
threads = 4
batch_size = 2097152
bandwidth_limit = 1048576

[rafs]
batch_size = 0
enable_xattr = true

[rafs.prefetch]
enable = true
prefetch_all = true
"""


def test_v2_toml() -> None:
    c = load_config(V2_TOML)
    assert c.id == "my_id"
    assert c.backend is not None and c.backend.type == "registry"
    reg = c.backend.settings
    assert isinstance(reg, RegistryConfig)
    assert (reg.scheme, reg.host, reg.repo, reg.timeout, reg.connect_timeout) == (
        "http", "127.0.0.1:5000", "library/busybox", 10, 5,
    )  # fmt: skip
    assert reg.retry_limit == 3 and reg.proxy.fallback is False and reg.proxy.check_interval == 5
    assert c.cache.type == "blobcache" and c.cache.compressed
    assert c.cache.filecache is not None and c.cache.filecache.work_dir == "/var/cache/nydus"
    p = c.cache.prefetch
    assert (p.enable, p.threads_count, p.batch_size, p.bandwidth_limit) == (
        True,
        4,
        2 << 20,
        1 << 20,
    )
    assert c.rafs.batch_size == 0 and c.rafs.enable_xattr and c.rafs.prefetch.prefetch_all
    # Secrets never leave through to_dict() unless asked for.
    assert "auth" not in json.dumps(c.to_dict())
    assert c.to_dict(secrets=True)["backend"]["registry"]["auth"] == "dXNlcjpwYXNz"


def test_v2_json_equals_toml() -> None:
    import tomllib

    as_json = json.dumps(tomllib.loads(V2_TOML))
    assert load_config(as_json) == load_config(V2_TOML)


def test_v1_json_conversion() -> None:
    v1 = {
        "device": {
            "backend": {"type": "localfs", "config": {"dir": "/blobs", "readahead": True}},
            "cache": {"type": "blobcache", "compressed": False, "config": {"work_dir": "/c"}},
        },
        "mode": "direct",
        "digest_validate": True,
        "amplify_io": 0,
        "fs_prefetch": {"enable": True, "threads_count": 2, "merging_size": 4096,
                        "bandwidth_rate": 100},
    }  # fmt: skip
    c = load_config(json.dumps(v1))
    assert c.backend is not None and c.backend.settings == LocalFsConfig(dir="/blobs")
    assert c.cache.filecache is not None and c.cache.filecache.work_dir == "/c"
    assert c.rafs.validate and c.rafs.batch_size == 0
    p = c.rafs.prefetch
    assert (p.enable, p.threads_count, p.batch_size, p.bandwidth_limit, p.prefetch_all) == (
        True, 2, 4096, 100, True,
    )  # fmt: skip
    # Upstream copies fs prefetch into the cache when the cache has none of its own.
    assert c.cache.prefetch == p


def test_http_proxy_needs_v2() -> None:
    v1 = {"device": {"backend": {"type": "http-proxy", "config": {"addr": "/run/x.sock"}}}}
    with pytest.raises(ConfigError, match="v2"):
        load_config(json.dumps(v1))
    v2 = {"version": 2, "backend": {"type": "http-proxy", "http-proxy": {"addr": "/run/x.sock"}}}
    c = load_config(json.dumps(v2))
    assert c.backend is not None and c.backend.settings == HttpProxyConfig(addr="/run/x.sock")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"version": 3}, r"^version: expected 2"),
        ({"version": 2, "backend": {"type": "ftp"}}, r"^backend.type: unknown backend type"),
        ({"version": 2, "backend": {"type": "localfs"}}, r"^backend.localfs: missing settings"),
        ({"version": 2, "backend": {"type": "localfs", "localfs": {}}},
         r"^backend.localfs: one of blob_file or dir"),
        ({"version": 2, "backend": {"type": "registry", "registry": {"host": "h", "repo": "r",
          "timeout": "5s"}}}, r"^backend.registry.timeout: expected an integer, got \"5s\""),
        ({"version": 2, "backend": {"type": "s3", "s3": {"bucket_name": "b"}}},
         r"^backend.s3.region: required"),
        ({"version": 2, "cache": {"type": "memcache"}}, r"^cache.type: unsupported"),
        ({"version": 2, "cache": {"prefetch": {"enable": True, "threads": 0}}},
         r"^cache.prefetch.threads_count: must be 1..1024"),
        ({"version": 2, "rafs": {"mode": "lazy"}}, r"^rafs.mode: expected direct or cached"),
        ({"version": 2, "rafs": {"enable_xattr": "yes"}}, r"^rafs.enable_xattr: expected true"),
        ({"version": 2, "rafs": {"batch_size": -1}}, r"^rafs.batch_size: must not be negative"),
        ([1, 2], r"neither a v2 config"),
    ],
)  # fmt: skip
def test_errors_name_the_key(config: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(json.dumps(config))


def test_unknown_keys_warn_or_fail(caplog: pytest.LogCaptureFixture) -> None:
    text = json.dumps({"version": 2, "rafs": {"enable_xatr": True}})
    assert load_config(text).rafs.enable_xattr is False
    assert "rafs.enable_xatr" in caplog.text
    with pytest.raises(ConfigError, match=r"^rafs.enable_xatr: unknown key"):
        load_config(text, strict=True)


def test_garbage_and_size_limits(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither JSON"):
        load_config("{not json nor = toml")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(" " * (2 << 20))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 2, "rafs": {"mode": 1}}))
    with pytest.raises(ConfigError, match=rf"^{bad}: rafs.mode: expected a string"):
        load_config_file(str(bad))
