"""PollFeeds: a periodic impulse that emits the feeds due for polling, in shards.

Feeds are split into stable shards by URL so a distributed runner can spread fetching
over workers; within a shard, FetchFeeds fetches concurrently.
"""
from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

from pipeline.config import Feed
from transforms.fetch import shard_feeds


class PollFeeds(beam.PTransform):
    """Emits `(shard, feeds)` every `interval` seconds; stops after `duration` seconds when
    given, which lets the pipeline drain and finish cleanly."""

    def __init__(self, feeds: tuple[Feed, ...], interval: float, duration: float | None = None,
                 shards: int = 8):
        super().__init__()
        if not feeds:
            raise ValueError("no feeds to poll: add some to configs/feeds.yaml or pass --feed URL")
        self._shards = shard_feeds(feeds, shards)
        self._interval = interval
        self._duration = duration

    def expand(self, pbegin):
        start = time.time()
        stop = Timestamp.of(start + self._duration) if self._duration else MAX_TIMESTAMP
        shards = self._shards
        return (pbegin
                | "Tick" >> PeriodicImpulse(start_timestamp=Timestamp.of(start), stop_timestamp=stop,
                                            fire_interval=self._interval)
                | "DueShards" >> beam.FlatMap(lambda _tick: shards))
