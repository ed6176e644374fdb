"""API errors: what went wrong with a request, as an HTTP status and upstream's error body.

Every error reply is ``{"code": "<kind>", "message": "<what is wrong>"}`` with one of these
statuses (upstream ``api/src/http_handler.rs``: ``translate_status_code`` and the endpoint
handlers' ``Err(HttpError::...)``, which all become 400):

=====  ==================  ======================================================================
400    ``BadRequest``      malformed HTTP, JSON or query; a wrong method for a route (upstream
                           answers 400, not 405); an invalid body, config or mountpoint; an event
                           the state machine does not accept in its current state
404    ``NotFound``        no such route (``NoRoute``); no metrics instance for the ``id``
                           (``NoCounter``); nothing mounted at the mountpoint
409    ``AlreadyExists``   something is already mounted at the mountpoint
413/431                    body larger than 1 MiB / headers larger than 64 KiB (server level)
501    ``Unsupported``     a feature this build does not have (passthrough_fs, hot upgrade, v2
                           blob cache entries)
503    ``NotReady``        the daemon is stopping
500    ``Internal``        anything else; the message says what failed
=====  ==================  ======================================================================

Upstream's ``code`` is always ``"UNDEFINED"`` and its message the Rust ``Debug`` form of the
error; upstream answers 500 for a duplicate mount or an umount of what is not mounted (its
``DaemonErrorKind::Other``). Clients (nydus-snapshotter, nydusctl) only test for a status of 400
or more and show ``code`` and ``message``, so the kinds and 404/409 here are compatible and say
more. Pure data; no I/O.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from nydusfs.errors import (
    BackendError,
    ConfigError,
    FormatError,
    NydusError,
    UnsupportedError,
)


class ApiError(Exception):
    """A request that cannot be served: ``status``, ``code`` (the kind) and ``message``."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    code = "Internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> bytes:
        return error_body(self.code, self.message)


class BadRequest(ApiError):
    status = HTTPStatus.BAD_REQUEST
    code = "BadRequest"


class NotFound(ApiError):
    status = HTTPStatus.NOT_FOUND
    code = "NotFound"


class NoRoute(NotFound):
    code = "NoRoute"


class NoCounter(NotFound):
    code = "NoCounter"


class AlreadyExists(ApiError):
    status = HTTPStatus.CONFLICT
    code = "AlreadyExists"


class Unsupported(ApiError):
    status = HTTPStatus.NOT_IMPLEMENTED
    code = "Unsupported"


class NotReady(ApiError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "NotReady"


class UnexpectedEvent(BadRequest):
    """An event the daemon state machine refuses in its current state (upstream 400)."""

    code = "UnexpectedEvent"


class InternalError(ApiError):
    pass


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"code": code, "message": message}).encode()


def from_exception(e: BaseException, what: str) -> ApiError:
    """The API error for a library exception raised while doing ``what`` ("mount /a").

    User mistakes (a bad config, a missing or malformed bootstrap, a bad path) are 4xx; a
    backend failing or an unexpected error is 500. The message always names the cause.
    """
    if isinstance(e, ApiError):
        return e
    text = f"{what}: {e}"
    if isinstance(e, FileExistsError):
        return AlreadyExists(text)
    if isinstance(e, FileNotFoundError):
        return NotFound(text)
    if isinstance(e, UnsupportedError):
        return Unsupported(text)
    if isinstance(e, BackendError):
        return InternalError(text)
    if isinstance(e, ConfigError | FormatError | ValueError):
        return BadRequest(text)
    if isinstance(e, NydusError | OSError):
        return InternalError(text)
    return InternalError(f"{what}: {type(e).__name__}: {e}")
