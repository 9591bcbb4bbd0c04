"""Feed bytes -> article records, with stable ids from canonical URLs (run by PollFeeds).

Documents that declare entities (`<!DOCTYPE x [<!ENTITY ...>]>`) are refused before
feedparser sees them: its loose parser expands what the strict one refused, which is how
"billion laughs" documents eat memory. Items per feed and characters per item are capped.
"""
from __future__ import annotations

import calendar
import codecs
import dataclasses
import hashlib
import io
import logging
import re
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import feedparser

from newsbeam.transforms import clock
from newsbeam.transforms.article import Article
from newsbeam.transforms.deadletter import dead_letter
from newsbeam.transforms.fetch import FetchResult
from newsbeam.transforms.redact import redact_url, without_userinfo

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


_EARLIEST_DATE = calendar.timegm((1990, 1, 1, 0, 0, 0))
_FUTURE_SLACK = 2 * 86_400  # time zones and clock skew


def _iso(struct: time.struct_time | None) -> str | None:
    """ISO-8601 UTC, or None for placeholders such as 0001-01-01 or 1970-01-01 (seen in real
    feeds; Elasticsearch rejects year 1 as written by strftime) and for dates far ahead."""
    if not struct:
        return None
    try:
        seconds = calendar.timegm(struct)
    except (OverflowError, ValueError):
        return None
    if not _EARLIEST_DATE <= seconds <= time.time() + _FUTURE_SLACK:
        return None
    return clock.iso(seconds, millis=False)


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
_SYNDICATION_PERIODS = {"hourly": 3600, "daily": 86_400, "weekly": 604_800, "monthly": 2_592_000,
                        "yearly": 31_536_000}


def declares_entities(body: bytes) -> bool:
    """True when the document type declaration has an internal subset with `<!ENTITY`."""
    head = body[:4]
    text = None
    for bom, codec in _BOMS:
        if head.startswith(bom):
            text = body.decode(codec, "replace")
            break
    if text is None and b"\x00" in head:  # UTF-16/32 without a BOM
        codec = {b"\x00\x00\x00<": "utf-32-be", b"<\x00\x00\x00": "utf-32-le",
                 b"\x00<\x00?": "utf-16-be", b"<\x00?\x00": "utf-16-le"}.get(head, "utf-16-le")
        text = body.decode(codec, "replace")
    if text is None:
        text = body.decode("latin-1")  # byte-transparent for every ASCII-compatible encoding
    low = text.lower()
    start = low.find("<!doctype")
    if start < 0:
        return False
    end = low.find("]>", start)
    return "<!entity" in low[start:end + 2 if end >= 0 else len(low)]


def refresh_hint(parsed: Any) -> float | None:
    """Seconds the feed asks readers to wait between polls: RSS `ttl` (minutes) or
    `sy:updatePeriod` / `sy:updateFrequency`; the longer one when both are present."""
    feed = parsed.get("feed", {})
    hints = []
    ttl = str(feed.get("ttl", "")).strip()
    if ttl.isdigit() and int(ttl) > 0:
        hints.append(int(ttl) * 60.0)
    period = _SYNDICATION_PERIODS.get(str(feed.get("sy_updateperiod", "")).strip().lower())
    if period:
        frequency = str(feed.get("sy_updatefrequency", "1")).strip()
        hints.append(period / max(1, int(frequency) if frequency.isdigit() else 1))
    return max(hints) if hints else None


def _entry_html(entry: Any) -> tuple[str, str]:
    """Returns (summary, content) as feedparser's sanitised HTML."""
    summary = entry.get("summary", "") or ""
    contents = entry.get("content") or []
    content = max((c.get("value", "") for c in contents), key=len, default="")
    return summary, content


@dataclasses.dataclass
class ParsedFeed:
    articles: list[Article]
    problem: str | None = None  # why a feed yielded nothing usable
    reason: str = ""  # dead-letter reason: unparseable_feed, entity_declaration
    refresh_hint: float | None = None  # seconds, from ttl / sy:updatePeriod


_ITEM_END = re.compile(rb"</(?:[A-Za-z_][\w.-]*:)?(?:item|entry)\s*>", re.IGNORECASE)
_TAIL = 64 * 1024  # where a document's closing tags are looked for
# Numeric references with 4+ hex or 5+ decimal digits: the only ones that can be out of range.
_BIG_REFERENCE = re.compile(rb"&#(?:[xX]0*([0-9a-fA-F]{4,})|0*([0-9]{5,}));")


def _ascii_compatible(body: bytes) -> bool:
    return b"\x00" not in body[:4] and not body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))


def pre_cut(body: bytes, max_items: int, max_bytes: int) -> bytes:
    """The document with its first `max_items` items only, and no more than `max_bytes` of them,
    cut after an item's end tag and closed by the document's own closing tags: feedparser's
    cost grows with the whole document, not with the items we keep."""
    if not _ascii_compatible(body):
        return body[:max_bytes]
    ends = []
    for match in _ITEM_END.finditer(body):
        if match.end() > max_bytes or len(ends) == max_items:
            break
        ends.append(match.end())
    else:
        return body  # all of it is within both limits
    tail_start = max(0, len(body) - _TAIL)
    closing = [m.end() for m in _ITEM_END.finditer(body, tail_start)]
    tail = body[closing[-1]:] if closing else b""
    return body[:ends[-1] if ends else max_bytes] + tail


