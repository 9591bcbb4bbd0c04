"""Duplicates: exact (the same id in-stream and across restarts, checked against the real
Elasticsearch) and near (syndicated copies share a story_id, also across restarts)."""
from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from newsbeam.pipeline.config import DedupeSettings
from newsbeam.transforms.article import Article
from newsbeam.transforms.dedupe import DedupeArticles, indexed_ids
from newsbeam.transforms.elastic import connect, ensure_indices
from newsbeam.transforms.neardup import LinkStoriesFn, StoryIndex, link_stories

WIRE = """WASHINGTON (AP) - The House approved a sweeping relief package on Friday that would send billions
of dollars to states and cities struggling with the economic fallout of the pandemic, setting up a fight
with the Senate over how much more the federal government should spend. The measure passed largely along
party lines after a day of debate in which members voted by proxy for the first time in the chamber's
history. Supporters said the money would keep police officers, firefighters and teachers on the job while
tax revenue collapses. Opponents called the bill a wish list that had no chance of becoming law and said
lawmakers should wait to see how earlier aid was being spent before approving more. The package includes
another round of direct payments to households, hazard pay for essential workers and money for testing and
contact tracing. It would also extend enhanced unemployment benefits through January. Senate leaders said
they would not take up the bill as written and would instead draft their own plan in the coming weeks, with
a focus on liability protections for businesses that reopen. Governors of both parties have pleaded for
direct aid, warning of deep cuts to schools and hospitals without it."""

COPY = WIRE.replace("WASHINGTON (AP) - ", "").replace(
    "It would also extend enhanced unemployment benefits through January. ", "").replace(
    "with a focus on liability protections for businesses that reopen.",
    "with a focus on liability protections for businesses that reopen, a spokesman said.") + (
    " Local officials in Illinois said the money would close most of the state's budget gap.")

OTHER = """The city council voted on Tuesday to extend outdoor dining permits through the end of the year,
giving restaurants more room to seat customers while indoor capacity remains limited. Owners said the
program had kept many of them afloat during the spring, and several asked the council to make it permanent.
The council also approved new rules for sidewalk clearance so that people using wheelchairs can pass, and
agreed to waive permit fees for businesses in neighbourhoods hit hardest by the closures. A separate
proposal to close two downtown streets to traffic on weekends was sent back to committee for more study."""


def article(article_id: str, title: str, body: str) -> Article:
    return Article(article_id=article_id, title=title, body=body, url=f"https://example.org/{article_id}")


def test_syndicated_copies_share_a_story_and_other_stories_do_not():
    linked = link_stories([article("a1", "House passes $3 trillion relief bill", WIRE),
                           article("b7", "House passes $3T relief bill for states", COPY),
                           article("c3", "Council extends outdoor dining permits", OTHER),
                           article("d4", "Short", "Too short to compare.")], StoryIndex(), 0.6)
    stories = {a.article_id: a.story_id for a in linked}
    assert stories == {"a1": "a1", "b7": "a1", "c3": "c3", "d4": "d4"}
    assert linked[3].story_bands == () and linked[3].story_minhash is None  # nothing to compare on: its own story
    # The same body under an unrelated headline is scraped boilerplate, not a copy.
    boiler = link_stories([article("a1", "House passes $3 trillion relief bill", WIRE),
                           article("x9", "Sweden looks to break out of its isolation", WIRE)], StoryIndex(), 0.6)
    assert boiler[1].story_id == "x9"
    strict = link_stories([article("a1", "House passes relief bill", WIRE),
                           article("b7", "House passes relief bill", COPY)], StoryIndex(), 0.95)
    assert strict[1].story_id == "b7"  # the threshold is honoured


def test_stories_link_across_restarts_through_elasticsearch(es, es_settings):
    client = connect(es_settings)
    ensure_indices(client, es_settings)
    (first,) = link_stories([article("a1", "House passes $3 trillion relief bill", WIRE)], StoryIndex(), 0.6)
    es.index(index=es_settings.articles_alias, id="a1", refresh=True, document={
        **first.to_document(), "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    fn = LinkStoriesFn(es_settings, DedupeSettings())
    fn.setup()  # a fresh process: nothing in memory
    try:
        (outputs,) = list(fn.handle_batch([article("b7", "House passes $3T relief bill for states", COPY)]))
    finally:
        fn.teardown()
    assert outputs[0].story_id == "a1"
    assert es.count(index=es_settings.articles_alias, query={"term": {"story_id": "a1"}})["count"] == 1


def test_exact_duplicates_are_dropped_in_stream_and_against_the_index(es, es_settings):
    ensure_indices(connect(es_settings), es_settings)
    es.index(index=es_settings.articles_alias, id="indexed-before-restart", refresh=True,
             document={"article_id": "indexed-before-restart", "title": "old"})
    assert indexed_ids(es, es_settings.articles_alias, ["indexed-before-restart", "new"]) == {"indexed-before-restart"}
    articles = [Article(article_id="new", title="first"), Article(article_id="new", title="again"),
                Article(article_id="indexed-before-restart", title="old"), Article(article_id="other", title="x")]
    with TestPipeline() as pipeline:
        unique = pipeline | beam.Create(articles) | DedupeArticles(es_settings)
        assert_that(unique | beam.Map(lambda a: a.article_id), equal_to(["new", "other"]))
