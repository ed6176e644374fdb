"""Registry authentication pieces: challenges, token responses, refresh timing, the auth store.

- ``parse_www_authenticate`` reads a ``WWW-Authenticate`` header (RFC 7235: several challenges,
  quoted values with commas and backslash escapes), which upstream splits on ``",`` and so
  misreads unquoted or comma-bearing values.
- ``TokenResponse.parse`` reads a token server's JSON answer (``token`` or ``access_token``,
  ``expires_in`` defaulting to 600 s), as upstream's ``TokenResponse``.
- ``token_refresh_delay`` is upstream's schedule: refresh 20 s plus a random jitter of at most
  min(TTL / 10, 300 s) before the token expires, so many daemons do not refresh at once.
- The runtime auth store (upstream ``utils/src/config.rs``, key ``registry_auth``) holds
  credentials set through the API (``PUT /api/v1/config``) after a backend was created. A
  registry backend reads it before each request, so a change takes effect on the next request
  (upstream polls every 5 s). Values are per backend id; ``id=None`` addresses every backend.

Thread-safety: the parsers are pure; the store is guarded by one lock and may be used from any
thread.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import threading
from dataclasses import dataclass, field

from nydusfs.errors import BackendError

DEFAULT_TOKEN_EXPIRES_IN = 600  # seconds, when the token server does not say
TOKEN_REFRESH_MARGIN = 20  # seconds before expiry
TOKEN_REFRESH_JITTER_MAX = 300
TOKEN_REFRESH_JITTER_DIVISOR = 10
TOKEN_REFRESH_BACKOFF_INITIAL = 5.0  # after a failed refresh; doubles up to the maximum
TOKEN_REFRESH_BACKOFF_MAX = 600.0

_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


# --- WWW-Authenticate --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge: the scheme as sent (compare with ``scheme.lower()``) and its parameters
    (names lower-cased)."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_bearer(self) -> bool:
        return self.scheme.lower() == "bearer"

    @property
    def is_basic(self) -> bool:
        return self.scheme.lower() == "basic"


@dataclass(frozen=True, slots=True)
class BearerChallenge:
    """What a token request needs: where (``realm``), for whom (``service``), for what
    (``scope``)."""

    realm: str
    service: str
    scope: str


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip(self, chars: str = " \t") -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _TCHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def bare(self) -> str:
        # Lenient: an unquoted value runs to the next comma or blank, so that servers which
        # send an unquoted URL (not a token by RFC 7235) still parse.
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ", \t":
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        self.pos += 1  # the opening quote
        out = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == "\\" and self.pos < len(self.text):
                out.append(self.text[self.pos])
                self.pos += 1
            elif ch == '"':
                break
            else:
                out.append(ch)
        return "".join(out)


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Every challenge in a ``WWW-Authenticate`` value, in order. Never raises: what cannot be
    parsed is skipped (token68 credentials, which registries do not use, come out mangled)."""
    s = _Scanner(value)
    challenges: list[Challenge] = []
    while True:
        s.skip(" \t,")
        scheme = s.token()
        if not scheme:
            if s.pos >= len(s.text):
                return challenges
            s.pos += 1  # a stray character: skip it rather than loop
            continue
        params: dict[str, str] = {}
        s.skip()
        while True:
            start = s.pos
            name = s.token()
            s.skip()
            if not name or s.peek() != "=":
                s.pos = start  # not "name=": the next challenge's scheme starts here
                break
            s.pos += 1
            s.skip()
            params[name.lower()] = s.quoted() if s.peek() == '"' else s.bare()
            s.skip()
            if s.peek() != ",":
                break
            s.pos += 1
            s.skip()
        challenges.append(Challenge(scheme, params))


def pick_challenge(value: str) -> Challenge | None:
    """The challenge to answer: Bearer if offered with a realm, else Basic. (Upstream also
    insists on ``service``; a registry that omits it gets an empty one here.)"""
    challenges = parse_www_authenticate(value)
    for ch in challenges:
        if ch.is_bearer and ch.params.get("realm"):
            return ch
    for ch in challenges:
        if ch.is_basic:
            return ch
    return None


def bearer_of(challenge: Challenge) -> BearerChallenge:
    p = challenge.params
    return BearerChallenge(p["realm"], p.get("service", ""), p.get("scope", ""))


# --- token responses ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenResponse:
    token: str
    expires_in: int

    @classmethod
    def parse(cls, body: bytes, realm: str) -> TokenResponse:
        try:
            data = json.loads(body)
        except ValueError as e:
            raise BackendError(
                f"registry token service {realm}: answer is not JSON ({e})", retryable=False
            ) from e
        if not isinstance(data, dict):
            raise BackendError(
                f"registry token service {realm}: answer is not a JSON object", retryable=False
            )
        token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token:
            raise BackendError(
                f"registry token service {realm}: no token or access_token in the answer",
                retryable=False,
            )
        expires_in = data.get("expires_in", DEFAULT_TOKEN_EXPIRES_IN)
        # Upstream takes 0 literally (refresh on every tick); the token spec's minimum is 60 s,
        # so a non-positive or malformed value gets the default instead.
        if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
            expires_in = DEFAULT_TOKEN_EXPIRES_IN
        return cls(token, expires_in)


def token_refresh_delay(ttl: float, rng: random.Random | None = None) -> float:
    """Seconds from now until a token valid for ``ttl`` seconds should be refreshed."""
    jitter_max = min(ttl / TOKEN_REFRESH_JITTER_DIVISOR, TOKEN_REFRESH_JITTER_MAX)
    jitter = (rng or random).uniform(0, jitter_max)
    return max(0.0, ttl - (TOKEN_REFRESH_MARGIN + jitter))


# --- credentials -------------------------------------------------------------------------------


def validate_auth(auth: str, where: str) -> str:
    """``auth`` trimmed, after checking it is base64 of ``user:password``; ValueError if not."""
    auth = auth.strip()
    try:
        raw = base64.b64decode(auth, validate=True)
        text = raw.decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not base64 of user:password ({e})") from e
    if ":" not in text:
        raise ValueError(f"{where}: base64 text must be user:password (no ':' found)")
    return auth


_store_lock = threading.Lock()
_store: dict[str, str] = {}
_store_all: str | None = None


def set_registry_auth(auth: str, id: str | None = None) -> None:
    """Set runtime registry credentials (base64 ``user:password``; ``""`` = anonymous).

    ``id`` is the backend id (upstream: the mount's id); ``None`` applies to every backend and
    replaces earlier per-id values. A backend uses the newest value on its next request.
    """
    global _store_all
    with _store_lock:
        if id is None:
            _store_all = auth
            _store.clear()
        else:
            _store[id] = auth


def get_registry_auth(id: str | None = None) -> str | None:
    """The runtime credentials in effect for backend ``id``, or None when none were set (the
    backend then uses its configured ``auth``)."""
    with _store_lock:
        if id is not None and id in _store:
            return _store[id]
        return _store_all


def reset_registry_auth() -> None:
    """Forget every runtime credential (tests; a daemon restart)."""
    global _store_all
    with _store_lock:
        _store.clear()
        _store_all = None
