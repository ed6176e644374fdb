"""The registry backend against Debian's docker-registry on loopback: anonymous, htpasswd
(Basic) and token (Bearer) auth, token fetch fallback and refresh, run-time credentials,
30x redirects and their cache, and the https->http fallback. Pure parsing comes first."""

from __future__ import annotations

import base64
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydusfs.config import RegistryConfig
from nydusfs.errors import BackendError, ConfigError
from nydusfs.storage.backends.auth import (
    DEFAULT_TOKEN_EXPIRES_IN,
    TokenResponse,
    get_registry_auth,
    parse_www_authenticate,
    pick_challenge,
    reset_registry_auth,
    set_registry_auth,
    token_refresh_delay,
    validate_auth,
)
from nydusfs.storage.backends.registry import RegistryBackend
from tests.helpers.registry_servers import (
    DockerRegistry,
    RedirectFront,
    TokenService,
    basic_auth,
    have_registry,
)

REPO = "nydus/test-blobs"
USERS = {"alice": "wonderland"}
GOOD = basic_auth("alice", "wonderland")
BAD = basic_auth("alice", "looking-glass")


# --- parsing (no servers) ----------------------------------------------------------------------


def test_www_authenticate_upstream_example() -> None:
    value = (
        'Bearer realm="https://auth.my-registry.com/token",service="my-registry.com",'
        'scope="repository:test/repo:pull,push"'
    )
    (ch,) = parse_www_authenticate(value)
    assert ch.is_bearer
    assert ch.params == {
        "realm": "https://auth.my-registry.com/token",
        "service": "my-registry.com",
        "scope": "repository:test/repo:pull,push",
    }


@pytest.mark.parametrize(
    ("value", "scheme", "params"),
    [
        ('Basic realm="harbor"', "Basic", {"realm": "harbor"}),
        ("Basic", "Basic", {}),
        # Several challenges; Bearer wins; unquoted URL; spaces around commas; escapes.
        (
            'Basic realm="a\\"b", Bearer realm=https://t.example/tok , service=svc,'
            'scope="repository:a/b:pull,push"',
            "Bearer",
            {
                "realm": "https://t.example/tok",
                "service": "svc",
                "scope": "repository:a/b:pull,push",
            },
        ),
        # Quoted commas and an error parameter (a rejected token).
        (
            'bearer realm="https://x/t,1",error="invalid_token",service="s"',
            "bearer",
            {"realm": "https://x/t,1", "error": "invalid_token", "service": "s"},
        ),
        # No service: upstream gives up; we ask with an empty one.
        ('Bearer realm="https://x/t"', "Bearer", {"realm": "https://x/t"}),
    ],
)
def test_pick_challenge(value: str, scheme: str, params: dict[str, str]) -> None:
    ch = pick_challenge(value)
    assert ch is not None
    assert (ch.scheme, ch.params) == (scheme, params)


@pytest.mark.parametrize("value", ["", "Negotiate abc==", ",,,", "Bearer service=x"])
def test_pick_challenge_none(value: str) -> None:
    assert pick_challenge(value) is None


def test_token_response() -> None:
    t = TokenResponse.parse(b'{"token": "a", "expires_in": 60}', "r")
    assert (t.token, t.expires_in) == ("a", 60)
    t = TokenResponse.parse(b'{"access_token": "b"}', "r")
    assert (t.token, t.expires_in) == ("b", DEFAULT_TOKEN_EXPIRES_IN)
    assert TokenResponse.parse(b'{"token": "", "access_token": "c", "expires_in": 0}', "r") == (
        TokenResponse("c", DEFAULT_TOKEN_EXPIRES_IN)
    )
    for bad in (b"not json", b"[]", b'{"expires_in": 3}'):
        with pytest.raises(BackendError) as e:
            TokenResponse.parse(bad, "https://auth/token")
        assert not e.value.retryable and "https://auth/token" in str(e.value)


def test_token_refresh_delay_bounds() -> None:
    rng = random.Random(1)
    for ttl, low, high in ((600, 600 - 20 - 60, 580), (7200, 7200 - 20 - 300, 7180), (25, 2.5, 5)):
        delays = [token_refresh_delay(ttl, rng) for _ in range(2000)]
        assert low <= min(delays) and max(delays) <= high
        assert max(delays) - min(delays) > (high - low) * 0.9  # the jitter is used
    assert token_refresh_delay(10) == 0.0


