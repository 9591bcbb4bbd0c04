"""A restart loses no parsed article: `newsbeam run` killed with SIGKILL while articles it
parsed are still on their way (held back by the per-tick budget or in NLP), then started
again on a feed that did not change meanwhile."""
import os
import signal
import subprocess
import sys
import time

import pytest

from newsbeam.transforms.feedstate import feed_id
from tests.support import REPO
from tests.support.config import write_config
from tests.support.feedserver import rss

pytestmark = pytest.mark.slow  # two `newsbeam run`s over 1,000 items
ITEMS = 1000  # the per-tick budget and NLP take long enough over these that the kill lands mid-way


def indexed(es, es_settings) -> int:
    if not es.indices.exists_alias(name=es_settings.articles_alias):
        return 0
    es.indices.refresh(index=es_settings.articles_alias)
    return es.count(index=es_settings.articles_alias)["count"]


def health_of(es, es_settings, feed: str) -> dict:
    found = es.options(ignore_status=404).get(index=es_settings.feeds_index, id=feed_id(feed))
    return found.get("_source") or {}


def test_kill_9_mid_backlog_and_restart_on_an_unchanged_feed_loses_no_article(tmp_path, es, es_settings,
                                                                             feed_server):
    items = [{"title": f"Grain report {i}", "link": f"https://wire.example.org/grain/{i}",
              "html": f"<p>Farmers near Odesa loaded grain barge number {i} on Monday.</p>"} for i in range(ITEMS)]
    body = rss(items)
    feed = feed_server.serve("/grain.xml", body, headers={"ETag": '"grain-1"'})  # the same bytes every poll
    # Ticks 3 s apart: the per-tick budget hands the parsed items downstream over several ticks.
    config = write_config(tmp_path, es_settings, poll_interval=2, overrides={"fetch": {"scheduler_interval": 3, "max_items_per_feed": 2000}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICSEARCH_")}
    process = subprocess.Popen([sys.executable, "-m", "newsbeam.pipeline.cli", "run", "--config", str(config),
                                "--feed", feed], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Killed once some articles are indexed and the feed's state records the whole body as
        # polled and parsed: the state a restart must not trust blindly.
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None and not (
                indexed(es, es_settings) >= 10 and health_of(es, es_settings, feed).get("items_seen") == ITEMS):
            time.sleep(0.3)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    es.indices.refresh(index=[es_settings.articles_alias, es_settings.feeds_index])
    at_kill = es.count(index=es_settings.articles_alias)["count"]
    assert 10 <= at_kill < ITEMS, f"the kill must land while parsed articles are on their way, had {at_kill}"
    # What the fault needs: the feed's state in the index already records this body as polled and parsed.
    health = health_of(es, es_settings, feed)
    assert health["body_hash"] and health["items_seen"] == ITEMS and health["etag"] == '"grain-1"'

    restarted = subprocess.Popen([sys.executable, "-m", "newsbeam.pipeline.cli", "run", "--config", str(config),
                                  "--feed", feed], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and restarted.poll() is None and indexed(es, es_settings) < ITEMS:
            time.sleep(0.5)
        time.sleep(3)  # a duplicate, were one coming, would be indexed with the rest
    finally:
        restarted.send_signal(signal.SIGTERM)
        _, stderr = restarted.communicate(timeout=120)
    assert restarted.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    total = indexed(es, es_settings)
    unique = es.search(index=es_settings.articles_alias, size=0, aggs={
        "urls": {"cardinality": {"field": "url"}}})["aggregations"]["urls"]["value"]
    assert (total, unique) == (ITEMS, ITEMS), f"killed at {at_kill}/{ITEMS}; after the restart {total}"
    print(f"\nkill -9 at {at_kill}/{ITEMS} indexed; after the restart {total} indexed, 0 duplicates")
