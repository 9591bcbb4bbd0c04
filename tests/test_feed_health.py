"""Feed health end to end: PollFeeds in a streaming pipeline against misbehaving endpoints
on loopback, health documents in the real Elasticsearch, `newsbeam feeds status`, a dead
feed that comes back by itself, and validators that survive a restart."""
from __future__ import annotations

import apache_beam as beam
import pytest
import yaml
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from newsbeam.pipeline.config import Feed, FetchSettings
from newsbeam.pipeline.feeds_cli import append_feeds, format_table, read_opml, status_rows
from newsbeam.transforms.deadletter import DEAD
from newsbeam.transforms.elastic import IndexArticles, WriteDeadLetters, WriteFeedHealth, connect, ensure_indices
from newsbeam.transforms.feedstate import feed_id
from newsbeam.transforms.poll import PollFeeds
from tests.support.cli import newsbeam
from tests.support.feedserver import rss
from tests.support.hostileserver import HostileServer, conditional, gzip_bomb, redirect, respond, stall
from tests.test_ingest_guards import BILLION_LAUGHS

# The verdicts follow from these settings, not from how fast the machine is: a run stops
# ticking FIRST_RUN seconds after it starts and a feed dies no earlier than its start, so with
# DEAD_RETRY longer than FIRST_RUN the first run cannot retry the dead feed (exactly two requests
# however slow the machine), and the second run, longer than DEAD_RETRY, always gets to it.
FIRST_RUN, DEAD_RETRY, SECOND_RUN = 10, 12, 20
FETCH = FetchSettings(allow_private_addresses=True, connect_timeout=1, read_timeout=1, total_timeout=2,
                      scheduler_interval=1, dead_after=2, dead_retry_interval=DEAD_RETRY, per_host_delay=0.01,
                      per_host_concurrency=8)
ITEMS = [{"title": "Quake hits the coast", "link": "https://news.example.org/quake", "html": "<p>Shaking.</p>"}]


def run_polling(feeds, es_settings, seconds: float) -> None:
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as pipeline:
        polled = pipeline | PollFeeds(tuple(feeds), 1.0, FETCH, es_settings, duration=seconds, shards=2)
        polled.health | WriteFeedHealth(es_settings)
        polled.articles | IndexArticles(es_settings)
        polled[DEAD] | WriteDeadLetters(es_settings)


@pytest.mark.slow
def test_misbehaving_feeds_show_up_in_health_and_dead_letters_and_recover(es, es_settings, tmp_path):
    ensure_indices(connect(es_settings), es_settings)
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
        feeds = [Feed(url=good, name="Good")] + [Feed(url=url) for url, _ in endpoints.values()]
        run_polling(feeds, es_settings, seconds=FIRST_RUN)
        es.indices.refresh(index=[es_settings.feeds_index, es_settings.deadletter_index, es_settings.articles_alias])

        docs = {hit["_source"]["feed_url"]: hit["_source"] for hit in
                es.search(index=es_settings.feeds_index, size=50)["hits"]["hits"]}
        assert set(docs) == {feed.url for feed in feeds}
        assert docs[good]["error_class"] is None and docs[good]["items_seen"] == 1
        assert docs[good]["etag"] == '"e1"' and docs[good]["http_status"] == 304  # re-polled, not re-parsed
        assert es.get(index=es_settings.feeds_index, id=feed_id(good))["_source"]["feed_url"] == good
        for url, error_class in endpoints.values():
            assert docs[url]["error_class"] == error_class, (url, docs[url])
            assert docs[url]["consecutive_failures"] >= 1 and docs[url]["last_success"] is None
        missing = endpoints["missing"][0]
        assert docs[missing]["dead"] and docs[missing]["consecutive_failures"] == 2
        assert server.hits("/good.xml") >= 2 and server.hits("/missing.xml") == 2  # backed off, then dead
        dead_letters = {(hit["_source"]["feed_url"], hit["_source"]["stage"], hit["_source"]["reason"]) for hit in
                        es.search(index=es_settings.deadletter_index, size=100)["hits"]["hits"]}
        for url, error_class in endpoints.values():
            reason = "unparseable_feed" if error_class == "parse" else error_class
            assert any(u == url and r == reason for u, _, r in dead_letters), (url, reason)
        assert es.count(index=es_settings.articles_alias)["count"] == 1

        table = format_table(status_rows(es, es_settings.feeds_index))
        lines = table.splitlines()
        assert lines[0].split()[:3] == ["STATE", "FAILS", "HTTP"]
        states = [line.split()[0] for line in lines[1:]]
        assert states == sorted(states, key=lambda state: state != "DEAD")  # the worst first
        assert any(line.startswith("DEAD") and missing in line for line in lines)
        assert lines[-1].startswith("ok") and good in lines[-1]

        # The dead feed recovers; after a restart the good feed is fetched whole once (what the
        # last run parsed may not have got downstream), then conditionally with its stored ETag.
        server.routes["/missing.xml"] = respond(200, rss(ITEMS), {"Content-Type": "application/rss+xml"})
        requests_before = len(server.requests)
        run_polling([Feed(url=good), Feed(url=missing)], es_settings, seconds=SECOND_RUN)
        es.indices.refresh(index=es_settings.feeds_index)
        restarted = [headers for path, headers in server.requests[requests_before:] if path == "/good.xml"]
        assert len(restarted) >= 2 and restarted[0].get("If-None-Match") is None
        assert restarted[1].get("If-None-Match") == '"e1"'
        recovered = es.get(index=es_settings.feeds_index, id=feed_id(missing))["_source"]
        assert not recovered["dead"] and recovered["consecutive_failures"] == 0 and recovered["http_status"] == 200


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