def test_validate_auth() -> None:
    assert validate_auth(f"  {GOOD}\n", "k") == GOOD
    for bad in ("%%%", base64.b64encode(b"\xff\xfe").decode(), base64.b64encode(b"x").decode()):
        with pytest.raises(ValueError, match=r"^k: "):
            validate_auth(bad, "k")


def test_auth_store() -> None:
    try:
        assert get_registry_auth("a") is None
        set_registry_auth("A", "a")
        assert (get_registry_auth("a"), get_registry_auth("b")) == ("A", None)
        set_registry_auth("ALL")
        assert (get_registry_auth("a"), get_registry_auth("b"), get_registry_auth()) == (
            "ALL", "ALL", "ALL"
        )  # fmt: skip
        set_registry_auth("", "b")
        assert (get_registry_auth("a"), get_registry_auth("b")) == ("ALL", "")
    finally:
        reset_registry_auth()
    assert get_registry_auth("a") is None


def test_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGE_PULL_AUTH", raising=False)
    with pytest.raises(ConfigError, match=r"backend\.registry\.auth"):
        RegistryBackend(RegistryConfig(host="h", repo="r", auth="nope!"))
    with pytest.raises(ConfigError, match="scheme"):
        RegistryBackend(RegistryConfig(host="h", repo="r", scheme="ftp"))
    with pytest.raises(ConfigError, match="host and repo"):
        RegistryBackend(RegistryConfig(host="h"))
    monkeypatch.setenv("IMAGE_PULL_AUTH", base64.b64encode(b"no-colon").decode())
    with pytest.raises(ConfigError, match="IMAGE_PULL_AUTH"):
        RegistryBackend(RegistryConfig(host="h", repo="r", auth=GOOD))


@pytest.mark.parametrize(
    ("scheme", "host", "location", "expected"),
    [
        ("", "", "https://s3.example/b/k?sig=1", "https://s3.example/b/k?sig=1"),
        ("http", "", "https://s3.example:8443/k", "http://s3.example:8443/k"),
        ("", "127.0.0.1", "https://localhost:9000/k?x", "https://127.0.0.1:9000/k?x"),
        ("", "cache.local:8080", "https://blob.example/k", "https://cache.local:8080/k"),
        ("", "::1", "http://blob.example:81/k", "http://[::1]:81/k"),
        ("", "", "/relative/k?x=1", "http://reg.example:5000/relative/k?x=1"),
    ],
)
def test_redirect_target(scheme: str, host: str, location: str, expected: str) -> None:
    backend = RegistryBackend(
        RegistryConfig(
            host="reg.example:5000",
            repo="r",
            scheme="http",
            blob_url_scheme=scheme,
            blob_redirected_host=host,
        )
    )
    try:
        base = backend.blob_url("ab")
        assert backend._redirect_target(base, location) == expected
    finally:
        backend.close()


# --- against docker-registry -------------------------------------------------------------------


@dataclass
class Setup:
    registry: DockerRegistry
    blob_id: str
    data: bytes
    token: TokenService | None = None


def _setup(tmp: Path, auth: str | None, token: TokenService | None = None) -> Iterator[Setup]:
    reg = DockerRegistry(tmp, auth=auth, users=USERS, token_service=token)
    try:
        data = random.Random(7).randbytes(300_000)
        yield Setup(reg, reg.push_blob(REPO, data), data, token)
    finally:
        reg.close()


@pytest.fixture(scope="module")
def anon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not have_registry():
        pytest.skip("needs /usr/bin/docker-registry")
    yield from _setup(tmp_path_factory.mktemp("reg-anon"), None)


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not have_registry():
        pytest.skip("needs /usr/bin/docker-registry")
    yield from _setup(tmp_path_factory.mktemp("reg-basic"), "htpasswd")


@pytest.fixture(scope="module")
def _token_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not have_registry():
        pytest.skip("needs /usr/bin/docker-registry")
    tmp = tmp_path_factory.mktemp("reg-token")
    service = TokenService(tmp, USERS)
    try:
        yield from _setup(tmp, "token", service)
    finally:
        service.close()


