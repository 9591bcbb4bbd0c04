"""Assembles the streaming pipeline from settings:

    PollFeeds (schedule, fetch, parse) -> DedupeArticles -> [FetchFullText] -> CleanText
        -> LinkStories -> DetectLanguage -> TagEntities -> TagTopics -> MatchAlerts -> IndexArticles
    MatchAlerts' alerts -> newsbeam-alerts (sent by the delivery loop beside the pipeline,
    transforms/delivery.py, which `newsbeam run` starts)
    (articles in languages the spaCy model does not read pass TagEntities and TagTopics untagged)
    PollFeeds' feed health -> WriteFeedHealth
    (every stage's dead letters) -> WriteDeadLetters

Run it with `newsbeam run` (the local runner pipeline/runner.py chooses; `--runner FlinkRunner ...`
on a cluster, with `newsbeam alerts deliver` beside it).
"""
from __future__ import annotations

import apache_beam as beam

from newsbeam.pipeline.config import Settings
from newsbeam.pipeline.runner import RunnerProfile
from newsbeam.transforms.alerts import STORE_DEAD, MatchAlerts
from newsbeam.transforms.deadletter import DEAD
from newsbeam.transforms.elastic import IndexArticles, WriteDeadLetters, WriteFeedHealth
from newsbeam.transforms.poll import PollFeeds
from newsbeam.transforms.tagging import ENRICH_CHAIN
from newsbeam.transforms.topics import Taxonomy


def enrich(articles, settings: Settings, taxonomy: Taxonomy):
    """Parsed articles -> (enriched articles, dead letters): `ENRICH_CHAIN` in order, the same
    stages `newsbeam tag` runs offline."""
    dead = []
    for stage in ENRICH_CHAIN:
        if not stage.applies(settings):
            continue
        result = articles | stage.name >> stage.transform(settings, taxonomy)
        if stage.main is None:
            articles = result
        else:
            articles = result[stage.main]
            dead.append(result[DEAD])
    return articles, tuple(dead)


def build_pipeline(pipeline: beam.Pipeline, settings: Settings, taxonomy: Taxonomy, profile: RunnerProfile,
                   duration: float | None = None, fetch_shards: int = 8) -> beam.Pipeline:
    polled = pipeline | "PollFeeds" >> PollFeeds(settings.feeds, settings.poll_interval, settings.fetch,
                                                 settings.elasticsearch, duration, fetch_shards,
                                                 profile.tick_budget, profile.wait_for_tick)
    health = polled.health | "WriteFeedHealth" >> WriteFeedHealth(settings.elasticsearch,
                                                                  in_flight=settings.sizes.bulk_in_flight)
    enriched, enrich_dead = enrich(polled.articles, settings, taxonomy)
    # Alerts are stored before their article is indexed, so a restart (which skips indexed
    # articles) never loses an alert.
    alerts = enriched | "MatchAlerts" >> MatchAlerts(settings)
    indexed = alerts["articles"] | "IndexArticles" >> IndexArticles(settings.elasticsearch,
                                                                      in_flight=settings.sizes.bulk_in_flight)
    dead = (polled[DEAD], *enrich_dead, alerts[DEAD], alerts[STORE_DEAD], indexed[DEAD], health[DEAD])
    if not profile.fan_out_dead_letters:
        dead = dead | "FlattenDeadLetters" >> beam.Flatten()
    dead | "WriteDeadLetters" >> WriteDeadLetters(settings.elasticsearch, settings.sizes.bulk_in_flight)
    return pipeline
