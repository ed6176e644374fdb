"""Loopback servers for the remote blob backends' tests (127.0.0.1 only, ports picked free).

- ``DockerRegistry``: Debian's ``docker-registry`` (distribution 2.8) with a private config and
  storage in a temp dir; anonymous, htpasswd (Basic) or token (Bearer) auth. ``push_blob``
  uploads a blob monolithically (POST ``/blobs/uploads/`` then PUT ``?digest=``).
- ``TokenService``: a docker token server in Python. It checks Basic credentials and signs
  RS256 JWTs with a self-made key whose certificate is the registry's ``rootcertbundle``; the
  JWT names the key by its libtrust key id (``kid``), which is how distribution finds it.
  Variants: refuse POST with 405 (GET fallback), ``access_token`` field, short ``expires_in``,
  JWTs the registry already considers expired.
- ``RedirectFront``: stands in front of a registry and answers blob GETs with 307 to its own
  ``/store/`` path, which serves the bytes while the URL's generation is current (``expire()``
  makes cached URLs 403, like an expired presigned URL). It can name another host and scheme in
  the Location and insist on a Host, to test ``blob_redirected_host`` / ``blob_url_scheme``.
- ``MotoS3``: ``moto.server`` with ``put_object`` signed by our own SigV4 signer.
- ``OssServer``: an OSS look-alike that recomputes every request's signature independently
  (403 on mismatch) and serves HEAD and ranged GET, bucket in the Host or in the path.

Every server runs in daemon threads or a child process and is stopped by ``close()``; the
pytest fixtures in the contract tests own them.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from nydusfs.storage.backends.signing import sigv4_sign
from tests.helpers.servers import stop_process

LOOPBACK = "127.0.0.1"
REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: a server outlives no crashed or killed test run.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def basic_auth(user: str, password: str) -> str:
    """The config's ``auth`` form: base64 of ``user:password``."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def htpasswd_line(user: str, password: str) -> str:
    """``user:$2y$...``: distribution's htpasswd accepts bcrypt only. libcrypt (libxcrypt,
    Debian's essential libcrypt1) computes it, so no bcrypt module or apache2-utils is needed."""
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    # The 22nd salt character carries 2 bits only; "." keeps the salt canonical.
    salt = "".join(secrets.choice(alphabet) for _ in range(21)) + "."
    hashed = lib.crypt(password.encode(), f"$2y$05${salt}".encode())
    if not hashed or not hashed.startswith(b"$2y$"):
        raise RuntimeError("libcrypt has no bcrypt support")
    return f"{user}:{hashed.decode()}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """docker/libtrust's key id: base32 of the first 240 bits of SHA-256(PKIX DER), in
    colon-separated groups of four."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i : i + 4] for i in range(0, len(text), 4))


