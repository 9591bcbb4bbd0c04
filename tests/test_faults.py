"""Fault injection against the real Elasticsearch: a TCP proxy in front of it refuses
connections for 60 s while the pipeline streams. Counts are asserted exactly."""
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from newsbeam.transforms import clock
from newsbeam.transforms.article import Article
from tests.support.cli import newsbeam, start_newsbeam
from tests.support.config import write_config
from tests.support.faultproxy import FaultProxy
from tests.support.feedserver import rss


def items(start: int, count: int) -> list[dict]:
    return [{"title": f"Harbour report {i}", "link": f"https://wire.example.org/harbour/{i}",
             "html": f"<p>Dock workers in Rotterdam unloaded cargo ship number {i} on Tuesday.</p>"}
            for i in range(start, start + count)]


@pytest.mark.slow
def test_elasticsearch_refusing_connections_for_60s_loses_and_doubles_nothing(tmp_path, es, es_settings,
                                                                              feed_server, runner):
    target = urlsplit(es_settings.url)
    proxy = FaultProxy(target.hostname, target.port)
    served = items(0, 5)
    feed = feed_server.serve("/harbour.xml", lambda: rss(served))
    config = write_config(tmp_path, es_settings.__class__(**{**es_settings.__dict__, "url": proxy.url}),
                          poll_interval=5)
    timeline: dict[str, float] = {}

    def outage():
        time.sleep(20)
        proxy.refuse()
        timeline["down"] = time.time()
        time.sleep(10)
        served.extend(items(5, 5))  # published while Elasticsearch is away
        time.sleep(50)
        proxy.restore()
        timeline["up"] = time.time()
        time.sleep(5)
        served.extend(items(10, 5))

    threading.Thread(target=outage, daemon=True).start()
    run = newsbeam("run", *runner, "--config", str(config), "--feed", feed, "--duration", "110", timeout=600)
    proxy.close()
    assert run.returncode == 0, run.stderr[-3000:]
    assert timeline["up"] - timeline["down"] >= 59

    es.indices.refresh(index=es_settings.articles_alias)
    hits = es.search(index=es_settings.articles_alias, size=100,
                     source_includes=["url", "indexed_at"])["hits"]["hits"]
    urls = [h["_source"]["url"] for h in hits]
    assert len(urls) == 15, "lost articles"
    assert len(set(urls)) == 15, "duplicates"
    assert es.count(index=es_settings.deadletter_index)["count"] == 0
    # The backlog from the outage drained within 2 minutes of recovery.
    backlog = [h for h in hits if h["_source"]["url"].rsplit("/", 1)[1] in {str(i) for i in range(5, 10)}]
    last = max(clock.epoch(h["_source"]["indexed_at"]) for h in backlog)
    assert last - timeline["up"] <= 120
    print(f"\noutage 60s: 15 in, {len(urls)} indexed, 0 duplicates, backlog drained "
          f"{last - timeline['up']:.0f}s after recovery")


class FailingBulkClient:
    """Wraps a real client: items whose id is in `reject_ids` answer 429 for the first
    `times` attempts (they are not sent); every other item goes to the real server."""

    def __init__(self, client, reject_ids: set[str], times: int):
        self._client = client
        self._reject = reject_ids
        self._times = times
        self._attempts: dict[str, int] = {}

    def bulk(self, operations):
        pairs = list(zip(operations[::2], operations[1::2]))
        sent, items = [], []
        for action, source in pairs:
            (op, meta), = action.items()
            self._attempts[meta["_id"]] = self._attempts.get(meta["_id"], 0) + 1
            if meta["_id"] in self._reject and self._attempts[meta["_id"]] <= self._times:
                items.append({op: {"_id": meta["_id"], "status": 429,
                                   "error": {"type": "es_rejected_execution_exception", "reason": "injected"}}})
            else:
                items.append(None)
                sent += [action, source]
        real = iter(self._client.bulk(operations=sent)["items"]) if sent else iter(())
        return {"errors": True, "items": [item or next(real) for item in items]}

    def close(self):
        self._client.close()


class FlakyClientFactory:
    def __init__(self, reject_ids: set[str], times: int):
        self.reject_ids = reject_ids
        self.times = times

    def __call__(self, settings):
        from newsbeam.transforms.elastic import connect
        return FailingBulkClient(connect(settings, check=False), self.reject_ids, self.times)


def articles(n: int, bad: set[int] = frozenset()) -> list[Article]:
    return [Article(article_id=f"a{i}", url=f"https://wire.example.org/{i}", title=f"story {i}",
                    published_at="not a date" if i in bad else "2020-05-21T14:05:00Z") for i in range(n)]


def run_index(settings, docs, client_factory=None):
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.test_pipeline import TestPipeline

    from newsbeam.transforms.deadletter import DEAD
    from newsbeam.transforms.elastic import IndexArticles, WriteDeadLetters, connect, ensure_indices

    ensure_indices(connect(settings), settings)
    pipeline = TestPipeline()
    indexed = pipeline | beam.Create(docs) | IndexArticles(settings, client_factory)
    indexed[DEAD] | WriteDeadLetters(settings)
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace("newsbeam"))["counters"]}
    return counters


