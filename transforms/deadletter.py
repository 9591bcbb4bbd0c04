"""Dead letters: one record shape for every stage, indexed where people can search them."""
from __future__ import annotations

import hashlib
from typing import Any

from newsbeam.transforms import clock, timing
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


class SafeMapFn:
    """Wraps a per-element function so an exception turns that element into a dead letter
    instead of failing the bundle (and with it, the stream)."""

    def __init__(self, fn, stage: str):
        self._fn = fn
        self._stage = stage

    def __call__(self, element: dict[str, Any]):
        import apache_beam as beam
        started = timing.now()
        try:
            result = self._fn(element)
        except Exception as err:  # one bad article must not stop the others
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
                self._stage, type(err).__name__, str(err), feed_url=element.get("feed_url", ""),
                article_id=element.get("article_id", ""), url=element.get("url", ""), payload=element))
            return
        timing.record(self._stage, 1, timing.now() - started)
        yield result
