"""A throwaway QEMU guest (TCG) whose kernel mounts an NBD export as EROFS (test-harness.md §1.6).

The guest runs Debian's bookworm-backports Linux 6.12 (6.1 has no EROFS "flatdev" mode, so it
cannot mount a RAFS v6 block view) from a busybox initramfs built here. Its ``/init`` loads
virtio_blk and erofs, mounts ``/dev/vda`` read-only, prints one ``E|...`` line per entry (path,
raw mode, size, owner, md5 of the data) between markers and powers off. QEMU's own NBD client
attaches the disk (``-drive file=nbd+unix://...``), so this is a second independent client
implementation and a second kernel.

The kernel comes from ``apt-get download`` with a private apt state (the system's sources are not
touched) and is kept in ``GUEST_DIR``; ``make deps`` runs ``python3 -m tests.nbd.guest`` to fetch
it ahead of the tests. Stdlib only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUEST_DIR = Path(os.environ.get("NYDUSFS_GUEST_DIR", "/var/cache/nydusfs-guest"))
BACKPORTS = "deb http://deb.debian.org/debian bookworm-backports main"
# Load order: erofs needs libcrc32c, which needs a crc32c implementation.
MODULES = {
    "crc32c_generic": "crypto/crc32c_generic",
    "libcrc32c": "lib/libcrc32c",
    "virtio_blk": "drivers/block/virtio_blk",
    "erofs": "fs/erofs/erofs",
}
BUSYBOX = "/bin/busybox"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in crc32c_generic libcrc32c virtio_blk erofs; do
    insmod /lib/modules/$m.ko || echo "GUEST-ERROR insmod $m"
done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
if mount -t erofs -o ro /dev/vda /mnt; then
    echo GUEST-MOUNTED
    cd /mnt
    find . | sort | while IFS= read -r p; do
        meta=$(stat -c '%f|%u|%g' "$p")
        if [ -L "$p" ]; then echo "E|$p|$meta|L|$(readlink "$p")"
        elif [ -f "$p" ]; then echo "E|$p|$meta|$(stat -c %s "$p")|$(md5sum < "$p" | cut -c1-32)"
        else echo "E|$p|$meta"; fi
    done
    cd /; umount /mnt
else
    echo GUEST-ERROR mount; dmesg | tail -n 8
fi
echo GUEST-DONE
poweroff -f
"""


@dataclass(frozen=True)
class GuestKernel:
    vmlinuz: Path
    modules: dict[str, Path]


def have_kernel(base: Path = GUEST_DIR) -> GuestKernel | None:
    vmlinuz = base / "vmlinuz"
    modules = {name: base / f"{name}.ko" for name in MODULES}
    if vmlinuz.exists() and all(p.exists() for p in modules.values()):
        return GuestKernel(vmlinuz, modules)
    return None


def fetch_kernel(base: Path = GUEST_DIR) -> GuestKernel:
    """The cached guest kernel, downloaded first if needed (about 100 MB, once)."""
    found = have_kernel(base)
    if found is not None:
        return found
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guest-apt-", dir=base) as tmp:
        work = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial"):
            (work / sub).mkdir(parents=True)
        (work / "sources.list").write_text(BACKPORTS + "\n")
        opts = [
            "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "APT::Architectures=amd64",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip
        subprocess.run(["apt-get", *opts, "-qq", "update"], check=True)
        deps = subprocess.run(["apt-cache", *opts, "depends", "linux-image-amd64"], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
        package = next(
            line.split(":", 1)[1].strip()
            for line in deps.splitlines()
            if line.strip().startswith("Depends: linux-image-")
        )
        abi = package.removeprefix("linux-image-")
        subprocess.run(["apt-get", *opts, "-qq", "download", package], check=True, cwd=work)
        (deb,) = work.glob(f"{package}_*.deb")
        members = [f"./boot/vmlinuz-{abi}"] + [
            f"./lib/modules/{abi}/kernel/{path}.ko.xz" for path in MODULES.values()
        ]
        tar_data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                                  capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(work), *members], input=tar_data, check=True)
        for name, path in MODULES.items():
            raw = lzma.decompress((work / f"lib/modules/{abi}/kernel/{path}.ko.xz").read_bytes())
            (base / f"{name}.ko").write_bytes(raw)
        # The kernel last: its presence says the cache is complete.
        shutil.copyfile(work / f"boot/vmlinuz-{abi}", base / "vmlinuz")
    found = have_kernel(base)
    assert found is not None
    return found


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One ``newc`` cpio record (the format the kernel unpacks an initramfs from)."""
    raw_name = name.encode() + b"\0"
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0]
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    out = header + raw_name
    out += bytes(-len(out) % 4) + data
    return out + bytes(-len(out) % 4)


def build_initramfs(kernel: GuestKernel, out: Path) -> Path:
    entries = [
        _cpio_entry(d, stat.S_IFDIR | 0o755)
        for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules")
    ]
    entries.append(_cpio_entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(_cpio_entry("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes()))
    for name, path in kernel.modules.items():
        entries.append(_cpio_entry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644,
                                   path.read_bytes()))  # fmt: skip
    entries.append(_cpio_entry("init", stat.S_IFREG | 0o755, INIT.encode()))
    entries.append(_cpio_entry("TRAILER!!!", 0))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as gz:
        gz.write(b"".join(entries))
    out.write_bytes(buf.getvalue())
    return out


def run_guest(kernel: GuestKernel, initramfs: Path, drive: str, timeout: float) -> str:
    """Boot the guest with ``drive`` (a QEMU ``-drive file=`` value) as /dev/vda; its console."""
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "256M", "-smp", "1", "-nodefaults",
        "-serial", "stdio", "-display", "none", "-no-reboot",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs),
        "-append", "console=ttyS0 quiet panic=-1",
        "-drive", f"file={drive},format=raw,if=virtio,readonly=on",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    console = proc.stdout.decode("utf-8", "replace").replace("\r", "")
    if proc.returncode != 0:
        raise RuntimeError(f"qemu exited with {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    return console


def tree_listing(root: Path) -> list[str]:
    """What the guest's ``/init`` prints for ``root``, computed on the host."""
    base = os.fsencode(root)
    rels = [b"."]
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            rels.append(b"./" + os.path.relpath(os.path.join(dirpath, name), base))
    lines = []
    for rel in sorted(rels):
        path = os.path.join(base, rel)
        st = os.lstat(path)
        head = f"E|{rel.decode()}|{st.st_mode:x}|{st.st_uid}|{st.st_gid}"
        if stat.S_ISLNK(st.st_mode):
            lines.append(f"{head}|L|{os.readlink(path).decode()}")
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                digest = hashlib.md5(f.read()).hexdigest()
            lines.append(f"{head}|{st.st_size}|{digest}")
        else:
            lines.append(head)
    return lines


if __name__ == "__main__":
    print(f"guest kernel: {fetch_kernel().vmlinuz}", file=sys.stderr)