# --- HTTP server plumbing ----------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class _ThreadedServer:
    handler: type[_Handler]

    def __init__(self) -> None:
        self.httpd = _Server((LOOPBACK, 0), self.handler)
        self.httpd.owner = self
        self.port = int(self.httpd.server_address[1])
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def count(self, what: str) -> None:
        with self.lock:
            self.hits[what] += 1

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a ``bytes=a-b`` header, clamped; None when absent."""
    if not header or not header.startswith("bytes="):
        return None
    first, _, last = header[6:].partition("-")
    start = int(first)
    end = min(int(last) if last else size - 1, size - 1)
    return start, end


def serve_bytes(handler: _Handler, data: bytes, extra: dict[str, str] | None = None) -> None:
    """HEAD / GET / ranged GET of ``data`` (206, or 416 past the end)."""
    headers = {"Accept-Ranges": "bytes", **(extra or {})}
    rng = _range(handler.headers.get("Range"), len(data))
    if rng is None:
        handler.reply(200, data, headers)
    elif rng[0] >= len(data):
        handler.reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
    else:
        start, end = rng
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        handler.reply(206, data[start : end + 1], headers)


# --- token service -----------------------------------------------------------------------------


class _TokenHandler(_Handler):
    def do_GET(self) -> None:
        self.server.owner.handle(self, "GET")

    def do_POST(self) -> None:
        self.server.owner.handle(self, "POST")


class TokenService(_ThreadedServer):
    """Docker token auth server. ``hits``: ``POST``/``GET`` requests, ``issued`` tokens,
    ``denied`` credential failures, ``refused`` POSTs answered 405."""

    handler = _TokenHandler
    issuer = "nydusfs-test-issuer"
    service = "nydusfs-test-registry"

    def __init__(self, workdir: Path, users: dict[str, str] | None = None) -> None:
        self.users = dict(users or {})
        self.allow_post = True
        self.expires_in: int | None = 300
        self.token_field = "token"  # "token", "access_token" or "both"
        self.jwt_lifetime = 300  # seconds; negative: expired on arrival (registry leeway is 60)
        self.anonymous_pull = not self.users
        self.last_params: dict[str, str] = {}
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = libtrust_key_id(self.key.public_key())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nydusfs test token signer")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-signer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        super().__init__()

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def mint(self, scope: str, subject: str = "") -> str:
        """A JWT granting ``scope`` (``repository:<name>:<actions>``; several separated by
        blanks), signed like the ones the service hands out."""
        access = []
        for item in scope.split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.jwt_lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def handle(self, h: _Handler, method: str) -> None:
        self.count(method)
        form = h.body() if method == "POST" else b""  # read even when refusing: keep-alive
        if method == "POST" and not self.allow_post:
            self.count("refused")
            h.reply(405, b'{"error":"method not allowed"}', {"Allow": "GET"})
            return
        if method == "POST":
            params = dict(urllib.parse.parse_qsl(form.decode()))
        else:
            params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(h.path).query))
        self.last_params = params
        user = ""
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(user) != password:
                self.count("denied")
                h.reply(401, b'{"details":"invalid credentials"}', {"Content-Type": "text/json"})
                return
        elif not self.anonymous_pull:
            self.count("denied")
            h.reply(401, b'{"details":"authentication required"}')
            return
        token = self.mint(params.get("scope", ""), user)
        self.count("issued")
        answer: dict[str, Any] = {"issued_at": datetime.now(UTC).isoformat()}
        if self.token_field in ("token", "both"):
            answer["token"] = token
        if self.token_field in ("access_token", "both"):
            answer["access_token"] = token
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        h.reply(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})


# --- docker-registry ---------------------------------------------------------------------------


class DockerRegistry:
    """``docker-registry serve`` on 127.0.0.1 with ``auth``: None, ``"htpasswd"`` or
    ``"token"`` (then ``token_service`` is required)."""

    def __init__(
        self,
        workdir: Path,
        *,
        auth: str | None = None,
        users: dict[str, str] | None = None,
        token_service: TokenService | None = None,
    ) -> None:
        if not os.access(REGISTRY_BIN, os.X_OK):
            raise FileNotFoundError(f"{REGISTRY_BIN} (Debian package docker-registry)")
        self.workdir = workdir
        self.auth = auth
        self.users = dict(users or {})
        self.token_service = token_service
        self.port = free_port()
        lines = [
            "version: 0.1",
            "log: {level: error, accesslog: {disabled: true}}",
            f"storage: {{filesystem: {{rootdirectory: {workdir / 'data'}}}, "
            "delete: {enabled: true}}",
            f"http: {{addr: '{LOOPBACK}:{self.port}', secret: {secrets.token_hex(16)}}}",
        ]
        if auth == "htpasswd":
            htpasswd = workdir / "htpasswd"
            htpasswd.write_text("".join(htpasswd_line(u, p) + "\n" for u, p in self.users.items()))
            lines.append(f"auth: {{htpasswd: {{realm: nydusfs-test, path: {htpasswd}}}}}")
        elif auth == "token":
            assert token_service is not None
            lines.append(
                f"auth: {{token: {{realm: '{token_service.realm}', "
                f"service: {token_service.service}, issuer: {token_service.issuer}, "
                f"rootcertbundle: {token_service.cert_path}}}}}"
            )
        elif auth is not None:
            raise ValueError(f"unknown registry auth {auth!r}")
        config = workdir / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        self.log_path = workdir / "registry.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        try:
            wait_http(f"{self.url}/v2/", proc=self.proc)
        except RuntimeError as e:
            self.close()
            raise RuntimeError(f"{e}; log: {self.log_path.read_text()[-2000:]}") from e

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _push_headers(self, repo: str) -> dict[str, str]:
        if self.auth == "htpasswd":
            user, password = next(iter(self.users.items()))
            return {"Authorization": f"Basic {basic_auth(user, password)}"}
        if self.auth == "token":
            assert self.token_service is not None
            return {"Authorization": "Bearer " + self.token_service.mint(
                f"repository:{repo}:pull,push"
            )}  # fmt: skip
        return {}

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload ``data`` to ``repo``; returns its sha256 hex digest (the blob id)."""
        digest = hashlib.sha256(data).hexdigest()
        headers = self._push_headers(repo)
        resp = requests.post(f"{self.url}/v2/{repo}/blobs/uploads/", headers=headers, timeout=10)
        if resp.status_code != 202:
            raise RuntimeError(f"upload start: {resp.status_code} {resp.text}")
        location = urllib.parse.urljoin(self.url, resp.headers["Location"])
        sep = "&" if "?" in location else "?"
        resp = requests.put(
            f"{location}{sep}digest=sha256:{digest}",
            data=data,
            headers={**headers, "Content-Type": "application/octet-stream"},
            timeout=30,
        )
        if resp.status_code != 201:
            raise RuntimeError(f"upload: {resp.status_code} {resp.text}")
        return digest

    def close(self) -> None:
        stop_process(self.proc, timeout=10)


