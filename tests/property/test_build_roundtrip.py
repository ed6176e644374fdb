"""Property: any tree we build reads back equal to its source.

Hypothesis draws trees with arbitrary byte names, modes (set-id bits included), owners beyond
16 bits (forcing extended inodes), xattrs, hard links, symlinks, devices, fifos and file sizes
around chunk boundaries, then builds them with a random compressor, digester and chunk size.
The image is read back with our reader (every chunk decompressed and digest-checked) and, when
we are root, by the kernel's EROFS driver as well.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydusfs.rafs.blobview import write_uncompressed_blobs
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.types import Compressor, Digester
from tests.helpers.erofs import kernel_has_erofs, mount_erofs
from tests.helpers.image import snapshot_image
from tests.helpers.tree import diff_snapshots, snapshot

IS_ROOT = os.geteuid() == 0
CHUNK_SIZES = (0x1000, 0x2000, 0x100000)

names = st.binary(min_size=1, max_size=24).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
) | st.binary(min_size=250, max_size=255).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
contents = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([0x1000, 0x2000, 0x3000]).flatmap(
        lambda n: st.sampled_from([n - 1, n, n + 1]).map(lambda k: bytes([k % 251]) * k)
    ),
    st.integers(min_value=0, max_value=20000).map(lambda n: os.urandom(n)),
)
xattr_sets = st.dictionaries(
    st.sampled_from([b"user.a", b"user.bb", b"trusted.t", b"security.s", b"user." + b"x" * 200]),
    st.binary(max_size=300),
    max_size=3,
)
owners = st.integers(min_value=0, max_value=70000) if IS_ROOT else st.just(os.geteuid())


@dataclass
class Entry:
    kind: str
    name: bytes
    mode: int
    uid: int
    gid: int
    xattrs: dict[bytes, bytes]
    data: bytes = b""
    children: list[Entry] | None = None
    target: bytes = b""
    rdev: int = 0


def entries(depth: int) -> st.SearchStrategy[Entry]:
    leaf = st.one_of(
        st.builds(Entry, st.just("reg"), names, st.integers(0, 0o7777), owners, owners, xattr_sets,
                  data=contents),
        st.builds(Entry, st.just("lnk"), names, st.just(0o777), owners, owners, st.just({}),
                  target=st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b)),
        st.builds(Entry, st.just("fifo"), names, st.integers(0, 0o777), owners, owners,
                  xattr_sets),
        st.builds(Entry, st.just("hardlink"), names, st.just(0), st.just(0), st.just(0),
                  st.just({})),
    )  # fmt: skip
    if IS_ROOT:
        leaf = leaf | st.builds(
            Entry, st.sampled_from(["chr", "blk"]), names, st.integers(0, 0o777), owners, owners,
            st.just({}), rdev=st.tuples(st.integers(0, 4095), st.integers(0, 2**20 - 1)).map(
                lambda mm: os.makedev(*mm)),
        )  # fmt: skip
    if depth == 0:
        return leaf
    sub = st.lists(entries(depth - 1), max_size=6, unique_by=lambda e: e.name)
    directory = st.builds(
        Entry, st.just("dir"), names, st.integers(0o700, 0o7777), owners, owners, xattr_sets,
        children=sub,
    )  # fmt: skip
    return leaf | directory


def materialize(root: bytes, items: list[Entry], regs: list[bytes]) -> None:
    for e in items:
        path = os.path.join(root, e.name)
        if e.kind == "reg":
            with open(path, "wb") as f:
                f.write(e.data)
            regs.append(path)
        elif e.kind == "hardlink":
            if not regs:
                continue
            os.link(regs[len(regs) // 2], path)
            continue
        elif e.kind == "lnk":
            os.symlink(e.target, path)
        elif e.kind == "fifo":
            os.mkfifo(path)
        elif e.kind in ("chr", "blk"):
            os.mknod(path, (stat.S_IFCHR if e.kind == "chr" else stat.S_IFBLK) | 0o600, e.rdev)
        elif e.kind == "dir":
            os.mkdir(path)
            materialize(path, e.children or [], regs)
        for key, value in e.xattrs.items():
            if key.startswith(b"user.") and e.kind not in ("reg", "dir"):
                continue  # Linux allows user.* only on regular files and directories
            os.setxattr(path, key, value, follow_symlinks=False)
        if e.kind != "lnk":
            if IS_ROOT:
                os.chown(path, e.uid, e.gid, follow_symlinks=False)
            os.chmod(path, e.mode)
        elif IS_ROOT:
            os.chown(path, e.uid, e.gid, follow_symlinks=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tree=st.lists(entries(2), max_size=8, unique_by=lambda e: e.name),
    compressor=st.sampled_from(list(Compressor.__members__.values())).filter(
        lambda c: c is not Compressor.GZIP
    ),
    digester=st.sampled_from([Digester.BLAKE3, Digester.SHA256]),
    chunk_size=st.sampled_from(CHUNK_SIZES),
    blob_toc=st.booleans(),
)
def test_build_then_read_equals_source(
    tree: list[Entry],
    compressor: Compressor,
    digester: Digester,
    chunk_size: int,
    blob_toc: bool,
) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        materialize(os.fsencode(src), tree, [])
        os.chmod(src, 0o755)
        out = work / "out"
        out.mkdir()
        boot = out / "bootstrap"
        build(
            BuildOptions(
                source=str(src),
                bootstrap=str(boot),
                blob_dir=str(out),
                compressor=compressor,
                digester=digester,
                chunk_size=chunk_size,
                blob_toc=blob_toc,
                threads=2,
                # Arbitrary names include ".wh.*"; whiteouts have their own tests.
                whiteout_spec="none",
            )
        )
        expected = snapshot(src)
        assert diff_snapshots(expected, snapshot_image(boot, out), ignore=("mtime",)) == []
        if IS_ROOT and kernel_has_erofs():
            views = write_uncompressed_blobs(boot, out, work)
            with mount_erofs(boot, work / "mnt", views) as mnt:
                seen = snapshot(mnt)
            assert diff_snapshots(expected, seen, ignore=("mtime",)) == []
