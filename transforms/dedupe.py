"""DedupeArticles: each article id goes to NLP once, whether it reappears on the next poll,
in another feed, or after a restart.

Two layers, before any expensive work:

1. `FirstSightingFn`: keyed state per article id, so a re-polled id is dropped in-stream on
   every runner. The state is bounded: an event-time timer clears each id `retention`
   seconds after it was first seen.
2. `SkipIndexedFn`: the ids that pass are looked up in the articles alias in bulk (one `ids`
   query per batch), so after a restart (empty state) or past the retention, articles
   already in Elasticsearch are not processed again. If Elasticsearch cannot answer, the
   articles pass: indexing uses `create`, so the worst case is repeated NLP, never a double.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration

from newsbeam.transforms.article import Article
from newsbeam.transforms.batching import BatchingDoFn
from newsbeam.transforms.settings import DedupeSettings, ElasticsearchSettings, StageSizes

_LOG = logging.getLogger(__name__)


class FirstSightingFn(beam.DoFn):
    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, retention: float = DedupeSettings.retention):
        self._retention = retention
        self._duplicates = Metrics.counter("newsbeam", "articles_deduplicated")

    def process(self, keyed: tuple[str, Article], timestamp=beam.DoFn.TimestampParam,
                seen=beam.DoFn.StateParam(SEEN), expiry=beam.DoFn.TimerParam(EXPIRY)) -> Iterator:
        _, article = keyed
        if seen.read():
            self._duplicates.inc()
            return
        seen.write(True)
        expiry.set(timestamp + Duration.of(self._retention))
        yield article

    @on_timer(EXPIRY)
    def forget(self, seen=beam.DoFn.StateParam(SEEN)) -> Iterator:
        seen.clear()
        return iter(())


def indexed_ids(client: Any, alias: str, ids: list[str]) -> set[str]:
    """The ids among `ids` that are already in the articles alias."""
    response = client.search(index=alias, query={"ids": {"values": ids}}, source=False, size=len(ids),
                             ignore_unavailable=True, allow_no_indices=True)
    return {hit["_id"] for hit in response["hits"]["hits"]}


class SkipIndexedFn(BatchingDoFn):
    stage = "dedupe"
    def __init__(self, settings: ElasticsearchSettings, batch_size: int = StageSizes.dedupe_batch):
        self._settings = settings
        self.batch_size = batch_size
        self._skipped = Metrics.counter("newsbeam", "articles_already_indexed")
        self._unchecked = Metrics.counter("newsbeam", "articles_dedupe_unchecked")

    def setup(self) -> None:
        from newsbeam.transforms.elastic import connect
        self._client = connect(self._settings, check=False)

    def handle_batch(self, articles: list[Article]) -> Iterator[list[Any]]:
        try:
            known = indexed_ids(self._client, self._settings.articles_alias,
                                [article.article_id for article in articles])
        except Exception as err:  # fail open: `create` still refuses doubles at indexing time
            _LOG.warning("cannot check %d article ids against %s (%s); processing them", len(articles),
                         self._settings.articles_alias, type(err).__name__)
            self._unchecked.inc(len(articles))
            known = set()
        for article in articles:
            if article.article_id in known:
                self._skipped.inc()
                yield []
            else:
                yield [article]

    def teardown(self) -> None:
        self._client.close()


class DedupeArticles(beam.PTransform):
    def __init__(self, es_settings: ElasticsearchSettings, retention: float = DedupeSettings.retention,
                 batch_size: int = StageSizes.dedupe_batch):
        super().__init__()
        self._es_settings = es_settings
        self._retention = retention
        self._batch_size = batch_size

    def expand(self, articles):
        return (articles
                | "KeyById" >> beam.Map(lambda article: (article.article_id, article))
                | "FirstSighting" >> beam.ParDo(FirstSightingFn(self._retention))
                | "SkipIndexed" >> beam.ParDo(SkipIndexedFn(self._es_settings, self._batch_size)))
