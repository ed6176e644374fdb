"""kill -9 in the middle of a fetch: the restarted cache fetches only what is missing and never
serves a chunk that was not completely written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from nydusfs.storage.cache.chunkmap import HEADER_SIZE, bit_mask
from nydusfs.storage.device import BlobDevice
from tests.cache.backend import FileBackend
from tests.cache.util import Image, chunks_of, descs_for, make_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_kill9_mid_fetch_then_restart(image: Image, tmp_path: Path) -> None:
    sup = image.load()
    blob = sup.blobs[0]
    rand = chunks_of(sup, "rand")
    work_dir = tmp_path / "cache"
    delay = 0.3
    args = [str(image.bootstrap), str(image.blob_dir), str(work_dir), str(delay)]
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.cache.crash_child", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    done: list[int] = []
    try:
        assert child.stdout is not None
        for line in child.stdout:
            done.append(int(line.split()[1]))
            if len(done) == 3:
                break
        time.sleep(delay / 2)  # the child is now inside the next backend read
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert done == [0, 1, 2]

    map_file = work_dir / f"{blob.blob_id}.blob.data.chunk_map"
    bitmap = map_file.read_bytes()[HEADER_SIZE:]

    def ready(index: int) -> bool:
        return bool(bitmap[index >> 3] & bit_mask(index))

    assert [c.index for c in rand if ready(c.index)] == done
    # Pretend the killed fetch had half-written its chunk: garbage where chunk 3 goes.
    with open(work_dir / f"{blob.blob_id}.blob.data", "r+b") as f:
        f.seek(rand[3].uncompressed_offset)
        f.write(os.urandom(rand[3].uncompressed_size // 2))

    backend = FileBackend(image.blob_dir)

    async def restart() -> None:
        device = BlobDevice(sup.blobs, make_config("blobcache", work_dir, batch_size=0), backend)
        assert await device.read(descs_for(sup, "rand")) == image.files["rand"]
        await device.close()

    trio.run(restart)
    assert backend.chunks_read(blob, rand) == {c.index for c in rand} - set(done)
    assert not any(
        off <= rand[0].compressed_offset < off + size for off, size in backend.data_reads(blob)
    )
