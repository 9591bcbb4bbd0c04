"""Fault injection against the real Elasticsearch: a TCP proxy in front of it refuses
connections for 60 s while the pipeline streams, or holds its answers past the client's
timeout; a node of its own with a tiny indexing pressure limit answers 429; a wrapped real
client refuses some items of each bulk. Each test shows that its fault happened."""
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from elasticsearch import Elasticsearch

from newsbeam.pipeline import local_es
from newsbeam.transforms.article import Article
from tests.support.cli import children_of, start_newsbeam, stop_newsbeam
from tests.support.config import write_config
from tests.support.faultproxy import FaultProxy
from tests.support.feedserver import rss
from tests.support.waiting import wait_until


def items(start: int, count: int) -> list[dict]:
    return [{"title": f"Harbour report {i}", "link": f"https://wire.example.org/harbour/{i}",
             "html": f"<p>Dock workers in Rotterdam unloaded cargo ship number {i} on Tuesday.</p>"}
            for i in range(start, start + count)]


def searchable(es, alias: str) -> set[str]:
    """The URLs of the articles Elasticsearch answers searches with now."""
    if not es.indices.exists_alias(name=alias):
        return set()
    es.indices.refresh(index=alias)
    hits = es.search(index=alias, size=1000, source_includes=["url"], query={"match_all": {}})["hits"]["hits"]
    return {hit["_source"]["url"] for hit in hits}


def links(batch: list[dict]) -> set[str]:
    return {item["link"] for item in batch}


@pytest.mark.slow
def test_elasticsearch_refusing_connections_for_60s_loses_and_doubles_nothing(tmp_path, es, es_settings,
                                                                              feed_server, runner):
    """The outage starts once the run is ready (its first articles are searchable) and lasts
    60 s; articles published meanwhile become searchable after it, each once. The run's log
    shows its writers meeting refused connections and retrying; the proxy, that it cut the
    open connections and was connected to again afterwards."""
    target = urlsplit(es_settings.url)
    proxy = FaultProxy(target.hostname, target.port)
    first, backlog, after = items(0, 5), items(5, 5), items(10, 5)
    served = list(first)
    feed = feed_server.serve("/harbour.xml", lambda: rss(served))
    config = write_config(tmp_path, dataclasses.replace(es_settings, url=proxy.url), poll_interval=5)
    log = tmp_path / "run.log"
    alias = es_settings.articles_alias
    # The articles writer, or (on Prism, whose polling waits for it) the feed health writer.
    prefix = re.escape(alias.rsplit("-", 1)[0])
    waiting = re.compile(rf"Elasticsearch unreachable \(ConnectionError\); \d+ documents for {prefix}-\w+ wait")
    with open(log, "w") as output:
        process = start_newsbeam("run", *runner, "--config", str(config), "--feed", feed, stdout=output,
                                 stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: links(first) <= searchable(es, alias), timeout=300), log.read_text()[-3000:]
        proxy.refuse()
        down = time.monotonic()
        served.extend(backlog)  # published while Elasticsearch is away
        met = wait_until(lambda: waiting.search(log.read_text()), timeout=60)
        assert met, "the run never met the outage:\n" + log.read_text()[-3000:]
        time.sleep(max(0.0, down + 60 - time.monotonic()))  # the outage itself: 60 s from its start
        assert not searchable(es, alias) & links(backlog)
        refused = len(waiting.findall(log.read_text()))
        reconnects = proxy.connections
        proxy.restore()
        up = time.monotonic()
        served.extend(after)
        drained = wait_until(lambda: links(backlog) <= searchable(es, alias), timeout=300)
        recovery = time.monotonic() - up
        assert drained, f"the backlog never became searchable:\n{log.read_text()[-3000:]}"
        assert wait_until(lambda: links(served) <= searchable(es, alias), timeout=300), log.read_text()[-3000:]
    finally:
        try:
            stop_newsbeam(process, timeout=120)
        finally:
            proxy.close()
    assert process.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    # The fault happened: open connections were cut, bulks were refused and retried, and the
    # run connected again once Elasticsearch was back.
    assert proxy.dropped >= 1 and refused >= 2 and proxy.connections > reconnects
    es.indices.refresh(index=[alias, es_settings.deadletter_index])
    urls = [hit["_source"]["url"] for hit in es.search(index=alias, size=100, source_includes=["url"])["hits"]["hits"]]
    assert sorted(urls) == sorted(links(served)), "lost or doubled articles"
    assert es.count(index=es_settings.deadletter_index)["count"] == 0
    print(f"\noutage 60s: {proxy.dropped} connections cut, {refused} refused bulks retried, 15 in, {len(urls)} "
          f"indexed once each; the backlog was searchable {recovery:.0f}s after Elasticsearch came back")


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


