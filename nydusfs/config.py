"""nydusd configuration: upstream's v2 schema (JSON or TOML) and the legacy v1 JSON form.

``load_config(text)`` tries, in upstream's order, JSON v2, TOML v2 and JSON v1 (converted to
v2), then validates. Field names and defaults are upstream's (``api/src/config.rs``), so an
upstream config file works unchanged. Every error is a ``ConfigError`` whose message names the
key path and what is wrong (``backend.registry.timeout: expected an integer, got "5s"``).

Unknown keys: upstream ignores them; so do we, with one warning per key naming it, unless
``strict=True`` (the HTTP API), where they are errors. Keys upstream documents but never reads
(localfs ``readahead``/``readahead_sec``) are accepted silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nydusfs.errors import ConfigError

log = logging.getLogger(__name__)

MAX_CONFIG_SIZE = 1 << 20
BACKEND_TYPES = ("localfs", "localdisk", "oss", "s3", "registry", "http-proxy")
CACHE_TYPES = ("blobcache", "filecache", "fscache", "dummycache", "")
_SILENTLY_IGNORED = frozenset({"readahead", "readahead_sec"})


# --- backends ----------------------------------------------------------------------------------


@dataclass(slots=True)
class ProxyConfig:
    """An HTTP proxy in front of the origin, health-checked, with fallback to the origin."""

    url: str = ""
    ping_url: str = ""
    fallback: bool = True
    check_interval: int = 5
    use_http: bool = False
    check_pause_elapsed: int = 300


@dataclass(slots=True)
class MirrorConfig:
    """A registry mirror tried before the origin (upstream removed these in 2025; we keep them)."""

    host: str = ""
    ping_url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    health_check_interval: int = 5
    failure_limit: int = 5
    health_check_pause_elapsed: int = 300


@dataclass(slots=True)
class HttpCommon:
    """Connection settings shared by every network backend."""

    skip_verify: bool = False
    ca_cert_files: list[str] = field(default_factory=list)
    timeout: int = 5
    connect_timeout: int = 5
    retry_limit: int = 0
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    mirrors: list[MirrorConfig] = field(default_factory=list)


@dataclass(slots=True)
class LocalFsConfig:
    blob_file: str = ""
    dir: str = ""
    alt_dirs: list[str] = field(default_factory=list)


@dataclass(slots=True)
class LocalDiskConfig:
    device_path: str = ""
    disable_gpt: bool = False


@dataclass(slots=True)
class OssConfig(HttpCommon):
    scheme: str = "https"
    endpoint: str = ""
    bucket_name: str = ""
    object_prefix: str = ""
    access_key_id: str = ""
    access_key_secret: str = ""


@dataclass(slots=True)
class S3Config(HttpCommon):
    scheme: str = "https"
    endpoint: str = ""
    region: str = ""
    bucket_name: str = ""
    object_prefix: str = ""
    access_key_id: str = ""
    access_key_secret: str = ""


@dataclass(slots=True)
class RegistryConfig(HttpCommon):
    scheme: str = "https"  # "" means: try https, fall back to http
    host: str = ""
    repo: str = ""
    auth: str | None = None  # base64 "user:pass"; IMAGE_PULL_AUTH overrides it
    registry_token: str | None = None
    blob_url_scheme: str = ""
    blob_redirected_host: str = ""


@dataclass(slots=True)
class HttpProxyConfig(HttpCommon):
    addr: str = ""  # http(s)://host:port or an absolute unix socket path
    path: str = ""


BackendSettings = (
    LocalFsConfig | LocalDiskConfig | OssConfig | S3Config | RegistryConfig | (HttpProxyConfig)
)
_BACKEND_CLASSES: dict[str, type[Any]] = {
    "localfs": LocalFsConfig,
    "localdisk": LocalDiskConfig,
    "oss": OssConfig,
    "s3": S3Config,
    "registry": RegistryConfig,
    "http-proxy": HttpProxyConfig,
}


@dataclass(slots=True)
class BackendConfig:
    """``backend``: the type name and the settings of that type."""

    type: str
    settings: BackendSettings


# --- cache, rafs, overlay ----------------------------------------------------------------------


@dataclass(slots=True)
class PrefetchConfig:
    enable: bool = False
    threads_count: int = 8
    batch_size: int = 1 << 20  # v1: merging_size
    bandwidth_limit: int = 0  # bytes per second, 0 = unlimited (v1: bandwidth_rate)
    prefetch_all: bool = False
    stream_prefetch: bool = False


@dataclass(slots=True)
class FileCacheConfig:
    work_dir: str = "."
    disable_indexed_map: bool = False
    enable_encryption: bool = False
    enable_convergent_encryption: bool = False
    encryption_key: str = ""


@dataclass(slots=True)
class FsCacheConfig:
    work_dir: str = "."


@dataclass(slots=True)
class CacheConfig:
    type: str = ""
    compressed: bool = False
    validate: bool = False
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    filecache: FileCacheConfig | None = None
    fscache: FsCacheConfig | None = None


@dataclass(slots=True)
class RafsConfig:
    mode: str = "direct"
    batch_size: int = 1 << 20  # user I/O amplification (v1: amplify_io)
    validate: bool = False
    enable_xattr: bool = False
    iostats_files: bool = False
    access_pattern: bool = False
    latest_read_files: bool = False
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)


@dataclass(slots=True)
class OverlayConfig:
    upper_dir: str = ""
    work_dir: str = ""


@dataclass(slots=True)
class ConfigV2:
    version: int = 2
    id: str = ""
    backend: BackendConfig | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    rafs: RafsConfig = field(default_factory=RafsConfig)
    overlay: OverlayConfig | None = None

    def to_dict(self, *, secrets: bool = False) -> dict[str, Any]:
        """The v2 JSON form; credentials are removed unless ``secrets`` (for API output)."""
        out: dict[str, Any] = {"version": 2, "id": self.id}
        if self.backend is not None:
            settings = dataclasses.asdict(self.backend.settings)
            if not secrets:
                for key in ("auth", "registry_token", "access_key_id", "access_key_secret"):
                    settings.pop(key, None)
            key = self.backend.type.replace("-", "_")
            out["backend"] = {"type": self.backend.type, key: settings}
        cache = dataclasses.asdict(self.cache)
        for key in ("filecache", "fscache"):
            if cache[key] is None:
                del cache[key]
        if not secrets and cache.get("filecache"):
            cache["filecache"].pop("encryption_key", None)  # upstream leaks it; we do not
        rafs = dataclasses.asdict(self.rafs)
        # The v2 key of the prefetch thread count is "threads" (upstream's serde rename).
        for prefetch in (cache["prefetch"], rafs["prefetch"]):
            prefetch["threads"] = prefetch.pop("threads_count")
        out["cache"] = cache
        out["rafs"] = rafs
        if self.overlay is not None:
            out["overlay"] = dataclasses.asdict(self.overlay)
        return out


def localfs_config(blob_dir: str, work_dir: str | None = None) -> ConfigV2:
    """What upstream synthesises for ``--localfs-dir``: blobs from a local directory through a
    blob cache (``work_dir``, by default the same directory), uncompressed."""
    return ConfigV2(
        backend=BackendConfig("localfs", LocalFsConfig(dir=blob_dir)),
        cache=CacheConfig(
            type="blobcache", filecache=FileCacheConfig(work_dir=work_dir or blob_dir)
        ),
    )


# --- loading -----------------------------------------------------------------------------------

T = TypeVar("T")
# On-disk key -> field name, where upstream's serde renames differ between v1 and v2.
_ALIASES: dict[type[Any], dict[str, str]] = {
    PrefetchConfig: {"threads": "threads_count"},
    RafsConfig: {"user_io_batch_size": "batch_size"},
}


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(tp: Any, value: Any, path: str, strict: bool) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path, strict)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        if value < 0:
            raise ConfigError(f"{path}: must not be negative, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]", strict) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table of strings, got {_describe(value)}")
        _, item_type = typing.get_args(tp)
        return {str(k): _convert(item_type, v, f"{path}.{k}", strict) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _load(tp, value, path, strict)  # type: ignore[arg-type]
    raise AssertionError(f"unsupported config type {tp!r}")


def _load(cls: type[T], data: Any, path: str, strict: bool) -> T:
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    aliases = _ALIASES.get(cls, {})
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key_path = f"{path}.{raw_key}" if path else raw_key
        key = aliases.get(raw_key, raw_key)
        if key in names:
            kwargs[key] = _convert(hints[key], value, key_path, strict)
        elif key in _SILENTLY_IGNORED:
            continue
        elif strict:
            raise ConfigError(f"{key_path}: unknown key")
        else:
            log.warning("config: unknown key %s ignored", key_path)
    return cls(**kwargs)


def _backend(data: Any, path: str, strict: bool) -> BackendConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table, got {_describe(data)}")
    kind = data.get("type")
    if kind not in BACKEND_TYPES:
        raise ConfigError(
            f"{path}.type: unknown backend type {_describe(kind)} "
            f"(expected one of {', '.join(BACKEND_TYPES)})"
        )
    key = kind.replace("-", "_")
    sub = data.get(key, data.get(kind))
    if sub is None:
        raise ConfigError(f"{path}.{key}: missing settings for the {kind} backend")
    settings = _load(_BACKEND_CLASSES[kind], sub, f"{path}.{key}", strict)
    # Settings tables of other backend types may be present and are unused, as upstream.
    _load(_BackendKeys, {k.replace("-", "_"): v for k, v in data.items()}, path, strict)
    return BackendConfig(kind, settings)


@dataclass(slots=True)
class _BackendKeys:
    """The keys a v2 ``backend`` table may have (validation only)."""

    type: str = ""
    localfs: dict[str, Any] | None = None
    localdisk: dict[str, Any] | None = None
    oss: dict[str, Any] | None = None
    s3: dict[str, Any] | None = None
    registry: dict[str, Any] | None = None
    http_proxy: dict[str, Any] | None = None


def parse_v2(data: Any, *, strict: bool = False) -> ConfigV2:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a table, got {_describe(data)}")
    version = data.get("version")
    if version != 2:
        raise ConfigError(f"version: expected 2, got {_describe(version)}")
    known = ("version", "id", "backend", "cache", "rafs", "overlay", "external_backends")
    for key in data:
        if key not in known:
            if strict:
                raise ConfigError(f"{key}: unknown key")
            log.warning("config: unknown key %s ignored", key)
    config = ConfigV2(
        id=_convert(str, data.get("id", ""), "id", strict),
        backend=_backend(data["backend"], "backend", strict) if "backend" in data else None,
        cache=_load(CacheConfig, data.get("cache", {}), "cache", strict),
        rafs=_load(RafsConfig, data.get("rafs", {}), "rafs", strict),
        overlay=_load(OverlayConfig, data["overlay"], "overlay", strict)
        if data.get("overlay") is not None
        else None,
    )
    validate(config)
    return config


def parse_v1(data: Any, *, strict: bool = False) -> ConfigV2:
    """Upstream's legacy ``RafsConfig`` JSON (``device.backend.config`` etc.), as v2."""
    if not isinstance(data, dict) or "device" not in data:
        raise ConfigError(
            'config: neither a v2 config (no "version": 2) nor a v1 one (no "device")'
        )
    device = data["device"]
    if not isinstance(device, dict) or not isinstance(device.get("backend"), dict):
        raise ConfigError("device.backend: missing backend table")
    backend = device["backend"]
    kind = backend.get("type")
    if kind == "http-proxy":
        raise ConfigError(
            "device.backend.type: the http-proxy backend needs a v2 config (as upstream)"
        )
    if kind not in BACKEND_TYPES:
        raise ConfigError(f"device.backend.type: unknown backend type {_describe(kind)}")
    settings = _load(
        _BACKEND_CLASSES[kind], backend.get("config", {}), "device.backend.config", strict
    )
    cache_v1 = device.get("cache", {})
    if not isinstance(cache_v1, dict):
        raise ConfigError("device.cache: expected a table")
    cache_type = _convert(str, cache_v1.get("type", ""), "device.cache.type", strict)
    cache = CacheConfig(
        type=cache_type,
        compressed=_convert(
            bool, cache_v1.get("compressed", False), "device.cache.compressed", strict
        ),
        validate=_convert(bool, cache_v1.get("validate", False), "device.cache.validate", strict),
    )
    cache_config = cache_v1.get("config", {})
    if cache_type in ("blobcache", "filecache"):
        cache.filecache = _load(FileCacheConfig, cache_config, "device.cache.config", strict)
    elif cache_type == "fscache":
        cache.fscache = _load(FsCacheConfig, cache_config, "device.cache.config", strict)
    elif cache_type not in ("", "dummycache"):
        raise ConfigError(f"device.cache.type: unsupported cache type {_describe(cache_type)}")
    fs_prefetch = data.get("fs_prefetch", {})
    prefetch = PrefetchConfig(prefetch_all=True)
    if isinstance(fs_prefetch, dict):
        mapping = {"merging_size": "batch_size", "bandwidth_rate": "bandwidth_limit"}
        renamed = {mapping.get(k, k): v for k, v in fs_prefetch.items()}
        prefetch = _load(PrefetchConfig, {"prefetch_all": True, **renamed}, "fs_prefetch", strict)
    elif fs_prefetch is not None:
        raise ConfigError("fs_prefetch: expected a table")
    rafs = RafsConfig(
        mode=_convert(str, data.get("mode", "direct"), "mode", strict),
        batch_size=_convert(int, data.get("amplify_io", 1 << 20), "amplify_io", strict),
        validate=_convert(bool, data.get("digest_validate", False), "digest_validate", strict),
        enable_xattr=_convert(bool, data.get("enable_xattr", False), "enable_xattr", strict),
        iostats_files=_convert(bool, data.get("iostats_files", False), "iostats_files", strict),
        access_pattern=_convert(bool, data.get("access_pattern", False), "access_pattern", strict),
        latest_read_files=_convert(
            bool, data.get("latest_read_files", False), "latest_read_files", strict
        ),
        prefetch=prefetch,
    )
    # Upstream copies fs-level prefetch to the cache when the cache has none of its own.
    if not cache.prefetch.enable:
        cache.prefetch = dataclasses.replace(prefetch)
    config = ConfigV2(
        id=_convert(str, device.get("id", ""), "device.id", strict),
        backend=BackendConfig(kind, settings),
        cache=cache,
        rafs=rafs,
    )
    validate(config)
    return config


