"""The guarded HTTP client (transforms/fetch.py) against a real HTTP server on loopback."""

import pytest

from newsbeam.pipeline.config import Feed, FetchSettings
from newsbeam.transforms.fetch import FetchError, fetch, new_session, shard_feeds

FAST = FetchSettings(connect_timeout=2, read_timeout=1, total_timeout=3, max_bytes=50_000, concurrency=4,
                     allow_private_addresses=True)


def test_fetch_returns_body_headers_and_sends_our_user_agent(feed_server):
    url = feed_server.serve("/ok.xml", b"<rss/>", headers={"ETag": '"v1"'})
    result = fetch(new_session(FAST), Feed(url=url), FAST)
    assert result.status == 200 and result.body == b"<rss/>"
    assert result.headers["etag"] == '"v1"'
    assert feed_server.hits["/ok.xml"] == 1


def test_fetch_classifies_http_errors(feed_server):
    url = feed_server.serve("/gone.xml", b"gone", status=410)
    with pytest.raises(FetchError) as err:
        fetch(new_session(FAST), Feed(url=url), FAST)
    assert err.value.kind == "http_4xx"
    url = feed_server.serve("/boom.xml", b"boom", status=503)
    with pytest.raises(FetchError) as err:
        fetch(new_session(FAST), Feed(url=url), FAST)
    assert err.value.kind == "http_5xx"


def test_fetch_refuses_oversized_bodies(feed_server):
    url = feed_server.serve("/huge.xml", b"x" * 200_000)
    with pytest.raises(FetchError) as err:
        fetch(new_session(FAST), Feed(url=url), FAST)
    assert err.value.kind == "too_large"


def test_fetch_times_out_on_a_stalled_server(feed_server):
    # The server answers after 30 s: without the 1 s read timeout the fetch would succeed.
    url = feed_server.serve("/stall.xml", b"<rss/>", delay=30)
    with pytest.raises(FetchError) as err:
        fetch(new_session(FAST), Feed(url=url), FAST)
    assert err.value.kind == "timeout"


def test_fetch_reports_refused_connections():
    with pytest.raises(FetchError) as err:
        fetch(new_session(FAST), Feed(url="http://127.0.0.1:9/feed.xml"), FAST)
    assert err.value.kind == "connection"


def test_shards_are_stable_and_cover_every_feed():
    feeds = [Feed(url=f"https://host{i}.example/rss") for i in range(50)]
    shards = shard_feeds(feeds, 8)
    assert sorted(f.url for _, group in shards for f in group) == sorted(f.url for f in feeds)
    reordered = shard_feeds(list(reversed(feeds)), 8)
    assert {k: set(v) for k, v in shards} == {k: set(v) for k, v in reordered}
    assert len(shards) > 1
