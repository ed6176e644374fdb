"""Property: a corrupt or truncated v6 bootstrap is refused with FormatError, never worse.

Random byte flips and truncations of a real image (all inode kinds, xattrs, a multi-block
directory, chunked files) must either still read, or raise ``FormatError``/``UnsupportedError``
from the load or from some accessor. Any other exception, a hang, or an unbounded allocation
is a bug.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nydusfs.errors import FormatError, UnsupportedError
from nydusfs.rafs.builder.build import BuildOptions, build
from nydusfs.rafs.superblock import RafsSuper


def _image() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        (src / "dir").mkdir(parents=True)
        for i in range(300):  # more than one dirent block
            (src / "dir" / f"file-{i:04d}-{'x' * 20}").write_bytes(os.urandom(i * 13))
        (src / "big").write_bytes(os.urandom(20_000))
        os.symlink("dir/file-0001", src / "link")
        os.mkfifo(src / "fifo")
        os.setxattr(src / "big", "user.k", b"v" * 100)
        os.link(src / "big", src / "hard")
        out = Path(tmp) / "out"
        out.mkdir()
        build(BuildOptions(source=str(src), bootstrap=str(out / "b"), blob_dir=str(out),
                           chunk_size=0x1000))  # fmt: skip
        return (out / "b").read_bytes()


IMAGE = _image()


def _read_everything(data: bytes) -> None:
    sup = RafsSuper.load(data)
    for _, inode in sup.walk():
        _ = (inode.mode, inode.uid, inode.gid, inode.size, inode.nlink, inode.rdev, inode.mtime)
        inode.xattrs()
        if inode.is_symlink():
            inode.symlink()
        if inode.is_dir():
            for name, _ino in inode.children()[:3]:
                inode.lookup(name)
            _ = inode.parent
        if inode.is_reg():
            inode.chunks()
    _ = sup.prefetch_table


def test_pristine_image_reads() -> None:
    _read_everything(IMAGE)


@settings(max_examples=400, deadline=2000)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(IMAGE) - 1), st.integers(1, 255)), min_size=1, max_size=8
    )
)
def test_flipped_bytes(flips: list[tuple[int, int]]) -> None:
    data = bytearray(IMAGE)
    for pos, xor in flips:
        data[pos] ^= xor
    with contextlib.suppress(FormatError, UnsupportedError):
        _read_everything(bytes(data))


@settings(max_examples=100, deadline=2000)
@given(cut=st.integers(0, len(IMAGE) - 1))
def test_truncated(cut: int) -> None:
    with pytest.raises(FormatError):
        _read_everything(IMAGE[:cut])
