"""EXTERNAL SUITE: replays the real feeds and the seed article from ../shared through the
pipeline. It needs ../shared beside the repository (CI always has it); without it the
whole module is skipped with one loud reason."""
from __future__ import annotations

import html
import os
import signal
import subprocess

import pytest
from elasticsearch import ApiError

from tests.support import REPO
from tests.support.cli import start_newsbeam
from tests.support.config import write_config
from tests.support.waiting import wait_until

SHARED = REPO.parent / "shared"
if not (SHARED / "corpus").is_dir():
    pytest.skip(f"EXTERNAL SUITE SKIPPED: {SHARED} is missing (it holds the real-feed corpus and the seed "
                "article); CI always provides it", allow_module_level=True)

pytestmark = pytest.mark.external
NEWS_FEEDS = sorted((SHARED / "corpus" / "feeds" / "news").glob("*.xml"))
SEED_URL = "https://seed.example/trump-putin-ventilators"
DEADLINE = 900  # seconds for every feed to be fed: 20-odd real feeds through NLP on 2 shared cores


def seed_feed() -> bytes:
    """The seed article wrapped as one RSS item, the way a publisher's feed would carry it."""
    text = (SHARED / "seed-article.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip() and p.strip() != "Skip to main content"]
    body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    return (
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0" '
        'xmlns:content="http://purl.org/rss/1.0/modules/content/"><channel><title>Seed</title>'
        "<link>https://seed.example/</link><description>seed</description><item>"
        "<title>Trump promises Putin ventilators for Russia</title>"
        "<link>https://seed.example/trump-putin-ventilators</link>"
        "<pubDate>Fri, 08 May 2020 12:00:00 GMT</pubDate>"
        f"<content:encoded>{html.escape(body)}</content:encoded></item></channel></rss>").encode()


def test_real_news_feeds_and_the_seed_article(tmp_path, es, es_settings, feed_server):
    assert len(NEWS_FEEDS) >= 20
    urls = [feed_server.serve(f"/news/{path.name}", path.read_bytes()) for path in NEWS_FEEDS]
    urls.append(feed_server.serve("/seed.xml", seed_feed()))
    config = write_config(tmp_path, es_settings, poll_interval=30)
    feed_args = [arg for url in urls for arg in ("--feed", url)]

    def fed_feeds() -> set[str]:
        try:
            if not es.indices.exists_alias(name=es_settings.articles_alias):
                return set()
            es.indices.refresh(index=es_settings.articles_alias)
            buckets = es.search(index=es_settings.articles_alias, size=0, aggs={
                "feeds": {"terms": {"field": "feed_url", "size": 100}}})["aggregations"]["feeds"]["buckets"]
        except ApiError:  # the index exists a moment before its shard can answer (503)
            return set()
        return {bucket["key"] for bucket in buckets}

    stderr_path = tmp_path / "run.stderr"
    with open(stderr_path, "w") as stderr:
        run = start_newsbeam("run", "--config", str(config), *feed_args, stdout=subprocess.DEVNULL, stderr=stderr,
                             start_new_session=True)
    try:
        # Every real news feed and the seed feed yield articles, however long NLP takes here.
        wait_until(lambda: run.poll() is None and fed_feeds() == set(urls)
                   and es.count(index=es_settings.articles_alias)["count"] >= 500, DEADLINE,
                   "500 articles, from every feed, while the run is running")
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 128 + signal.SIGTERM, stderr_path.read_text()[-3000:]
    es.indices.refresh(index=[es_settings.articles_alias, es_settings.deadletter_index])

    seed = es.search(index=es_settings.articles_alias, query={"term": {"url": SEED_URL}})["hits"]["hits"]
    assert len(seed) == 1
    doc = seed[0]["_source"]
    assert {"Donald Trump", "Vladimir Putin"} <= set(doc["persons"])
    assert "Russia" in doc["locations"]
    assert "medical equipment aid" in doc["topics"]

    # None of the real feeds is dead-lettered.
    dead = es.search(index=es_settings.deadletter_index, size=20)["hits"]
    assert dead["total"]["value"] == 0, [d["_source"]["error"] for d in dead["hits"]]
    total = es.count(index=es_settings.articles_alias)["count"]
    assert total >= 500
    ids = es.search(index=es_settings.articles_alias, size=0,
                    aggs={"ids": {"cardinality": {"field": "article_id"}}})["aggregations"]["ids"]["value"]
    assert ids == total  # no duplicates
    print(f"\nexternal replay: {len(urls)} feeds -> {total} articles indexed")
