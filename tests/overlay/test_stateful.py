"""OverlayFs against the model and the kernel's overlayfs.

The same random steps run on the model (initialised from the lower tree), on ``OverlayFs``
called directly (lower: the tree through PassthroughFs), on a real ``nydusd --writable`` FUSE
mount (lower: the tree as a RAFS image, mounted through the API with a fresh upper directory per
example) and on the kernel's overlayfs over the same tree. Answers and whole trees must agree
after every step. At the end of each example the upper directories are swapped: the kernel
mounts the one nydusfs wrote and OverlayFs serves the one the kernel wrote, and both must show
the model's tree.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from nydusfs.overlay import OverlayFs
from nydusfs.passthrough import PassthroughFs
from tests.api.daemon import ApiDaemon, api_daemon, make_image
from tests.helpers.fsmachine import FsMachine
from tests.helpers.fsmodel import FsTarget, LoopThread, Model, PathTarget
from tests.helpers.overlay import KernelOverlayTarget, kernel_overlay, make_lower
from tests.mount.nydusd_proc import localfs_config

pytestmark = pytest.mark.root


def direct_overlay(lower: Path, upper: Path, work: Path) -> OverlayFs:
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return OverlayFs([PassthroughFs(str(lower), writable=False)], str(upper), str(work))


class OverlayMachine(FsMachine):
    exchange_dirs = False  # the kernel refuses to exchange directories with lower parts
    lower: Path
    daemon: ApiDaemon | None = None
    image: tuple[Path, Path] | None = None
    _count = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="ov-sm-"))
        self.loop = LoopThread()
        self.fs = direct_overlay(self.lower, self.tmp / "upper", self.tmp / "work")
        self.kernel = kernel_overlay(self.lower, self.tmp / "kupper", self.tmp / "kwork",
                                     self.tmp / "kmnt")  # fmt: skip
        kmnt = self.kernel.__enter__()
        self.targets: dict[str, Any] = {
            "model": Model.from_tree(str(self.lower)),
            "overlayfs": FsTarget(self.fs, self.loop),
            "kernel": KernelOverlayTarget(str(kmnt)),
        }
        self.sub: str | None = None
        if self.daemon is not None and self.image is not None:
            self.sub = f"/ov{next(self._count)}"
            boot, blobs = self.image
            config = localfs_config(blobs, None, cache="dummycache")
            config["overlay"] = {"upper_dir": str(self.tmp / "fupper"),
                                 "work_dir": str(self.tmp / "fwork")}  # fmt: skip
            (self.tmp / "fupper").mkdir()
            (self.tmp / "fwork").mkdir()
            self.daemon.client.mount(self.sub, str(boot), json.dumps(config))
            self.targets["nydusd"] = PathTarget(str(self.daemon.mnt) + self.sub)

    def teardown(self) -> None:
        try:
            model = self.targets["model"].snapshot()
            self.kernel.__exit__(None, None, None)
            self.loop.call(self.fs.destroy)
            if self.sub is not None and self.daemon is not None:
                self.daemon.client.umount(self.sub)
            # The kernel serves the upper directory OverlayFs wrote...
            with kernel_overlay(self.lower, self.tmp / "upper", self.tmp / "work2",
                                self.tmp / "kmnt2") as mnt:  # fmt: skip
                assert KernelOverlayTarget(str(mnt)).snapshot() == model
            # ...and OverlayFs the one the kernel wrote.
            fs = direct_overlay(self.lower, self.tmp / "kupper", self.tmp / "work3")
            try:
                assert FsTarget(fs, self.loop).snapshot() == model
            finally:
                self.loop.call(fs.destroy)
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def lower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lower(tmp_path_factory.mktemp("ov-lower") / "lower")


def _run(machine: type[OverlayMachine], examples: int, steps: int) -> None:
    test = machine.TestCase
    test.settings = settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )  # fmt: skip
    test().runTest()


def test_direct_and_kernel(lower: Path) -> None:
    class Machine(OverlayMachine):
        pass

    Machine.lower = lower
    _run(Machine, 100, 30)


def test_through_fuse(lower: Path, tmp_path: Path) -> None:
    class Machine(OverlayMachine):
        pass

    boot = make_image(lower, tmp_path / "image")
    with api_daemon(tmp_path, "--writable") as daemon:
        Machine.lower, Machine.daemon, Machine.image = lower, daemon, (boot, tmp_path / "image")
        _run(Machine, 40, 25)
