"""Feed health end to end: `newsbeam run` against misbehaving endpoints on loopback, health
documents in the real Elasticsearch, `newsbeam feeds status`, a dead feed that comes back by
itself, and validators that survive a restart. The test waits for each state it needs (deadlines
generous for a loaded machine) and stops each run with SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest
import yaml

from newsbeam.pipeline.feeds_cli import append_feeds, format_table, read_opml, status_rows
from newsbeam.transforms import clock
from newsbeam.transforms.elastic import connect, ensure_indices
from newsbeam.transforms.feedstate import feed_id
from tests.support.cli import newsbeam, start_newsbeam
from tests.support.config import write_config
from tests.support.feedserver import rss
from tests.support.hostileserver import HostileServer, conditional, gzip_bomb, redirect, respond, stall
from tests.support.waiting import wait_until
from tests.test_ingest_guards import BILLION_LAUGHS

DEADLINE = 240  # seconds for each awaited state: start-up, NLP and Elasticsearch on 2 shared cores
# A dead feed is retried DEAD_RETRY seconds after its second failure: long past the moment the test
# reads its health (so exactly two requests however slow the machine), short enough to see it recover.
DEAD_RETRY = 20
FETCH = {"connect_timeout": 1, "read_timeout": 1, "total_timeout": 2, "scheduler_interval": 1, "dead_after": 2,
         "dead_retry_interval": DEAD_RETRY, "per_host_delay": 0.01, "per_host_concurrency": 8}
ITEMS = [{"title": "Quake hits the coast", "link": "https://news.example.org/quake", "html": "<p>Shaking.</p>"}]


class Run:
    """`newsbeam run` on `feeds` in the background until `stop()` (SIGTERM)."""

    def __init__(self, config, feeds: list[str], log):
        self.log = log
        with open(log, "w") as stderr:
            self.process = start_newsbeam("run", "--config", str(config), *[a for f in feeds for a in ("--feed", f)],
                                          stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)

    def until(self, condition, what: str):
        return wait_until(lambda: self.process.poll() is None and condition(), DEADLINE, f"{what} (run alive)")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=DEADLINE)
            finally:
                if self.process.poll() is None:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
        assert self.process.returncode == 128 + signal.SIGTERM, self.log.read_text()[-3000:]


def health_docs(es, index: str) -> dict[str, dict]:
    if not es.indices.exists(index=index):
        return {}
    es.indices.refresh(index=index)
    return {hit["_source"]["feed_url"]: hit["_source"] for hit in es.search(index=index, size=50)["hits"]["hits"]}


@pytest.mark.slow
def test_misbehaving_feeds_show_up_in_health_and_dead_letters_and_recover(es, es_settings, tmp_path):
    config = write_config(tmp_path, es_settings, poll_interval=1, overrides={"fetch": FETCH})
    with HostileServer() as server:
        good = server.route("/good.xml", conditional(rss(ITEMS), '"e1"'))
        endpoints = {
            "missing": (server.route("/missing.xml", respond(404, b"gone")), "http_4xx"),
            "html": (server.route("/page.html", respond(200, b"<html><p>hi</p></html>", {"Content-Type": "text/html"})),
                     "parse"),
            "laughs": (server.route("/laughs.xml", respond(200, BILLION_LAUGHS)), "entity_declaration"),
            "loop": (server.route("/loop.xml", redirect("/loop.xml")), "redirects"),
            "bomb": (server.route("/bomb.xml", respond(200, gzip_bomb(64 << 20), {"Content-Encoding": "gzip"})),
                     "too_large"),
            "stall": (server.route("/stall.xml", stall(30)), "timeout"),
        }
        missing = endpoints["missing"][0]
        feeds = [good] + [url for url, _ in endpoints.values()]
        run = Run(config, feeds, tmp_path / "first.stderr")
        try:
            def every_feed_reported():
                docs = health_docs(es, es_settings.feeds_index)
                done = (set(docs) == set(feeds) and docs[good]["http_status"] == 304 and docs[missing]["dead"]
                        and all(docs[url]["error_class"] for url, _ in endpoints.values()))
                return docs if done else None

            docs = run.until(every_feed_reported, "a health document for every feed, the good one re-polled, "
                                                  "the missing one dead")
            assert server.hits("/missing.xml") == 2  # backed off, then dead: no third request yet
            assert docs[missing]["consecutive_failures"] == 2
            # ... and its next try is scheduled a dead feed's retry interval after its last one.
            retry_in = clock.epoch(docs[missing]["next_poll"]) - clock.epoch(docs[missing]["last_attempt"])
            assert abs(retry_in - DEAD_RETRY) < 1, retry_in
            assert docs[good]["error_class"] is None and docs[good]["items_seen"] == 1
            assert docs[good]["etag"] == '"e1"'  # re-polled with its validator, not re-parsed
            assert es.get(index=es_settings.feeds_index, id=feed_id(good))["_source"]["feed_url"] == good
            for url, error_class in endpoints.values():
                assert docs[url]["error_class"] == error_class, (url, docs[url])
                assert docs[url]["consecutive_failures"] >= 1 and docs[url]["last_success"] is None

            def dead_letters():
                es.indices.refresh(index=es_settings.deadletter_index)
                found = {(hit["_source"]["feed_url"], hit["_source"]["reason"]) for hit in
                         es.search(index=es_settings.deadletter_index, size=100)["hits"]["hits"]}
                wanted = {(url, "unparseable_feed" if kind == "parse" else kind) for url, kind in endpoints.values()}
                return wanted <= found

            run.until(dead_letters, "a dead letter with its reason for every misbehaving feed")
            run.until(lambda: es.indices.exists_alias(name=es_settings.articles_alias) and
                      es.count(index=es_settings.articles_alias)["count"] == 1, "the good feed's item indexed")

            table = format_table(status_rows(es, es_settings.feeds_index))
            lines = table.splitlines()
            assert lines[0].split()[:3] == ["STATE", "FAILS", "HTTP"]
            states = [line.split()[0] for line in lines[1:]]
            assert states == sorted(states, key=lambda state: state != "DEAD")  # the worst first
            assert any(line.startswith("DEAD") and missing in line for line in lines)
            assert lines[-1].startswith("ok") and good in lines[-1]

            # The dead feed comes back by itself, on its dead-feed retry.
            server.routes["/missing.xml"] = respond(200, rss(ITEMS), {"Content-Type": "application/rss+xml"})
            recovered = run.until(lambda: (lambda doc: doc if doc and not doc["dead"] else None)(
                health_docs(es, es_settings.feeds_index).get(missing)), "the dead feed recovered")
            assert recovered["consecutive_failures"] == 0 and recovered["http_status"] == 200
        finally:
            run.stop()

        # After a restart the good feed is fetched whole once (what the last run parsed may not
        # have got downstream), then conditionally with its stored ETag.
        requests_before = len(server.requests)

        def good_requests():
            return [headers for path, headers in server.requests[requests_before:] if path == "/good.xml"]

        restarted = Run(config, [good], tmp_path / "second.stderr")
        try:
            restarted.until(lambda: len(good_requests()) >= 2, "two polls of the good feed after the restart")
        finally:
            restarted.stop()
        first, second = good_requests()[:2]
        assert first.get("If-None-Match") is None and second.get("If-None-Match") == '"e1"'


def test_feeds_status_command(es, es_settings, tmp_path):
    ensure_indices(connect(es_settings), es_settings)
    es.index(index=es_settings.feeds_index, id=feed_id("https://a.example/rss"), refresh=True, document={
        "feed_id": feed_id("https://a.example/rss"), "feed_url": "https://a.example/rss", "dead": True,
        "error_class": "dns", "error": "cannot resolve a.example", "consecutive_failures": 12, "items_seen": 0})
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"elasticsearch": {"url": es_settings.url,
                                                        "feeds_index": es_settings.feeds_index}}))
    result = newsbeam("feeds", "status", "--config", str(config), timeout=120, clean=False)
    assert result.returncode == 0, result.stderr
    assert "DEAD" in result.stdout and "https://a.example/rss" in result.stdout and "cannot resolve" in result.stdout
    assert "1 feed(s): 1 failing, 1 dead" in result.stderr


def test_opml_import_appends_new_feeds_and_keeps_the_file(tmp_path):
    opml = tmp_path / "list.opml"
    opml.write_text("""<?xml version="1.0"?><opml version="1.0"><head><title>News & more</title></head><body>
