"""Failures: retries and their limits, timeouts, resets, corruption, and the HTTP client's
routing around broken servers (proxy fallback, mirrors, health checks), TLS and unix sockets.

The servers are ``FaultServer`` (Python, countable, switchable faults) and nginx, all on
127.0.0.1. Timing bounds are correctness bounds, deliberately generous.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nydusfs.config import HttpCommon, HttpProxyConfig, MirrorConfig, ProxyConfig
from nydusfs.errors import BackendError
from nydusfs.storage.backends.http import HttpClient, check_status
from nydusfs.storage.backends.http_proxy import HttpProxyBackend
from tests.contract.conftest import forward_proxy, short_tmpdir, static_site
from tests.helpers.servers import FaultServer, RequestRecord, free_port, nginx

pytestmark = pytest.mark.timeout(60)

BLOB = random.Random(11).randbytes(100_000)
PATH = "/b/blob"


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer({PATH: BLOB}) as s:
        yield s


@pytest.fixture
def make_backend(server: FaultServer) -> Iterator[Callable[..., HttpProxyBackend]]:
    made: list[HttpProxyBackend] = []

    def make(**settings: object) -> HttpProxyBackend:
        config = HttpProxyConfig(addr=server.url, path="/b", **settings)  # type: ignore[arg-type]
        made.append(HttpProxyBackend(config, id="faults"))
        return made[-1]

    yield make
    for b in made:
        b.close()


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# --- retries -----------------------------------------------------------------------------------


def test_500s_then_success(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend]
) -> None:
    backend = make_backend(retry_limit=2)
    server.fail_next(2)
    assert backend.get_reader("blob").read(10, 1000) == BLOB[10:1010]
    assert server.count("GET", PATH) == 3
    assert backend.metrics.read_errors == 2 and backend.metrics.read_count == 1


def test_500s_beyond_retry_limit(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend]
) -> None:
    backend = make_backend(retry_limit=2)
    server.fail_next(5, status=503, body=b"try later")
    with pytest.raises(BackendError, match=r"HTTP 503.*try later") as info:
        backend.get_reader("blob").read(0, 10)
    assert info.value.retryable
    assert server.count("GET", PATH) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_4xx_is_not_retried(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend], status: int
) -> None:
    backend = make_backend(retry_limit=3)
    server.fail_next(1, status=status)
    with pytest.raises(BackendError, match=f"HTTP {status}") as info:
        backend.get_reader("blob").read(0, 10)
    assert not info.value.retryable
    assert server.count("GET", PATH) == 1


def test_429_is_retried(server: FaultServer, make_backend: Callable[..., HttpProxyBackend]) -> None:
    backend = make_backend(retry_limit=1)
    server.fail_next(1, status=429)
    assert backend.get_reader("blob").read(0, 10) == BLOB[:10]
    assert server.count("GET", PATH) == 2


@pytest.mark.parametrize("after_bytes", [None, 1000])
def test_connection_reset_is_retried(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend], after_bytes: int | None
) -> None:
    backend = make_backend(retry_limit=1)
    server.reset_next(1, after_bytes=after_bytes)
    assert backend.get_reader("blob").read(0, 50_000) == BLOB[:50_000]
    assert server.count("GET", PATH) == 2


def test_connection_reset_without_retries(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend]
) -> None:
    backend = make_backend(retry_limit=0)
    server.reset_next(1)
    with pytest.raises(BackendError, match="connection") as info:
        backend.get_reader("blob").read(0, 10)
    assert info.value.retryable
    assert "127.0.0.1" in str(info.value) and PATH in str(info.value)


def test_truncated_body_is_retried(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend]
) -> None:
    backend = make_backend(retry_limit=1)
    server.truncate_next(1)
    assert backend.get_reader("blob").read(0, 20_000) == BLOB[:20_000]
    assert server.count("GET", PATH) == 2


def test_stall_past_timeout(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend]
) -> None:
    backend = make_backend(retry_limit=1, timeout=1, connect_timeout=1)
    server.stall_next(2, 30)
    started = time.monotonic()
    with pytest.raises(BackendError, match="timed out") as info:
        backend.get_reader("blob").read(0, 10)
    elapsed = time.monotonic() - started
    assert info.value.retryable
    # Two attempts of ~timeout each plus one backoff (<= 0.15 s); the bound is generous.
    assert 1.5 <= elapsed < 2 * 1 + 4, elapsed
    assert server.count("GET", PATH) == 2


def test_corrupted_bytes_are_returned_as_is(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend]
) -> None:
    backend = make_backend()
    server.corrupt_next(1)
    got = backend.get_reader("blob").read(100, 64)
    assert got == bytes(b ^ 0xFF for b in BLOB[100:164])  # digests are the cache's business


def test_blob_size_is_retried(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend]
) -> None:
    backend = make_backend(retry_limit=1)
    server.fail_next(1, status=502)
    assert backend.get_reader("blob").blob_size() == len(BLOB)
    assert server.count("HEAD", PATH) == 2


# --- http-proxy answers ------------------------------------------------------------------------


def test_206_must_start_where_asked(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend]
) -> None:
    def wrong_range(record: RequestRecord) -> tuple[int, dict[str, str], bytes]:
        return 206, {"Content-Range": f"bytes 0-9/{len(BLOB)}"}, BLOB[:10]

    server.add_route("GET", PATH, wrong_range)
    with pytest.raises(BackendError, match="range starting at 0") as info:
        make_backend(retry_limit=2).get_reader("blob").read(5, 10)
    assert not info.value.retryable


def test_head_without_content_length(
    server: FaultServer, make_backend: Callable[..., HttpProxyBackend]
) -> None:
    server.add_route("HEAD", PATH, lambda r: (200, {"Content-Length": "many"}, b""))
    with pytest.raises(BackendError, match="Content-Length"):
        make_backend().get_reader("blob").blob_size()


def test_unix_socket_without_path_asks_for_root() -> None:
    # Upstream sends every request over a unix socket to "/" (path and blob id ignored).
    with short_tmpdir() as d, FaultServer({"/": BLOB}, unix_socket=d / "s.sock") as server:
        backend = HttpProxyBackend(HttpProxyConfig(addr=str(d / "s.sock")))
        try:
            reader = backend.get_reader("any-blob")
            assert reader.blob_size() == len(BLOB)
            assert reader.read(7, 9) == BLOB[7:16]
        finally:
            backend.close()
        assert {r.path for r in server.requests} == {"/"}


# --- the client --------------------------------------------------------------------------------


def test_check_status_classifies(server: FaultServer) -> None:
    with HttpClient(HttpCommon(), name="t") as client:
        for status, retryable in ((503, True), (429, True), (404, False), (403, False)):
            server.fail_next(1, status=status, body=b"  details\n of   failure ")
            resp = client.request("GET", server.url + PATH + "?sig=secret")
            with pytest.raises(BackendError) as info:
                check_status(resp, "fetch")
            assert info.value.retryable is retryable
            text = str(info.value)
            assert f"fetch: HTTP {status}" in text and "details of failure" in text
            assert "secret" not in text and f"{server.url}{PATH}?…" in text
        ok = client.request("GET", server.url + PATH)
        check_status(ok, "fetch")
        assert ok.content == BLOB


def test_transport_errors_name_the_request() -> None:
    port = free_port()
    with HttpClient(HttpCommon(), name="probe") as client, pytest.raises(BackendError) as info:
        client.request("GET", f"http://127.0.0.1:{port}/x?token=abc")
    text = str(info.value)
    assert info.value.retryable
    assert text.startswith(f"probe: GET http://127.0.0.1:{port}/x?…: connection failed")
    assert "refused" in text and "abc" not in text


def test_closed_client_refuses(server: FaultServer) -> None:
    client = HttpClient(HttpCommon(), name="t")
    client.request("GET", server.url + PATH)
    client.close()
    with pytest.raises(BackendError, match="closed") as info:
        client.request("GET", server.url + PATH)
    assert not info.value.retryable


def test_sessions_are_per_thread(server: FaultServer) -> None:
    with HttpClient(HttpCommon(), name="t") as client:
        seen: list[object] = []

        def use() -> None:
            client.request("GET", server.url + PATH)
            seen.append(client._local.direct)

        threads = [threading.Thread(target=use) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({id(s) for s in seen}) == 4


def test_streamed_response(server: FaultServer) -> None:
    with HttpClient(HttpCommon(), name="t") as client:
        resp = client.request("GET", server.url + PATH, stream=True)
        assert b"".join(resp.iter_content(4096)) == BLOB


def test_user_agent_and_env_headers(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NYDUS_HEADER_X-Tenant", "blue")
    with HttpClient(HttpCommon(), name="t") as client:
        client.request("GET", server.url + PATH)
    headers = server.requests[-1].headers
    assert headers["User-Agent"] == "nydusd/1.0.0" and headers["X-Tenant"] == "blue"
    assert headers["Accept-Encoding"] == "identity"


# --- proxy -------------------------------------------------------------------------------------


def _proxy_common(url: str, **proxy: object) -> HttpCommon:
    return HttpCommon(proxy=ProxyConfig(url=url, **proxy), timeout=5)  # type: ignore[arg-type]


@pytest.fixture
def nginx_proxy(server: FaultServer, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with nginx(forward_proxy(port, server.port), tmp_path / "proxy", port=port):
        yield f"http://127.0.0.1:{port}"


def test_requests_go_through_the_proxy(server: FaultServer, nginx_proxy: str) -> None:
    with HttpClient(_proxy_common(nginx_proxy, fallback=False), name="t") as client:
        resp = client.request("GET", server.url + PATH, headers={"Range": "bytes=0-9"})
        assert resp.status_code == 206 and resp.content == BLOB[:10]
        assert resp.headers.get("X-Via-Proxy") == "1"
        # use_http: an https URL reaches the proxy as plain http (no CONNECT tunnel).
        https_url = f"https://127.0.0.1:{server.port}{PATH}"
        with HttpClient(_proxy_common(nginx_proxy, use_http=True, fallback=False), name="u") as u:
            resp = u.request("GET", https_url)
            assert resp.content == BLOB and resp.headers.get("X-Via-Proxy") == "1"
        with pytest.raises(BackendError):  # without it: CONNECT, which nginx refuses
            client.request("GET", https_url)
        # skip_proxy goes straight to the origin.
        resp = client.request("GET", server.url + PATH, skip_proxy=True)
        assert "X-Via-Proxy" not in resp.headers


def test_dead_proxy_falls_back_to_origin(server: FaultServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with HttpClient(_proxy_common(dead), name="t") as client:
        assert client.request("GET", server.url + PATH).content == BLOB
    ping = _proxy_common(dead, ping_url=dead + "/ping", check_interval=1)
    with HttpClient(ping, name="t") as client:
        _wait_for(lambda: not client.proxy_healthy)
        assert client.request("GET", server.url + PATH).content == BLOB
    assert server.count("GET", PATH) == 2


def test_dead_proxy_without_fallback_fails(server: FaultServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with HttpClient(_proxy_common(dead, fallback=False), name="t") as client:
        with pytest.raises(BackendError, match="proxy connection failed") as info:
            client.request("GET", server.url + PATH)
        assert info.value.retryable
    common = _proxy_common(dead, fallback=False, ping_url=dead + "/ping", check_interval=1)
    with HttpClient(common, name="t") as client:
        _wait_for(lambda: not client.proxy_healthy)
        with pytest.raises(BackendError, match="not healthy and fallback is disabled"):
            client.request("GET", server.url + PATH)
    assert server.count() == 0
    backend = HttpProxyBackend(
        HttpProxyConfig(addr=server.url, path="/b", proxy=common.proxy, retry_limit=1)
    )
    try:
        with pytest.raises(BackendError):
            backend.get_reader("blob").read(0, 1)
    finally:
        backend.close()


def test_proxy_5xx_falls_back(server: FaultServer) -> None:
    with FaultServer() as proxy:
        proxy.fail_next(2, status=502)
        with HttpClient(_proxy_common(proxy.url), name="t") as client:
            assert client.request("GET", server.url + PATH).content == BLOB
        assert proxy.requests[0].path == server.url + PATH  # absolute-form: a forward proxy
        with HttpClient(_proxy_common(proxy.url, fallback=False), name="t") as client:
            assert client.request("GET", server.url + PATH).status_code == 502
    assert server.count("GET", PATH) == 1


def test_proxy_health_checks(server: FaultServer) -> None:
    health = {"status": 200}
    server.add_route("GET", "/healthz", lambda r: (health["status"], {}, b"ok"))
    common = _proxy_common(
        f"http://127.0.0.1:{free_port()}", ping_url=server.url + "/healthz", check_interval=1
    )
    client = HttpClient(common, name="hc")
    try:
        _wait_for(lambda: server.count() >= 2)
        assert client.proxy_healthy
        health["status"] = 500
        _wait_for(lambda: not client.proxy_healthy, timeout=5)
        health["status"] = 200
        _wait_for(lambda: client.proxy_healthy, timeout=5)
        assert {r.path for r in server.requests} == {"/healthz"}  # nothing but the ping URL
        assert any(t.name.startswith("nydusfs-health-hc") for t in threading.enumerate())
    finally:
        client.close()
    assert not any(t.name.startswith("nydusfs-health-hc") for t in threading.enumerate())
    pings = server.count()
    time.sleep(1.5)
    assert server.count() == pings


def test_proxy_health_check_pauses_when_idle(server: FaultServer) -> None:
    server.add_route("GET", "/healthz", lambda r: (200, {}, b"ok"))
    common = _proxy_common(
        f"http://127.0.0.1:{free_port()}",
        ping_url=server.url + "/healthz",
        check_interval=1,
        check_pause_elapsed=0,
    )
    with HttpClient(common, name="idle"):
        time.sleep(3.5)
        assert 1 <= server.count("GET", "/healthz") <= 2  # ~4 if it did not pause


# --- mirrors -----------------------------------------------------------------------------------


def _mirror(url: str, **kw: object) -> MirrorConfig:
    return MirrorConfig(host=url, **kw)  # type: ignore[arg-type]


def test_first_mirror_down_second_serves(server: FaultServer, tmp_path: Path) -> None:
    root = tmp_path / "www" / "b"
    root.mkdir(parents=True)
    (root / "blob").write_bytes(BLOB)
    port = free_port()
    need_token = 'if ($http_x_mirror_token != "t0k") { return 403; }'
    site = static_site(f"127.0.0.1:{port}", root, prefix="/b", extra=need_token)
    with nginx(site, tmp_path / "nginx", port=port):
        mirrors = [
            _mirror(f"http://127.0.0.1:{free_port()}", failure_limit=2),
            _mirror(f"http://127.0.0.1:{port}", headers={"X-Mirror-Token": "t0k"}),
        ]
        with HttpClient(HttpCommon(mirrors=mirrors), name="m") as client:
            for _ in range(3):
                resp = client.request("GET", server.url + PATH, mirrorable=True)
                assert resp.status_code == 200 and resp.content == BLOB
            assert not client.mirrors[0].healthy and client.mirrors[1].healthy
            assert server.count() == 0
            client.request("GET", server.url + PATH)  # not mirrorable: the origin
            assert server.count("GET", PATH) == 1


def test_mirror_failure_limit_and_recovery(server: FaultServer) -> None:
    with FaultServer({PATH: BLOB}) as m1, FaultServer({PATH: BLOB}) as m2:
        m1.add_route("GET", "/v2", lambda r: (200, {}, b"{}"))
        m1.reset_next(100, path="/b/")
        mirrors = [
            _mirror(m1.url, failure_limit=2, health_check_interval=1),
            _mirror(m2.url),
        ]
        with HttpClient(HttpCommon(mirrors=mirrors), name="m") as client:
            for _ in range(4):
                assert client.request("GET", server.url + PATH, mirrorable=True).content == BLOB
            assert m1.count("GET", PATH) == 2 and m2.count("GET", PATH) == 4
            assert not client.mirrors[0].healthy
            m1.clear_faults()
            _wait_for(lambda: client.mirrors[0].healthy, timeout=5)  # pinged at <host>/v2
            assert client.request("GET", server.url + PATH, mirrorable=True).content == BLOB
            assert m1.count("GET", PATH) == 3
    assert server.count() == 0


def test_all_mirrors_failing_uses_origin(server: FaultServer) -> None:
    with FaultServer() as m1:
        m1.fail_next(10, status=500)
        mirrors = [_mirror(m1.url), _mirror(f"http://127.0.0.1:{free_port()}")]
        with HttpClient(HttpCommon(mirrors=mirrors), name="m") as client:
            resp = client.request("GET", server.url + PATH + "?x=1", mirrorable=True)
            assert resp.content == BLOB
            assert client.mirrors[0].failures == 1 and client.mirrors[1].failures == 1
        assert m1.requests[0].path == PATH + "?x=1"  # path and query kept, host replaced
    assert server.count("GET", PATH + "?x=1") == 1


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_verification(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot make a test certificate with openssl: {e}")
    (tmp_path / "www" / "b").mkdir(parents=True)
    (tmp_path / "www" / "b" / "blob").write_bytes(BLOB)
    port = free_port()
    tls = f"ssl_certificate {cert}; ssl_certificate_key {key};"
    site = static_site(f"127.0.0.1:{port} ssl", tmp_path / "www" / "b", prefix="/b", extra=tls)
    url = f"https://127.0.0.1:{port}{PATH}"
    with nginx(site, tmp_path / "nginx", port=port):
        with HttpClient(HttpCommon(), name="tls") as client:
            with pytest.raises(BackendError, match="TLS error") as info:
                client.request("GET", url)
            assert not info.value.retryable
        with HttpClient(HttpCommon(ca_cert_files=[str(cert)]), name="tls") as client:
            assert client.request("GET", url).content == BLOB
        with HttpClient(HttpCommon(skip_verify=True), name="tls") as client:
            assert client.request("GET", url).content == BLOB
