"""Work budgets per item and per page (docs/hostile-input.md): hostile text that is cheap in
bytes but expensive in CPU costs that one article, never the stream. Real spaCy models and
worker processes; limits made small through the settings."""
from __future__ import annotations

import time

import pytest
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils import shared

from newsbeam.pipeline.config import Feed, FetchSettings, NlpSettings
from newsbeam.transforms.article import Article
from newsbeam.transforms.entities import TagEntitiesFn, tag_entities
from newsbeam.transforms.fetch import FetchError, fetch, new_session
from newsbeam.transforms.parse import read_feed
from tests.support.feedserver import rss
from tests.support.hostileserver import HostileServer, gzipped, respond, stall, trickle_body
from tests.test_workers import _articles, _run, poisoned

FEED = rss([{"title": "Floods in the north", "link": "https://news.example.org/floods", "html": "<p>Water.</p>"}])

PARENS = "(" * 16000


def test_a_run_of_parentheses_reaches_the_tokenizer_cut_short_and_names_beside_it_are_tagged(nlp):
    article = Article(title="Angela Merkel visits Paris",
                      body=f"{PARENS} Angela Merkel met Emmanuel Macron in Paris. {'x' * 5000} {')' * 9000}")
    text = article.nlp_text(NlpSettings().max_chars)
    assert "(" * 9 not in text and ")" * 9 not in text  # runs cut to max_char_run
    assert max(len(word) for word in text.split()) <= NlpSettings().max_token_chars
    (tagged,) = tag_entities(nlp, [article], NlpSettings())
    assert {"Angela Merkel", "Emmanuel Macron"} <= set(tagged.persons)
    assert "Paris" in tagged.locations


@pytest.mark.slow
def test_an_article_past_the_ner_deadline_is_dead_lettered_alone_and_its_worker_replaced():
    # The collapse is switched off so that the tokenizer really is stuck on the article.
    settings = NlpSettings(processes=1, batch_size=8, article_timeout=1.5, max_char_run=10**9,
                           max_token_chars=10**9)
    articles = _articles()
    articles.insert(1, poisoned(articles[0], body="(" * 40000))
    fn = TagEntitiesFn(settings, shared.Shared())
    values, raw = _run(fn, articles)
    dead = [o.value.value for o in raw if isinstance(o, TaggedOutput)]
    assert [(d["stage"], d["article_id"], d["reason"]) for d in dead] == [
        ("entities", "poison", "nlp.article_timeout")]
    assert "1.5s" in dead[0]["error"] and "replaced" in dead[0]["error"]
    tagged = [v.value.article_id for v in values if isinstance(v.value, Article)]
    assert tagged == [a.article_id for a in articles if a.article_id != "poison"]


# ---------------------------------------------------------------- fetch deadlines and cookies

def test_the_deadline_covers_a_request_on_a_socket_the_server_kept_open():
    settings = FetchSettings(connect_timeout=1, read_timeout=1, total_timeout=2, allow_private_addresses=True)
    with HostileServer(keep_alive=True) as server:
        first = server.route("/first.xml", respond(200, FEED, close=False))
        second = server.route("/trickle.xml", trickle_body(every=0.2, total=60))  # 12 s, never idle 1 s
        session = new_session(settings)
        try:
            assert "connection" not in fetch(session, Feed(url=first), settings).headers  # keep-alive offered
            with pytest.raises(FetchError) as err:  # without the deadline: all 60 bytes, no error
                fetch(session, Feed(url=second), settings)
            assert err.value.kind == "timeout" and f"total time exceeds {settings.total_timeout:g}s" in str(err.value)
        finally:
            session.close()
    assert server.hits("/trickle.xml") == 1
    assert server.client_ports[0] != server.client_ports[1]  # a new socket, which the watchdog knows


def test_cookies_are_not_kept():
    settings = FetchSettings(allow_private_addresses=True)
    with HostileServer() as server:
        url = server.route("/cookies.xml", respond(200, FEED, {"Set-Cookie": "session=abc; Path=/"}))
        session = new_session(settings)
        try:
            for _ in range(3):
                assert fetch(session, Feed(url=url), settings).headers["set-cookie"].startswith("session=")
            assert len(session.cookies) == 0
        finally:
            session.close()
    assert [headers.get("Cookie") for _, headers in server.requests] == [None, None, None]


# ---------------------------------------------------------------- parse budget

