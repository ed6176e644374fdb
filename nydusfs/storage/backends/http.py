"""The HTTP client every network backend (registry, s3, oss, http-proxy) is built on.

``HttpClient`` is upstream's ``Connection`` (``storage/src/backend/connection.rs``) on top of
``requests``: one attempt per call, bounded by ``(connect_timeout, timeout)``, TLS verified
against the system CAs plus ``ca_cert_files`` unless ``skip_verify``, no redirects unless asked,
no retries (``BlobReader`` retries), and no exception for an HTTP status (callers decide;
``check_status`` turns one into a ``BackendError``). Every transport failure becomes a
``BackendError`` naming the method, the URL (query string hidden: it may carry signatures) and
the cause; connection failures and timeouts are retryable, TLS and URL errors are not.

Routing of one ``request`` (upstream's order):

1. The proxy (``proxy.url``), unless ``skip_proxy``. It is an HTTP forward proxy: the request
   line carries the absolute URL (https URLs are tunnelled with CONNECT unless ``use_http``,
   which rewrites ``https://`` to ``http://`` so that a caching proxy such as Dragonfly's
   dfdaemon sees the request). If the proxy answers below 500 the answer is returned. If it
   fails to connect or answers 5xx, ``fallback`` sends the request on (else the error or the 5xx
   answer is returned). A health thread GETs ``ping_url`` every ``check_interval`` s (only while
   the client was used within ``check_pause_elapsed`` s); while unhealthy the proxy is skipped,
   or, without ``fallback``, the request fails at once.
2. Mirrors (``mirrors``), only for ``mirrorable`` requests (the registry marks its blob and
   manifest reads): each healthy mirror in order, with the URL's scheme and host:port replaced
   by the mirror's ``host`` and the mirror's ``headers`` added. An answer below 500 is returned;
   a connection failure or a 5xx counts against the mirror, and ``failure_limit`` consecutive
   failures mark it unhealthy until its ``ping_url`` (default ``<host>/v2``) answers below 500
   (checked every ``health_check_interval`` s by a health thread).
3. The origin URL itself.

With ``unix_socket`` every request goes over that AF_UNIX socket (the URL's host is ignored);
proxy and mirrors do not apply.

Thread safety: a client is shared by all threads of a backend. Each thread gets its own
``requests.Session`` (a ``threading.local``), so the hot path takes no lock and no two threads
share a connection pool or cookie jar; sessions are tracked in a ``WeakSet`` only so that
``close()`` can close them (a thread's session goes away with the thread). Health state is a
plain attribute written by one health thread and read racily by requests, as upstream's
relaxed atomics. ``close()`` stops the health threads and closes every session; calls after it
fail with a non-retryable ``BackendError``.

With ``stream=False`` (the default) the body is read before ``request`` returns, and the whole
call is bounded by ``timeout`` counted from the start (upstream's reqwest total timeout), not
only per socket read. With ``stream=True`` only each socket read is bounded, and errors while
reading the body surface as ``requests`` exceptions, which the caller must map (``map_error``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions
from urllib3.util.timeout import Timeout

from nydusfs.config import HttpCommon, MirrorConfig
from nydusfs.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

USER_AGENT = "nydusd/1.0.0"  # upstream's value; proxies and registries may key on it
HEADER_ENV_PREFIX = "NYDUS_HEADER_"  # upstream: NYDUS_HEADER_<Name>=<value> adds a header
MAX_REDIRECTS = 10  # as containerd and upstream's older client
_READ_CHUNK = 1 << 16
_EXCERPT = 200
_FALLBACK_LOG_INTERVAL = 2.0  # upstream rate-limits "proxy unhealthy, fallback" to one per 2 s


def redact(url: str) -> str:
    """``url`` without credentials or query string, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def body_excerpt(resp: requests.Response) -> str:
    """The first ``_EXCERPT`` characters of a response body, on one line (never raises)."""
    try:
        raw = next(resp.iter_content(_EXCERPT * 2), b"")
    except Exception:  # the excerpt only decorates an error message
        return ""
    text = " ".join(raw.decode("utf-8", "replace").split())
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 1] + "…"


