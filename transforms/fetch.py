"""FetchFeeds: our own HTTP client for feeds (feedparser never touches the network).

Guards on every request: connect/read timeouts, a total deadline, a response-size cap
and a User-Agent that names us. Failures become dead letters, never exceptions that
stop the stream.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Iterable, Iterator

import apache_beam as beam
import requests
from apache_beam.metrics import Metrics

from pipeline.config import Feed, FetchSettings
from transforms.deadletter import DEAD, dead_letter

_LOG = logging.getLogger(__name__)
_CHUNK = 64 * 1024


class FetchError(Exception):
    """A feed could not be fetched; `kind` is a short class such as 'timeout' or 'http_5xx'."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class FetchResult:
    feed: Feed
    final_url: str
    status: int
    headers: dict[str, str]
    body: bytes
    fetched_at: float
    elapsed: float


def new_session(settings: FetchSettings) -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = settings.user_agent
    session.headers["Accept"] = (
        "application/rss+xml, application/atom+xml, application/rdf+xml, "
        "application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5")
    session.max_redirects = 5
    adapter = requests.adapters.HTTPAdapter(pool_connections=settings.concurrency,
                                            pool_maxsize=settings.concurrency)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch(session: requests.Session, feed: Feed, settings: FetchSettings) -> FetchResult:
    """GETs one feed within the configured deadlines and size cap, or raises FetchError."""
    started = time.monotonic()
    deadline = started + settings.total_timeout
    try:
        with session.get(feed.url, stream=True,
                         timeout=(settings.connect_timeout, settings.read_timeout)) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > settings.max_bytes:
                raise FetchError("too_large", f"Content-Length {declared} exceeds {settings.max_bytes} bytes")
            chunks, size = [], 0
            for chunk in response.iter_content(_CHUNK):
                size += len(chunk)
                if size > settings.max_bytes:
                    raise FetchError("too_large", f"body exceeds {settings.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError("timeout", f"total time exceeds {settings.total_timeout:g}s")
                chunks.append(chunk)
            if response.status_code >= 400:
                kind = "http_4xx" if response.status_code < 500 else "http_5xx"
                raise FetchError(kind, f"HTTP {response.status_code} from {response.url}")
            return FetchResult(feed=feed, final_url=response.url, status=response.status_code,
                               headers={k.lower(): v for k, v in response.headers.items()},
                               body=b"".join(chunks), fetched_at=time.time(),
                               elapsed=time.monotonic() - started)
    except FetchError:
        raise
    except requests.exceptions.Timeout as err:
        raise FetchError("timeout", str(err)) from None
    except requests.exceptions.SSLError as err:
        raise FetchError("tls", str(err)) from None
    except requests.exceptions.TooManyRedirects as err:
        raise FetchError("redirects", str(err)) from None
    except requests.exceptions.ConnectionError as err:
        kind = "dns" if "Name or service not known" in str(err) or "resolve" in str(err) else "connection"
        raise FetchError(kind, str(err)) from None
    except requests.exceptions.RequestException as err:
        raise FetchError("request", str(err)) from None


class FetchShardFn(beam.DoFn):
    """Fetches every feed of a shard concurrently, so one slow host never delays the others."""

    def __init__(self, settings: FetchSettings):
        self._settings = settings
        self._fetched = Metrics.counter("newsbeam", "feeds_fetched")
        self._failed = Metrics.counter("newsbeam", "feeds_failed")

    def setup(self) -> None:
        self._session = new_session(self._settings)
        self._pool = ThreadPoolExecutor(max_workers=self._settings.concurrency,
                                        thread_name_prefix="newsbeam-fetch")

    def process(self, shard: tuple[int, tuple[Feed, ...]]) -> Iterator:
        _, feeds = shard
        futures = {self._pool.submit(fetch, self._session, feed, self._settings): feed for feed in feeds}
        for future in as_completed(futures):
            feed = futures[future]
            try:
                result = future.result()
            except FetchError as err:
                self._failed.inc()
                _LOG.warning("fetch failed for %s: %s", feed.url, err)
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter("fetch", err.kind, str(err), feed_url=feed.url))
                continue
            self._fetched.inc()
            yield result

    def teardown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()


class FetchFeeds(beam.PTransform):
    """(shard, feeds) -> FetchResult, with dead letters on the `dead` output."""

    def __init__(self, settings: FetchSettings):
        super().__init__()
        self._settings = settings

    def expand(self, shards):
        return shards | "FetchShard" >> beam.ParDo(FetchShardFn(self._settings)).with_outputs(DEAD, main="fetched")


def shard_feeds(feeds: Iterable[Feed], shards: int) -> list[tuple[int, tuple[Feed, ...]]]:
    """Splits feeds into stable shards by URL so a runner can spread polling over workers."""
    buckets: dict[int, list[Feed]] = {}
    for feed in feeds:
        buckets.setdefault(_stable_hash(feed.url) % shards, []).append(feed)
    return [(key, tuple(value)) for key, value in sorted(buckets.items())]


def _stable_hash(text: str) -> int:
    import zlib
    return zlib.crc32(text.encode("utf-8"))