@pytest.fixture
def bearer(_token_module: Setup) -> Setup:
    """The token registry, its token service back to defaults and its counters zeroed."""
    ts = _token_module.token
    assert ts is not None
    ts.allow_post, ts.expires_in, ts.token_field, ts.jwt_lifetime = True, 300, "token", 300
    ts.hits.clear()
    return _token_module


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("IMAGE_PULL_AUTH", raising=False)
    yield
    reset_registry_auth()


def backend_for(
    setup: Setup | RedirectFront, request: pytest.FixtureRequest, **kw: object
) -> RegistryBackend:
    host = setup.host if isinstance(setup, RedirectFront) else setup.registry.host
    config = RegistryConfig(**{"scheme": "http", "host": host, "repo": REPO, **kw})  # type: ignore[arg-type]
    backend = RegistryBackend(config, id=request.node.nodeid)
    request.addfinalizer(backend.close)
    return backend


def check_reads(backend: RegistryBackend, setup: Setup) -> None:
    reader = backend.get_reader(setup.blob_id)
    data = setup.data
    assert reader.blob_size() == len(data)
    assert reader.read(0, 4096) == data[:4096]
    assert reader.read(123_457, 70_000) == data[123_457:193_457]
    assert reader.read(len(data) - 10, 100) == data[-10:]  # short only at the end
    assert reader.read(len(data), 10) == b""


@pytest.mark.timeout(60)
def test_anonymous(anon: Setup, request: pytest.FixtureRequest) -> None:
    check_reads(backend_for(anon, request), anon)
    # "sha256:"-prefixed ids name the same blob
    reader = backend_for(anon, request).get_reader("sha256:" + anon.blob_id)
    assert reader.read(5, 5) == anon.data[5:10]


@pytest.mark.timeout(60)
def test_missing_blob_is_not_retried(anon: Setup, request: pytest.FixtureRequest) -> None:
    backend = backend_for(anon, request, retry_limit=3)
    started = time.monotonic()
    with pytest.raises(BackendError) as e:
        backend.get_reader("0" * 64).read(0, 10)
    assert not e.value.retryable
    assert "404" in str(e.value) and "0" * 64 in str(e.value)
    assert time.monotonic() - started < 1.0  # no backoff sleeps
    assert backend.metrics.read_errors == 1


@pytest.mark.timeout(60)
def test_basic_auth(basic: Setup, request: pytest.FixtureRequest) -> None:
    check_reads(backend_for(basic, request, auth=GOOD), basic)


@pytest.mark.timeout(60)
def test_basic_wrong_password(basic: Setup, request: pytest.FixtureRequest) -> None:
    backend = backend_for(basic, request, auth=BAD, retry_limit=3)
    with pytest.raises(BackendError) as e:
        backend.get_reader(basic.blob_id).read(0, 10)
    assert not e.value.retryable
    assert "rejected the credentials of user 'alice'" in str(e.value)
    assert "looking-glass" not in str(e.value)


@pytest.mark.timeout(60)
def test_basic_without_credentials(basic: Setup, request: pytest.FixtureRequest) -> None:
    with pytest.raises(BackendError, match="requires credentials") as e:
        backend_for(basic, request).get_reader(basic.blob_id).blob_size()
    assert not e.value.retryable


