"""Assembles the streaming pipeline from settings:

    PollFeeds (schedule, fetch, parse) -> DedupeArticles -> [FetchFullText] -> CleanText
        -> LinkStories -> DetectLanguage -> TagEntities -> TagTopics -> MatchAlerts -> IndexArticles
    MatchAlerts' alerts -> newsbeam-alerts, delivered by the outbox (transforms/delivery.py)
    (articles in languages the spaCy model does not read pass TagEntities and TagTopics untagged)
    PollFeeds' feed health -> WriteFeedHealth
    (every stage's dead letters) -> WriteDeadLetters

Run it with `newsbeam run` (DirectRunner by default; `--runner FlinkRunner ...` on a cluster).
"""
from __future__ import annotations

import apache_beam as beam

from newsbeam.pipeline.config import Settings
from newsbeam.pipeline.runner import RunnerProfile
from newsbeam.transforms.alerts import STORE_DEAD, MatchAlerts
from newsbeam.transforms.clean import CleanText
from newsbeam.transforms.deadletter import DEAD
from newsbeam.transforms.dedupe import DedupeArticles
from newsbeam.transforms.elastic import IndexArticles, WriteDeadLetters, WriteFeedHealth
from newsbeam.transforms.entities import TagEntities
from newsbeam.transforms.fulltext import FetchFullText
from newsbeam.transforms.language import DetectLanguage, model_languages
from newsbeam.transforms.neardup import LinkStories
from newsbeam.transforms.poll import PollFeeds
from newsbeam.transforms.topics import TagTopics, Taxonomy


def enrich(articles, settings: Settings, taxonomy: Taxonomy):
    """Parsed articles -> (enriched articles, dead letters); the part shared by every source."""
    unique = articles | "DedupeArticles" >> DedupeArticles(settings.elasticsearch, settings.dedupe.retention)
    if any(feed.full_text for feed in settings.feeds):
        unique = unique | "FetchFullText" >> FetchFullText(settings.feeds, settings.fetch)
    cleaned = unique | "CleanText" >> CleanText()
    linked = cleaned.cleaned | "LinkStories" >> LinkStories(settings.elasticsearch, settings.dedupe)
    # One stream through NER (marked, not split): joining split streams would need a Flatten.
    languages = linked | "DetectLanguage" >> DetectLanguage(model_languages(settings.nlp.model))
    entities = languages | "TagEntities" >> TagEntities(settings.nlp)
    topics = entities.tagged | "TagTopics" >> TagTopics(taxonomy)
    return topics.tagged, (cleaned[DEAD], entities[DEAD], topics[DEAD])


def build_pipeline(pipeline: beam.Pipeline, settings: Settings, taxonomy: Taxonomy, profile: RunnerProfile,
                   duration: float | None = None, fetch_shards: int = 8) -> beam.Pipeline:
    polled = pipeline | "PollFeeds" >> PollFeeds(settings.feeds, settings.poll_interval, settings.fetch,
                                                 settings.elasticsearch, duration, fetch_shards,
                                                 profile.tick_budget, profile.wait_for_tick)
    health = polled.health | "WriteFeedHealth" >> WriteFeedHealth(settings.elasticsearch)
    enriched, enrich_dead = enrich(polled.articles, settings, taxonomy)
    # Alerts are stored before their article is indexed, so a restart (which skips indexed
    # articles) never loses an alert.
    alerts = enriched | "MatchAlerts" >> MatchAlerts(settings)
    indexed = alerts["articles"] | "IndexArticles" >> IndexArticles(settings.elasticsearch)
    dead = (polled[DEAD], *enrich_dead, alerts[DEAD], alerts[STORE_DEAD], indexed[DEAD], health[DEAD])
    if not profile.fan_out_dead_letters:
        dead = dead | "FlattenDeadLetters" >> beam.Flatten()
    dead | "WriteDeadLetters" >> WriteDeadLetters(settings.elasticsearch)
    return pipeline