def _fix_reference(match: re.Match) -> bytes:
    value = int(match.group(1), 16) if match.group(1) else int(match.group(2))
    return b"&#xFFFD;" if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF else match.group()


def replace_bad_references(body: bytes) -> bytes:
    """Out-of-range and surrogate character references (`&#xD800;`, `&#x110000;`) become U+FFFD:
    feedparser's loose parser raises on them, and the whole feed would be lost for one character."""
    return _BIG_REFERENCE.sub(_fix_reference, body) if _ascii_compatible(body) else body


def markup_tags(body: bytes) -> int:
    """About how many HTML tags the items carry, escaped or not (a count, no parsing)."""
    return body.count(b"&lt;") + body.count(b"<")


def parse_document(result: FetchResult, max_items: int = 500, max_bytes: int = 8 * 1024 * 1024,
                   max_sanitized_tags: int = 20_000) -> Any:
    """feedparser over the fetched bytes, never over a URL or a path; at most `max_items` items
    and `max_bytes` reach it. With more than `max_sanitized_tags` tags, feedparser neither
    sanitises item HTML nor resolves its links: both run its pure-Python HTML parser over every
    tag, and CleanText reduces the HTML to text (without scripts or styles) anyway."""
    # Without the feed URL's credentials: feedparser resolves relative links against this base.
    base = without_userinfo(urljoin(result.final_url, result.headers.get("content-location", "")))
    headers = {"content-location": base}
    for name in ("content-type", "content-language"):
        if name in result.headers:
            headers[name] = result.headers[name]
    body = replace_bad_references(pre_cut(result.body, max_items, max_bytes))
    thorough = markup_tags(body) <= max_sanitized_tags
    return feedparser.parse(io.BytesIO(body), response_headers=headers, sanitize_html=thorough,
                            resolve_relative_uris=thorough)


def read_feed(result: FetchResult, max_items: int, max_entry_chars: int = 200_000,
              max_parse_bytes: int = 8 * 1024 * 1024, max_sanitized_tags: int = 20_000) -> ParsedFeed:
    """Parses a fetched feed into articles (at most `max_items`, each text field cut at
    `max_entry_chars`, from its first `max_parse_bytes`), or says why it could not."""
    if declares_entities(result.body):
        return ParsedFeed([], "the document declares XML entities; refused before parsing",
                          "entity_declaration")
    parsed = parse_document(result, max_items, max_parse_bytes, max_sanitized_tags)
    hint = refresh_hint(parsed)
    if not parsed.entries:
        if parsed.bozo:
            return ParsedFeed([], f"{type(parsed.bozo_exception).__name__}: {parsed.bozo_exception}",
                              "unparseable_feed", hint)
        if not parsed.get("version"):
            return ParsedFeed([], "not a feed: no RSS, Atom or RDF document found", "unparseable_feed", hint)
        return ParsedFeed([], refresh_hint=hint)  # a valid feed that is empty right now
    feed_meta = parsed.get("feed", {})
    publisher = result.feed.publisher or feed_meta.get("title", "") or urlsplit(result.final_url).hostname or ""
    source = urlsplit(result.feed.url).hostname or ""
    language = (feed_meta.get("language") or "").split("-")[0].lower() or None
    fetched_at = clock.iso(result.fetched_at)
    cap = max_entry_chars
    articles = []
    for entry in parsed.entries[:max_items]:
        link = (entry.get("link", "") or "")[:4096]
        guid = (entry.get("id", "") or "")[:4096]
        if not link and not guid:
            continue
        summary, content = _entry_html(entry)
        articles.append(Article(
            article_id=article_id(link, guid),
            url=link or guid,
            guid=guid,
            title=(entry.get("title", "") or "")[:cap],
            summary_html=summary[:cap],
            content_html=content[:cap],
            feed_url=redact_url(result.feed.url),  # a feed URL may carry user:password@
            source=source,
            publisher=publisher,
            author=(entry.get("author", "") or "")[:1024] or None,
            published_at=_iso(entry.get("published_parsed") or entry.get("updated_parsed")),
            fetched_at=fetched_at,
            language=(entry.get("language") or "").split("-")[0].lower() or language,
            body_source="feed",
        ))
    return ParsedFeed(articles, refresh_hint=hint)


def safe_read_feed(result: FetchResult, max_items: int, max_entry_chars: int,
                   max_parse_bytes: int = 8 * 1024 * 1024, max_sanitized_tags: int = 20_000) -> ParsedFeed:
    try:
        return read_feed(result, max_items, max_entry_chars, max_parse_bytes, max_sanitized_tags)
    except Exception as err:  # feedparser is defensive; anything else is still one bad feed
        return ParsedFeed([], f"{type(err).__name__}: {err}", "unparseable_feed")


def timed_read_feed(result: FetchResult, max_items: int, max_entry_chars: int,
                    max_parse_bytes: int = 8 * 1024 * 1024,
                    max_sanitized_tags: int = 20_000) -> tuple[ParsedFeed, float]:
    """`safe_read_feed` and its duration; what a parser process runs (transforms/workers.py)."""
    started = time.perf_counter()
    parsed = safe_read_feed(result, max_items, max_entry_chars, max_parse_bytes, max_sanitized_tags)
    return parsed, time.perf_counter() - started


def parse_dead_letter(result: FetchResult, parsed: ParsedFeed) -> dict[str, Any]:
    return dead_letter("parse", parsed.reason, parsed.problem or "", feed_url=redact_url(result.feed.url),
                       payload=result.body[:2000].decode("utf-8", "replace"))
