"""Dead letters: one record shape for every stage, indexed where people can search them."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from newsbeam.transforms import clock, timing
from newsbeam.transforms.article import Article
from newsbeam.transforms.redact import redact_url, redact_urls_in

DEAD = "dead"
_MAX_PAYLOAD = 20_000


def dead_letter(stage: str, reason: str, error: str, *, feed_url: str = "", article_id: str = "",
                url: str = "", payload: Any = None) -> dict[str, Any]:
    """A dead-letter document; its id is stable so a replay of the same failure is stored once."""
    feed_url, url, error = redact_url(feed_url), redact_url(url), redact_urls_in(error)  # no credentials stored
    key = "|".join((stage, reason, feed_url, article_id, url, error[:500]))
    record = {
        "dead_letter_id": hashlib.sha256(key.encode("utf-8")).hexdigest()[:32],
        "stage": stage,
        "reason": reason,
        "error": error[:2000],
        "feed_url": feed_url,
        "article_id": article_id,
        "url": url,
        "failed_at": clock.iso(),
    }
    if payload is not None:
        record["payload"] = str(payload)[:_MAX_PAYLOAD]
    return record


Record = Article | dict[str, Any]  # an article, or a document (an alert, a feed's health, ...)


def dead_letter_for(record: Record, stage: str, reason: str, error: str) -> dict[str, Any]:
    """The dead letter of one record (an article, an alert, a document): its ids, and the
    record itself as the payload, so it can be replayed."""
    if isinstance(record, Article):
        return dead_letter(stage, reason, error, feed_url=record.feed_url, article_id=record.article_id,
                           url=record.url, payload=record.to_payload())
    return dead_letter(stage, reason, error, feed_url=record.get("feed_url", "") or "",
                       article_id=record.get("article_id", "") or "", url=record.get("url", "") or "",
                       payload=json.dumps(record, default=str, ensure_ascii=False))


def failed(record: Record, stage: str, err: BaseException):
    """The `dead` output for a record whose stage raised `err`: reason = the exception's class."""
    import apache_beam as beam
    return beam.pvalue.TaggedOutput(DEAD, dead_letter_for(record, stage, type(err).__name__, str(err)))


def rejected(record: Record, stage: str, detail: str):
    """The `dead` output for a record Elasticsearch refused for good (e.g. a mapping error)."""
    import apache_beam as beam
    return beam.pvalue.TaggedOutput(DEAD, dead_letter_for(record, stage, "rejected_by_elasticsearch", detail))


class SafeMapFn:
    """Wraps a per-element function so an exception turns that element into a dead letter
    instead of failing the bundle (and with it, the stream)."""

    def __init__(self, fn, stage: str):
        self._fn = fn
        self._stage = stage

    def __call__(self, element: Record):
        started = timing.now()
        try:
            result = self._fn(element)
        except Exception as err:  # one bad article must not stop the others
            yield failed(element, self._stage, err)
            return
        timing.record(self._stage, 1, timing.now() - started)
        yield result
