"""A realistic multi-layer OCI image built offline-from-the-registry with Debian's tools.

``build_debian_image(workdir)`` makes an OCI image layout with three layers, the recipe of
``docs/test-harness.md`` ("OCI tooling"):

1. ``debootstrap --variant=minbase bookworm`` (packages from deb.debian.org, the apt registry),
   packed by ``umoci repack``;
2. more packages installed with apt in a chroot (``umoci repack`` writes the diff, with the
   whiteouts of whatever apt removed);
3. a hand-written layer tar (umoci never emits opaque markers): deletions (``.wh.`` files),
   a renamed file and a renamed directory, an opaque directory that also re-adds a name, a
   directory replaced by a file and a file by a directory, a changed symlink, a hard link,
   xattrs, set-uid and non-root owners; appended with ``umoci raw add-layer``.

``unpack_reference`` runs ``umoci unpack``: the tree the converted image must equal.

Set ``NYDUSFS_OCI_IMAGE_CACHE=DIR`` to keep the built layout in DIR between runs (development
only; CI builds it once per session).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
LAYER2_PACKAGES = ["python3", "less"]
TAG = "v1"
TOOLS = ("debootstrap", "umoci", "skopeo", "chroot")
_DONE = ".nydusfs-image-complete"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _run(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, env=env, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {out}")


def _stage(bundle: Path, layout: Path, timings: dict[str, float], name: str) -> None:
    started = time.monotonic()
    _run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{TAG}", bundle)
    timings[name] = time.monotonic() - started


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    info.mode = 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    regular = info.type in (tarfile.REGTYPE, tarfile.AREGTYPE)
    tar.addfile(info, io.BytesIO(data) if regular else None)


def _dir(tar: tarfile.TarFile, name: str, mode: int = 0o755, **attrs: object) -> None:
    _add(tar, name, type=tarfile.DIRTYPE, mode=mode, **attrs)


def layer3_tar(lower: Path, out: Path) -> None:
    """The third layer, written against the lower tree ``lower`` (which it inspects).

    Symlinks carry mode 0777, as every tar writer that reads them from a filesystem stores.
    """
    rng = random.Random(9)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        # Deletions: every entry of /usr/share/doc, one whiteout each (what docker emits).
        _dir(tar, "usr/share/doc")
        for name in sorted(os.listdir(lower / "usr/share/doc")):
            _add(tar, f"usr/share/doc/.wh.{name}")
        # An opaque directory: the lower locale tree vanishes; one name comes back.
        _dir(tar, "usr/share/locale", mode=0o750)
        _add(tar, "usr/share/locale/.wh..wh..opq")
        _add(tar, "usr/share/locale/locale.alias", b"# replaced by the opaque layer\n")
        # Renames: a file and a directory (whiteout the old name, add the new one).
        _dir(tar, "etc")
        motd = (lower / "etc/motd").read_bytes()
        _add(tar, "etc/.wh.motd")
        _add(tar, "etc/motd.renamed", motd)
        _dir(tar, "usr/share")
        _add(tar, "usr/share/.wh.common-licenses")
        _dir(tar, "usr/share/licenses")
        for name in sorted(os.listdir(lower / "usr/share/common-licenses")):
            src = lower / "usr/share/common-licenses" / name
            if src.is_symlink():
                _add(tar, f"usr/share/licenses/{name}", type=tarfile.SYMTYPE,
                     linkname=os.readlink(src), mode=0o777)  # fmt: skip
            else:
                _add(tar, f"usr/share/licenses/{name}", src.read_bytes())
        # A modified file, a directory replaced by a file, a file replaced by a directory.
        release = (lower / "etc/os-release").read_bytes()
        _add(tar, "etc/os-release", release + b'VARIANT="nydusfs test layer"\n')
        _add(tar, "etc/cron.daily", b"no longer a directory\n", mode=0o600)
        _dir(tar, "etc/hostname", mode=0o700)
        _add(tar, "etc/hostname/name", b"nydusfs\n")
        # A symlink pointing elsewhere than before.
        _add(tar, "etc/localtime", type=tarfile.SYMTYPE, linkname="/usr/share/zoneinfo/UTC",
             mode=0o777)
        # Data with a hard link, xattrs, special modes and owners.
        _dir(tar, "opt")
        _dir(tar, "opt/app", uid=1000, gid=1000, uname="", gname="")
        blob = rng.randbytes(3 << 20)
        _add(tar, "opt/app/blob.bin", blob, uid=1000, gid=1000,
             pax_headers={"SCHILY.xattr.user.origin": "layer3"})  # fmt: skip
        _add(tar, "opt/app/blob.link", type=tarfile.LNKTYPE, linkname="opt/app/blob.bin",
             uid=1000, gid=1000)  # fmt: skip
        _add(tar, "opt/app/run", b"#!/bin/sh\necho hi\n", mode=0o4755)
        _add(tar, "opt/app/empty", b"", mode=0o600, uid=65534, gid=65534)
        _add(tar, "opt/app/fifo", type=tarfile.FIFOTYPE, mode=0o644)
        # Hard link to a file of a lower layer is not allowed by OCI; a new pair within
        # the layer is. A dangling whiteout (no such lower name) is harmless.
        _add(tar, "opt/.wh.never-existed")


def build_debian_image(workdir: Path) -> tuple[Path, dict[str, float]]:
    """Build the three-layer image; returns (OCI layout dir, seconds per step).

    The layout's tag is ``TAG``. Needs root, network access to deb.debian.org and the tools
    in ``TOOLS``.
    """
    cache = os.environ.get("NYDUSFS_OCI_IMAGE_CACHE")
    if cache and (Path(cache) / _DONE).exists():
        return Path(cache) / "layout", {}
    if cache:
        workdir = Path(cache)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
    layout = workdir / "layout"
    bundle = workdir / "bundle"
    rootfs = bundle / "rootfs"
    timings: dict[str, float] = {}
    _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", f"{layout}:{TAG}")
    _run("umoci", "unpack", "--image", f"{layout}:{TAG}", bundle)

    started = time.monotonic()
    _run("debootstrap", "--variant=minbase", SUITE, rootfs, MIRROR)
    timings["debootstrap"] = time.monotonic() - started
    _run("chroot", rootfs, "apt-get", "clean")
    _stage(bundle, layout, timings, "layer1")

    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    _run("chroot", rootfs, "apt-get", "install", "-y", "-q", "--no-install-recommends",
         *LAYER2_PACKAGES, env=env)  # fmt: skip
    _run("chroot", rootfs, "apt-get", "clean")
    shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
    (rootfs / "var/lib/apt/lists").mkdir()
    timings["apt"] = time.monotonic() - started
    _stage(bundle, layout, timings, "layer2")

    started = time.monotonic()
    layer3 = workdir / "layer3.tar"
    layer3_tar(rootfs, layer3)
    _run("umoci", "raw", "add-layer", "--image", f"{layout}:{TAG}", layer3)
    _run("umoci", "config", "--image", f"{layout}:{TAG}", "--config.cmd", "/bin/bash")
    timings["layer3"] = time.monotonic() - started
    shutil.rmtree(bundle)
    layer3.unlink()
    (workdir / _DONE).touch()
    return layout, timings


def unpack_reference(layout: Path, out: Path, tag: str = TAG) -> Path:
    """``umoci unpack`` of the image: returns the rootfs directory."""
    _run("umoci", "unpack", "--image", f"{layout}:{tag}", out)
    return out / "rootfs"


def skopeo_copy(src: str, dest: str) -> None:
    """``skopeo copy`` without TLS on either side (the test registry is plain http)."""
    _run("skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", src, dest)
