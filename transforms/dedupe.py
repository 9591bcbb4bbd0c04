"""DedupeArticles: each article id passes once per stream, whether it reappears on the
next poll or in another feed. Keyed state, so it holds on every runner."""
from __future__ import annotations

from typing import Any, Iterator

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec


class FirstSightingFn(beam.DoFn):
    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())

    def __init__(self):
        self._duplicates = Metrics.counter("newsbeam", "articles_deduplicated")

    def process(self, keyed: tuple[str, dict[str, Any]], seen=beam.DoFn.StateParam(SEEN)) -> Iterator:
        _, article = keyed
        if seen.read():
            self._duplicates.inc()
            return
        seen.write(True)
        yield article


class DedupeArticles(beam.PTransform):
    def expand(self, articles):
        return (articles
                | "KeyById" >> beam.Map(lambda article: (article["article_id"], article))
                | "FirstSighting" >> beam.ParDo(FirstSightingFn()))
