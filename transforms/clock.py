"""Timestamps as newsbeam stores them in Elasticsearch: ISO 8601, UTC, with milliseconds
(whole seconds made the benchmark's throughput window, and ordering within a second, coarse)."""
from __future__ import annotations

import time
from datetime import UTC, datetime


def iso(ts: float | None = None) -> str:
    """Epoch seconds (default: now) -> e.g. 2026-11-27T09:41:07.125Z."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def epoch(value: str) -> float:
    """The inverse of `iso`; also reads whole seconds and offsets (older documents)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