def test_30_percent_429s_are_retried_and_nothing_is_lost(es, es_settings):
    docs = articles(200)
    rejected = {d.article_id for d in docs[::3]}  # 67 of 200
    counters = run_index(es_settings, docs, FlakyClientFactory(rejected, times=2))
    es.indices.refresh(index=[es_settings.articles_alias, es_settings.deadletter_index])
    assert es.count(index=es_settings.articles_alias)["count"] == 200
    assert es.count(index=es_settings.deadletter_index)["count"] == 0
    assert counters["index_written"] == 200
    assert counters["index_retried"] == 2 * len(rejected)  # each rejected item retried twice
    print(f"\n429s: 200 in, 200 indexed, {counters['index_retried']} retries, 0 dead letters")


def test_k_mapping_errors_give_exactly_k_dead_letters(es, es_settings):
    bad = {3, 50, 51, 99}
    counters = run_index(es_settings, articles(120, bad))
    es.indices.refresh(index=[es_settings.articles_alias, es_settings.deadletter_index])
    assert es.count(index=es_settings.articles_alias)["count"] == 120 - len(bad)
    dead = es.search(index=es_settings.deadletter_index, size=20)["hits"]["hits"]
    assert sorted(d["_source"]["article_id"] for d in dead) == sorted(f"a{i}" for i in bad)
    assert all(d["_source"]["stage"] == "index" and "published_at" in d["_source"]["error"] for d in dead)
    assert counters["index_failed"] == len(bad)


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def busy_run(tmp_path, es, es_settings, feed_server, runner, **popen):
    """`newsbeam run` on a feed that grows by 15 items every 2 s up to 150, returned once 20
    articles are indexed (so whatever stops it lands mid-run), with the feed's items, its URL,
    the config and the PIDs of the run's child processes."""
    served = items(0, 15)
    feed = feed_server.serve("/harbour.xml", lambda: rss(served))
    config = write_config(tmp_path, es_settings, poll_interval=2)

    def publish():
        while len(served) < 150:
            time.sleep(2)
            served.extend(items(len(served), 15))

    threading.Thread(target=publish, daemon=True).start()
    process = start_newsbeam("run", *runner, "--config", str(config), "--feed", feed, stdout=subprocess.DEVNULL,
                             **popen)
    deadline = time.time() + 300
    count = 0
    while time.time() < deadline and count < 20 and process.poll() is None:
        time.sleep(0.5)
        if es.indices.exists_alias(name=es_settings.articles_alias):
            es.indices.refresh(index=es_settings.articles_alias)
            count = es.count(index=es_settings.articles_alias)["count"]
    children = [int(pid) for task in Path(f"/proc/{process.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return process, served, feed, config, children


def assert_exited(children: list[int]) -> None:
    deadline = time.time() + 30
    while time.time() < deadline and any(map(running, children)):
        time.sleep(0.2)
    assert not [pid for pid in children if running(pid)], "worker processes outlived the pipeline"


@pytest.mark.slow
def test_kill_9_and_restart_leaves_every_article_exactly_once(tmp_path, es, es_settings, feed_server, runner):
    process, served, feed, config, children = busy_run(tmp_path, es, es_settings, feed_server, runner,
                                                       stderr=subprocess.DEVNULL)
    assert children, "the pipeline runs feedparser in worker processes"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert_exited(children)
    es.indices.refresh(index=es_settings.articles_alias)
    at_kill = es.count(index=es_settings.articles_alias)["count"]
    assert 20 <= at_kill < 150, f"kill must land mid-run, had {at_kill}"
    while len(served) < 150:  # the restarted pipeline sees the whole feed
        time.sleep(0.5)

    run = newsbeam("run", *runner, "--config", str(config), "--feed", feed, "--duration", "15", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    es.indices.refresh(index=es_settings.articles_alias)
    total = es.count(index=es_settings.articles_alias)["count"]
    unique = es.search(index=es_settings.articles_alias, size=0, aggs={
        "urls": {"cardinality": {"field": "url"}}})["aggregations"]["urls"]["value"]
    assert total == 150 and unique == 150
    print(f"\nkill -9 at {at_kill}/150 indexed; after restart 150 indexed, 0 duplicates")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_run_and_its_worker_processes(how, tmp_path, es, es_settings, feed_server,
                                                                   runner):
    """A terminal's Ctrl-C reaches the whole process group, workers included; SIGTERM (`kill PID`,
    docker stop) reaches the pipeline process alone."""
    process, _, _, _, children = busy_run(
        tmp_path, es, es_settings, feed_server, runner, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # Ctrl-C handled as in a terminal, however the suite was started (a background job ignores it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        es.indices.refresh(index=es_settings.articles_alias)
        assert es.count(index=es_settings.articles_alias)["count"] >= 20 and children
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.kill(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    code, message = {"ctrl-c": (130, "interrupted"), "sigterm": (143, "stopped by SIGTERM")}[how]
    assert process.returncode == code, stderr[-3000:]
    assert f"{message}; articles already handed to Elasticsearch are kept" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert_exited(children)
