"""Timestamps as newsbeam stores them in Elasticsearch: ISO 8601, UTC, with milliseconds
(whole seconds made ordering within a second, and the benchmark's throughput window, coarse).
Every module that writes or reads a stored time goes through here."""
from __future__ import annotations

import time
from datetime import UTC, datetime


def iso(ts: float | None = None, *, millis: bool = True) -> str:
    """Epoch seconds (default: now) -> e.g. 2026-11-27T09:41:07.125Z; `millis=False` for times
    that come with whole seconds (a feed's publication date): 2026-11-27T09:41:07Z."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    if not millis:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def epoch(value: str) -> float:
    """The inverse of `iso`; also reads whole seconds and offsets (older documents)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
