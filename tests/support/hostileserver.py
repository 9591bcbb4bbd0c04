"""A real HTTP server on 127.0.0.1 that misbehaves on purpose: each path is a function
that writes whatever it likes to the socket (stall, trickle, redirect, gzip bombs, 304s)."""
from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

from tests.support.loopback import LoopbackServer, QuietHandler

Behaviour = Callable[[BaseHTTPRequestHandler], None]


def respond(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None,
            declare_length: bool = True, close: bool = True) -> Behaviour:
    """Without `declare_length` the body ends when the connection closes; without `close` the
    response does not say `Connection: close` (on a keep-alive server the socket stays open)."""
    def behave(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        if declare_length:
            handler.send_header("Content-Length", str(len(body)))
        if close:
            handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(body)
    return behave


def redirect(location: str, status: int = 302) -> Behaviour:
    return respond(status, b"", {"Location": location})


def stall(seconds: float) -> Behaviour:
    def behave(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
    return behave


def trickle_body(every: float = 0.2, total: int = 10_000) -> Behaviour:
    """Headers at once, then one byte every `every` seconds: never idle long enough for a
    read timeout, never done."""
    def behave(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/rss+xml")
        handler.send_header("Content-Length", str(total))
        handler.end_headers()
        for _ in range(total):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(every)
    return behave


def trickle_headers(every: float = 0.2) -> Behaviour:
    def behave(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(10_000):
            handler.wfile.write(f"X-Slow-{i}: 1\r\n".encode())
            handler.wfile.flush()
            time.sleep(every)
    return behave


def gzip_bomb(size: int) -> bytes:
    """`size` zero bytes, gzip-compressed (about 1,000 times smaller)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (1 << 20)
    parts = [compressor.compress(block) for _ in range(size // len(block))]
    return b"".join(parts) + compressor.flush()


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


def conditional(body: bytes, etag: str, content_type: str = "application/rss+xml") -> Behaviour:
    """200 with an ETag, 304 when the request carries it."""
    def behave(handler: BaseHTTPRequestHandler) -> None:
        if handler.headers.get("If-None-Match") == etag:
            handler.send_response(304)
            handler.send_header("ETag", etag)
            handler.end_headers()
            return
        respond(200, body, {"ETag": etag, "Content-Type": content_type})(handler)
    return behave


class HostileServer(LoopbackServer):
    """With `keep_alive` the server ignores the client's `Connection: close` and keeps serving
    requests on one socket for as long as the client sends them."""

    def __init__(self, host: str = "127.0.0.1", keep_alive: bool = False):
        self.routes: dict[str, Behaviour] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.client_ports: list[int] = []  # the client's port per request: equal ports, one socket
        server = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                path = self.path.split("?")[0]
                server.requests.append((path, dict(self.headers)))
                server.client_ports.append(self.client_address[1])
                behaviour = server.routes.get(path, respond(404, b"not found"))
                try:
                    behaviour(self)
                except (TimeoutError, BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True
                    return
                self.close_connection = not keep_alive

        super().__init__(Handler, host)

    def route(self, path: str, behaviour: Behaviour) -> str:
        self.routes[path] = behaviour
        return self.url(path)

    def hits(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)
