"""Per-feed polling state and health: when to poll next, what changed, and the document
kept for each feed in the `newsbeam-feeds` index (`_id` = feed_id(url)).

The schedule is polite: a feed is never polled more often than its configured interval,
its own hints (RSS `ttl`, `sy:updatePeriod`/`sy:updateFrequency`, `Cache-Control: max-age`)
or a server's `Retry-After` allow; feeds that rarely change are polled less and less often
(after two unchanged polls, 1.5x more each time, up to `fetch.unchanged_backoff_max` times
their interval); failing feeds back off exponentially and, after `dead_after` failures in a row, are flagged dead and tried only every `dead_retry_interval`, coming back
by themselves on the first success. The schedule, back-off and validators (ETag,
Last-Modified, body hash) live in the health document, so they survive restarts; a restarted
run's first poll of a feed is unconditional (`FeedState.validators`), so no article parsed
before a crash is lost.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from typing import Any
from urllib.parse import urlsplit

from newsbeam.transforms import clock
from newsbeam.transforms.redact import redact_url, redact_urls_in
from newsbeam.transforms.settings import Feed, FetchSettings

_LOG = logging.getLogger(__name__)
_UNCHANGED_GRACE = 2  # unchanged polls before the interval starts to grow
_UNCHANGED_GROWTH = 1.5
_MAX_AGE = re.compile(r"(?:^|,)\s*(?:s-)?max-age\s*=\s*\"?(\d+)", re.I)


def feed_id(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def max_age(headers: dict[str, str]) -> float | None:
    match = _MAX_AGE.search(headers.get("cache-control", ""))
    return float(match.group(1)) if match and int(match.group(1)) > 0 else None


@dataclasses.dataclass
class FeedState:
    url: str
    next_due: float = 0.0
    last_attempt: float | None = None
    last_success: float | None = None
    last_change: float | None = None
    http_status: int | None = None
    error_class: str | None = None
    error: str | None = None
    consecutive_failures: int = 0
    unchanged_polls: int = 0
    items_seen: int = 0
    dead: bool = False
    etag: str | None = None
    last_modified: str | None = None
    body_hash: str | None = None
    items_hash: str | None = None  # of the item ids: a new lastBuildDate alone is no change
    # Short ids of the items of this run's last parse: only new items go downstream. None until
    # this run parsed the feed (not persisted: see `validators`).
    item_ids: frozenset[str] | None = None
    hint: float | None = None  # seconds the feed or its server asked for
    final_url: str | None = None

    def validators(self) -> tuple[str | None, str | None, str | None]:
        """(ETag, Last-Modified, body hash) for the next poll; none until this run has parsed the
        feed. Parsed articles in flight die with a killed run, and the stored validators cannot
        tell which got downstream; so a restarted run fetches and parses each feed whole once,
        and the articles index decides what is new (the exact-duplicate check)."""
        if self.item_ids is None:
            return None, None, None
        return self.etag, self.last_modified, self.body_hash

    def interval(self, feed: Feed, default_interval: float, settings: FetchSettings) -> float:
        """The base interval: configured, raised (never lowered) by the feed's own hints."""
        base = feed.poll_interval or default_interval
        return min(max(base, self.hint or 0.0), max(base, settings.max_poll_interval))


def _iso(seconds: float | None) -> str | None:
    return clock.iso(seconds) if seconds is not None else None


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return clock.epoch(value)
    except ValueError:
        return None


def on_success(state: FeedState, feed: Feed, *, now: float, status: int, items: list[str] | None,
               etag: str | None, last_modified: str | None, digest: str | None, hint: float | None,
               final_url: str, default_interval: float, settings: FetchSettings) -> tuple[FeedState, bool]:
    """A 2xx or 304; `items` are the parsed item ids (None: not parsed, i.e. a 304 or a body
    identical to the last one). Returns (state, whether the items changed)."""
    items_hash = hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest() if items is not None else None
    changed = items_hash is not None and items_hash != state.items_hash
    state = dataclasses.replace(
        state, last_attempt=now, last_success=now, http_status=status, error_class=None, error=None,
        consecutive_failures=0, dead=False, final_url=final_url,
        etag=etag or (state.etag if status == 304 else None),
        last_modified=last_modified or (state.last_modified if status == 304 else None),
        body_hash=digest or state.body_hash, items_hash=items_hash or state.items_hash, hint=hint)
    if changed:
        state.unchanged_polls, state.last_change = 0, now
    else:
        state.unchanged_polls += 1
    if items is not None:
        state.items_seen = len(items)
    interval = state.interval(feed, default_interval, settings)
    factor = min(_UNCHANGED_GROWTH ** max(0, state.unchanged_polls - _UNCHANGED_GRACE),
                 max(1.0, settings.unchanged_backoff_max))
    state.next_due = now + min(interval * factor, max(interval, settings.max_poll_interval))
    return state, changed