def _fetch_feed(body: bytes, **headers: str):
    settings = FetchSettings(allow_private_addresses=True, max_bytes=30_000_000, max_decompressed_bytes=60_000_000)
    with HostileServer() as server:
        url = server.route("/feed.xml", respond(200, body, {"Content-Type": "application/rss+xml", **headers}))
        session = new_session(settings)
        try:
            return fetch(session, Feed(url=url), settings)
        finally:
            session.close()


def test_a_huge_feed_is_cut_to_its_first_items_before_feedparser_reads_it(monkeypatch):
    from newsbeam.transforms import parse

    many = rss([{"title": f"t{i}", "link": f"https://example.org/{i}", "html": "<p>x</p>"} for i in range(60_000)])
    result = _fetch_feed(gzipped(many), **{"Content-Encoding": "gzip"})
    assert len(result.body) == len(many) > 10_000_000
    seen: list[int] = []
    real_parse = parse.feedparser.parse

    def measured(stream, **kwargs):
        seen.append(len(stream.getvalue()))
        return real_parse(stream, **kwargs)

    monkeypatch.setattr(parse.feedparser, "parse", measured)
    parsed = read_feed(result, 25)
    assert [a.title for a in parsed.articles] == [f"t{i}" for i in range(25)] and not parsed.problem
    assert seen[-1] < 20_000  # 25 items and the document's closing tags, not 60,000 items
    # The byte budget: only whole items within the first 3,000 bytes.
    parsed = read_feed(result, 500, max_parse_bytes=3_000)
    assert 0 < len(parsed.articles) < 25 and not parsed.problem and seen[-1] <= 3_000 + 100


def test_a_bad_character_reference_costs_nothing_but_that_character():
    items = [{"title": "Before", "link": "https://example.org/1", "html": "<p>fine</p>"},
             {"title": "Surrogate", "link": "https://example.org/2", "html": "<p>x</p>"},
             {"title": "Beyond", "link": "https://example.org/3", "html": "<p>y</p>"},
             {"title": "After", "link": "https://example.org/4", "html": "<p>fine</p>"}]
    body = rss(items).replace(b"<title>Surrogate</title>", b"<title>Surrogate &#xD800; &#55296;</title>")
    body = body.replace(b"<title>Beyond</title>", b"<title>Beyond &#x110000; &#99999999999;</title>")
    parsed = read_feed(_fetch_feed(body), 10)
    assert not parsed.problem
    assert [a.title for a in parsed.articles] == [
        "Before", "Surrogate \ufffd \ufffd", "Beyond \ufffd \ufffd", "After"]


# ---------------------------------------------------------------- cleaning and article pages

def test_deeply_nested_html_is_read_as_text_without_the_html_parser(monkeypatch):
    from newsbeam.transforms import clean

    parsed: list[int] = []
    real_parser = clean.LexborHTMLParser

    def counted(markup):
        parsed.append(len(markup))
        return real_parser(markup)

    monkeypatch.setattr(clean, "LexborHTMLParser", counted)
    deep = "<div>" * 40000 + "deep &amp; down" + "</div>" * 40000
    cleaned = clean.clean_article(Article(title="Nested", content_html=deep, summary_html="<p>a</p><p>b</p>"))
    assert cleaned.body == "deep & down"
    assert parsed == [len("<p>a</p>\n<p>b</p>\n")]  # only the shallow summary went through the parser
    assert cleaned.summary == "a\nb"


def _full_text(settings: FetchSettings, page_behaviour) -> tuple[Article, float, int]:
    """(the article FetchFullText returned, seconds it took, requests for the page)."""
    from newsbeam.transforms.fulltext import FetchFullTextFn

    with HostileServer() as server:
        feed = Feed(url=server.url("/feed.xml"), full_text=True)
        article = Article(feed_url=feed.url, url=server.route("/page.html", page_behaviour),
                          content_html="<p>feed text</p>")
        fn = FetchFullTextFn((feed,), settings)
        fn.setup()
        try:
            started = time.monotonic()
            (result,) = next(iter(fn.handle_batch([article])))
            seconds = time.monotonic() - started
        finally:
            fn.teardown()
        return result, seconds, server.hits("/page.html")


def test_an_article_page_has_a_much_smaller_size_cap_than_a_feed(caplog):
    page = b"<html><body>" + b"<div><p>hostile page text</p></div>" * 200_000 + b"</body></html>"  # 7 MiB
    settings = FetchSettings(allow_private_addresses=True, max_page_bytes=1_000_000)
    assert len(page) < settings.max_decompressed_bytes  # a feed this size would be read
    with caplog.at_level("INFO", logger="newsbeam.transforms.fulltext"):
        result, _, hits = _full_text(settings, respond(200, gzipped(page), {"Content-Encoding": "gzip"}))
    assert hits == 1 and result.content_html == "<p>feed text</p>"
    assert "inflates beyond 1000000 bytes" in caplog.text


