"""Fixtures for the backend contract suite, and the factories of the local backends.

``test_backends.py`` runs once per registered factory (see ``tests/contract/__init__.py`` for
how to add one; modules named ``factories_*.py`` here are imported automatically). Factories
defined here: localfs (``dir``; ``dir`` + ``alt_dirs``), localdisk (GPT with the two-half blob
ids; legacy basic-data partitions), and http-proxy (nginx over TCP and over a unix socket,
through an nginx forward proxy, past a dead proxy with fallback, and our FaultServer in its
three ``Range`` styles).

Helpers shared with the tests: ``contract_blobs`` (the blob set), ``make_gpt_image`` (builds a
GPT disk image with ``sgdisk`` and writes blobs into its partitions), ``static_site`` (an nginx
``server`` block serving a directory), ``short_tmpdir`` (a directory whose path is short
enough for unix sockets).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import pkgutil
import random
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydusfs.config import HttpProxyConfig, LocalDiskConfig, LocalFsConfig, ProxyConfig
from nydusfs.storage.backends import BlobBackend
from nydusfs.storage.backends.http_proxy import HttpProxyBackend
from nydusfs.storage.backends.localdisk import LocalDiskBackend
from nydusfs.storage.backends.localfs import LocalFsBackend
from tests.contract import BACKEND_FACTORIES, BackendFactory, Blobs, backend_factory
from tests.helpers.servers import FaultServer, free_port, nginx

BLOB_PREFIX = "/ns/repo/blobs"
SECTOR = 512
MIB = 1 << 20

for _info in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if _info.name.startswith("factories_"):
        importlib.import_module(f"{__package__}.{_info.name}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_factory" in metafunc.fixturenames:
        metafunc.parametrize("backend_factory", BACKEND_FACTORIES, ids=str, scope="module")


def blob_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="session")
def contract_blobs() -> Blobs:
    """Random blobs keyed by their sha256: odd-sized, empty, one sector, 64 KiB + 1, ~3 MiB."""
    rng = random.Random(20240601)
    sizes = [1000, 0, 4096, 65537, 3 * MIB + 333]
    return {blob_id(d): d for d in (rng.randbytes(n) for n in sizes)}


@pytest.fixture(scope="module")
def served(backend_factory: BackendFactory, contract_blobs: Blobs) -> dict[str, bytes]:
    """``{blob_id: what the backend must serve}`` for the blobs this factory holds."""
    return {
        k: backend_factory.expected(v)
        for k, v in contract_blobs.items()
        if v or backend_factory.empty
    }


@pytest.fixture(scope="module")
def backend(
    backend_factory: BackendFactory,
    contract_blobs: Blobs,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BlobBackend]:
    blobs = {k: v for k, v in contract_blobs.items() if v or backend_factory.empty}
    workdir = tmp_path_factory.mktemp(re.sub(r"[^\w-]", "_", backend_factory.name))
    with backend_factory.make(blobs, workdir) as b:
        yield b


# --- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A fresh directory under /tmp with a short path (sun_path holds only 108 bytes)."""
    d = tempfile.mkdtemp(prefix="nyd-", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_blobs(directory: Path, blobs: Blobs) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for k, v in blobs.items():
        (directory / k).write_bytes(v)
    return directory


def static_site(listen: str, root: Path, prefix: str = BLOB_PREFIX, extra: str = "") -> str:
    """An nginx ``server`` serving ``root`` at ``prefix`` (Range and HEAD are built in)."""
    return f"""
    server {{
        listen {listen};
        location {prefix}/ {{ alias {root}/; }}
        location = /ping {{ return 200 "pong"; }}
        {extra}
    }}"""


def make_gpt_image(path: Path, blobs: Blobs, *, legacy: bool = False) -> dict[str, int]:
    """A GPT image holding each blob in a partition named as upstream's localdisk expects.

    Returns ``{blob_id: byte offset}``. Offsets come from ``sgdisk -i``, not from our parser.
    """
    if shutil.which("sgdisk") is None:
        pytest.skip("sgdisk not installed (make deps installs gdisk)")
    size = 3 * MIB + sum(-(-max(len(v), 1) // MIB) * MIB for v in blobs.values())
    with open(path, "wb") as f:
        f.truncate(size)
    args = ["sgdisk"]
    for i, (k, v) in enumerate(blobs.items(), start=1):
        sectors = max(1, -(-len(v) // SECTOR))
        args += ["-n", f"{i}:0:+{sectors}", "-c", f"{i}:{k[:32]}"]
        if legacy:
            args += ["-t", f"{i}:0700"]
        else:
            args += ["-t", f"{i}:8300", "-u", f"{i}:{uuid.UUID(hex=k[32:])}"]
    subprocess.run([*args, str(path)], check=True, capture_output=True)
    offsets = {}
    with open(path, "r+b") as f:
        for i, (k, v) in enumerate(blobs.items(), start=1):
            info = subprocess.run(
                ["sgdisk", "-i", str(i), str(path)], check=True, capture_output=True, text=True
            ).stdout
            match = re.search(r"First sector: (\d+)", info)
            assert match, info
            offsets[k] = int(match.group(1)) * SECTOR
            f.seek(offsets[k])
            f.write(v)
    return offsets


# --- factories ---------------------------------------------------------------------------------


@backend_factory("localfs-dir")
def localfs_dir(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    d = write_blobs(workdir / "blobs", blobs)
    backend = LocalFsBackend(LocalFsConfig(dir=str(d)), id="contract")
    try:
        yield backend
    finally:
        backend.close()


@backend_factory("localfs-alt-dirs")
def localfs_alt_dirs(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    # dir holds empty placeholders for every other non-empty blob (they must not hide the real
    # ones), the first alternative does not exist, the second holds everything else.
    primary = (workdir / "dir").resolve()
    primary.mkdir()
    alt = write_blobs(workdir / "alt", {})
    for i, (k, v) in enumerate(sorted(blobs.items())):
        if i % 2 == 0 and v:
            (primary / k).write_bytes(v)
        else:
            (alt / k).write_bytes(v)
            if v:
                (primary / k).write_bytes(b"")
    config = LocalFsConfig(dir=str(primary), alt_dirs=[str(workdir / "missing"), str(alt)])
    backend = LocalFsBackend(config, id="contract")
    try:
        yield backend
    finally:
        backend.close()


@backend_factory("localdisk-gpt", granularity=SECTOR, empty=False)
def localdisk_gpt(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    make_gpt_image(workdir / "disk.img", blobs)
    backend = LocalDiskBackend(LocalDiskConfig(device_path=str(workdir / "disk.img")), "c")
    try:
        yield backend
    finally:
        backend.close()


@backend_factory("localdisk-gpt-legacy", granularity=SECTOR, empty=False)
def localdisk_gpt_legacy(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    make_gpt_image(workdir / "disk.img", blobs, legacy=True)
    backend = LocalDiskBackend(LocalDiskConfig(device_path=str(workdir / "disk.img")), "c")
    try:
        yield backend
    finally:
        backend.close()


@backend_factory("http-proxy-nginx")
def http_proxy_nginx(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    root = write_blobs(workdir / "www", blobs)
    port = free_port()
    with nginx(static_site(f"127.0.0.1:{port}", root), workdir / "nginx", port=port) as web:
        config = HttpProxyConfig(addr=web.url, path=BLOB_PREFIX, retry_limit=2, timeout=10)
        backend = HttpProxyBackend(config, id="contract")
        try:
            yield backend
        finally:
            backend.close()


@backend_factory("http-proxy-nginx-unix")
def http_proxy_nginx_unix(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    root = write_blobs(workdir / "www", blobs)
    with short_tmpdir() as sock_dir:
        sock = sock_dir / "nginx.sock"
        conf = static_site(f"unix:{sock}", root)
        with nginx(conf, workdir / "nginx", unix_socket=sock):
            config = HttpProxyConfig(addr=str(sock), path=BLOB_PREFIX + "/", retry_limit=1)
            backend = HttpProxyBackend(config, id="contract")
            try:
                yield backend
            finally:
                backend.close()


@backend_factory("http-proxy-nginx-via-proxy")
def http_proxy_via_proxy(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    root = write_blobs(workdir / "www", blobs)
    origin_port, proxy_port = free_port(), free_port()
    conf = static_site(f"127.0.0.1:{origin_port}", root) + forward_proxy(proxy_port, origin_port)
    with nginx(conf, workdir / "nginx", port=proxy_port):
        proxy = ProxyConfig(
            url=f"http://127.0.0.1:{proxy_port}",
            ping_url=f"http://127.0.0.1:{proxy_port}/ping",
            fallback=False,  # every read must really go through the proxy
            check_interval=1,
        )
        config = HttpProxyConfig(
            addr=f"http://127.0.0.1:{origin_port}", path=BLOB_PREFIX, proxy=proxy, retry_limit=1
        )
        backend = HttpProxyBackend(config, id="contract")
        try:
            yield backend
        finally:
            backend.close()


def forward_proxy(port: int, origin_port: int) -> str:
    """An nginx forward proxy for absolute-form requests to the origin on ``origin_port``.

    It marks answers with ``X-Via-Proxy`` and serves its own ``/ping``.
    """
    return f"""
    server {{
        listen 127.0.0.1:{port};
        location = /ping {{ return 200 "proxy ok"; }}
        location / {{
            proxy_pass http://127.0.0.1:{origin_port};
            add_header X-Via-Proxy 1 always;
        }}
    }}"""


@backend_factory("http-proxy-dead-proxy-fallback")
def http_proxy_dead_proxy(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
    root = write_blobs(workdir / "www", blobs)
    port = free_port()
    with nginx(static_site(f"127.0.0.1:{port}", root), workdir / "nginx", port=port) as web:
        proxy = ProxyConfig(url=f"http://127.0.0.1:{free_port()}", fallback=True)
        config = HttpProxyConfig(addr=web.url, path=BLOB_PREFIX, proxy=proxy)
        backend = HttpProxyBackend(config, id="contract")
        try:
            yield backend
        finally:
            backend.close()


def _fault_server_factory(range_mode: str) -> None:
    @backend_factory(f"http-proxy-faultserver-range-{range_mode}")
    def factory(blobs: Blobs, workdir: Path) -> Iterator[BlobBackend]:
        content = {f"{BLOB_PREFIX}/{k}": v for k, v in blobs.items()}
        with FaultServer(content, range_mode=range_mode) as server:
            config = HttpProxyConfig(addr=server.url, path=BLOB_PREFIX, retry_limit=1)
            backend = HttpProxyBackend(config, id="contract")
            try:
                yield backend
            finally:
                backend.close()


for _mode in ("honour", "200", "ignore"):
    _fault_server_factory(_mode)
