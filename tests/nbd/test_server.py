"""``nydusd nbd`` under misbehaving and concurrent clients, spoken to byte by byte.

The client here is written from the protocol document (nbd's proto.md), independently of
``nydusfs.nbd.protocol``. A malformed message must close only its own connection; well-formed
but invalid requests get error replies; many connections read concurrently and every byte
matches ``nydus-image export --block``. Command-line mistakes end with one clear line.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nydusfs.types import Compressor
from tests.nbd.conftest import REPO, Image, nydusd_nbd, tool, uri

REQUEST_MAGIC = 0x25609513


class Client:
    """A blocking NBD client: fixed newstyle, NO_ZEROES, simple replies, OPT_GO."""

    def __init__(self, sock_path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(sock_path))
        greeting = self.recv(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        self.sock.sendall(struct.pack(">I", 3))

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            data = self.sock.recv(n - len(out))
            if not data:
                raise EOFError(f"connection closed after {len(out)} of {n} bytes")
            out += data
        return out

    def go(self, name: bytes = b"") -> int:
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
        size = -1
        while True:
            _, _, kind, length = struct.unpack(">QIII", self.recv(20))
            payload = self.recv(length)
            if kind == 3 and struct.unpack_from(">H", payload)[0] == 0:
                size = struct.unpack_from(">Q", payload, 2)[0]
            if kind == 1:
                return size
            assert not kind & (1 << 31), f"GO failed: {kind:#x} {payload!r}"

    def request(self, kind: int, offset: int, length: int, cookie: int = 1) -> None:
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, kind, cookie, offset, length))

    def reply(self, length: int) -> tuple[int, int, bytes]:
        """(error, cookie, data): the data is read only when there is no error."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698
        return error, cookie, b"" if error else self.recv(length)

    def read(self, offset: int, length: int) -> bytes:
        self.request(0, offset, length)
        error, _, data = self.reply(length)
        assert error == 0
        return data

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def served(nbd_image, short_tmp: Path):  # type: ignore[no-untyped-def]
    image: Image = nbd_image(Compressor.ZSTD)
    sock = short_tmp / "nbd.sock"
    with nydusd_nbd(sock, "-B", str(image.bootstrap), "-D", str(image.blob_dir)) as proc:
        yield sock, image.disk.read_bytes(), proc


def test_malformed_messages_close_only_their_connection(served) -> None:  # type: ignore[no-untyped-def]
    sock, disk, _ = served
    good = Client(sock)
    assert good.go() == len(disk)
    # Garbage instead of an option header.
    bad = Client(sock)
    bad.sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert bad.closed_by_server()
    # An option claiming a gigabyte of data.
    bad = Client(sock)
    bad.sock.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 1 << 30))
    assert bad.closed_by_server()
    # A bad request magic during transmission.
    bad = Client(sock)
    bad.go()
    bad.sock.sendall(b"\xff" * 28)
    assert bad.closed_by_server()
    # A client that vanishes in the middle of a request header.
    gone = Client(sock)
    gone.go()
    gone.sock.sendall(struct.pack(">IHH", REQUEST_MAGIC, 0, 0))
    gone.close()
    # The first connection never noticed.
    assert good.read(0, 4096) == disk[:4096]
    good.close()


def test_invalid_requests_get_error_replies(served) -> None:  # type: ignore[no-untyped-def]
    sock, disk, _ = served
    client = Client(sock)
    size = client.go(b"disk-default")
    client.request(0, size - 10, 20, cookie=5)
    assert client.reply(0)[:2] == (22, 5)  # EINVAL: past the end
    client.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 6, 0, 4) + b"data")
    assert client.reply(0)[:2] == (1, 6)  # EPERM: read-only
    client.request(3, 0, 0, cookie=8)
    assert client.reply(0) == (0, 8, b"")  # FLUSH
    client.request(5, 0, 65536, cookie=9)
    assert client.reply(0) == (0, 9, b"")  # CACHE fetches, answers without data
    assert client.read(size - 10, 10) == disk[-10:]
    client.request(2, 0, 0)  # DISC
    assert client.closed_by_server()
    # An unknown export name is refused with ERR_UNKNOWN and the handshake goes on.
    client = Client(sock)
    client.sock.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 10) + struct.pack(">I", 4)
                        + b"nope" + struct.pack(">H", 0))  # fmt: skip
    _, _, kind, length = struct.unpack(">QIII", client.recv(20))
    client.recv(length)
    assert kind == (1 << 31) | 6
    assert client.go() == len(disk)
    client.close()


