"""Hostile and broken input against our fetch-and-parse functions, over real sockets on
loopback: stalls, trickles, redirects (to other schemes and to private addresses), gzip
bombs, 304s, wrong charsets, broken XML and entity declarations."""
from __future__ import annotations

import dataclasses
import random
import tracemalloc

import pytest

from newsbeam.pipeline.config import Feed, FetchSettings
from newsbeam.transforms import fetch as fetch_module
from newsbeam.transforms.feedstate import FeedState
from newsbeam.transforms.fetch import FetchError, blocked_address, fetch, inflate, new_session
from newsbeam.transforms.parse import declares_entities, read_feed
from newsbeam.transforms.poll import apply_outcome, poll_one
from tests.support.feedserver import rss
from tests.support.hostileserver import (
    HostileServer,
    conditional,
    gzip_bomb,
    gzipped,
    redirect,
    respond,
    stall,
    trickle_body,
    trickle_headers,
)

GUARDED = FetchSettings(connect_timeout=1, read_timeout=1, total_timeout=2, max_bytes=200_000,
                        max_decompressed_bytes=1_000_000, concurrency=4, allow_private_addresses=True)
ITEMS = [{"title": "Floods in the north", "link": "https://news.example.org/floods", "html": "<p>Water.</p>"}]
FEED = rss(ITEMS)


@pytest.fixture
def server():
    with HostileServer() as hostile:
        yield hostile


@pytest.fixture
def session():
    client = new_session(GUARDED)
    yield client
    client.close()


def fetch_error(session, url: str, settings: FetchSettings = GUARDED) -> FetchError:
    with pytest.raises(FetchError) as err:
        fetch(session, Feed(url=url), settings)
    return err.value


def test_private_and_metadata_addresses_are_blocked():
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200",
                    "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1", "::ffff:10.0.0.1"):
        assert blocked_address(address), address
    for address in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"):
        assert not blocked_address(address), address


def test_blocking_is_on_by_default(server, session):
    url = server.route("/feed.xml", respond(200, FEED))
    err = fetch_error(session, url, FetchSettings())
    assert err.kind == "blocked_address" and "127.0.0.1" in str(err)
    assert server.hits("/feed.xml") == 0  # refused before connecting


def test_only_http_and_https_on_every_hop(server, session):
    with pytest.raises(FetchError) as err:
        fetch(session, Feed(url=server.url("/any")), GUARDED, url="file:///etc/passwd")
    assert err.value.kind == "bad_url"
    url = server.route("/to-file", redirect("file:///etc/passwd"))
    assert fetch_error(session, url).kind == "bad_url"
    url = server.route("/to-ftp", redirect("ftp://example.org/feed.xml"))
    assert fetch_error(session, url).kind == "bad_url"


def test_redirects_are_followed_by_us_and_capped(server, session):
    server.route("/feed.xml", respond(200, FEED, {"Content-Type": "application/rss+xml"}))
    url = server.route("/old", redirect("/middle", 301))
    server.route("/middle", redirect(server.url("/feed.xml"), 307))
    result = fetch(session, Feed(url=url), GUARDED)
    assert result.status == 200 and result.final_url == server.url("/feed.xml")
    loop = server.route("/loop", redirect("/loop"))
    err = fetch_error(session, loop)
    assert err.kind == "redirects"
    assert server.hits("/loop") == GUARDED.max_redirects + 1


def test_a_redirect_to_a_private_address_is_refused(server, session, monkeypatch):
    # 127.0.0.1 plays a public host here; 127.0.0.2 plays an internal one.
    monkeypatch.setattr(fetch_module, "blocked_address", lambda address: address == "127.0.0.2")
    blocking = dataclasses.replace(GUARDED, allow_private_addresses=False)
    url = server.route("/innocent", redirect(f"http://127.0.0.2:{server.port}/admin"))
    err = fetch_error(session, url, blocking)
    assert err.kind == "blocked_address" and "127.0.0.2" in str(err)
    assert server.hits("/admin") == 0


