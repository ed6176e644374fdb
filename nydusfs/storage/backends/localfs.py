"""The ``localfs`` backend: blobs are files in a local directory (upstream ``localfs.rs``).

Where a blob is found:

- ``blob_file`` set: that one file serves every blob id (a single-blob image).
- otherwise ``<dir>/<blob_id>``, else ``<alt_dir>/<blob_id>`` for the first of ``alt_dirs``
  that has it. As upstream, a candidate counts only if it is non-empty, so an empty placeholder
  in ``dir`` does not hide the real blob in an alternative directory; unlike upstream, when no
  candidate is non-empty an existing empty file is still used (upstream would open the last
  alternative path, existing or not), so genuinely empty blobs work.

Blob ids come from image metadata, which is untrusted: an id that is not a plain file name
(``/``, ``..``, NUL) is refused rather than joined to a directory path.

Each reader opens its file once (``O_RDONLY | O_CLOEXEC``) when the backend first hands it out
and keeps the descriptor until ``close()``; a blob replaced or unlinked afterwards keeps being
read from the file that was opened. Reads are ``os.pread``, which needs no lock: any number of
threads may read one reader at once. Local I/O errors are not retried (``retry_limit`` is 0,
as upstream has no such key for localfs).
"""

from __future__ import annotations

import logging
import os

from nydusfs.config import LocalFsConfig
from nydusfs.errors import BackendError, ConfigError
from nydusfs.storage.backends.base import BlobBackend, BlobReader

log = logging.getLogger(__name__)

# pread(2) on Linux moves at most this much per call; larger reads come back short.
_MAX_PREAD = 0x7FFF_F000


def check_blob_id(blob_id: str, backend: str) -> None:
    """Refuse ids that would escape a directory or name no file."""
    if not blob_id or blob_id in (".", "..") or "/" in blob_id or "\0" in blob_id:
        raise BackendError(f"{backend}: invalid blob id {blob_id!r}", retryable=False)


def pread_full(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset`` of ``fd``, fewer only at end of file."""
    data = os.pread(fd, min(size, _MAX_PREAD), offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    done = len(data)
    while done < size:
        more = os.pread(fd, min(size - done, _MAX_PREAD), offset + done)
        if not more:
            break
        parts.append(more)
        done += len(more)
    return b"".join(parts)


class LocalFsReader(BlobReader):
    """One open blob file."""

    def __init__(self, backend: LocalFsBackend, blob_id: str, path: str, fd: int) -> None:
        super().__init__(backend, blob_id)
        self.path = path
        self._fd = fd

    def try_blob_size(self) -> int:
        try:
            return os.fstat(self._fd).st_size
        except OSError as e:
            raise BackendError(
                f"localfs: cannot stat blob {self.blob_id} ({self.path}): {e.strerror}",
                retryable=False,
            ) from e

    def try_read(self, offset: int, size: int) -> bytes:
        try:
            return pread_full(self._fd, size, offset)
        except OSError as e:
            raise BackendError(
                f"localfs: cannot read blob {self.blob_id} ({self.path}) at offset {offset} "
                f"size {size}: {e.strerror}",
                retryable=False,
            ) from e

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class LocalFsBackend(BlobBackend):
    """Blobs in ``dir`` (and ``alt_dirs``), or the single ``blob_file``."""

    type = "localfs"

    def __init__(self, config: LocalFsConfig, id: str = "") -> None:
        if not isinstance(config, LocalFsConfig):
            raise ConfigError(f"backend.localfs: expected localfs settings, got {config!r}")
        if not config.blob_file and not config.dir:
            raise ConfigError("backend.localfs: one of blob_file or dir is required")
        super().__init__(id, retry_limit=0)
        self.config = config

    def blob_path(self, blob_id: str) -> str:
        """The file that serves ``blob_id``; raises ``BackendError`` if there is none."""
        if self.config.blob_file:
            return self.config.blob_file
        check_blob_id(blob_id, "localfs")
        dirs = [d for d in (self.config.dir, *self.config.alt_dirs) if d]
        candidates = [os.path.join(d, blob_id) for d in dirs]
        fallback = None
        for path in candidates:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_size > 0:
                return path
            fallback = fallback or path
        if fallback is not None:
            return fallback
        raise BackendError(
            f"localfs: blob {blob_id} not found (looked for {', '.join(candidates)})",
            retryable=False,
        )

    def new_reader(self, blob_id: str) -> LocalFsReader:
        path = self.blob_path(blob_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise BackendError(
                f"localfs: cannot open blob {blob_id} at {path}: {e.strerror}", retryable=False
            ) from e
        log.debug("localfs: blob %s is %s", blob_id, path)
        return LocalFsReader(self, blob_id, path, fd)
