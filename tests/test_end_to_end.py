"""`newsbeam run` as a user runs it: a subprocess polling a feed server on loopback,
streaming into the real Elasticsearch, then `newsbeam search`. The test waits for each state it
needs (with deadlines generous for a loaded machine) and then stops the run with SIGTERM."""
import json
import os
import signal
import subprocess

import pytest
from elasticsearch import ApiError

from tests.support.cli import newsbeam, start_newsbeam
from tests.support.config import write_config
from tests.support.feedserver import fixture_articles, rss
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # `newsbeam run` for tens of seconds per test
DEADLINE = 240  # seconds for each awaited state: start-up, NLP and Elasticsearch on 2 shared cores


def count(es, index: str) -> int:
    try:
        if not es.indices.exists(index=index):
            return 0
        return es.count(index=index)["count"]
    except ApiError:  # the index exists a moment before its shard can answer (503)
        return 0


def indexed_titles(es, alias: str) -> list[str]:
    if not es.indices.exists_alias(name=alias):
        return []
    es.indices.refresh(index=alias)
    return sorted(hit["_source"]["title"] for hit in es.search(index=alias, size=50)["hits"]["hits"])


def test_run_indexes_feed_items_once_and_picks_up_new_ones(tmp_path, es, es_settings, feed_server, runner):
    fixtures = fixture_articles()
    items = [fixtures["ventilators"], fixtures["floods"], fixtures["election"]]
    feed = feed_server.serve("/world.xml", lambda: rss(items))
    duplicate_feed = feed_server.serve("/mirror.xml", rss([fixtures["ventilators"]], title="Mirror"))
    broken_feed = feed_server.serve("/broken.xml", b"<html>this is not a feed</html>")
    config = write_config(tmp_path, es_settings, poll_interval=2)
    stderr_path = tmp_path / "run.stderr"
    with open(stderr_path, "w") as stderr:
        run = start_newsbeam("run", *runner, "--config", str(config), "--feed", feed, "--feed", duplicate_feed,
                             "--feed", broken_feed, stdout=subprocess.DEVNULL, stderr=stderr,
                             start_new_session=True)
    try:
        def running(condition):
            return lambda: run.poll() is None and condition()

        # Dead letters are searchable while the stream runs, not only when it stops.
        wait_until(running(lambda: count(es, es_settings.deadletter_index)), DEADLINE,
                   "a dead letter for the broken feed while the run is running")
        first = sorted(item["title"] for item in items)
        wait_until(running(lambda: indexed_titles(es, es_settings.articles_alias) == first), DEADLINE,
                   "the feed's three items indexed")
        polls_before = feed_server.hits["/world.xml"]
        items.append(fixtures["late"])
        # An item that appears mid-run is picked up by a later poll of the same run.
        wait_until(running(lambda: fixtures["late"]["title"] in indexed_titles(es, es_settings.articles_alias)),
                   DEADLINE, "the item added mid-run indexed while the run is running")
        assert feed_server.hits["/world.xml"] > polls_before
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=DEADLINE)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    log = stderr_path.read_text()
    assert run.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "stopped by SIGTERM" in log and f"runner: {runner[1]}" in log

    es.indices.refresh(index=[es_settings.articles_alias, es_settings.deadletter_index])
    hits = es.search(index=es_settings.articles_alias, size=50)["hits"]["hits"]
    titles = sorted(h["_source"]["title"] for h in hits)
    assert titles == sorted(f["title"] for f in (*items,)), "each item exactly once"
    docs = {h["_source"]["title"]: h["_source"] for h in hits}
    story = docs[fixtures["ventilators"]["title"]]
    assert {"Donald Trump", "Vladimir Putin"} <= set(story["persons"])
    assert "Russia" in story["locations"]
    assert "medical equipment aid" in story["topics"]
    assert story["body"].startswith("President Donald Trump told")
    assert "trackReader" not in story["body"]
    assert story["url"] == fixtures["ventilators"]["link"]
    for field in ("fetched_at", "indexed_at", "published_at", "feed_url", "source", "article_id"):
        assert story[field], field
    late = docs[fixtures["late"]["title"]]
    assert "medical equipment aid" in late["topics"]

    dead = es.search(index=es_settings.deadletter_index)["hits"]["hits"]
    assert {(d["_source"]["stage"], d["_source"]["feed_url"]) for d in dead} == {("parse", broken_feed)}

    search = newsbeam("search", "ventilators", "--config", str(config))
    assert search.returncode == 0, search.stderr
    assert "*ventilators*" in search.stdout  # highlighted (plain-text emphasis off a terminal)
    assert "medical equipment aid" in search.stdout
    found = json.loads(newsbeam("search", "ventilators", "--json", "--config", str(config)).stdout)
    assert [a["title"] for a in found["articles"]] == [fixtures["ventilators"]["title"]]
    by_entity = newsbeam("search", "--entity", "vladimir putin", "--config", str(config))
    assert fixtures["ventilators"]["title"] in by_entity.stdout
    assert fixtures["floods"]["title"] not in by_entity.stdout
    by_topic = newsbeam("search", "--topic", "natural disasters", "--config", str(config))
    assert fixtures["floods"]["title"] in by_topic.stdout and "1 of 1" in by_topic.stderr
