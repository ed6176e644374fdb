"""The project's exception hierarchy.

Library code raises these (filesystems raise only ``OSError``, see ``filesystem.py``). Every error
carries a message that a user can act on: what was wrong, and where. The CLI prints ``str(err)``
on one line and exits non-zero.
"""

from __future__ import annotations

import errno


class NydusError(Exception):
    """Base of every error nydusfs raises on purpose."""


class ConfigError(NydusError, ValueError):
    """A configuration file, key or value is invalid. The message names the key and why."""


class FormatError(NydusError, ValueError):
    """An on-disk structure (bootstrap, blob, ToC, chunk info) is malformed or truncated."""


class UnsupportedError(NydusError):
    """A valid structure uses a feature this implementation does not support."""


class BuildError(NydusError):
    """An image cannot be built from the given source."""


class DigestMismatch(FormatError):
    """Data read back does not match its recorded digest."""


class BackendError(NydusError, OSError):
    """A blob backend failed to serve a request. Maps to EIO for the read that needed it.

    ``retryable`` is False for answers that a retry cannot change (404, bad credentials, a
    blob shorter than asked), so the retry loop gives up at once.
    """

    def __init__(self, message: str, *, code: int = errno.EIO, retryable: bool = True) -> None:
        super().__init__(code, message)
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message