# --- redirecting front -------------------------------------------------------------------------


class _FrontHandler(_Handler):
    def do_GET(self) -> None:
        self.server.owner.handle(self)

    def do_HEAD(self) -> None:
        self.server.owner.handle(self)


class RedirectFront(_ThreadedServer):
    """307s ``GET /v2/<repo>/blobs/<digest>`` to ``<scheme>://<host>:<port>/store/<repo>/<digest>
    ?gen=N``; serves ``/store/`` while ``gen`` is current (else 403) and only to requests whose
    Host is ``127.0.0.1:<port>``. Everything else is proxied to the registry. ``hits``:
    ``redirect``, ``store``, ``store-stale``, ``store-wrong-host``, ``proxy``."""

    handler = _FrontHandler

    def __init__(
        self, registry: DockerRegistry, location_host: str = LOOPBACK, scheme: str = "http"
    ) -> None:
        self.registry = registry
        self.location_host = location_host
        self.location_scheme = scheme
        self.generation = 0
        super().__init__()

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def expire(self) -> None:
        """Make every Location handed out so far answer 403."""
        with self.lock:
            self.generation += 1

    def _relay(self, h: _Handler, path: str) -> None:
        headers = {k: v for k, v in h.headers.items() if k.lower() in ("range", "authorization")}
        resp = requests.request(
            h.command,
            self.registry.url + path,
            headers=headers,
            allow_redirects=False,
            timeout=10,
            stream=True,
        )
        if resp.status_code == 416:  # docker-registry's 416 has a bogus Content-Length
            resp.close()
            h.reply(416, b"", {"Content-Range": resp.headers.get("Content-Range", "")})
            return
        keep = ("content-range", "content-type", "www-authenticate", "docker-content-digest")
        out = {k: v for k, v in resp.headers.items() if k.lower() in keep}
        if h.command == "HEAD":
            out["Content-Length"] = resp.headers.get("Content-Length", "0")
            h.send_response(resp.status_code)
            for k, v in out.items():
                h.send_header(k, v)
            h.end_headers()
            return
        h.reply(resp.status_code, resp.content, out)

    def handle(self, h: _Handler) -> None:
        parts = urllib.parse.urlsplit(h.path)
        if parts.path.startswith("/store/"):
            if h.headers.get("Host") != self.host:
                self.count("store-wrong-host")
                h.reply(400, b"wrong host")
                return
            gen = urllib.parse.parse_qs(parts.query).get("gen", ["-1"])[0]
            if int(gen) != self.generation:
                self.count("store-stale")
                h.reply(403, b"<Error><Code>AccessDenied</Code><Message>expired</Message></Error>")
                return
            self.count("store")
            repo, _, digest = parts.path[len("/store/") :].rpartition("/")
            self._relay(h, f"/v2/{repo}/blobs/{digest}")
            return
        if h.command == "GET" and "/blobs/sha256:" in parts.path:
            self.count("redirect")
            repo, _, digest = parts.path[len("/v2/") :].partition("/blobs/")
            location = (
                f"{self.location_scheme}://{self.location_host}:{self.port}"
                f"/store/{repo}/{digest}?gen={self.generation}"
            )
            h.reply(307, b"", {"Location": location})
            return
        self.count("proxy")
        self._relay(h, h.path)


# --- moto (S3) ---------------------------------------------------------------------------------