def on_failure(state: FeedState, feed: Feed, *, now: float, error_class: str, error: str,
               status: int | None, retry_after: float | None, default_interval: float,
               settings: FetchSettings, keep_body_hash: bool = False) -> FeedState:
    """A fetch or parse failure: exponential back-off, `Retry-After` honoured, dead after a streak."""
    failures = state.consecutive_failures + 1
    dead = failures >= settings.dead_after
    interval = state.interval(feed, default_interval, settings)
    if dead:
        delay = settings.dead_retry_interval
    else:
        delay = min(interval * 2 ** min(failures - 1, 16), max(interval, settings.max_poll_interval))
    if retry_after:
        delay = max(delay, min(retry_after, settings.max_poll_interval))
    return dataclasses.replace(
        state, last_attempt=now, http_status=status, error_class=error_class, error=error[:1000],
        consecutive_failures=failures, dead=dead, next_due=now + delay,
        body_hash=state.body_hash if keep_body_hash else None)


def health_doc(state: FeedState, feed: Feed) -> dict[str, Any]:
    """The `newsbeam-feeds` document for one feed."""
    return {
        "feed_id": feed_id(feed.url), "feed_url": redact_url(feed.url), "name": feed.name or None,
        "publisher": feed.publisher or None, "host": (urlsplit(feed.url).hostname or "").lower(),
        "final_url": redact_url(state.final_url) if state.final_url else state.final_url, "last_attempt": _iso(state.last_attempt),
        "last_success": _iso(state.last_success), "last_change": _iso(state.last_change),
        "http_status": state.http_status, "error_class": state.error_class, "error": redact_urls_in(state.error) if state.error else state.error,
        "consecutive_failures": state.consecutive_failures, "unchanged_polls": state.unchanged_polls,
        "items_seen": state.items_seen, "next_poll": _iso(state.next_due), "dead": state.dead,
        "etag": state.etag, "last_modified": state.last_modified, "body_hash": state.body_hash,
        "items_hash": state.items_hash, "refresh_hint_seconds": state.hint, "updated_at": _iso(time.time()),
    }


def state_from_doc(url: str, doc: dict[str, Any] | None, now: float) -> FeedState:
    """Restores a feed's state from its health document (validators, failures, next poll)."""
    if not doc:
        return FeedState(url=url, next_due=now)
    next_poll = _epoch(doc.get("next_poll"))
    return FeedState(
        url=url, next_due=next_poll if next_poll is not None else now,
        last_attempt=_epoch(doc.get("last_attempt")), last_success=_epoch(doc.get("last_success")),
        last_change=_epoch(doc.get("last_change")), http_status=doc.get("http_status"),
        error_class=doc.get("error_class"), error=doc.get("error"),
        consecutive_failures=int(doc.get("consecutive_failures") or 0),
        unchanged_polls=int(doc.get("unchanged_polls") or 0), items_seen=int(doc.get("items_seen") or 0),
        dead=bool(doc.get("dead")), etag=doc.get("etag"), last_modified=doc.get("last_modified"),
        body_hash=doc.get("body_hash"), items_hash=doc.get("items_hash"), hint=doc.get("refresh_hint_seconds"), final_url=doc.get("final_url"))


def load_states(client: Any, index: str, urls: list[str], now: float) -> dict[str, FeedState]:
    """States for `urls` from the health index; feeds it does not know start due now."""
    docs: dict[str, dict[str, Any]] = {}
    if urls:
        try:
            response = client.mget(index=index, ids=[feed_id(url) for url in urls])
            docs = {d["_id"]: d["_source"] for d in response["docs"] if d.get("found")}
        except Exception as err:  # a missing index or an outage: start fresh, politely
            if getattr(getattr(err, "meta", None), "status", None) != 404:
                _LOG.warning("cannot load feed states from %s (%s); starting fresh", index, type(err).__name__)
    return {url: state_from_doc(url, docs.get(feed_id(url)), now) for url in urls}
