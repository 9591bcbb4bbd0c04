"""Assembles the streaming pipeline from settings:

    PollFeeds -> FetchFeeds -> ParseEntries -> DedupeArticles -> CleanText
        -> TagEntities -> TagTopics -> IndexArticles
    (every stage's dead letters) -> WriteDeadLetters

Run it with `newsbeam run` (DirectRunner by default; `--runner FlinkRunner ...` on a cluster).
"""
from __future__ import annotations

import apache_beam as beam

from pipeline.config import Settings
from transforms.clean import CleanText
from transforms.deadletter import DEAD
from transforms.dedupe import DedupeArticles
from transforms.elastic import IndexArticles, WriteDeadLetters
from transforms.entities import TagEntities
from transforms.fetch import FetchFeeds
from transforms.parse import ParseEntries
from transforms.poll import PollFeeds
from transforms.topics import Taxonomy, TagTopics


def enrich(articles, settings: Settings, taxonomy: Taxonomy):
    """Parsed articles -> (enriched articles, dead letters); the part shared by every source."""
    unique = articles | "DedupeArticles" >> DedupeArticles()
    cleaned = unique | "CleanText" >> CleanText()
    entities = cleaned.cleaned | "TagEntities" >> TagEntities(settings.nlp)
    topics = entities.tagged | "TagTopics" >> TagTopics(taxonomy)
    return topics.tagged, (cleaned[DEAD], entities[DEAD], topics[DEAD])


def build_pipeline(pipeline: beam.Pipeline, settings: Settings, taxonomy: Taxonomy,
                   duration: float | None = None, fetch_shards: int = 8) -> beam.Pipeline:
    shards = pipeline | "PollFeeds" >> PollFeeds(settings.feeds, settings.poll_interval, duration, fetch_shards)
    fetched = shards | "FetchFeeds" >> FetchFeeds(settings.fetch)
    parsed = fetched.fetched | "ParseEntries" >> ParseEntries(settings.fetch.max_items_per_feed)
    enriched, enrich_dead = enrich(parsed.articles, settings, taxonomy)
    indexed = enriched | "IndexArticles" >> IndexArticles(settings.elasticsearch)
    dead = (fetched[DEAD], parsed[DEAD], *enrich_dead, indexed[DEAD]) | "AllDeadLetters" >> beam.Flatten()
    dead | "WriteDeadLetters" >> WriteDeadLetters(settings.elasticsearch)
    return pipeline
