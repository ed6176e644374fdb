"""A throttling reverse proxy for the benchmarks: a *total* bandwidth limit on 127.0.0.1.

``ThrottlingProxy(upstream, mbit)`` forwards HTTP requests to ``upstream`` (host:port) and sends
the response bodies through one token bucket shared by every connection, so parallel requests
together get no more than the limit (a link to a registry, not a per-connection cap); it counts
the bytes and requests it forwards. ``python3 bench/_throttle.py --upstream H:P --mbit N``
serves one in a process of its own (it prints its ``host:port`` on the first line), so the
proxy's own work does not compete with an in-process client for the GIL.
"""

from __future__ import annotations

import argparse
import http.client
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: F401  (puts the repository on sys.path)

from tests.helpers.registry_servers import LOOPBACK

_PIECE = 64 << 10
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                "proxy-authorization", "proxy-authenticate"}  # fmt: skip


class TokenBucket:
    """``rate`` bytes/s shared by every caller; no burst beyond one piece."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)


class ThrottlingProxy:
    """A reverse proxy to ``upstream`` (host:port) with a total bandwidth limit and counters."""

    def __init__(self, upstream: str, mbit: float) -> None:
        self.upstream = upstream
        self.bucket = TokenBucket(mbit * 1e6 / 8)
        self.bytes = 0
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: with Nagle's algorithm the body
            # waits for the client's delayed ACK, 40 ms per request.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    # Repeated headers (skopeo sends one Accept per media type) stay repeated.
                    conn.putrequest(self.command, self.path, skip_host=True,
                                    skip_accept_encoding=True)  # fmt: skip
                    for key, value in self.headers.items():
                        if key.lower() not in _HOP_HEADERS:
                            conn.putheader(key, value)
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    self.send_response(resp.status, resp.reason)
                    for key, value in resp.getheaders():
                        if key.lower() not in _HOP_HEADERS:
                            self.send_header(key, value)
                    data_len = resp.getheader("Content-Length")
                    if data_len is None and self.command != "HEAD":
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    while piece := resp.read(_PIECE):
                        proxy.bucket.take(len(piece))
                        self.wfile.write(piece)
                        with proxy._lock:
                            proxy.bytes += len(piece)
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.requests += 1

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _forward

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.server.server_address[1]}"

    def reset(self) -> None:
        with self._lock:
            self.bytes = self.requests = 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="throttling reverse proxy on 127.0.0.1")
    ap.add_argument("--upstream", required=True, help="host:port to forward to")
    ap.add_argument("--mbit", type=float, required=True, help="total bandwidth, Mbit/s")
    args = ap.parse_args(argv)
    proxy = ThrottlingProxy(args.upstream, args.mbit)
    print(proxy.host, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
