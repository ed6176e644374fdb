"""PassthroughFs against the model: called directly, and through a real ``nydusd --shared-dir``
FUSE mount, every random step gives the same answer and leaves the same tree."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from nydusfs.passthrough import PassthroughFs
from tests.helpers.fsmachine import FsMachine
from tests.helpers.fsmodel import FsTarget, LoopThread, Model, PathTarget
from tests.mount.nydusd_proc import nydusd

pytestmark = pytest.mark.root


class DirectMachine(FsMachine):
    """Model, the host directory itself, and PassthroughFs called directly on a copy."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="pt-sm-"))
        (self.tmp / "host").mkdir()
        (self.tmp / "shared").mkdir()
        self.loop = LoopThread()
        # One fd at most: the other inodes live as file handles and are reopened on use.
        self.fs = PassthroughFs(str(self.tmp / "shared"), max_open=1)
        self.targets = {
            "model": Model(),
            "host": PathTarget(str(self.tmp / "host")),
            "passthrough": FsTarget(self.fs, self.loop),
        }

    def teardown(self) -> None:
        self.loop.call(self.fs.destroy)
        self.loop.close()
        shutil.rmtree(self.tmp)


TestDirect = DirectMachine.TestCase
TestDirect.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip


class MountMachine(FsMachine):
    """Model and ``nydusd --shared-dir`` over FUSE (one daemon for all examples)."""

    mnt: Path
    shared: Path

    def __init__(self) -> None:
        super().__init__()
        # Through the mount, so the kernel's caches see the clean-up too.
        for child in self.mnt.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        self.targets = {"model": Model(), "fuse": PathTarget(str(self.mnt))}


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("pt-fuse")
    shared = base / "shared"
    shared.mkdir()
    with nydusd("--shared-dir", str(shared), "--writable", mountpoint=base / "mnt"):
        yield shared, base / "mnt"


def test_through_fuse(shared_mount: tuple[Path, Path]) -> None:
    MountMachine.shared, MountMachine.mnt = shared_mount
    test = MountMachine.TestCase
    test.settings = settings(
        max_examples=40, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
    test().runTest()
