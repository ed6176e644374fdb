"""The write side of the FUSE codec through a real kernel mount: /dev/fuse serving ``MemFs``.

The kernel is the client here: ordinary system calls on the mount become CREATE, WRITE,
SETATTR, RENAME, LINK, SYMLINK, MKNOD, MKDIR, SETXATTR, ... requests that the codec decodes
and hands to the in-memory filesystem, whose state the test then checks directly.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nydusfs.fuse import fusedev
from tests.codec.memfs import MemFs
from tests.mount.nydusd_proc import is_mounted

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, MemFs]]:
    fs = MemFs()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ready = threading.Event()
    errors: list[BaseException] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: fusedev.serve(
                fs, str(mnt), read_only=False, task_status=task_status))  # fmt: skip
            ready.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:
            errors.append(e)
        finally:
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    assert not errors, errors
    assert is_mounted(mnt)
    try:
        yield mnt, fs
    finally:
        # Unmounting ends the session: the reader sees ENODEV and serve returns.
        fusedev.unmount(str(mnt))
        thread.join(10)
        assert not thread.is_alive() and not errors, errors
        assert not is_mounted(mnt)


def test_kernel_writes_through_the_codec(mounted: tuple[Path, MemFs]) -> None:
    mnt, fs = mounted
    (mnt / "dir").mkdir(mode=0o750)
    f = mnt / "dir" / "file"
    f.write_bytes(b"hello world")
    with open(f, "r+b") as h:
        h.seek(6)
        h.write(b"there")
        h.flush()
        os.fsync(h.fileno())
    assert f.read_bytes() == b"hello there"
    os.truncate(f, 5)
    assert f.read_bytes() == b"hello"
    big = os.urandom(3 << 20)  # several max-size WRITEs and READs
    (mnt / "big").write_bytes(big)
    assert (mnt / "big").read_bytes() == big
    os.chmod(f, 0o600)
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o600, 1234, 5678, 5)
    os.symlink("dir/file", mnt / "link")
    assert os.readlink(mnt / "link") == "dir/file"
    os.link(f, mnt / "hard")
    assert os.stat(mnt / "hard").st_nlink == 2
    os.mknod(mnt / "fifo", stat.S_IFIFO | 0o644)
    assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
    os.rename(mnt / "hard", mnt / "dir" / "renamed")
    os.setxattr(f, "user.k", b"v" * 100)
    assert os.getxattr(f, "user.k") == b"v" * 100
    assert "user.k" in os.listxattr(f)
    os.removexattr(f, "user.k")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.k")
    assert e.value.errno == errno.ENODATA
    assert sorted(os.listdir(mnt / "dir")) == ["file", "renamed"]
    os.unlink(mnt / "dir" / "renamed")
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "dir")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(f)
    os.rmdir(mnt / "dir")
    assert sorted(os.listdir(mnt)) == ["big", "fifo", "link"]
    assert os.statvfs(mnt).f_namemax == 255
    # What the filesystem holds is what the kernel asked for.
    names = fs.nodes[1].children
    assert bytes(fs.nodes[names[b"big"]].data) == big
    assert fs.nodes[names[b"link"]].target == b"dir/file"
