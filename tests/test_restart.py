"""A restart loses no parsed article: `newsbeam run` killed with SIGKILL while articles it
parsed are still on their way (held back by the per-tick budget or in NLP), then started
again on a feed that did not change meanwhile."""
import os
import signal
import subprocess
import sys
import time

from newsbeam.transforms.feedstate import feed_id
from tests.support import REPO
from tests.support.cli import newsbeam
from tests.support.config import write_config
from tests.support.feedserver import rss

ITEMS = 150


def test_kill_9_mid_backlog_and_restart_on_an_unchanged_feed_loses_no_article(tmp_path, es, es_settings,
                                                                             feed_server):
    items = [{"title": f"Grain report {i}", "link": f"https://wire.example.org/grain/{i}",
              "html": f"<p>Farmers near Odesa loaded grain barge number {i} on Monday.</p>"} for i in range(ITEMS)]
    body = rss(items)
    feed = feed_server.serve("/grain.xml", body, headers={"ETag": '"grain-1"'})  # the same bytes every poll
    config = write_config(tmp_path, es_settings, poll_interval=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICSEARCH_")}
    process = subprocess.Popen([sys.executable, "-m", "newsbeam.pipeline.cli", "run", "--config", str(config),
                                "--feed", feed], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, count = time.time() + 300, 0
        while time.time() < deadline and count < 10 and process.poll() is None:
            time.sleep(0.3)
            if es.indices.exists_alias(name=es_settings.articles_alias):
                es.indices.refresh(index=es_settings.articles_alias)
                count = es.count(index=es_settings.articles_alias)["count"]
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    es.indices.refresh(index=[es_settings.articles_alias, es_settings.feeds_index])
    at_kill = es.count(index=es_settings.articles_alias)["count"]
    assert 10 <= at_kill < ITEMS, f"the kill must land while parsed articles are on their way, had {at_kill}"
    # What the fault needs: the feed's state in the index already records this body as polled and parsed.
    health = es.get(index=es_settings.feeds_index, id=feed_id(feed))["_source"]
    assert health["body_hash"] and health["items_seen"] == ITEMS and health["etag"] == '"grain-1"'

    run = newsbeam("run", "--config", str(config), "--feed", feed, "--duration", "25", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    es.indices.refresh(index=es_settings.articles_alias)
    total = es.count(index=es_settings.articles_alias)["count"]
    unique = es.search(index=es_settings.articles_alias, size=0, aggs={
        "urls": {"cardinality": {"field": "url"}}})["aggregations"]["urls"]["value"]
    assert (total, unique) == (ITEMS, ITEMS), f"killed at {at_kill}/{ITEMS}; after the restart {total}"
    print(f"\nkill -9 at {at_kill}/{ITEMS} indexed; after the restart {total} indexed, 0 duplicates")