def test_the_connected_peer_is_checked_too(server, session, monkeypatch):
    # DNS rebinding: the name looked public when checked, the socket lands on a private address.
    monkeypatch.setattr(fetch_module, "check_url", lambda url, allow_private: None)
    url = server.route("/feed.xml", respond(200, FEED))
    err = fetch_error(session, url, dataclasses.replace(GUARDED, allow_private_addresses=False))
    assert err.kind == "blocked_address" and "connected to 127.0.0.1" in str(err)


def test_a_stalled_server_times_out(server, session):
    # The server closes without a response after 10 s: that would be a connection error, not a timeout.
    url = server.route("/stall", stall(10))
    assert fetch_error(session, url).kind == "timeout"


def test_a_trickling_body_hits_the_total_deadline(server, session):
    # One byte every 0.2 s (for 2,000 s) never trips the 1 s read timeout; only the 2 s total
    # deadline, which the error names, stops it.
    url = server.route("/trickle", trickle_body(every=0.2))
    err = fetch_error(session, url)
    assert err.kind == "timeout" and f"total time exceeds {GUARDED.total_timeout:g}s" in str(err)


def test_trickling_headers_hit_the_total_deadline(server, session):
    url = server.route("/slow-headers", trickle_headers(every=0.2))
    err = fetch_error(session, url)
    assert err.kind == "timeout" and "total" in str(err)