def check_status(resp: requests.Response, what: str) -> None:
    """Raise ``BackendError`` unless ``resp`` is a success (below 400).

    5xx, 429 and 408 are retryable (the server may recover); other 4xx are not.
    """
    status = resp.status_code
    if status < 400:
        return
    excerpt = body_excerpt(resp)
    resp.close()
    retryable = status >= 500 or status in (408, 429)
    message = f"{what}: HTTP {status} {resp.reason or ''}".rstrip()
    message += f" from {redact(resp.url)}" if resp.url else ""
    if excerpt:
        message += f": {excerpt}"
    raise BackendError(message, retryable=retryable)


def _cause(exc: BaseException) -> str:
    """The innermost useful description of a requests/urllib3 failure."""
    inner: BaseException = exc
    for _ in range(4):
        arg = inner.args[0] if inner.args else None
        if isinstance(arg, urllib3.exceptions.MaxRetryError) and arg.reason is not None:
            inner = arg.reason
        elif isinstance(inner, urllib3.exceptions.MaxRetryError) and inner.reason is not None:
            inner = inner.reason
        else:
            break
    text = str(inner) or type(inner).__name__
    # urllib3 prefixes some messages with the repr of its connection object.
    return re.sub(r"^<[^>]*>: ", "", text)


def map_error(exc: BaseException, where: str) -> BackendError:
    """The ``BackendError`` for a requests/urllib3/OS failure of the request ``where``."""
    ex = requests.exceptions
    cause = _cause(exc)
    if isinstance(exc, ex.SSLError):
        return BackendError(f"{where}: TLS error: {cause}", retryable=False)
    if isinstance(exc, ex.ConnectTimeout):
        return BackendError(f"{where}: connect timed out: {cause}")
    if isinstance(exc, ex.ReadTimeout | urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return BackendError(f"{where}: timed out waiting for the server: {cause}")
    if isinstance(exc, ex.ProxyError):
        return BackendError(f"{where}: proxy connection failed: {cause}")
    if isinstance(exc, ex.ConnectionError):
        return BackendError(f"{where}: connection failed: {cause}")
    if isinstance(exc, ex.ChunkedEncodingError | ex.ContentDecodingError):
        return BackendError(f"{where}: response body broken off: {cause}")
    if isinstance(exc, ex.InvalidURL | ex.MissingSchema | ex.InvalidSchema | ex.InvalidHeader):
        return BackendError(f"{where}: invalid request: {cause}", retryable=False)
    if isinstance(exc, ex.TooManyRedirects):
        return BackendError(f"{where}: too many redirects: {cause}", retryable=False)
    return BackendError(f"{where}: request failed: {cause}")


# --- transport adapters ------------------------------------------------------------------------


class _TlsAdapter(requests.adapters.HTTPAdapter):
    """Verifies servers with our ``SSLContext`` (system CAs + ``ca_cert_files``).

    requests would otherwise verify against certifi's bundle only, and ``verify=<file>`` would
    replace the system CAs instead of adding to them.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would point the pool at certifi's bundle here; the context already holds
        # the CAs to trust. (No client certificates: nydus backends never use them.)
        verified = bool(verify) and url.lower().startswith("https")
        conn.cert_reqs = "CERT_REQUIRED" if verified else "CERT_NONE"
        conn.ca_certs = None
        conn.ca_cert_dir = None


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, socket_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(Timeout.resolve_default_timeout(self.timeout))
        try:
            sock.connect(self.socket_path)
        except OSError as e:  # a timeout included: unix sockets connect at once or never
            sock.close()
            raise urllib3.exceptions.NewConnectionError(
                self, f"cannot connect to unix socket {self.socket_path}: {e}"
            ) from e
        return sock


class _UnixConnectionPool(urllib3.HTTPConnectionPool):
    def __init__(self, socket_path: str, maxsize: int) -> None:
        super().__init__("localhost", maxsize=maxsize)
        self.socket_path = socket_path

    def _new_conn(self) -> urllib3.connection.HTTPConnection:
        self.num_connections += 1
        return _UnixConnection(
            self.socket_path,
            host=self.host,
            port=self.port,
            timeout=self.timeout.connect_timeout,
            **self.conn_kw,
        )


class UnixSocketAdapter(requests.adapters.HTTPAdapter):
    """Sends every request over one AF_UNIX socket, whatever the URL's host (http.client
    framing through urllib3, so pooling, timeouts and streaming behave as over TCP)."""

    def __init__(self, socket_path: str, maxsize: int = 4) -> None:
        super().__init__(max_retries=0)
        self._pool = _UnixConnectionPool(socket_path, maxsize)

    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ) -> urllib3.HTTPConnectionPool:
        return self._pool

    def request_url(self, request: Any, proxies: Any) -> str:
        return str(request.path_url)

    def close(self) -> None:
        self._pool.close()
        super().close()


# --- health state ------------------------------------------------------------------------------


@dataclass(eq=False)
class MirrorState:
    """One configured mirror and its health (read by requests, written under ``lock``)."""

    config: MirrorConfig
    scheme: str
    netloc: str
    ping_url: str
    healthy: bool = True
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rewrite(self, url: str) -> str:
        """``url`` with its scheme and host:port replaced by the mirror's (upstream's rule)."""
        parts = urlsplit(url)
        return urlunsplit((self.scheme, self.netloc, parts.path, parts.query, parts.fragment))

    def record(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.failures = 0
                return
            self.failures += 1
            if self.healthy and self.failures >= self.config.failure_limit:
                self.healthy = False
                log.warning(
                    "mirror %s: %d consecutive failures, disabled until its ping succeeds",
                    self.config.host, self.failures,
                )  # fmt: skip

    def recover(self) -> None:
        with self.lock:
            self.failures = 0
            self.healthy = True


class _Sessions(threading.local):
    direct: requests.Session | None = None
    proxied: requests.Session | None = None


def _parse_base(url: str, key: str) -> tuple[str, str]:
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ConfigError(f"{key}: invalid URL {url!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}: expected an http(s)://host[:port] URL, got {url!r}")
    return parts.scheme, parts.netloc


class HttpClient:
    """Requests for one backend; see the module docstring for routing and thread safety."""

    def __init__(self, common: HttpCommon, *, name: str, unix_socket: str | None = None) -> None:
        self.common = common
        self.name = name
        self.unix_socket = unix_socket
        self._timeouts = (common.connect_timeout or None, common.timeout or None)
        self._closed = False
        self._stop = threading.Event()
        self._local = _Sessions()
        self._sessions: weakref.WeakSet[requests.Session] = weakref.WeakSet()
        self._sessions_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._last_active = time.monotonic()
        self._last_fallback_log = 0.0
        # identity: blob bytes must arrive as stored (no transparent gzip of ranged reads).
        self._headers = {"User-Agent": USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"}
        for key, value in os.environ.items():
            if key.startswith(HEADER_ENV_PREFIX) and len(key) > len(HEADER_ENV_PREFIX):
                self._headers[key[len(HEADER_ENV_PREFIX) :]] = value
        self._ssl_context: ssl.SSLContext | None = None
        if common.skip_verify:
            # The user turned verification off on purpose; one warning per request is noise.
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        else:
            self._ssl_context = ssl.create_default_context()
            for path in common.ca_cert_files:
                try:
                    self._ssl_context.load_verify_locations(cafile=path)
                except (OSError, ssl.SSLError) as e:
                    raise ConfigError(f"ca_cert_files: cannot load {path}: {e}") from None

        proxy = common.proxy
        self.proxy_url = proxy.url if unix_socket is None else ""
        self.proxy_healthy = True
        if self.proxy_url:
            _parse_base(self.proxy_url, "proxy.url")
            if proxy.ping_url:
                _parse_base(proxy.ping_url, "proxy.ping_url")
        self.mirrors: list[MirrorState] = []
        for i, m in enumerate(common.mirrors if unix_socket is None else []):
            if not m.host:
                continue
            scheme, netloc = _parse_base(m.host, f"mirrors[{i}].host")
            ping = m.ping_url or f"{m.host.rstrip('/')}/v2"
            _parse_base(ping, f"mirrors[{i}].ping_url")
            self.mirrors.append(MirrorState(m, scheme, netloc, ping))
        if unix_socket is not None and (proxy.url or common.mirrors):
            log.warning("%s: proxy and mirrors do not apply to unix socket %s", name, unix_socket)

        if self.proxy_url and proxy.ping_url:
            self._start(self._proxy_health_loop, "proxy")
        for i, mirror in enumerate(self.mirrors):
            self._start(self._mirror_health_loop, f"mirror{i}", mirror)

    # --- sessions ------------------------------------------------------------------------------

    def _new_session(self, proxied: bool) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # no HTTP(S)_PROXY, .netrc or REQUESTS_CA_BUNDLE: config rules
        s.headers.clear()
        s.headers.update(self._headers)
        s.max_redirects = MAX_REDIRECTS
        adapter: requests.adapters.HTTPAdapter
        if self.unix_socket is not None:
            adapter = UnixSocketAdapter(self.unix_socket)
        elif self._ssl_context is not None:
            adapter = _TlsAdapter(self._ssl_context)
        else:
            adapter = requests.adapters.HTTPAdapter(max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        s.verify = not self.common.skip_verify
        if proxied:
            s.proxies = {"http": self.proxy_url, "https": self.proxy_url}
        return s

    def _session(self, proxied: bool) -> requests.Session:
        s = self._local.proxied if proxied else self._local.direct
        if s is None:
            s = self._new_session(proxied)
            with self._sessions_lock:
                if self._closed:
                    s.close()
                    raise BackendError(f"{self.name}: HTTP client is closed", retryable=False)
                self._sessions.add(s)
            if proxied:
                self._local.proxied = s
            else:
                self._local.direct = s
        return s

    # --- requests ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        params: Any = None,
        data: Any = None,
        allow_redirects: bool = False,
        stream: bool = False,
        mirrorable: bool = False,
        skip_proxy: bool = False,
    ) -> requests.Response:
        """One attempt at ``method url``, routed through proxy, mirrors and origin.

        Returns any HTTP answer (use ``check_status``); raises ``BackendError`` for transport
        failures. ``skip_proxy`` sends the request straight to the origin (upstream does this
        for registry token requests, whose URLs ``use_http`` must not rewrite).
        """
        if self._closed:
            raise BackendError(f"{self.name}: HTTP client is closed", retryable=False)
        self._last_active = time.monotonic()
        kw = dict(params=params, data=data, allow_redirects=allow_redirects, stream=stream)
        if self.proxy_url and not skip_proxy:
            resp = self._try_proxy(method, url, headers, kw)
            if resp is not None:
                return resp
        if mirrorable and self.mirrors:
            resp = self._try_mirrors(method, url, headers, kw)
            if resp is not None:
                return resp
        return self._send(False, method, url, headers, kw, via="")

    def _try_proxy(
        self, method: str, url: str, headers: dict[str, str] | None, kw: dict[str, Any]
    ) -> requests.Response | None:
        """The proxy's answer, or None to go on to mirrors and origin (fallback)."""
        fallback = self.common.proxy.fallback
        if not self.proxy_healthy:
            if not fallback:
                raise BackendError(
                    f"{self.name}: {method} {redact(url)}: proxy {redact(self.proxy_url)} "
                    "is not healthy and fallback is disabled"
                )
            now = time.monotonic()
            if now - self._last_fallback_log >= _FALLBACK_LOG_INTERVAL:
                self._last_fallback_log = now
                log.warning("%s: proxy is not healthy, using the origin", self.name)
            return None
        target = url
        if self.common.proxy.use_http and url.startswith("https://"):
            # Upstream caches the decision from the first URL it sees; deciding per URL gives
            # the same result without its mixed-scheme surprises.
            target = "http://" + url[len("https://") :]
        try:
            resp = self._send(True, method, target, headers, kw, via=self.proxy_url)
        except BackendError as e:
            if not fallback:
                raise
            log.warning("%s: proxy failed, falling back to the origin: %s", self.name, e)
            return None
        if not fallback or resp.status_code < 500:
            return resp
        log.warning(
            "%s: proxy answered HTTP %d for %s %s, falling back to the origin",
            self.name, resp.status_code, method, redact(url),
        )  # fmt: skip
        resp.close()
        return None

    def _try_mirrors(
        self, method: str, url: str, headers: dict[str, str] | None, kw: dict[str, Any]
    ) -> requests.Response | None:
        """The first healthy mirror's answer below 500, or None to use the origin."""
        for mirror in self.mirrors:
            if not mirror.healthy:
                continue
            merged = {**(headers or {}), **mirror.config.headers}
            try:
                resp = self._send(False, method, mirror.rewrite(url), merged, kw, via="")
            except BackendError as e:
                log.warning("%s: mirror %s failed: %s", self.name, mirror.config.host, e)
                mirror.record(False)
                continue
            if resp.status_code < 500:
                mirror.record(True)
                return resp
            log.warning(
                "%s: mirror %s answered HTTP %d", self.name, mirror.config.host, resp.status_code
            )
            resp.close()
            mirror.record(False)
        log.warning("%s: every mirror failed, using the origin for %s", self.name, redact(url))
        return None

    def _send(
        self,
        proxied: bool,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        kw: dict[str, Any],
        *,
        via: str,
    ) -> requests.Response:
        where = f"{self.name}: {method} {redact(url)}"
        if via:
            where += f" via proxy {redact(via)}"
        if self.unix_socket is not None:
            where += f" over unix socket {self.unix_socket}"
        started = time.monotonic()
        session = self._session(proxied)
        try:
            resp = session.request(
                method,
                url,
                headers=dict(headers) if headers else None,
                params=kw["params"],
                data=kw["data"],
                allow_redirects=kw["allow_redirects"],
                stream=True,
                timeout=self._timeouts,
            )
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            raise map_error(e, where) from e
        if kw["stream"]:
            return resp
        try:
            self._read_body(resp, started, where)
        except BaseException:
            resp.close()
            raise
        return resp

    def _read_body(self, resp: requests.Response, started: float, where: str) -> None:
        deadline = started + self.common.timeout if self.common.timeout else None
        chunks: list[bytes] = []
        try:
            for chunk in resp.iter_content(_READ_CHUNK):
                chunks.append(chunk)
                if deadline is not None and time.monotonic() > deadline:
                    raise BackendError(
                        f"{where}: response not complete within {self.common.timeout} s"
                    )
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            if isinstance(e, BackendError):
                raise
            raise map_error(e, where) from e
        # Hand the body to requests as if it had read it itself (stream=False semantics).
        resp._content = b"".join(chunks)
        resp._content_consumed = True  # type: ignore[attr-defined]

    check_status = staticmethod(check_status)

    # --- health checks -------------------------------------------------------------------------

    def _start(self, target: Callable[..., None], what: str, *args: Any) -> None:
        name = f"nydusfs-health-{self.name}-{what}"
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _ping(self, session: requests.Session, url: str, timeout: float | None) -> int | None:
        """The status of ``GET url``, or None when it cannot be reached."""
        try:
            resp = session.get(url, timeout=timeout, allow_redirects=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            log.debug("%s: ping %s failed: %s", self.name, redact(url), _cause(e))
            return None
        resp.close()
        return resp.status_code

    def _idle_for(self) -> int:
        # Whole seconds, as upstream: with a pause of 0 the check still runs in the second
        # after a request.
        return int(time.monotonic() - self._last_active)

    def _proxy_health_loop(self) -> None:
        proxy = self.common.proxy
        session = self._new_session(False)
        try:
            while not self._stop.is_set():
                # Upstream skips the check while the backend is idle, so an unused mount does
                # not ping forever; the first request after the pause may use a stale state.
                if self._idle_for() <= proxy.check_pause_elapsed:
                    status = self._ping(
                        session, proxy.ping_url, self.common.connect_timeout or None
                    )
                    healthy = status is not None and 200 <= status < 400
                    if healthy != self.proxy_healthy:
                        log.warning(
                            "%s: proxy %s is %s (ping: %s)", self.name, redact(self.proxy_url),
                            "healthy again" if healthy else "unhealthy",
                            status if status is not None else "unreachable",
                        )  # fmt: skip
                    self.proxy_healthy = healthy
                if self._stop.wait(proxy.check_interval):
                    break
        finally:
            session.close()

    def _mirror_health_loop(self, mirror: MirrorState) -> None:
        cfg = mirror.config
        session = self._new_session(False)
        try:
            while not self._stop.wait(cfg.health_check_interval):
                if mirror.healthy or self._idle_for() > cfg.health_check_pause_elapsed:
                    continue
                status = self._ping(session, mirror.ping_url, self.common.timeout or None)
                if status is not None and status < 500:
                    log.info("%s: mirror %s recovered", self.name, cfg.host)
                    mirror.recover()
        finally:
            session.close()

    # --- lifetime ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the health threads and close every connection. Idempotent."""
        with self._sessions_lock:
            self._closed = True
            sessions = list(self._sessions)
        self._stop.set()
        limit = (self.common.connect_timeout or 5) + (self.common.timeout or 5) + 1
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=limit)
        for s in sessions:
            s.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ranged_body(
    client: HttpClient, resp: requests.Response, offset: int, size: int, what: str
) -> bytes:
    """The bytes of a ranged GET: empty on 416 (at or past the end), the asked-for slice of a
    200 (the server ignored ``Range`` and sent everything), else the 206 body."""
    if resp.status_code == 416:
        resp.close()
        return b""
    client.check_status(resp, what)
    data = resp.content
    if resp.status_code == 200:
        return data[offset : offset + size]
    return data[:size]
