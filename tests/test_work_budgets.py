"""Work budgets per item and per page (docs/hostile-input.md): hostile text that is cheap in
bytes but expensive in CPU costs that one article, never the stream. Real spaCy models and
worker processes; limits made small through the settings."""
from __future__ import annotations

import time

import pytest
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils import shared

from newsbeam.pipeline.config import Feed, FetchSettings, NlpSettings
from newsbeam.transforms.entities import TagEntitiesFn, nlp_text, tag_entities
from newsbeam.transforms.fetch import FetchError, fetch, new_session
from tests.feedserver import rss
from tests.hostileserver import HostileServer, respond, trickle_body
from tests.test_workers import _articles, _run

FEED = rss([{"title": "Floods in the north", "link": "https://news.example.org/floods", "html": "<p>Water.</p>"}])

PARENS = "(" * 16000


def test_a_run_of_parentheses_reaches_the_tokenizer_cut_short_and_names_beside_it_are_tagged(nlp):
    article = {"title": "Angela Merkel visits Paris",
               "body": f"{PARENS} Angela Merkel met Emmanuel Macron in Paris. {'x' * 5000} {')' * 9000}"}
    text = nlp_text(article, NlpSettings().max_chars)
    assert "(" * 9 not in text and ")" * 9 not in text  # runs cut to max_char_run
    assert max(len(word) for word in text.split()) <= NlpSettings().max_token_chars
    (tagged,) = tag_entities(nlp, [article], NlpSettings())
    assert {"Angela Merkel", "Emmanuel Macron"} <= set(tagged["persons"])
    assert "Paris" in tagged["locations"]


def test_an_article_past_the_ner_deadline_is_dead_lettered_alone_and_its_worker_replaced():
    # The collapse is switched off so that the tokenizer really is stuck on the article.
    settings = NlpSettings(processes=1, batch_size=8, article_timeout=1.5, max_char_run=10**9,
                           max_token_chars=10**9)
    articles = _articles()
    articles.insert(1, {**articles[0], "title": "poison", "body": "(" * 40000, "article_id": "poison",
                        "url": "poison"})
    fn = TagEntitiesFn(settings, shared.Shared())
    values, raw = _run(fn, articles)
    dead = [o.value.value for o in raw if isinstance(o, TaggedOutput)]
    assert [(d["stage"], d["article_id"], d["reason"]) for d in dead] == [
        ("entities", "poison", "nlp.article_timeout")]
    assert "1.5s" in dead[0]["error"] and "replaced" in dead[0]["error"]
    tagged = [v.value["article_id"] for v in values if isinstance(v.value, dict) and "entities" in v.value]
    assert tagged == [a["article_id"] for a in articles if a["article_id"] != "poison"]


# ---------------------------------------------------------------- fetch deadlines and cookies

def test_the_deadline_covers_a_request_on_a_socket_the_server_kept_open():
    settings = FetchSettings(connect_timeout=1, read_timeout=1, total_timeout=2, allow_private_addresses=True)
    with HostileServer(keep_alive=True) as server:
        first = server.route("/first.xml", respond(200, FEED, close=False))
        second = server.route("/trickle.xml", trickle_body(every=0.2, total=60))  # 12 s, never idle 1 s
        session = new_session(settings)
        try:
            assert "connection" not in fetch(session, Feed(url=first), settings).headers  # keep-alive offered
            started = time.monotonic()
            with pytest.raises(FetchError) as err:
                fetch(session, Feed(url=second), settings)
            assert err.value.kind == "timeout" and time.monotonic() - started < settings.total_timeout + 1
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