def test_a_gzip_bomb_is_refused_without_inflating_it(server, session):
    small_bomb = gzip_bomb(64 * 1024 * 1024)  # 64 MB of zeros in about 64 KB
    assert len(small_bomb) < GUARDED.max_bytes
    url = server.route("/bomb.xml", respond(200, small_bomb, {"Content-Encoding": "gzip"}))
    tracemalloc.start()
    try:
        err = fetch_error(session, url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.kind == "too_large" and "inflates" in str(err)
    assert peak < 8 * GUARDED.max_decompressed_bytes  # nowhere near the 64 MB the bomb holds
    # The same bomb as a .gz file without Content-Encoding is sniffed and capped too.
    url = server.route("/bomb.xml.gz", respond(200, small_bomb, {"Content-Type": "application/gzip"}))
    assert fetch_error(session, url).kind == "too_large"


def test_compressed_size_is_capped_before_inflating(server, session):
    noise = random.Random(7).randbytes(150_000)  # incompressible
    url = server.route("/big.gz", respond(200, gzipped(noise) * 2, {"Content-Encoding": "gzip"}))
    err = fetch_error(session, url)
    assert err.kind == "too_large" and "Content-Length 300" in str(err)  # refused before reading
    url = server.route("/undeclared.gz", respond(200, gzipped(noise) * 2, {"Content-Encoding": "gzip"},
                                                 declare_length=False))
    err = fetch_error(session, url)
    assert err.kind == "too_large" and "body exceeds 200000" in str(err)


def test_gzip_and_deflate_bodies_are_inflated(server, session):
    import zlib
    url = server.route("/gz.xml", respond(200, gzipped(FEED), {"Content-Encoding": "gzip"}))
    assert fetch(session, Feed(url=url), GUARDED).body == FEED
    url = server.route("/zlib.xml", respond(200, zlib.compress(FEED), {"Content-Encoding": "deflate"}))
    assert fetch(session, Feed(url=url), GUARDED).body == FEED
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    url = server.route("/raw.xml", respond(200, raw.compress(FEED) + raw.flush(), {"Content-Encoding": "deflate"}))
    assert fetch(session, Feed(url=url), GUARDED).body == FEED
    url = server.route("/br.xml", respond(200, b"xx", {"Content-Encoding": "br"}))
    assert fetch_error(session, url).kind == "bad_encoding"
    with pytest.raises(FetchError):
        inflate(b"\x1f\x8bnot gzip at all", "gzip", 1000)


def test_a_304_costs_no_parsing(server, session):
    url = server.route("/cond.xml", conditional(FEED, '"v7"'))
    feed = Feed(url=url)
    first = poll_one(session, feed, None, None, None, GUARDED)
    assert first.result.status == 200 and first.parsed is not None and len(first.parsed.articles) == 1
    state, articles, dead = apply_outcome(FeedState(url=url), feed, first, 300, GUARDED)
    assert state.etag == '"v7"' and len(articles) == 1 and not dead
    second = poll_one(session, feed, state.etag, state.last_modified, state.body_hash, GUARDED)
    assert second.result.status == 304 and second.parsed is None
    assert server.requests[-1][1].get("If-None-Match") == '"v7"'
    state, articles, dead = apply_outcome(state, feed, second, 300, GUARDED)
    assert articles == [] and not dead and state.http_status == 304 and state.unchanged_polls == 1


def test_an_identical_body_is_not_parsed_again(server, session):
    url = server.route("/same.xml", respond(200, FEED, {"Content-Type": "application/rss+xml"}))
    feed = Feed(url=url)
    first = poll_one(session, feed, None, None, None, GUARDED)
    again = poll_one(session, feed, None, None, first.digest, GUARDED)
    assert again.result.status == 200 and again.parsed is None


def test_wrong_and_missing_charsets_still_parse(server, session):
    latin = rss([{"title": "Café in Zürich", "link": "https://example.ch/a", "html": "<p>Grüezi</p>"}])
    latin = latin.replace(b'encoding="UTF-8"', b'encoding="ISO-8859-1"').decode("utf-8").encode("latin-1")
    # The header lies (utf-8); the bytes are Latin-1.
    url = server.route("/latin.xml", respond(200, latin, {"Content-Type": "application/rss+xml; charset=utf-8"}))
    result = fetch(session, Feed(url=url), GUARDED)
    parsed = read_feed(result, 10)
    assert not parsed.problem and len(parsed.articles) == 1
    # Correctly declared in the header only: the title comes out right.
    url = server.route("/cp1252.xml", respond(200, latin.replace(b' encoding="ISO-8859-1"', b""),
                                              {"Content-Type": "text/xml; charset=windows-1252"}))
    (article,) = read_feed(fetch(session, Feed(url=url), GUARDED), 10).articles
    assert article.title == "Café in Zürich"


def test_broken_xml_is_salvaged_or_reported(server, session):
    truncated = FEED[:FEED.index(b"</item>")]
    url = server.route("/truncated.xml", respond(200, truncated, {"Content-Type": "application/rss+xml"}))
    parsed = read_feed(fetch(session, Feed(url=url), GUARDED), 10)
    assert not parsed.problem and parsed.articles[0].title == "Floods in the north"  # the loose parser
    url = server.route("/garbage.xml", respond(200, b"\x00\xff<<<>>>&&&", {"Content-Type": "text/xml"}))
    parsed = read_feed(fetch(session, Feed(url=url), GUARDED), 10)
    assert parsed.articles == [] and parsed.problem and parsed.reason == "unparseable_feed"


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE rss [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<rss version="2.0"><channel><title>&lol3;</title><item><title>&lol3;</title><link>https://x.example/1</link>
</item></channel></rss>"""


def test_entity_declarations_are_refused_before_parsing(server, session):
    url = server.route("/laughs.xml", respond(200, BILLION_LAUGHS, {"Content-Type": "application/rss+xml"}))
    outcome = poll_one(session, Feed(url=url), None, None, None, GUARDED)
    assert outcome.parsed.reason == "entity_declaration" and outcome.parsed.articles == []
    state, articles, dead = apply_outcome(FeedState(url=url), Feed(url=url), outcome, 300, GUARDED)
    assert articles == [] and state.error_class == "entity_declaration" and state.consecutive_failures == 1
    (record,) = dead
    assert (record["stage"], record["reason"], record["feed_url"]) == ("parse", "entity_declaration", url)
    # In UTF-16 too; a plain DOCTYPE without entities is fine.
    assert declares_entities(BILLION_LAUGHS.decode().encode("utf-16"))
    assert declares_entities(BILLION_LAUGHS.decode().replace('<?xml version="1.0"?>', "").encode("utf-16-le"))
    assert not declares_entities(b'<!DOCTYPE rss PUBLIC "-//Netscape//DTD RSS 0.91//EN" "x.dtd"><rss/>')
    assert not declares_entities(FEED)


def test_items_and_text_are_capped(server, session):
    items = [{"title": f"t{i}", "link": f"https://example.org/{i}", "html": "<p>" + "word " * 5000 + "</p>"}
             for i in range(40)]
    url = server.route("/many.xml", respond(200, rss(items), {"Content-Type": "application/rss+xml"}))
    parsed = read_feed(fetch(session, Feed(url=url), dataclasses.replace(GUARDED, max_bytes=2_000_000)), 25,
                       max_entry_chars=1000)
    assert len(parsed.articles) == 25
    assert all(len(a.content_html) <= 1000 for a in parsed.articles)


def test_every_fetch_failure_is_a_dead_letter_and_a_health_update(server, session):
    url = server.route("/busy.xml", respond(503, b"busy", {"Retry-After": "120"}))
    feed = Feed(url=url)
    outcome = poll_one(session, feed, None, None, None, GUARDED)
    state, articles, dead = apply_outcome(FeedState(url=url), feed, outcome, 30, GUARDED)
    assert articles == [] and state.error_class == "http_5xx" and state.http_status == 503
    assert state.next_due - outcome.started >= 120  # Retry-After beats the 30 s interval
    (record,) = dead
    assert (record["stage"], record["reason"], record["feed_url"]) == ("fetch", "http_5xx", url)


def test_a_late_poll_keeps_the_feed_s_rhythm(server, session):
    """Started 15 s after it was due (a host's polite queue, a late tick): the next poll is
    due one interval after the due time, so the lag does not add up cycle after cycle; a poll
    later than a whole interval starts a new rhythm from its start."""
    url = server.route("/rhythm.xml", respond(200, rss([{"title": "t", "link": "https://example.org/t",
                                                          "html": "<p>x</p>"}]),
                                              {"Content-Type": "application/rss+xml"}))
    feed = Feed(url=url)
    outcome = poll_one(session, feed, None, None, None, GUARDED)
    state, _, _ = apply_outcome(FeedState(url=url), feed, outcome, 300, GUARDED, due=outcome.started - 15)
    assert state.next_due == pytest.approx(outcome.started - 15 + 300)
    state, _, _ = apply_outcome(FeedState(url=url), feed, outcome, 300, GUARDED, due=outcome.started - 400)
    assert state.next_due == pytest.approx(outcome.started + 300)


def test_only_items_new_since_the_last_parse_go_downstream(server, session):
    def item(n):
        return {"title": f"Story {n}", "link": f"https://example.org/{n}", "html": "<p>x</p>"}

    feed = Feed(url=server.route("/growing.xml", respond(200, rss([item(1), item(2)]),
                                                         {"Content-Type": "application/rss+xml"})))
    state, articles, _ = apply_outcome(FeedState(url=feed.url), feed, poll_one(session, feed, None, None, None, GUARDED),
                                       300, GUARDED)
    assert [a.title for a in articles] == ["Story 1", "Story 2"]
    server.route("/growing.xml", respond(200, rss([item(3), item(1), item(2)]), {"Content-Type": "application/rss+xml"}))
    state, articles, _ = apply_outcome(state, feed, poll_one(session, feed, None, None, state.body_hash, GUARDED),
                                       300, GUARDED)
    assert [a.title for a in articles] == ["Story 3"]
    assert state.items_seen == 3
