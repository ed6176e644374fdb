"""Child process of test_crash: reads a file chunk by chunk through a slow backend, printing
``done <index>`` after each chunk, until the parent kills it with SIGKILL mid-fetch.

Usage: python -m tests.cache.crash_child BOOTSTRAP BLOB_DIR WORK_DIR DELAY
"""

from __future__ import annotations

import sys

import trio

from nydusfs.rafs.superblock import RafsSuper
from nydusfs.storage.device import BlobDevice
from tests.cache.backend import FileBackend
from tests.cache.util import chunk_desc, chunks_of, make_config


def main() -> None:
    bootstrap, blob_dir, work_dir, delay = sys.argv[1:5]
    sup = RafsSuper.load(bootstrap)
    backend = FileBackend(blob_dir, delay=float(delay))

    async def run() -> None:
        device = BlobDevice(sup.blobs, make_config("blobcache", work_dir, batch_size=0), backend)
        for chunk in chunks_of(sup, "rand"):
            await device.read(chunk_desc(sup.blobs[0], chunk))
            print(f"done {chunk.index}", flush=True)
        await device.close()

    trio.run(run)


if __name__ == "__main__":
    main()