def run_index(settings, docs, client_factory=None, writer=None):
    """IndexArticles over `docs` on the test pipeline; its counters. `writer`: other settings
    for the articles writer alone (through a fault proxy, a short request_timeout)."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.test_pipeline import TestPipeline

    from newsbeam.transforms.deadletter import DEAD
    from newsbeam.transforms.elastic import IndexArticles, WriteDeadLetters, connect, ensure_indices

    ensure_indices(connect(settings), settings)
    pipeline = TestPipeline()
    indexed = pipeline | beam.Create(docs) | IndexArticles(writer or settings, client_factory)
    indexed[DEAD] | WriteDeadLetters(settings)
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace("newsbeam"))["counters"]}
    return counters


@pytest.fixture(scope="module")
def pushback_es_node():
    """A second node of its own whose indexing pressure limit is tiny: it answers a whole
    bulk request larger than 64 kB with HTTP 429 (es_rejected_execution_exception), as a
    real cluster does when its indexing memory is exhausted; and one larger than 200 kB
    with HTTP 413 (`http.max_content_length`)."""
    directory = Path(tempfile.mkdtemp(prefix="newsbeam-test-pushback-es-"))
    instance = local_es.start(directory, port=local_es.free_port(),
                              node_settings={"indexing_pressure.memory.limit": "64kb",
                                             "http.max_content_length": "200kb"})
    try:
        yield instance
    finally:
        local_es.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


def coordinating_rejections(instance) -> int:
    stats = instance.request("GET", "/_nodes/stats/indexing_pressure")["nodes"]
    return sum(node["indexing_pressure"]["memory"]["total"]["coordinating_rejections"] for node in stats.values())


def run_index_within(settings, docs, timeout: float, writer=None) -> dict[str, int] | None:
    """run_index in a thread of its own: None if it has not finished within `timeout` (a writer
    that retries for ever must fail the test, not hang it); the pipeline's error, raised here."""
    outcome: dict[str, Any] = {}

    def index() -> None:
        try:
            outcome["counters"] = run_index(settings, docs, writer=writer)
        except Exception as err:  # re-raised in the test's thread
            outcome["error"] = err

    worker = threading.Thread(target=index, daemon=True)
    worker.start()
    worker.join(timeout)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("counters")


@pytest.mark.slow
def test_a_node_answering_429_to_whole_bulk_requests_gets_every_article_in_smaller_requests(pushback_es_node,
                                                                                             es_settings):
    """The whole-request path: the node refuses each 50-article bulk (~2.5 kB each) outright
    (HTTP 429, not per-item statuses); the writer retries, then splits the batch until the node takes it."""
    settings = dataclasses.replace(es_settings, url=pushback_es_node.url)
    node = Elasticsearch(pushback_es_node.url, request_timeout=30)
    docs = [dataclasses.replace(doc, body=f"Dock workers unloaded cargo ship {i}. " * 70)
            for i, doc in enumerate(articles(100))]
    rejected_before = coordinating_rejections(pushback_es_node)
    counters = run_index_within(settings, docs, timeout=240)
    rejections = coordinating_rejections(pushback_es_node) - rejected_before
    assert rejections >= 2, "the node never answered 429: the fault did not happen"
    assert counters is not None, f"the writer was still retrying after 240 s ({rejections} whole-request 429s)"
    node.indices.refresh(index=[settings.articles_alias, settings.deadletter_index])
    assert node.count(index=settings.articles_alias)["count"] == 100
    assert node.count(index=settings.deadletter_index)["count"] == 0
    assert counters["index_written"] == 100 and counters["index_retried"] >= 100
    print(f"\nwhole-request 429s from a real node: {rejections} rejections, {counters['index_retried']} "
          f"documents retried, 100 of 100 indexed")
    node.close()


