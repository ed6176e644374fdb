"""Session fixtures of the OCI end-to-end tests: one Debian image, built once, in a registry.

The image build (debootstrap from deb.debian.org, apt, umoci; about 45 s) happens at most once
per session; the registry runs for the whole session. Without the tools (``make deps``
installs them) the tests skip, which fails under CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.oci_image import (
    TAG,
    build_debian_image,
    missing_tools,
    skopeo_copy,
    unpack_reference,
)
from tests.helpers.registry_servers import DockerRegistry, have_registry
from tests.helpers.tree import Snapshot, snapshot

REPO = Path(__file__).resolve().parents[2]
SOURCE_REPO = "test/debian"
NYDUS_TAG = f"{TAG}-nydus"


@dataclass(frozen=True)
class DebianImage:
    layout: Path
    reference_rootfs: Path
    reference: Snapshot
    timings: dict[str, float]


def run_cli(module: str, *args: str, check: bool = True, stdin: bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    """Run one of our console scripts (``python -m nydusfs.cli.<module>``) as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", f"nydusfs.cli.{module}", *args],
        cwd=REPO, capture_output=True, input=stdin, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()[-3000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def debian_image(tmp_path_factory: pytest.TempPathFactory) -> DebianImage:
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (debootstrap, chroot)")
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (make deps installs them)")
    work = tmp_path_factory.mktemp("debian-oci")
    layout, timings = build_debian_image(work)
    rootfs = unpack_reference(layout, work / "reference")
    return DebianImage(layout, rootfs, snapshot(rootfs), timings)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    if not have_registry():
        pytest.skip("docker-registry is not installed (make deps installs it)")
    reg = DockerRegistry(tmp_path_factory.mktemp("oci-registry"))
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture(scope="session")
def source_ref(debian_image: DebianImage, registry: DockerRegistry) -> str:
    """The OCI image pushed to the registry by skopeo (a real client)."""
    ref = f"{registry.host}/{SOURCE_REPO}:{TAG}"
    skopeo_copy(f"oci:{debian_image.layout}:{TAG}", f"docker://{ref}")
    return ref


@pytest.fixture(scope="session")
def nydus_ref(source_ref: str, registry: DockerRegistry) -> str:
    """The nydus image converted from ``source_ref`` and pushed by ``nydusify convert``."""
    target = f"{registry.host}/{SOURCE_REPO}:{NYDUS_TAG}"
    run_cli("nydusify", "convert", "--source", f"http://{source_ref}",
            "--target", f"http://{target}")  # fmt: skip
    return target