@pytest.mark.timeout(60)
def test_image_pull_auth_overrides_config(
    basic: Setup, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGE_PULL_AUTH", GOOD)
    check_reads(backend_for(basic, request, auth=BAD), basic)
    monkeypatch.setenv("IMAGE_PULL_AUTH", BAD)
    with pytest.raises(BackendError, match="rejected"):
        backend_for(basic, request, auth=GOOD).get_reader(basic.blob_id).read(0, 1)


@pytest.mark.timeout(60)
def test_runtime_auth_update_basic(basic: Setup, request: pytest.FixtureRequest) -> None:
    backend = backend_for(basic, request, auth=BAD)
    reader = backend.get_reader(basic.blob_id)
    with pytest.raises(BackendError, match="rejected"):
        reader.read(0, 10)
    set_registry_auth(GOOD, backend.id)
    assert reader.read(0, 10) == basic.data[:10]
    set_registry_auth(BAD)  # every backend
    with pytest.raises(BackendError, match="rejected"):
        reader.read(10, 10)


@pytest.mark.timeout(60)
def test_bearer_post(bearer: Setup, request: pytest.FixtureRequest) -> None:
    ts = bearer.token
    assert ts is not None
    check_reads(backend_for(bearer, request, auth=GOOD), bearer)
    assert ts.hits == {"POST": 1, "issued": 1}
    assert ts.last_params == {
        "service": ts.service,
        "scope": f"repository:{REPO}:pull",
        "client_id": "nydus-registry-client",
    }


@pytest.mark.timeout(60)
def test_bearer_post_refused_falls_back_to_get(
    bearer: Setup, request: pytest.FixtureRequest
) -> None:
    ts = bearer.token
    assert ts is not None
    ts.allow_post, ts.token_field, ts.expires_in = False, "access_token", None
    backend = backend_for(bearer, request, auth=GOOD)
    clock = FakeClock()
    backend.clock = clock
    reader = backend.get_reader(bearer.blob_id)
    assert reader.read(0, 100) == bearer.data[:100]
    assert ts.hits == {"POST": 1, "refused": 1, "GET": 1, "issued": 1}
    # Default lifetime 600 s: past the refresh point the next token is asked with GET only.
    clock.now += 600 - 19
    assert reader.read(100, 100) == bearer.data[100:200]
    assert ts.hits == {"POST": 1, "refused": 1, "GET": 2, "issued": 2}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(60)
def test_bearer_refresh_before_expiry(bearer: Setup, request: pytest.FixtureRequest) -> None:
    ts = bearer.token
    assert ts is not None
    ts.expires_in = 100  # refresh 20 s + up to 10 s jitter before expiry
    backend = backend_for(bearer, request, auth=GOOD)
    clock = FakeClock()
    backend.clock = clock
    reader = backend.get_reader(bearer.blob_id)
    reader.read(0, 10)
    assert ts.hits["issued"] == 1
    clock.now += 69  # before the earliest refresh point (100 - 30)
    reader.read(0, 10)
    assert ts.hits["issued"] == 1
    clock.now += 11  # past the latest refresh point (100 - 20), token still valid
    reader.read(0, 10)
    assert ts.hits["issued"] == 2
    # A failed proactive refresh keeps the valid token and backs off.
    clock.now += 80
    ts.users["alice"] = "changed"
    try:
        assert reader.read(0, 10) == bearer.data[:10]
        assert ts.hits["denied"] == 2  # POST, then GET
        assert reader.read(0, 10) == bearer.data[:10]
        assert ts.hits["denied"] == 2  # backing off: not asked again at once
    finally:
        ts.users["alice"] = USERS["alice"]
    # Expired: every reader waits for one new token.
    clock.now += 1000
    threads = [threading.Thread(target=reader.read, args=(0, 10)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ts.hits["issued"] == 3


@pytest.mark.timeout(60)
def test_bearer_stale_token_is_replaced(bearer: Setup, request: pytest.FixtureRequest) -> None:
    # The registry accepts a JWT until 60 s past its exp: -58 gives ~2 s of life while the
    # token service claims 300 s, so only the registry's 401 can reveal it.
    ts = bearer.token
    assert ts is not None
    ts.jwt_lifetime = -58
    reader = backend_for(bearer, request, auth=GOOD).get_reader(bearer.blob_id)
    assert reader.read(0, 10) == bearer.data[:10]
    time.sleep(3)
    ts.jwt_lifetime = 300
    assert reader.read(10, 10) == bearer.data[10:20]
    assert ts.hits["issued"] == 2


@pytest.mark.timeout(60)
def test_bearer_wrong_password(bearer: Setup, request: pytest.FixtureRequest) -> None:
    ts = bearer.token
    assert ts is not None
    backend = backend_for(bearer, request, auth=BAD, retry_limit=2)
    with pytest.raises(BackendError) as e:
        backend.get_reader(bearer.blob_id).read(0, 10)
    assert not e.value.retryable
    assert "refused the credentials of user 'alice'" in str(e.value)
    assert ts.hits == {"POST": 1, "GET": 1, "denied": 2}  # not retried


@pytest.mark.timeout(60)
def test_bearer_anonymous_refused(bearer: Setup, request: pytest.FixtureRequest) -> None:
    with pytest.raises(BackendError, match="refused anonymous access") as e:
        backend_for(bearer, request).get_reader(bearer.blob_id).blob_size()
    assert not e.value.retryable


@pytest.mark.timeout(60)
def test_bearer_runtime_auth_update(bearer: Setup, request: pytest.FixtureRequest) -> None:
    ts = bearer.token
    assert ts is not None
    backend = backend_for(bearer, request, auth=GOOD)
    reader = backend.get_reader(bearer.blob_id)
    reader.read(0, 10)
    set_registry_auth(BAD, backend.id)
    with pytest.raises(BackendError, match="refused the credentials"):
        reader.read(0, 10)
    set_registry_auth(GOOD, backend.id)
    assert reader.read(0, 10) == bearer.data[:10]
    assert ts.hits["issued"] == 2


@pytest.mark.timeout(60)
def test_static_registry_token(bearer: Setup, request: pytest.FixtureRequest) -> None:
    ts = bearer.token
    assert ts is not None
    token = ts.mint(f"repository:{REPO}:pull")
    check_reads(backend_for(bearer, request, registry_token=token), bearer)
    assert ts.hits == {}


@pytest.mark.timeout(60)
def test_first_requests_share_one_token(bearer: Setup, request: pytest.FixtureRequest) -> None:
    ts = bearer.token
    assert ts is not None
    backend = backend_for(bearer, request, auth=GOOD)
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            reader = backend.get_reader(bearer.blob_id)
            assert reader.read(i * 1000, 1000) == bearer.data[i * 1000 : (i + 1) * 1000]
        except BaseException as e:  # collected for the main thread
            errors.append(e)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ts.hits["issued"] == 1


# --- redirects ---------------------------------------------------------------------------------


@pytest.fixture
def front(anon: Setup) -> Iterator[RedirectFront]:
    server = RedirectFront(anon.registry)
    yield server
    server.close()


@pytest.mark.timeout(60)
def test_redirect_is_cached_per_blob(
    anon: Setup, front: RedirectFront, request: pytest.FixtureRequest
) -> None:
    backend = backend_for(front, request)
    reader = backend.get_reader(anon.blob_id)
    assert reader.read(0, 100) == anon.data[:100]
    assert (front.hits["redirect"], front.hits["store"]) == (1, 1)
    assert reader.read(1000, 100) == anon.data[1000:1100]
    assert (front.hits["redirect"], front.hits["store"]) == (1, 2)
    # The stored URL expires (403): dropped, the registry is asked again, once.
    front.expire()
    assert reader.read(2000, 100) == anon.data[2000:2100]
    assert front.hits["store-stale"] == 1
    assert (front.hits["redirect"], front.hits["store"]) == (2, 3)
    assert reader.read(len(anon.data), 1) == b""


@pytest.mark.timeout(60)
def test_blob_redirected_host_and_scheme(anon: Setup, request: pytest.FixtureRequest) -> None:
    # The Location names https://localhost:<port>; the backend must go to
    # http://127.0.0.1:<port> (the store refuses any other Host).
    server = RedirectFront(anon.registry, location_host="localhost", scheme="https")
    request.addfinalizer(server.close)
    backend = backend_for(server, request, blob_url_scheme="http", blob_redirected_host="127.0.0.1")
    reader = backend.get_reader(anon.blob_id)
    assert reader.read(10, 1000) == anon.data[10:1010]
    assert server.hits["store"] == 1 and server.hits["store-wrong-host"] == 0
    # Scheme fixed but not the host: the store sees Host localhost and refuses.
    other = backend_for(server, request, blob_url_scheme="http").get_reader(anon.blob_id)
    with pytest.raises(BackendError, match="400"):
        other.read(0, 10)
    assert server.hits["store-wrong-host"] == 1


# --- scheme ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_https_falls_back_to_http_with_skip_verify(
    anon: Setup, request: pytest.FixtureRequest
) -> None:
    backend = backend_for(anon, request, scheme="", skip_verify=True)
    assert backend.blob_url("x").startswith("https://")
    check_reads(backend, anon)
    assert backend.blob_url("x").startswith("http://")


@pytest.mark.timeout(60)
def test_https_without_skip_verify_does_not_fall_back(
    anon: Setup, request: pytest.FixtureRequest
) -> None:
    backend = backend_for(anon, request, scheme="https", retry_limit=2)
    with pytest.raises(BackendError, match="TLS") as e:
        backend.get_reader(anon.blob_id).read(0, 10)
    assert not e.value.retryable
    assert backend.blob_url("x").startswith("https://")