def test_a_batch_of_pages_waits_no_longer_than_its_timeout(caplog):
    settings = FetchSettings(allow_private_addresses=True, total_timeout=30, read_timeout=30, full_text_timeout=1)
    with caplog.at_level("INFO", logger="newsbeam.transforms.fulltext"):
        result, seconds, hits = _full_text(settings, stall(8))
    assert hits == 1 and result.content_html == "<p>feed text</p>"
    assert seconds < 5 and "fetch.full_text_timeout (1s)" in caplog.text


def test_a_feed_full_of_markup_skips_feedparser_s_html_passes_and_keeps_every_item(monkeypatch):
    from newsbeam.transforms import parse

    items = [{"title": "Before", "link": "https://example.org/1", "html": "<p>fine</p>"},
             {"title": "Nested", "link": "https://example.org/2",
              "html": "<div>" * 15000 + "deep down in the tree<script>steal()</script>" + "</div>" * 15000},
             {"title": "After", "link": "https://example.org/3", "html": "<p>fine</p>"}]
    calls: list[dict] = []
    real_parse = parse.feedparser.parse

    def recorded(stream, **kwargs):
        calls.append(kwargs)
        return real_parse(stream, **kwargs)

    monkeypatch.setattr(parse.feedparser, "parse", recorded)
    hostile = read_feed(_fetch_feed(rss(items)), 10)
    assert [a.title for a in hostile.articles] == ["Before", "Nested", "After"]
    assert (calls[-1]["sanitize_html"], calls[-1]["resolve_relative_uris"]) == (False, False)
    from newsbeam.transforms.clean import clean_article
    assert clean_article(hostile.articles[1]).body == "deep down in the tree"  # the script is still dropped, by CleanText
    read_feed(_fetch_feed(rss([items[0], items[2]])), 10)
    assert (calls[-1]["sanitize_html"], calls[-1]["resolve_relative_uris"]) == (True, True)  # ordinary feeds


@pytest.mark.parametrize("parse_processes", [0, 1], ids=["parse-thread", "parse-process"])
def test_a_parse_past_its_deadline_costs_that_feed_and_the_next_feed_is_parsed(es_settings, parse_processes):
    from apache_beam.utils.timestamp import Timestamp

    from newsbeam.transforms.poll import PollShardFn
    from tests.test_polling import _State

    # feedparser's HTML passes kept on for any amount of markup: this feed takes seconds to parse,
    # several times the deadline even on a fast machine
    settings = FetchSettings(allow_private_addresses=True, per_host_delay=0.01, parse_timeout=1.0,
                             max_sanitized_tags=10**9, parse_processes=parse_processes)
    heavy_items = [{"title": "Nested", "link": "https://example.org/n", "html": "<div>" * 200_000 + "</div>" * 200_000}]
    light_items = [{"title": "Light news", "link": "https://example.org/l", "html": "<p>x</p>"}]
    with HostileServer() as server, HostileServer("127.0.0.2") as other:
        heavy = Feed(url=server.route("/heavy.xml", respond(200, rss(heavy_items))))
        light = Feed(url=other.route("/light.xml", respond(200, rss(light_items))))
        fn = PollShardFn(settings, es_settings, default_interval=300, settle=0.5, slack=0, tick=1.0, shards=1)
        fn.setup()
        try:
            state, outputs = _State(), []
            give_up = time.monotonic() + 60
            while (len([o for o in outputs if getattr(o, "tag", None) == "health"]) < 2
                   and time.monotonic() < give_up):
                fn.start_bundle()
                outputs += list(fn.process((0, (heavy, light)), tick=Timestamp.now(), states=state,
                                           backlog_state=_State()))
                time.sleep(0.2)
        finally:
            fn.teardown()
    health = {o.value["feed_url"]: o.value for o in outputs if getattr(o, "tag", None) == "health"}
    dead = [o.value for o in outputs if getattr(o, "tag", None) == "dead"]
    assert health[heavy.url]["error_class"] == "fetch.parse_timeout"
    assert [(d["stage"], d["reason"], d["feed_url"]) for d in dead] == [("parse", "fetch.parse_timeout", heavy.url)]
    assert "1s" in dead[0]["error"]
    assert [a.title for a in outputs if isinstance(a, Article)] == ["Light news"]