@pytest.mark.slow
def test_an_article_larger_than_the_node_takes_is_a_dead_letter_and_the_rest_are_indexed(pushback_es_node, es,
                                                                                          es_settings):
    """A bulk larger than the node's http.max_content_length answers 413 as a whole: the batch
    is split until the one article too large on its own is left, which becomes a dead letter
    with the reason; its batch-mates are indexed and the stream goes on. (The dead letters go
    to the shared node: this one's indexing pressure limit is below a dead letter's size.)"""
    from newsbeam.transforms.elastic import connect, ensure_indices

    settings = dataclasses.replace(es_settings, url=pushback_es_node.url)
    ensure_indices(connect(settings), settings)
    node = Elasticsearch(pushback_es_node.url, request_timeout=30)
    docs = [dataclasses.replace(doc, body=f"Dock workers unloaded cargo ship {i}. " * 25)
            for i, doc in enumerate(articles(30))]
    docs[7] = dataclasses.replace(docs[7], body="A very long harbour report. " * 11_000)  # ~300 kB
    counters = run_index_within(es_settings, docs, timeout=240, writer=settings)
    assert counters is not None, "the writer was still retrying after 240 s"
    node.indices.refresh(index=settings.articles_alias)
    es.indices.refresh(index=es_settings.deadletter_index)
    assert node.count(index=settings.articles_alias)["count"] == 29
    [dead] = es.search(index=es_settings.deadletter_index)["hits"]["hits"]
    assert dead["_source"]["article_id"] == "a7" and "413" in dead["_source"]["error"]
    assert counters["index_written"] == 29 and counters["index_failed"] == 1
    node.close()


def test_30_percent_429s_are_retried_and_nothing_is_lost(es, es_settings):
    """Per-item 429s on a third of each bulk whose other items land (the real node above
    refuses whole requests or every item of one): only the refused items are sent again,
    and the retries counted are exactly those."""
    docs = articles(200)
    rejected = {d.article_id for d in docs[::3]}  # 67 of 200
    counters = run_index(es_settings, docs, FlakyClientFactory(rejected, times=2))
    es.indices.refresh(index=[es_settings.articles_alias, es_settings.deadletter_index])
    assert es.count(index=es_settings.articles_alias)["count"] == 200
    assert es.count(index=es_settings.deadletter_index)["count"] == 0
    assert counters["index_written"] == 200
    assert counters["index_retried"] == 2 * len(rejected)  # each rejected item retried twice
    print(f"\n429s: 200 in, 200 indexed, {counters['index_retried']} retries, 0 dead letters")


def test_answers_slower_than_the_request_timeout_are_retried_without_losing_or_doubling(es, es_settings):
    """The proxy holds Elasticsearch's first answers past the client's request_timeout (1 s):
    the bulks were carried out, the client timed out and sent them again; `create` finds
    them there (409), so each article is written once and counted once."""
    target = urlsplit(es_settings.url)
    proxy = FaultProxy(target.hostname, target.port)
    settings = es_settings
    proxy.slow(seconds=3.0, chunks=3)
    try:
        counters = run_index(settings, articles(120), writer=dataclasses.replace(settings, url=proxy.url,
                                                                                 request_timeout=1.0))
    finally:
        proxy.close()
    assert proxy.delayed >= 1 and counters["index_retried"] >= 1, "no answer was held past the timeout"
    es.indices.refresh(index=[settings.articles_alias, settings.deadletter_index])
    hits = es.search(index=settings.articles_alias, size=200, version=True)["hits"]["hits"]
    assert sorted(hit["_id"] for hit in hits) == sorted(f"a{i}" for i in range(120))
    assert {hit["_version"] for hit in hits} == {1}, "an article was written twice"
    assert counters["index_written"] + counters.get("index_already_present", 0) == 120
    assert counters.get("index_already_present", 0) >= 1, "no timed-out bulk was found already written"
    assert es.count(index=settings.deadletter_index)["count"] == 0
    print(f"\nslow Elasticsearch: {proxy.delayed} answers held 3s past a 1s timeout, {counters['index_retried']} "
          f"documents retried, {counters['index_already_present']} found already written, 120 indexed once")


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
    return process, served, feed, config, children_of(process.pid)


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

    def count() -> int:
        es.indices.refresh(index=es_settings.articles_alias)
        return es.count(index=es_settings.articles_alias)["count"]

    log = tmp_path / "restart.log"
    with open(log, "w") as output:
        restart = start_newsbeam("run", *runner, "--config", str(config), "--feed", feed, stdout=output,
                                 stderr=subprocess.STDOUT)
    try:
        caught_up = wait_until(lambda: count() >= 150, timeout=300, every=1.0)
    finally:
        stop_newsbeam(restart, timeout=150)
    assert caught_up, f"the restarted run indexed {count()} of 150:\n{log.read_text()[-3000:]}"
    assert restart.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    total = count()
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
