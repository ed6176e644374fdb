"""The ``registry`` backend: blobs from an OCI distribution registry (upstream ``registry.rs``).

Requests: ``HEAD /v2/<repo>/blobs/sha256:<id>`` for the size (``Content-Length``) and
``GET`` of the same URL with ``Range: bytes=a-b`` for data, both mirrorable. The scheme is
``http`` only when configured so; otherwise (``https`` or ``""``) ``https``, and with
``skip_verify`` a TLS failure ("wrong version number", "ssl", "connection refused") switches
the backend to ``http`` for good, as upstream; without ``skip_verify`` TLS errors are final
(the "auto-detect" of upstream's docs is only this fallback).

Authentication, as upstream:

- Credentials are the config's ``auth`` (base64 ``user:password``), replaced by the
  ``IMAGE_PULL_AUTH`` environment variable when set, and replaced at run time by the auth
  store (``auth.set_registry_auth``, the ``/api/v1/config`` route), read before each request.
  ``registry_token`` is a static bearer token sent until the registry rejects it.
- A 401 is answered by its ``WWW-Authenticate`` challenge. If the 401 came to a request that
  carried credentials, the request is first repeated without them, because Harbor answers a
  stale token with a misleading ``Basic`` challenge. ``Basic`` sends the credentials;
  ``Bearer`` fetches a token: POST form (``service``, ``scope``,
  ``client_id=nydus-registry-client``; no ``grant_type``, as upstream) with ``Authorization:
  Basic`` when credentials exist, then GET with the same query if the POST fails; once GET
  worked, the token host is asked with GET only (Harbor, GAR). The token (``token`` or
  ``access_token``) is refreshed 20 s plus jitter before ``expires_in`` (default 600 s) runs
  out. Upstream refreshes from a thread that wakes every 5 s; here the first request after the
  refresh time does it, one thread at a time, while the others keep using the still-valid token.
- Until one request has succeeded, requests are serialised (upstream's ``First``), so a burst of
  first reads does not fetch one token each.

Redirects: a 30x answer to a blob GET is followed by hand, without the registry credentials,
after applying ``blob_url_scheme`` and ``blob_redirected_host``; the final URL is cached per
blob. A cached URL that fails (upstream: 401/403, e.g. an expired presigned URL; here any
failure) is dropped and the read goes to the registry again, once. HEAD follows redirects too
(not cached); upstream would read the size from the 30x answer itself.

Thread-safety: one backend serves all threads. Token state and caches sit behind
``_state_lock`` (held only for field access); ``_refresh_lock`` makes token fetches one at a
time; HTTP goes through ``HttpClient``, which is thread-safe.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import urllib3

from nydusfs.config import RegistryConfig
from nydusfs.errors import BackendError, ConfigError
from nydusfs.storage.backends.auth import (
    TOKEN_REFRESH_BACKOFF_INITIAL,
    TOKEN_REFRESH_BACKOFF_MAX,
    BearerChallenge,
    TokenResponse,
    bearer_of,
    get_registry_auth,
    pick_challenge,
    token_refresh_delay,
    validate_auth,
)
from nydusfs.storage.backends.base import BlobBackend, BlobReader
from nydusfs.storage.backends.http import HttpClient, body_excerpt, map_error
from nydusfs.storage.backends.localfs import check_blob_id
from nydusfs.storage.backends.s3 import content_length

log = logging.getLogger(__name__)

T = TypeVar("T")

REGISTRY_CLIENT_ID = "nydus-registry-client"
MAX_REDIRECTS = 5
_READ_CHUNK = 1 << 20  # big pieces: the per-piece Python work dominated at 64 KiB
_FALLBACK_MARKERS = ("wrong version number", "connection refused", "ssl")


def _error_text(err: BaseException) -> str:
    """The messages of an exception and its causes, lower-cased (TLS details sit deep)."""
    seen: list[str] = []
    cur: BaseException | None = err
    while cur is not None and len(seen) < 10:
        seen.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return " | ".join(seen).lower()


def _rewound(data: bytes | BinaryIO | None) -> bytes | BinaryIO | None:
    if data is not None and not isinstance(data, bytes):
        data.seek(0)
    return data


def _user_of(auth: str) -> str:
    return base64.b64decode(auth).decode(errors="replace").partition(":")[0]


class RegistryReader(BlobReader):
    backend: RegistryBackend

    def try_blob_size(self) -> int:
        return self.backend.first(lambda: self.backend.blob_size_of(self.blob_id))

    def try_read(self, offset: int, size: int) -> bytes:
        return self.backend.first(lambda: self.backend.read_blob(self.blob_id, offset, size))


class RegistryBackend(BlobBackend):
    type = "registry"

    def __init__(self, config: RegistryConfig, id: str = "") -> None:
        super().__init__(id=id, retry_limit=config.retry_limit)
        if not config.host or not config.repo:
            raise ConfigError("backend.registry: host and repo are required")
        if config.scheme not in ("", "http", "https"):
            raise ConfigError(
                f'backend.registry.scheme: expected "http", "https" or "", got "{config.scheme}"'
            )
        env_auth = os.environ.get("IMAGE_PULL_AUTH", "").strip()
        try:
            if env_auth:
                auth: str | None = validate_auth(env_auth, "IMAGE_PULL_AUTH")
            elif config.auth and config.auth.strip():
                auth = validate_auth(config.auth, "backend.registry.auth")
            else:
                auth = None
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.host = config.host
        self.repo = config.repo
        self._config_auth = auth
        self._skip_verify = config.skip_verify
        self._timeout = config.timeout
        self._blob_url_scheme = config.blob_url_scheme
        self._blob_redirected_host = config.blob_redirected_host
        self._https = config.scheme != "http"
        self._client = HttpClient(config, name=f"registry {config.host}")

        self._state_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        token = (config.registry_token or "").strip()
        self._auth_header: str | None = f"Bearer {token}" if token else None
        self._bearer: BearerChallenge | None = None
        # The clock of token lifetimes (a seam for tests, which cannot wait ten minutes).
        self.clock: Callable[[], float] = time.monotonic
        self._refresh_at: float | None = None  # on self.clock
        self._expires_at: float | None = None
        self._refresh_backoff = TOKEN_REFRESH_BACKOFF_INITIAL
        self._runtime_auth = get_registry_auth(id)
        self._token_hosts_using_get: set[str] = set()
        self._redirects: dict[str, str] = {}
        self._first_lock = threading.Lock()
        self._first_done = False

    def new_reader(self, blob_id: str) -> BlobReader:
        blob_id = blob_id.removeprefix("sha256:")
        check_blob_id(blob_id, f"registry {self.host}")
        return RegistryReader(self, blob_id)

    def close(self) -> None:
        super().close()
        self._client.close()

    # --- requests with authentication ------------------------------------------------------

    def first(self, call: Callable[[], T]) -> T:
        """Run ``call``; until one call has succeeded, one at a time (see module docstring)."""
        if not self._first_done:
            with self._first_lock:
                if not self._first_done:
                    result = call()
                    self._first_done = True
                    return result
        return call()

    def credentials(self) -> str | None:
        """The base64 ``user:password`` in effect: the runtime store's, else the configured."""
        runtime = get_registry_auth(self.id)
        return (runtime or None) if runtime is not None else self._config_auth

    def _check_runtime_auth(self) -> None:
        runtime = get_registry_auth(self.id)
        with self._state_lock:
            if runtime == self._runtime_auth:
                return
            self._runtime_auth = runtime
            # New credentials: forget what the old ones earned. A known bearer challenge makes
            # the next request fetch a token with the new credentials right away.
            self._auth_header = None
            self._refresh_at = self._expires_at = None
        log.info("registry %s: credentials changed at run time", self.host)

    def _set_token(self, bearer: BearerChallenge, token: TokenResponse) -> str:
        header = f"Bearer {token.token}"
        now = self.clock()
        with self._state_lock:
            self._auth_header = header
            self._bearer = bearer
            self._expires_at = now + token.expires_in
            self._refresh_at = now + token_refresh_delay(token.expires_in)
            self._refresh_backoff = TOKEN_REFRESH_BACKOFF_INITIAL
        return header

    def _current_header(self) -> str | None:
        with self._state_lock:
            header, bearer = self._auth_header, self._bearer
            refresh_at, expires_at = self._refresh_at, self._expires_at
        now = self.clock()
        if bearer is None or (header is not None and (refresh_at is None or now < refresh_at)):
            return header
        if header is not None and expires_at is not None and now < expires_at:
            # Proactive refresh: one thread does it; the others go on with the valid token.
            if not self._refresh_lock.acquire(blocking=False):
                return header
            try:
                return self._set_token(bearer, self._fetch_token(bearer))
            except BackendError as e:
                with self._state_lock:
                    delay = self._refresh_backoff
                    self._refresh_backoff = min(delay * 2, TOKEN_REFRESH_BACKOFF_MAX)
                    self._refresh_at = now + delay
                log.error(
                    "registry %s: token refresh failed, retry in %ds: %s", self.host, delay, e
                )
                return header
            finally:
                self._refresh_lock.release()
        # No token, or it expired: everyone waits for one fetch.
        with self._refresh_lock:
            with self._state_lock:
                if self._auth_header is not None and self._auth_header != header:
                    return self._auth_header
            return self._set_token(bearer, self._fetch_token(bearer))

    def _fetch_token(self, bearer: BearerChallenge) -> TokenResponse:
        creds = self.credentials()
        headers = {"Authorization": f"Basic {creds}"} if creds else {}
        form = {"service": bearer.service, "scope": bearer.scope, "client_id": REGISTRY_CLIENT_ID}
        token_host = urlsplit(bearer.realm).netloc
        with self._state_lock:
            use_get = token_host in self._token_hosts_using_get
        post_failure = ""
        if not use_get:
            try:
                resp = self._client.request(
                    "POST", bearer.realm, headers=headers, data=form, skip_proxy=True
                )
                if resp.status_code == 200:
                    return TokenResponse.parse(resp.content, bearer.realm)
                post_failure = f"POST answered {resp.status_code}"
            except BackendError as e:
                post_failure = f"POST failed: {e}"
            log.warning("registry %s: token %s; trying GET", self.host, post_failure)
        resp = self._client.request(
            "GET", bearer.realm, headers=headers, params=form, skip_proxy=True
        )
        if resp.status_code == 200:
            if not use_get:  # remember: this token server wants GET (Harbor, GAR)
                with self._state_lock:
                    self._token_hosts_using_get.add(token_host)
            return TokenResponse.parse(resp.content, bearer.realm)
        status = resp.status_code
        if status in (401, 403):
            who = f"the credentials of user {_user_of(creds)!r}" if creds else "anonymous access"
            why = f"refused {who}"
        else:
            why = f"answered {status}"
        prefix = f"{post_failure}, " if post_failure else ""
        raise BackendError(
            f"registry {self.host}: token service {bearer.realm} {why} "
            f"({prefix}GET {status}: {body_excerpt(resp)})",
            retryable=status >= 500 or status == 429,
        )

    def _answer(self, challenge_value: str, sent: str | None) -> str | None:
        """The Authorization header that answers a 401's challenge, or None if none can."""
        challenge = pick_challenge(challenge_value)
        if challenge is None:
            return None
        if challenge.is_basic:
            creds = self.credentials()
            if not creds:
                raise BackendError(
                    f"registry {self.host} requires credentials (Basic auth); set "
                    "backend.registry.auth or IMAGE_PULL_AUTH",
                    retryable=False,
                )
            with self._state_lock:
                self._bearer = None
                self._refresh_at = self._expires_at = None
            return f"Basic {creds}"
        bearer = bearer_of(challenge)
        with self._refresh_lock:
            with self._state_lock:
                # Another thread got a fresh token for this challenge meanwhile: use it.
                if self._bearer == bearer and self._auth_header not in (None, sent):
                    return self._auth_header
            return self._set_token(bearer, self._fetch_token(bearer))

    def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        *,
        mirrorable: bool = False,
        stream: bool = False,
        data: bytes | BinaryIO | None = None,
    ) -> requests.Response:
        """``method url`` to the registry with authentication; HTTP status not checked, except
        that credentials the registry still rejects after a challenge raise (not retried).
        A file ``data`` (an upload body) is rewound before each attempt."""
        self._check_runtime_auth()
        sent = self._current_header()
        hdrs = dict(headers)
        if sent:
            hdrs["Authorization"] = sent
        resp = self._client.request(
            method, url, headers=hdrs, mirrorable=mirrorable, stream=stream, data=_rewound(data)
        )
        if resp.status_code != 401:
            return resp
        if sent:
            # Harbor answers a stale token with a misleading Basic challenge: ask afresh, and
            # stop sending what was refused.
            with self._state_lock:
                if self._auth_header == sent:
                    self._auth_header = None
            resp.close()
            hdrs.pop("Authorization")
            resp = self._client.request(
                method, url, headers=hdrs, mirrorable=mirrorable, stream=stream,
                data=_rewound(data),
            )  # fmt: skip
            if resp.status_code != 401:
                return resp
        answer = self._answer(resp.headers.get("WWW-Authenticate", ""), sent)
        if answer is None:
            return resp
        resp.close()
        hdrs["Authorization"] = answer
        resp = self._client.request(
            method, url, headers=hdrs, mirrorable=mirrorable, stream=stream, data=_rewound(data)
        )
        if resp.status_code == 401:
            with self._state_lock:
                self._auth_header = None
            creds = self.credentials()
            who = f"the credentials of user {_user_of(creds)!r}" if creds else "anonymous access"
            raise BackendError(
                f"registry {self.host} rejected {who} for {self.repo} (401: {body_excerpt(resp)})",
                retryable=False,
            )
        if resp.status_code < 400:
            with self._state_lock:
                self._auth_header = answer
        return resp

    # --- blobs ------------------------------------------------------------------------------

    def blob_url(self, blob_id: str) -> str:
        scheme = "https" if self._https else "http"
        return f"{scheme}://{self.host}/v2/{self.repo}/blobs/sha256:{blob_id}"

    def _registry_call(
        self, method: str, blob_id: str, headers: dict[str, str], stream: bool = False
    ) -> requests.Response:
        try:
            return self.request(
                method, self.blob_url(blob_id), headers, mirrorable=True, stream=stream
            )
        except BackendError as e:
            text = _error_text(e)
            if self._skip_verify and self._https and any(m in text for m in _FALLBACK_MARKERS):
                log.warning("registry %s: falling back to http after TLS error: %s", self.host, e)
                self._https = False
                return self.request(
                    method, self.blob_url(blob_id), headers, mirrorable=True, stream=stream
                )
            if "certificate" in text and not self._skip_verify:
                raise BackendError(
                    f"{e} (for a registry with a self-signed certificate, set skip_verify)",
                    retryable=e.retryable,
                ) from e
            raise

    def _redirect_target(self, base: str, location: str) -> str:
        parts = urlsplit(urljoin(base, location))
        scheme = self._blob_url_scheme or parts.scheme
        netloc = parts.netloc
        if self._blob_redirected_host:
            new = self._blob_redirected_host
            try:
                has_port = urlsplit(f"//{new}").port is not None
            except ValueError:  # a bare IPv6 address
                new, has_port = f"[{new}]", False
            if not has_port and parts.port is not None:
                new = f"{new}:{parts.port}"
            userinfo, at, _ = netloc.rpartition("@")
            netloc = f"{userinfo}{at}{new}"
        return urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))

    def _follow(
        self,
        method: str,
        resp: requests.Response,
        url: str,
        headers: dict[str, str],
        stream: bool = False,
    ) -> tuple[requests.Response, str]:
        """Follow 30x answers by hand, without registry credentials."""
        for _ in range(MAX_REDIRECTS):
            location = resp.headers.get("Location")
            if not (300 <= resp.status_code < 400 and location):
                return resp, url
            resp.close()
            url = self._redirect_target(url, location)
            resp = self._client.request(method, url, headers=headers, stream=stream)
        raise BackendError(
            f"registry {self.host}: more than {MAX_REDIRECTS} redirects", retryable=False
        )

    def blob_size_of(self, blob_id: str) -> int:
        what = f"size of blob {blob_id} in {self.host}/{self.repo}"
        resp = self._registry_call("HEAD", blob_id, {})
        resp, _ = self._follow("HEAD", resp, self.blob_url(blob_id), {})
        self._client.check_status(resp, what)
        return content_length(resp, what)

    def read_blob(self, blob_id: str, offset: int, size: int, allow_retry: bool = True) -> bytes:
        # Blob GETs stream: docker-registry answers a Range at the blob's end with 416 and the
        # blob's Content-Length but a short body, which a full read would report as broken.
        what = f"read of blob {blob_id} in {self.host}/{self.repo} at {offset}+{size}"
        headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
        started = time.monotonic()
        with self._state_lock:
            cached = self._redirects.get(blob_id)
        if cached is not None:
            try:
                resp = self._client.request("GET", cached, headers=headers, stream=True)
            except BackendError:
                self._forget_redirect(blob_id)
                raise
            if resp.status_code in (200, 206, 416):
                return self._body(resp, offset, size, what, started)
            self._forget_redirect(blob_id)
            log.warning(
                "registry %s: cached redirect for blob %s answered %d, asking the registry again",
                self.host, blob_id, resp.status_code,
            )  # fmt: skip
            if allow_retry and 400 <= resp.status_code < 500:
                resp.close()
                return self.read_blob(blob_id, offset, size, allow_retry=False)
            self._client.check_status(resp, what)
        resp = self._registry_call("GET", blob_id, headers, stream=True)
        if 300 <= resp.status_code < 400 and resp.headers.get("Location"):
            resp, target = self._follow("GET", resp, self.blob_url(blob_id), headers, stream=True)
            if resp.status_code in (200, 206):
                with self._state_lock:
                    self._redirects[blob_id] = target
        return self._body(resp, offset, size, what, started)

    def _forget_redirect(self, blob_id: str) -> None:
        with self._state_lock:
            self._redirects.pop(blob_id, None)

    def _body(
        self, resp: requests.Response, offset: int, size: int, what: str, started: float
    ) -> bytes:
        if resp.status_code == 416:  # at or past the end: a short (empty) read
            resp.close()
            return b""
        self._client.check_status(resp, what)
        # The whole call stays bounded by ``timeout`` (HttpClient's rule for unstreamed reads).
        deadline = started + self._timeout if self._timeout else None
        chunks = []
        try:
            for chunk in resp.iter_content(_READ_CHUNK):
                chunks.append(chunk)
                if deadline is not None and time.monotonic() > deadline:
                    raise BackendError(f"{what}: not complete within {self._timeout} s")
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            if isinstance(e, BackendError):
                raise
            raise map_error(e, what) from e
        finally:
            resp.close()
        data = b"".join(chunks)
        if resp.status_code == 200:  # the server ignored Range and sent the whole blob
            return data[offset : offset + size]
        return data[:size]
