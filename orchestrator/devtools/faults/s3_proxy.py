"""A fault-injecting HTTP proxy for an S3-compatible server, on loopback.

Point ``AWS_ENDPOINT_URL`` at :attr:`S3FaultProxy.endpoint` and every S3 request of the job goes
through it.  Per request kind (``get`` = object read, ``put`` = object / multipart write,
``list``, ``head``, ``other``) a :class:`FaultSpec` sets the probability of each fault:

- ``slowdown``: answer ``503 SlowDown`` with the S3 XML error body (what S3 sends when throttling);
- ``reset``: drop the connection with a TCP RST before answering;
- ``truncate``: forward the request, send the headers and half the body, then reset;
- ``delay``: wait ``delay_s`` before forwarding (a client timeout when it exceeds the client's).

Faults are drawn from a seeded RNG, so a run is repeatable; every request and every injected
fault is counted (:meth:`S3FaultProxy.stats`).  ``max_consecutive`` caps the faults in a row for
one request kind so that a bounded-retry client can always succeed ("transient faults").
"""
from __future__ import annotations

import dataclasses
import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("get", "put", "list", "head", "other")
FAULTS = ("slowdown", "reset", "truncate", "delay")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b'<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>')
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclasses.dataclass
class FaultSpec:
    slowdown: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    delay: float = 0.0
    delay_s: float = 0.5

    def __post_init__(self) -> None:
        total = self.slowdown + self.reset + self.truncate + self.delay
        if min(self.slowdown, self.reset, self.truncate, self.delay) < 0 or total > 1:
            raise ValueError(f"fault probabilities must be >= 0 and sum to <= 1, got {self}")


def request_kind(method: str, path: str) -> str:
    """S3 request kind from the method and the path-style URL (``/bucket[/key][?query]``)."""
    parsed = urllib.parse.urlsplit(path)
    has_key = "/" in parsed.path.lstrip("/")
    if method == "HEAD":
        return "head"
    if method == "GET":
        return "get" if has_key else "list"
    if method in ("PUT", "POST"):
        return "put" if has_key else "other"
    return "other"


class S3FaultProxy:
    """``with S3FaultProxy(upstream, {"get": FaultSpec(slowdown=0.3)}) as proxy: ...``"""

    def __init__(self, upstream: str, faults: dict[str, FaultSpec] | None = None, seed: int = 0,
                 max_consecutive: int | None = None):
        unknown = set(faults or {}) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown request kinds {sorted(unknown)}; known: {KINDS}")
        up = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = up.hostname, up.port or 80
        self.faults = dict(faults or {})
        self.max_consecutive = max_consecutive
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.injected: Counter[tuple[str, str]] = Counter()
        self._streak: Counter[str] = Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "S3FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "S3FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_faults(self, faults: dict[str, FaultSpec]) -> None:
        with self._lock:
            self.faults = dict(faults)

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"requests": dict(self.requests),
                    "injected": {f"{k}:{f}": n for (k, f), n in sorted(self.injected.items())}}

    def injected_total(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(n for (k, _), n in self.injected.items() if kind is None or k == kind)

    def _draw(self, kind: str) -> str | None:
        with self._lock:
            self.requests[kind] += 1
            spec = self.faults.get(kind)
            if spec is None:
                return None
            if self.max_consecutive is not None and self._streak[kind] >= self.max_consecutive:
                self._streak[kind] = 0
                return None
            x, acc = self._rng.random(), 0.0
            for fault in FAULTS:
                acc += getattr(spec, fault)
                if x < acc:
                    self.injected[(kind, fault)] += 1
                    self._streak[kind] += 1
                    return fault
            self._streak[kind] = 0
            return None

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST")
                                 else None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP], data
                finally:
                    conn.close()

            def _handle(self) -> None:
                body = self._read_body()
                kind = request_kind(self.command, self.path)
                fault = proxy._draw(kind)
                if fault == "reset":
                    return self._reset()
                if fault == "slowdown":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN_BODY if self.command != "HEAD" else b"")
                    return
                if fault == "delay":
                    time.sleep(proxy.faults[kind].delay_s)
                status, headers, data = self._forward(body)
                self.send_response(status)
                has_len = False
                for k, v in headers:
                    if k.lower() == "content-length":
                        has_len = True
                        if self.command != "HEAD":
                            v = str(len(data))
                    self.send_header(k, v)
                if not has_len:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    return self._reset()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler
