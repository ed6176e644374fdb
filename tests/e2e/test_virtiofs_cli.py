"""``nydusd virtiofs`` as a command: flags, user errors, the API, clean exits."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from nydusfs.api.client import NydusdClient
from nydusfs.cli.nydusd import main
from tests.e2e.guest import virtiofs_daemon


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["virtiofs"])  # --sock is required
    assert e.value.code == 2
    assert main(["virtiofs", "--sock", str(tmp_path / "s"), "--hybrid-mode"]) == 1
    assert "passthroughfs" in capsys.readouterr().err
    assert main(["virtiofs", "--sock", str(tmp_path / "no" / "dir" / "s")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["virtiofs", "--sock", str(tmp_path), "-B", "x"]) == 1  # a directory
    assert main(["virtiofs", "--sock", str(tmp_path / "s"), "--dedup-db", "x.db"]) == 1
    assert "dedup" in capsys.readouterr().err
    assert main(["virtiofs", "--sock", str(tmp_path / "s"), "--prefetch-files", "f"]) == 1
    assert "--prefetch-files requires --bootstrap" in capsys.readouterr().err


@pytest.mark.root
def test_api_only_daemon_answers_and_exits_on_request(tmp_path: Path) -> None:
    sock, api = tmp_path / "vfs.sock", tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # left behind by a crashed daemon: replaced
        stale.bind(str(sock))
    with virtiofs_daemon(sock, apisock=api) as proc:
        with NydusdClient(str(api)) as client:
            assert client.daemon_info()["state"] == "RUNNING"
        # The vhost-user side answers like a device: GET_FEATURES.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(struct.pack("=III", 1, 1, 0))
            request, flags, size = struct.unpack("=III", s.recv(12))
            (features,) = struct.unpack("=Q", s.recv(size))
        assert (request, flags, size) == (1, 5, 8) and features & (1 << 32)
        # A second daemon on the same socket is refused; the first goes on.
        assert main(["virtiofs", "--sock", str(sock)]) == 1
        with NydusdClient(str(api)) as client:
            assert client.daemon_info()["state"] == "RUNNING"
            client.exit()
        assert proc.wait(timeout=20) == 0
    assert not sock.exists()
