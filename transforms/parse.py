"""ParseEntries: feed bytes -> article dicts, with stable ids from canonical URLs."""
from __future__ import annotations

import calendar
import hashlib
import io
import logging
import time
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import apache_beam as beam
import feedparser
from apache_beam.metrics import Metrics

from transforms.deadletter import DEAD, dead_letter
from transforms.fetch import FetchResult

_LOG = logging.getLogger(__name__)

# Query parameters that identify a campaign or a click, not a document.
_TRACKING_PARAMS = frozenset({
    "fbclid", "gclid", "dclid", "msclkid", "mc_cid", "mc_eid", "igshid", "ocid", "cmpid",
    "smid", "smtyp", "ito", "ns_mchannel", "ns_source", "ns_campaign", "ns_linkname", "ns_fee",
    "at_medium", "at_campaign", "at_custom1", "at_custom2", "at_custom3", "at_custom4",
    "xtor", "_ga", "spm", "cid", "rss", "rssfeed", "partner", "taid",
})


def canonical_url(url: str) -> str:
    """Normalises a URL so one article has one id: scheme/host lower-cased, default port,
    fragment and tracking parameters (utm_*, fbclid, ...) dropped, remaining query sorted."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower() or "http"
    host = (parts.hostname or "").lower().rstrip(".")
    if host.startswith("www."):
        host = host[4:]
    port = parts.port
    netloc = host if port in (None, 80, 443) else f"{host}:{port}"
    query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                   if not k.lower().startswith("utm_") and k.lower() not in _TRACKING_PARAMS)
    path = parts.path or "/"
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return urlunsplit(("https" if scheme in ("http", "https") else scheme, netloc, path, urlencode(query), ""))


def article_id(url: str, guid: str = "") -> str:
    """Stable id: a hash of the canonical URL, or of the guid when there is no usable link."""
    basis = canonical_url(url) if url.startswith(("http://", "https://")) else f"guid:{guid}"
    return hashlib.sha256(basis.encode("utf-8")).hexdigest()[:32]


def _iso(struct: time.struct_time | None) -> str | None:
    if not struct:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(calendar.timegm(struct)))


def _entry_html(entry: Any) -> tuple[str, str]:
    """Returns (summary, content) as feedparser's sanitised HTML."""
    summary = entry.get("summary", "") or ""
    contents = entry.get("content") or []
    content = max((c.get("value", "") for c in contents), key=len, default="")
    return summary, content


def parse_feed(result: FetchResult, max_items: int) -> tuple[list[dict[str, Any]], str | None]:
    """Parses a fetched feed into articles. Returns (articles, problem) where `problem`
    describes a feed that yielded nothing usable."""
    headers = {"content-location": result.final_url}
    if "content-type" in result.headers:
        headers["content-type"] = result.headers["content-type"]
    # A file object: feedparser must never treat the input as a URL or a path.
    parsed = feedparser.parse(io.BytesIO(result.body), response_headers=headers, sanitize_html=True)
    if not parsed.entries:
        if parsed.bozo:
            return [], f"{type(parsed.bozo_exception).__name__}: {parsed.bozo_exception}"
        if not parsed.get("version"):
            return [], "not a feed: no RSS, Atom or RDF document found"
        return [], None  # a valid feed that is empty right now
    feed_meta = parsed.get("feed", {})
    publisher = result.feed.publisher or feed_meta.get("title", "") or urlsplit(result.final_url).hostname or ""
    source = urlsplit(result.feed.url).hostname or ""
    language = (feed_meta.get("language") or "").split("-")[0].lower() or None
    fetched_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.fetched_at))
    articles = []
    for entry in parsed.entries[:max_items]:
        link = entry.get("link", "") or ""
        guid = entry.get("id", "") or ""
        if not link and not guid:
            continue
        summary, content = _entry_html(entry)
        articles.append({
            "article_id": article_id(link, guid),
            "url": link or guid,
            "guid": guid,
            "title": entry.get("title", "") or "",
            "summary_html": summary,
            "content_html": content,
            "feed_url": result.feed.url,
            "source": source,
            "publisher": publisher,
            "author": entry.get("author", "") or None,
            "published_at": _iso(entry.get("published_parsed") or entry.get("updated_parsed")),
            "fetched_at": fetched_at,
            "language": (entry.get("language") or "").split("-")[0].lower() or language,
        })
    return articles, None


class ParseFn(beam.DoFn):
    def __init__(self, max_items: int):
        self._max_items = max_items
        self._parsed = Metrics.counter("newsbeam", "articles_parsed")

    def process(self, result: FetchResult) -> Iterator:
        try:
            articles, problem = parse_feed(result, self._max_items)
        except Exception as err:  # feedparser is defensive; anything else is still one bad feed
            articles, problem = [], f"{type(err).__name__}: {err}"
        if problem:
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
                "parse", "unparseable_feed", problem, feed_url=result.feed.url,
                payload=result.body[:2000].decode("utf-8", "replace")))
            return
        self._parsed.inc(len(articles))
        yield from articles


class ParseEntries(beam.PTransform):
    """FetchResult -> article dicts; unparseable feeds go to the `dead` output."""

    def __init__(self, max_items: int = 500):
        super().__init__()
        self._max_items = max_items

    def expand(self, fetched):
        return fetched | "Parse" >> beam.ParDo(ParseFn(self._max_items)).with_outputs(DEAD, main="articles")
