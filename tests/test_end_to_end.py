"""`newsbeam run` as a user runs it: a subprocess polling a feed server on loopback,
streaming into the real Elasticsearch, then `newsbeam search`."""
import json
import threading
import time

import pytest
from elasticsearch import ApiError

from newsbeam.transforms import clock
from tests.support.cli import newsbeam
from tests.support.config import write_config
from tests.support.feedserver import fixture_articles, rss

pytestmark = pytest.mark.slow  # `newsbeam run` for tens of seconds per test


def test_run_indexes_feed_items_once_and_picks_up_new_ones(tmp_path, es, es_settings, feed_server, runner):
    fixtures = fixture_articles()
    items = [fixtures["ventilators"], fixtures["floods"], fixtures["election"]]
    feed = feed_server.serve("/world.xml", lambda: rss(items))
    duplicate_feed = feed_server.serve("/mirror.xml", rss([fixtures["ventilators"]], title="Mirror"))
    broken_feed = feed_server.serve("/broken.xml", b"<html>this is not a feed</html>")
    config = write_config(tmp_path, es_settings, poll_interval=4)

    def add_item_later():
        time.sleep(14)
        items.append(fixtures["late"])
        added_at.append(time.time())

    def watch_dead_letters():
        while not finished:
            try:
                if es.indices.exists(index=es_settings.deadletter_index) and \
                        es.count(index=es_settings.deadletter_index)["count"]:
                    dead_seen.append(time.time())
                    return
            except ApiError:  # the index exists a moment before its shard can answer (503)
                pass
            time.sleep(1)

    added_at: list[float] = []
    dead_seen: list[float] = []
    finished: list[bool] = []
    threading.Thread(target=add_item_later, daemon=True).start()
    threading.Thread(target=watch_dead_letters, daemon=True).start()
    run = newsbeam("run", *runner, "--config", str(config), "--feed", feed, "--feed", duplicate_feed,
                   "--feed", broken_feed, "--duration", "32")
    finished.append(True)
    ended = time.time()
    assert run.returncode == 0, run.stderr[-3000:]
    # Dead letters are searchable while the stream runs, not only when it stops.
    assert dead_seen and dead_seen[0] < ended - 10
    assert f"runner: {runner[1]}" in run.stderr
    assert feed_server.hits["/world.xml"] >= 5  # polled repeatedly, not once

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
    # The item that appeared mid-run was searchable within one poll interval (+ processing).
    indexed_at = clock.epoch(late["indexed_at"])
    assert indexed_at - added_at[0] <= 4 + 6

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
