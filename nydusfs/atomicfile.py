"""Write a file so that it appears whole or not at all.

Outputs (bootstraps, unpacked tars) are written under a temporary name in the target's
directory and renamed over the target only when complete, so an interrupted or failed run
never leaves a truncated file where a user expects a valid one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(target: str, *, buffering: int = -1, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file; on a clean exit it replaces ``target``, on an error it is removed."""
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb", buffering=buffering) as f:
            yield f
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