<outline text="World"><outline text="BBC World" xmlUrl="https://feeds.bbci.co.uk/news/world/rss.xml"/>
<outline text="Q & A" title="Q & A" xmlUrl="https://qa.example/feed?x=1&y=2"/></outline>
<outline text="not a feed"/><outline text="gopher" xmlUrl="gopher://old.example/"/></body></opml>""")
    feeds = read_opml(opml)
    assert [(f.url, f.name) for f in feeds] == [("https://feeds.bbci.co.uk/news/world/rss.xml", "BBC World"),
                                                ("https://qa.example/feed?x=1&y=2", "Q & A")]
    feeds_file = tmp_path / "feeds.yaml"
    feeds_file.write_text("# my feeds\nfeeds:\n  - url: https://feeds.bbci.co.uk/news/world/rss.xml\n")
    added = append_feeds(feeds_file, feeds)
    assert [f.url for f in added] == ["https://qa.example/feed?x=1&y=2"]
    assert feeds_file.read_text().startswith("# my feeds\n")
    assert append_feeds(feeds_file, feeds) == []  # idempotent
    result = newsbeam("feeds", "import", str(opml), "--feeds-file", str(tmp_path / "new.yaml"), timeout=120,
                      clean=False)
    assert result.returncode == 0 and "2 added" in result.stderr
    assert len(yaml.safe_load((tmp_path / "new.yaml").read_text())["feeds"]) == 2
    laughs = tmp_path / "laughs.opml"
    laughs.write_bytes(BILLION_LAUGHS)
    result = newsbeam("feeds", "import", str(laughs), "--feeds-file", str(feeds_file), timeout=120, clean=False)
    assert result.returncode == 2 and "declares XML entities" in result.stderr