class MotoS3:
    """``python -m moto.server`` on 127.0.0.1. Credentials are arbitrary (moto checks none)."""

    region = "us-east-1"
    access_key = "testing-key"
    secret_key = "testing-secret"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "moto.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        try:
            wait_http(f"{self.url}/moto-api/", proc=self.proc)
        except RuntimeError as e:
            self.close()
            raise RuntimeError(f"{e}; log: {self.log_path.read_text()[-2000:]}") from e

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def _call(
        self, method: str, path: str, data: bytes = b"", headers: dict[str, str] | None = None
    ) -> requests.Response:
        url = self.url + path
        headers = sigv4_sign(
            method,
            url,
            headers or {},
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            payload_sha256=hashlib.sha256(data).hexdigest(),
        )
        resp = requests.request(method, url, headers=headers, data=data, timeout=10)
        if resp.status_code >= 300:
            raise RuntimeError(f"moto {method} {path}: {resp.status_code} {resp.text[:300]}")
        return resp

    def create_bucket(self, bucket: str) -> None:
        self._call("PUT", f"/{bucket}")

    def put_object(self, bucket: str, key: str, data: bytes, *, public: bool = False) -> None:
        """Store an object; ``public`` makes it readable without credentials (canned ACL)."""
        headers = {"x-amz-acl": "public-read"} if public else {}
        self._call("PUT", f"/{bucket}/{urllib.parse.quote(key, safe='/~')}", data, headers)

    def close(self) -> None:
        stop_process(self.proc, timeout=10)


# --- OSS look-alike ----------------------------------------------------------------------------


class _OssHandler(_Handler):
    def do_GET(self) -> None:
        self.server.owner.handle(self)

    def do_HEAD(self) -> None:
        self.server.owner.handle(self)


class OssServer(_ThreadedServer):
    """Serves ``objects[(bucket, key)]``. Virtual-host requests (``Host: <bucket>.<domain>``,
    which reach it as an HTTP proxy, since no such name resolves) and path-style ones
    (``/<bucket>/<key>``) both work. The signature is recomputed here from
    the request as received, written out independently of ``nydusfs``' signer. ``hits``:
    ``ok``, ``bad-signature``, ``anonymous``, ``missing``, ``stale-date``."""

    handler = _OssHandler

    def __init__(
        self,
        key_id: str = "oss-test-id",
        key_secret: str = "oss-test-secret",
        domain: str = "oss.test",
    ) -> None:
        self.key_id = key_id
        self.domain = domain  # virtual-host requests name <bucket>.<domain>
        self.key_secret = key_secret
        self.allow_anonymous = False
        self.objects: dict[tuple[str, str], bytes] = {}
        super().__init__()

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _expected(self, h: _Handler, resource: str) -> str:
        lines = [
            h.command,
            h.headers.get("Content-MD5", ""),
            h.headers.get("Content-Type", ""),
            h.headers.get("Date", ""),
        ]
        oss = sorted(
            (k.lower(), v.strip()) for k, v in h.headers.items() if k.lower().startswith("x-oss-")
        )
        text = "\n".join(lines) + "\n" + "".join(f"{k}:{v}\n" for k, v in oss) + resource
        mac = hmac.new(self.key_secret.encode(), text.encode(), hashlib.sha1).digest()
        return f"OSS {self.key_id}:{base64.b64encode(mac).decode()}"

    def handle(self, h: _Handler) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        host = (h.headers.get("Host") or "").rsplit(":", 1)[0]
        if host.endswith("." + self.domain):
            bucket, key = host[: -len(self.domain) - 1], path.lstrip("/")
        else:
            bucket, _, key = path.lstrip("/").partition("/")
        auth = h.headers.get("Authorization")
        if auth is None:
            if not self.allow_anonymous:
                self.count("anonymous")
                h.reply(403, b"<Error><Code>AccessDenied</Code></Error>")
                return
        else:
            if auth != self._expected(h, f"/{bucket}/{key}"):
                self.count("bad-signature")
                h.reply(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
                return
            date = parsedate_to_datetime(h.headers.get("Date", "Thu, 01 Jan 1970 00:00:00 GMT"))
            if abs((datetime.now(UTC) - date).total_seconds()) > 900:
                self.count("stale-date")
                h.reply(403, b"<Error><Code>RequestTimeTooSkewed</Code></Error>")
                return
        data = self.objects.get((bucket, key))
        if data is None:
            self.count("missing")
            h.reply(404, b"<Error><Code>NoSuchKey</Code></Error>")
            return
        self.count("ok")
        serve_bytes(h, data, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})


def have_registry() -> bool:
    return os.access(REGISTRY_BIN, os.X_OK)


def have_moto() -> bool:
    return importlib.util.find_spec("moto") is not None
