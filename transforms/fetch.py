"""Our own HTTP client for feeds and article pages (feedparser never touches the network).

Guards on every request, because feed URLs come from users and redirects come from anyone:

* only `http`/`https`, and every redirect hop is checked again (we follow them ourselves);
* private, loopback, link-local, shared and metadata addresses are refused unless
  `fetch.allow_private_addresses` is set: every address a host resolves to is checked
  before connecting, and the socket's real peer is checked after (DNS rebinding);
* connect and read timeouts, and a total deadline enforced by a watchdog that shuts the
  socket, so a server that trickles bytes cannot hold a worker; every request gets a new
  socket (none is pooled), so the deadline covers every request;
* no cookies are kept;
* a cap on the bytes received and, separately, on the bytes after gzip/deflate, which we
  inflate ourselves in bounded steps (a 10 MB gzip bomb never becomes 10 GB in memory);
* conditional GET (`If-None-Match`/`If-Modified-Since`): a 304 is a result, not an error.

`PoliteExecutor` runs fetches on a thread pool with a per-host concurrency limit and a
minimum delay between requests to one host; a host's queued requests wait without holding
a thread, so one slow host never delays the others.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import http.client
import http.cookiejar
import ipaddress
import itertools
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.cookies import RequestsCookieJar
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from newsbeam.transforms.settings import Feed, FetchSettings

_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
FEED_ACCEPT = ("application/rss+xml, application/atom+xml, application/rdf+xml, "
               "application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5")


class FetchError(Exception):
    """A URL could not be fetched. `kind` is a short class for feed health and dead letters:
    dns, tls, timeout, connection, redirects, bad_redirect (a 3xx we cannot follow),
    blocked_address, bad_url, http_4xx, http_5xx, too_large, bad_encoding. `retry_after` is
    the server's hint in seconds, when it gave one."""

    def __init__(self, kind: str, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.status = status
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class FetchResult:
    feed: Feed
    final_url: str
    status: int  # 200-299, or 304 (not modified: `body` is empty)
    headers: dict[str, str]  # lower-case names
    body: bytes  # decompressed
    fetched_at: float
    elapsed: float


# ---------------------------------------------------------------- addresses

# IPv6 forms that only wrap an IPv4 address (the IPv4 address is the real destination):
# IPv4-compatible ::a.b.c.d (:: and ::1 included), IPv4-translated ::ffff:0:a.b.c.d and
# the NAT64 well-known prefix. IPv4-mapped (::ffff:a.b.c.d) is `ipaddress`'s `ipv4_mapped`.
_WRAPPING_IPV4 = tuple(ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96"))
# Local-use NAT64 (RFC 8215): translation inside a private network, wherever the IPv4 sits.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast


def _wrapped_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in network for network in _WRAPPING_IPV4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_address(address: str) -> bool:
    """True for anything but a public unicast address: private, loopback, link-local
    (169.254.169.254 metadata), shared (100.64/10), reserved, unspecified, multicast,
    unique-local IPv6 (fd00:ec2::254 metadata), and the IPv6 forms that carry such an IPv4
    address: IPv4-mapped, -compatible and -translated, NAT64, 6to4 and Teredo."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return not _is_public(ip)
    wrapped = _wrapped_ipv4(ip)
    if wrapped is not None:  # the IPv6 address is only a wrapper: the IPv4 address is where it goes
        return not _is_public(wrapped)
    tunnelled = [v4 for v4 in (ip.sixtofour, *(ip.teredo or ())) if v4 is not None]
    return ip in _LOCAL_NAT64 or not _is_public(ip) or not all(map(_is_public, tunnelled))


def check_url(url: str, allow_private: bool) -> None:
    """Refuses non-http(s) URLs and, unless allowed, hosts that resolve to a blocked address."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise FetchError("bad_url", f"{url!r}: {err}") from None
    if parts.scheme not in ("http", "https"):
        raise FetchError("bad_url", f"{url!r}: only http and https are fetched")
    if not parts.hostname:
        raise FetchError("bad_url", f"{url!r}: no host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise FetchError("dns", f"cannot resolve {parts.hostname}: {err}") from None
    for info in infos:
        if blocked_address(info[4][0]):
            raise FetchError("blocked_address", f"{parts.hostname} resolves to {info[4][0]}, a private or "
                                                "reserved address (set fetch.allow_private_addresses to allow)")


# ---------------------------------------------------------------- timers and deadlines

class _Timers:
    """One thread that runs callbacks at given monotonic times (deadlines, delayed starts)."""

    def __init__(self, name: str):
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def at(self, when: float, callback: Callable[[], None]) -> int:
        with self._cond:
            token = next(self._ids)
            heapq.heappush(self._heap, (when, token, callback))
            self._cond.notify()
            return token

    def cancel(self, token: int) -> None:
        with self._cond:
            self._cancelled.add(token)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                _, token, callback = heapq.heappop(self._heap)
                if token in self._cancelled:
                    self._cancelled.discard(token)
                    continue
            try:
                callback()
            except Exception:  # a timer must never die
                pass


class _Request:
    """Per-request guard state, reachable from the connection through a thread-local."""

    def __init__(self, allow_private: bool, deadline: float):
        self.allow_private = allow_private
        self.deadline = deadline  # monotonic; checked between chunks too, whatever the socket
        self.sockets: list[socket.socket] = []
        self.expired = False
        self._lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                sock.close()
                raise FetchError("timeout", "total deadline passed while connecting")
            self.sockets.append(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_current = threading.local()


class _GuardedConnectionMixin:
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        request: _Request | None = getattr(_current, "request", None)
        if request is not None:
            peer = sock.getpeername()[0]
            if not request.allow_private and blocked_address(peer):
                sock.close()
                raise FetchError("blocked_address", f"connected to {peer}, a private or reserved address")
            request.add(sock)
        return sock


class _GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    pass


class _OneUseMixin:
    """Connections are closed after one response, never pooled: a server that ignores our
    `Connection: close` would otherwise hand the next fetch a socket the watchdog never saw."""

    def _put_conn(self, conn) -> None:
        if conn is not None:
            conn.close()
        super()._put_conn(None)  # type: ignore[misc]  # the pool's slot, free for a new connection


class _GuardedHTTPPool(_OneUseMixin, HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(_OneUseMixin, HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class GuardedSession(requests.Session):
    """A requests session whose connections are checked and whose requests have deadlines.
    Environment proxies and .netrc are ignored: feed hosts must never see our credentials."""

    def __init__(self, settings: FetchSettings):
        super().__init__()
        self.trust_env = False
        # No cookies kept: feeds need none, and a jar that takes every Set-Cookie grows without bound.
        self.cookies = RequestsCookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.headers["User-Agent"] = settings.user_agent
        self.headers["Accept-Encoding"] = "gzip, deflate"
        # A connection per request: every socket passes the address check and the watchdog,
        # and no server can hand us a half-dead pooled connection.
        self.headers["Connection"] = "close"
        adapter = _GuardedAdapter(pool_connections=settings.concurrency, pool_maxsize=settings.concurrency)
        self.mount("http://", adapter)
        self.mount("https://", adapter)
        self.timers = _Timers("newsbeam-fetch-timers")

    def close(self) -> None:
        self.timers.close()
        super().close()


def new_session(settings: FetchSettings) -> GuardedSession:
    return GuardedSession(settings)


# ---------------------------------------------------------------- bodies

class _Inflater:
    """Bounded gzip/deflate: output is produced in steps and counted before it is kept."""

    def __init__(self, encoding: str, limit: int):
        self._limit = limit
        self._size = 0
        self._deflate = encoding == "deflate"
        self._raw_tried = False
        self._decoder = zlib.decompressobj(zlib.MAX_WBITS if self._deflate else 16 + zlib.MAX_WBITS)
        self.parts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        while data and not self._decoder.eof:
            try:
                piece = self._decoder.decompress(data, self._limit - self._size + 1)
            except zlib.error as err:
                if self._deflate and not self._raw_tried and not self._size:
                    # Some servers send raw deflate without the zlib header.
                    self._raw_tried = True
                    self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise FetchError("bad_encoding", f"corrupt compressed body: {err}") from None
            self._raw_tried = True
            self._size += len(piece)
            if self._size > self._limit:
                raise FetchError("too_large", f"body inflates beyond {self._limit} bytes")
            self.parts.append(piece)
            data = self._decoder.unconsumed_tail

    def finish(self) -> bytes:
        self.feed(b"")
        return b"".join(self.parts)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    inflater = _Inflater(encoding, limit)
    inflater.feed(body)
    return inflater.finish()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _read_body(response: requests.Response, settings: FetchSettings, request: _Request) -> bytes:
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        inflater = None
    elif encoding in ("gzip", "x-gzip", "deflate"):
        inflater = _Inflater("deflate" if encoding == "deflate" else "gzip", settings.max_decompressed_bytes)
    else:
        raise FetchError("bad_encoding", f"unsupported Content-Encoding {encoding!r}")
    raw, size, first = [], 0, b""
    while True:
        chunk = response.raw.read1(_CHUNK, decode_content=False)
        if not chunk:
            break
        if time.monotonic() > request.deadline:
            raise FetchError("timeout", f"total time exceeds {settings.total_timeout:g}s")
        size += len(chunk)
        if size > settings.max_bytes:
            raise FetchError("too_large", f"body exceeds {settings.max_bytes} bytes")
        if inflater:
            inflater.feed(chunk)
        else:
            raw.append(chunk)
            first = first or chunk
    if request.expired:  # the watchdog shut the socket: what we have is truncated
        raise FetchError("timeout", f"total time exceeds {settings.total_timeout:g}s")
    if inflater:
        return inflater.finish()
    body = b"".join(raw)
    if first[:2] == b"\x1f\x8b":  # a .gz file served without Content-Encoding
        return inflate(body, "gzip", settings.max_decompressed_bytes)
    return body


# ---------------------------------------------------------------- fetch

def _classify(err: requests.exceptions.RequestException) -> str:
    text = repr(err)
    if isinstance(err, requests.exceptions.SSLError):
        return "tls"
    if isinstance(err, requests.exceptions.Timeout):
        return "timeout"
    if any(s in text for s in ("NameResolutionError", "Name or service not known", "nodename nor servname",
                               "Temporary failure in name resolution", "No address associated")):
        return "dns"
    if isinstance(err, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                        requests.exceptions.InvalidSchema)):
        return "bad_url"
    return "connection"


def fetch(session: GuardedSession, feed: Feed, settings: FetchSettings, etag: str | None = None,
          last_modified: str | None = None, url: str | None = None, accept: str = FEED_ACCEPT) -> FetchResult:
    """GETs `url` (default: the feed's) within every guard, following redirects ourselves.
    Returns a 2xx or 304 result or raises FetchError."""
    started = time.monotonic()
    request = _Request(settings.allow_private_addresses, started + settings.total_timeout)
    token = session.timers.at(request.deadline, request.expire)
    _current.request = request
    headers = {"Accept": accept}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    url = url or feed.url
    try:
        for _hop in range(settings.max_redirects + 1):
            check_url(url, settings.allow_private_addresses)
            with session.get(url, headers=headers, stream=True, allow_redirects=False,
                             timeout=(settings.connect_timeout, settings.read_timeout)) as response:
                status = response.status_code
                location = response.headers.get("Location", "").strip()
                if status in _REDIRECTS and location:
                    url = urljoin(url, location)
                    continue
                response_headers = {k.lower(): v for k, v in response.headers.items()}
                if status == 304:
                    return FetchResult(feed, url, 304, response_headers, b"", time.time(),
                                       time.monotonic() - started)
                if 300 <= status < 400:  # a redirect we cannot follow is no feed
                    why = "not a redirect we follow" if location else "no Location header to follow"
                    raise FetchError("bad_redirect", f"HTTP {status} from {url}: {why}", status=status)
                if status >= 400 or status < 200:
                    kind = "http_4xx" if 400 <= status < 500 else "http_5xx" if status >= 500 else "http_other"
                    raise FetchError(kind, f"HTTP {status} from {url}", status=status,
                                     retry_after=_retry_after(response.headers.get("Retry-After")))
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > settings.max_bytes:
                    raise FetchError("too_large", f"Content-Length {declared} exceeds {settings.max_bytes} bytes")
                body = _read_body(response, settings, request)
                return FetchResult(feed, url, status, response_headers, body, time.time(),
                                   time.monotonic() - started)
        raise FetchError("redirects", f"more than {settings.max_redirects} redirects from {feed.url}")
    except FetchError:
        raise
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
            OSError) as err:
        # Reading the body raises urllib3's own errors; connecting raises requests'.
        if request.expired:
            raise FetchError("timeout", f"total time exceeds {settings.total_timeout:g}s") from None
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, FetchError):
            cause = cause.__context__
        if isinstance(cause, FetchError):  # raised inside our connection class
            raise cause from None
        if isinstance(err, requests.exceptions.RequestException):
            kind = _classify(err)
        else:
            kind = "timeout" if isinstance(err, (urllib3.exceptions.TimeoutError, TimeoutError)) else "connection"
        raise FetchError(kind, str(err)[:500]) from None
    finally:
        _current.request = None
        session.timers.cancel(token)


# ---------------------------------------------------------------- politeness

class PoliteExecutor:
    """Runs `fn` on a thread pool with at most `per_host` calls in flight per host and at
    least `delay` seconds between call starts for one host. Waiting calls hold no thread."""

    def __init__(self, workers: int, per_host: int, delay: float, timers: _Timers):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="newsbeam-fetch")
        self._per_host = per_host
        self._delay = delay
        self._timers = timers
        self._lock = threading.Lock()
        self._queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._active: dict[str, int] = collections.defaultdict(int)
        self._next_start: dict[str, float] = {}

    def submit(self, host: str, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._lock:
            self._queues[host].append((future, fn, args))
        self._pump(host)
        return future

    def _pump(self, host: str) -> None:
        with self._lock:
            queue = self._queues[host]
            while queue and self._active[host] < self._per_host:
                item = queue.popleft()
                self._active[host] += 1
                now = time.monotonic()
                start = max(now, self._next_start.get(host, now))
                self._next_start[host] = start + self._delay
                if start <= now:
                    self._pool.submit(self._run, host, item)
                else:
                    self._timers.at(start, lambda item=item: self._pool.submit(self._run, host, item))
            if not queue and not self._active[host]:
                del self._queues[host], self._active[host]

    def _run(self, host: str, item: tuple[Future, Callable[..., Any], tuple]) -> None:
        future, fn, args = item
        try:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # handed to whoever waits on the future
                    future.set_exception(err)
        finally:
            with self._lock:
                self._active[host] -= 1
            self._pump(host)

    def shutdown(self) -> None:
        with self._lock:
            for queue in self._queues.values():
                for future, _, _ in queue:
                    future.cancel()
            self._queues.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def shard_feeds(feeds: Iterable[Feed], shards: int) -> list[tuple[int, tuple[Feed, ...]]]:
    """Splits feeds into stable shards by host, so every feed of a host lands in one shard
    and per-host politeness holds even when shards run on different workers."""
    buckets: dict[int, list[Feed]] = {}
    for feed in feeds:
        buckets.setdefault(zlib.crc32(host_of(feed.url).encode("utf-8")) % shards, []).append(feed)
    return [(key, tuple(value)) for key, value in sorted(buckets.items())]
