"""The fixture articles (tests/fixtures/articles.json) indexed the way the pipeline indexes them:
served as RSS, parsed by PollFeeds' parser function, cleaned and tagged by the pipeline's Tagger,
bulk-written by the pipeline's BulkWriter into indices made by ensure_indices."""
from __future__ import annotations

import time

from elasticsearch import Elasticsearch

from newsbeam.pipeline.config import Feed, Settings
from newsbeam.transforms.elastic import BulkWriter, ensure_indices
from newsbeam.transforms.fetch import FetchResult
from newsbeam.transforms.parse import safe_read_feed
from newsbeam.transforms.tagging import Tagger
from newsbeam.transforms.topics import Taxonomy
from tests.support.feedserver import fixture_articles, rss

# Two feeds on two hosts, so "top sources" has more than one value.
FEEDS = {"https://news.example.org/world.xml": ["ventilators", "floods", "election"],
         "https://wire.example.net/tech.xml": ["chips", "late"]}


def index_fixture_articles(client: Elasticsearch, settings: Settings, nlp) -> dict[str, str]:
    """Indexes the five fixture articles; returns fixture key -> article_id."""
    ensure_indices(client, settings.elasticsearch)
    fixtures = fixture_articles()
    parsed, keys = [], []
    for url, feed_keys in FEEDS.items():
        result = FetchResult(feed=Feed(url=url), final_url=url, status=200,
                             headers={"content-type": "application/rss+xml"},
                             body=rss([fixtures[key] for key in feed_keys]), fetched_at=time.time(), elapsed=0.0)
        feed = safe_read_feed(result, max_items=100, max_entry_chars=200_000)
        assert feed.problem is None and len(feed.articles) == len(feed_keys)
        parsed.extend(feed.articles)
        keys.extend(feed_keys)
    tagged = Tagger(nlp, Taxonomy.load(settings.topics_file), settings).tag_articles(parsed)
    writer = BulkWriter(client, settings.elasticsearch.articles_alias, "article_id")
    assert [outcome for outcome, _ in writer.write([a.to_document() for a in tagged])] == ["written"] * len(tagged)
    client.indices.refresh(index=settings.elasticsearch.articles_alias)
    return {key: article.article_id for key, article in zip(keys, tagged)}