def test_concurrent_connections_and_pipelined_requests(served) -> None:  # type: ignore[no-untyped-def]
    sock, disk, _ = served
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            rng = random.Random(seed)
            client = Client(sock)
            client.go()
            # Pipeline 8 requests, then collect the replies, which may come in any order.
            wanted = {}
            for cookie in range(8):
                offset = rng.randrange(len(disk))
                length = rng.randrange(1, min(200_000, len(disk) - offset) + 1)
                wanted[cookie] = (offset, length)
                client.request(0, offset, length, cookie=cookie)
            for _ in range(8):
                magic, error, cookie = struct.unpack(">IIQ", client.recv(16))
                assert (magic, error) == (0x67446698, 0)
                offset, length = wanted.pop(cookie)
                assert client.recv(length) == disk[offset : offset + length]
            client.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-B", "x", "-D", "y"], "exactly one of --unix PATH and --port N"),
        (["/dev/nbd0", "--port", "1"], "kernel NBD devices (/dev/nbd0) are not supported"),
        (["--port", "1"], "either --bootstrap"),
        (["-B", "/nonexistent", "-D", "/tmp", "--port", "1"], "cannot open bootstrap"),
        (["-B", "x", "--port", "1"], "--bootstrap needs --localfs-dir"),
        (["-C", "{entry}", "--port", "1"], "metadata_path: the bootstrap path is missing"),
        (["-C", "{plain}", "--port", "1"], "--bootstrap is required with it"),
        (["-C", "{plain}", "-D", "/tmp", "--port", "1"], "conflicts with --config"),
    ],
)
def test_command_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    entry = tmp_path / "entry.json"  # a BlobCacheEntry without the bootstrap's path
    entry.write_text(json.dumps({"type": "bootstrap", "config_v2": {"version": 2}}))
    plain = tmp_path / "nydusd.json"
    plain.write_text(json.dumps({"version": 2, "backend": {"type": "localfs"}}))
    args = [a.format(entry=entry, plain=plain) for a in args]
    proc = subprocess.run(tool("nydusd", "nbd", *args), capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nydusd: ") and message in lines[0], lines


def test_blob_prefetch_fills_the_cache(nbd_image, short_tmp: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With ``cache.prefetch.enable`` the whole blob is fetched with no client reading; once the
    chunk map says so, the export reads back whole with the backend gone."""
    image: Image = nbd_image(Compressor.LZ4_BLOCK)
    backend = tmp_path / "backend"
    backend.mkdir()
    (blob,) = [b for b in image.blob_dir.iterdir() if len(b.name) == 64]
    shutil.copyfile(blob, backend / blob.name)
    cache = tmp_path / "cache"
    config = tmp_path / "nydusd.json"
    config.write_text(json.dumps({
        "version": 2,
        "backend": {"type": "localfs", "localfs": {"dir": str(backend)}},
        "cache": {"type": "blobcache", "filecache": {"work_dir": str(cache)},
                  "prefetch": {"enable": True, "threads": 2}},
    }))  # fmt: skip
    sock = short_tmp / "nbd.sock"
    chunk_map = cache / f"{blob.name}.blob.data.chunk_map"
    with nydusd_nbd(sock, "-B", str(image.bootstrap), "-C", str(config)):
        deadline = time.monotonic() + 120
        while not (chunk_map.exists() and chunk_map.read_bytes()[12:16] == b"PAMM"):
            assert time.monotonic() < deadline, "prefetch did not complete the blob cache"
            time.sleep(0.1)
        (backend / blob.name).unlink()
        copy = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", uri(sock), str(copy)], check=True, timeout=120)
        assert copy.read_bytes() == image.disk.read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-B", "x", "-D", "y"], "only --block is supported"),
        (["--block", "--verity", "-B", "x", "-D", "y"], "--verity"),
        (["--block", "-C", "/nonexistent.json"], "cannot read config file"),
        (["--block", "-B", "/nonexistent", "-D", "/tmp", "-O", "/tmp/x"], "cannot open bootstrap"),
    ],
)
def test_export_command_line_errors(args: list[str], message: str) -> None:
    proc = subprocess.run(tool("nydus-image", "export", *args), capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nydus-image: ") and message in lines[0], lines