def validate(config: ConfigV2) -> None:
    """Upstream's ``validate()`` rules, with messages that name the key."""
    b = config.backend
    if b is not None:
        s = b.settings
        key = f"backend.{b.type.replace('-', '_')}"
        if isinstance(s, LocalFsConfig) and not (s.blob_file or s.dir):
            raise ConfigError(f"{key}: one of blob_file or dir is required")
        if isinstance(s, LocalDiskConfig) and not s.device_path:
            raise ConfigError(f"{key}.device_path: required")
        if isinstance(s, OssConfig | S3Config) and not s.bucket_name:
            raise ConfigError(f"{key}.bucket_name: required")
        if isinstance(s, OssConfig) and not s.endpoint:
            raise ConfigError(f"{key}.endpoint: required")
        if isinstance(s, S3Config) and not s.region:
            raise ConfigError(f"{key}.region: required")
        if isinstance(s, RegistryConfig) and (not s.host or not s.repo):
            raise ConfigError(f"{key}: host and repo are required")
        if isinstance(s, HttpProxyConfig) and not s.addr:
            raise ConfigError(f"{key}.addr: required")
        if isinstance(s, OssConfig | S3Config | RegistryConfig) and s.scheme not in (
            "",
            "http",
            "https",
        ):
            raise ConfigError(f"{key}.scheme: expected http, https or empty, got {s.scheme!r}")
        if isinstance(s, HttpCommon) and s.timeout == 0:
            raise ConfigError(f"{key}.timeout: must be at least 1 second")
    c = config.cache
    if c.type not in CACHE_TYPES:
        raise ConfigError(f"cache.type: unsupported cache type {c.type!r}")
    if c.type in ("blobcache", "filecache") and c.filecache is None:
        c.filecache = FileCacheConfig()
    for name, p in (("cache.prefetch", c.prefetch), ("rafs.prefetch", config.rafs.prefetch)):
        if p.enable and not 1 <= p.threads_count <= 1024:
            raise ConfigError(f"{name}.threads_count: must be 1..1024, got {p.threads_count}")
        if p.batch_size > 0x1000_0000:
            raise ConfigError(f"{name}.batch_size: must be at most 256 MiB")
    if config.rafs.mode not in ("direct", "cached"):
        raise ConfigError(f"rafs.mode: expected direct or cached, got {config.rafs.mode!r}")
    if config.rafs.batch_size > 0x1000_0000:
        raise ConfigError("rafs.batch_size: must be at most 256 MiB")


def load_config(text: str | bytes, *, strict: bool = False) -> ConfigV2:
    """Parse a config file's content: JSON v2, then TOML v2, then JSON v1 (upstream's order)."""
    if len(text) > MAX_CONFIG_SIZE:
        raise ConfigError("config is larger than 1 MiB")
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as e:
            raise ConfigError(f"config is not UTF-8 text: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as json_error:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as toml_error:
            raise ConfigError(
                f"config is neither JSON ({json_error}) nor TOML ({toml_error})"
            ) from None
    if isinstance(data, dict) and "version" in data:
        return parse_v2(data, strict=strict)
    return parse_v1(data, strict=strict)


def load_config_file(path: str, *, strict: bool = False) -> ConfigV2:
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_SIZE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        return load_config(text, strict=strict)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
