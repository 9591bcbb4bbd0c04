"""The enrichment and indexing stages in a TestPipeline, writing to the real Elasticsearch."""
import dataclasses
import json
import time

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from newsbeam.pipeline.build import enrich
from newsbeam.pipeline.config import Feed
from newsbeam.transforms.article import Article
from newsbeam.transforms.deadletter import DEAD
from newsbeam.transforms.elastic import IndexArticles, WriteDeadLetters, connect, ensure_indices
from newsbeam.transforms.fetch import FetchResult
from newsbeam.transforms.parse import parse_dead_letter, safe_read_feed
from newsbeam.transforms.tagging import OUTPUT_FIELDS, Tagger
from newsbeam.transforms.topics import Taxonomy
from tests.support.feedserver import fixture_articles, rss


def fetched(items, url="https://news.example.org/feed.xml"):
    return FetchResult(feed=Feed(url=url), final_url=url, status=200, headers={}, body=rss(items),
                       fetched_at=time.time(), elapsed=0.0)


def parse_entries(result: FetchResult):
    """What PollFeeds does with a fetched feed: its articles, or one dead letter."""
    parsed = safe_read_feed(result, 500, 200_000)
    if parsed.problem:
        yield beam.pvalue.TaggedOutput(DEAD, parse_dead_letter(result, parsed))
    else:
        yield from parsed.articles


def test_parse_enrich_index_with_duplicates_and_a_broken_feed(es, settings):
    client = connect(settings.elasticsearch)
    ensure_indices(client, settings.elasticsearch)
    fixtures = fixture_articles()
    taxonomy = Taxonomy.load(settings.topics_file)
    # The same story in two feeds (one link with tracking parameters) and a feed that is not a feed.
    first = fetched([fixtures["ventilators"], fixtures["floods"]])
    again = fetched([{**fixtures["ventilators"], "link": fixtures["ventilators"]["link"] + "&utm_term=x"}],
                    url="https://other.example.org/rss")
    broken = FetchResult(feed=Feed(url="https://broken.example.org/rss"), final_url="https://broken.example.org/rss",
                         status=200, headers={}, body=b"<html>oops</html>", fetched_at=time.time(), elapsed=0.0)
    with TestPipeline() as p:
        parsed = (p | beam.Create([first, again, broken])
                  | "Parse" >> beam.FlatMap(parse_entries).with_outputs(DEAD, main="articles"))
        enriched, enrich_dead = enrich(parsed.articles, settings, taxonomy)
        indexed = enriched | IndexArticles(settings.elasticsearch)
        dead = (parsed[DEAD], *enrich_dead, indexed[DEAD]) | "Dead" >> beam.Flatten()
        dead | WriteDeadLetters(settings.elasticsearch)
        assert_that(indexed.indexed | beam.combiners.Count.Globally(), equal_to([2]), label="TwoUnique")
        assert_that(dead | beam.Map(lambda d: (d["stage"], d["feed_url"])),
                    equal_to([("parse", "https://broken.example.org/rss")]), label="OneDeadLetter")
    es.indices.refresh(index=[settings.elasticsearch.articles_alias, settings.elasticsearch.deadletter_index])
    docs = {h["_source"]["title"]: h["_source"] for h in
            es.search(index=settings.elasticsearch.articles_alias, size=10)["hits"]["hits"]}
    assert set(docs) == {fixtures["ventilators"]["title"], fixtures["floods"]["title"]}
    story = docs[fixtures["ventilators"]["title"]]
    assert "medical equipment aid" in story["topics"]
    assert {"Donald Trump", "Vladimir Putin"} <= set(story["persons"])
    assert "lemmas" not in story  # searchable, not stored
    assert es.count(index=settings.elasticsearch.articles_alias,
                    query={"match": {"lemmas": "ventilator"}})["count"] == 1
    dead_docs = es.search(index=settings.elasticsearch.deadletter_index)["hits"]["hits"]
    assert [(d["_source"]["stage"], d["_source"]["reason"]) for d in dead_docs] == [("parse", "unparseable_feed")]


GERMAN = {"title": "Bundesregierung liefert Beatmungsgeräte", "link": "https://news.example.org/de/beatmung",
          "html": "<p>Die Bundesregierung hat am Montag neue Beatmungsgeräte an mehrere Krankenhäuser in Berlin "
                  "und Hamburg geliefert, teilte das Gesundheitsministerium mit.</p>"}


def test_tag_runs_the_pipelines_enrich_chain_language_routing_included(es, settings, nlp):
    """`newsbeam tag` (Tagger) and the pipeline's `enrich` give the same fields for the same
    parsed articles; the feed states no language, so both detect it and skip NER for German."""
    client = connect(settings.elasticsearch)
    ensure_indices(client, settings.elasticsearch)
    fixtures = fixture_articles()
    parsed = safe_read_feed(fetched([fixtures["ventilators"], fixtures["floods"], GERMAN]), 500, 200_000).articles
    parsed = [dataclasses.replace(article, language=None) for article in parsed]
    taxonomy = Taxonomy.load(settings.topics_file)
    compared = (*OUTPUT_FIELDS, "body", "lemmas")

    def fields(article: Article) -> tuple[str, str]:
        document = article.to_document()
        return article.article_id, json.dumps({key: document.get(key) for key in compared}, sort_keys=True)

    offline = Tagger(nlp, taxonomy, settings).tag_articles(parsed)
    by_id = dict(fields(article) for article in offline)
    assert json.loads(by_id[parsed[2].article_id])["language"] == "de"
    assert json.loads(by_id[parsed[2].article_id])["nlp_skipped"] is True
    assert json.loads(by_id[parsed[0].article_id])["language"] == "en"
    assert "medical equipment aid" in json.loads(by_id[parsed[0].article_id])["topics"]
    with TestPipeline() as p:
        enriched, _ = enrich(p | beam.Create(parsed), settings, taxonomy)
        assert_that(enriched | beam.Map(fields), equal_to(list(by_id.items())), label="SameAsTag")
