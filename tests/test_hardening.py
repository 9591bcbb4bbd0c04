"""The smaller holes of a hostile web and careless input, each refused with a clear reason:
IPv6 forms of private addresses, 3xx without a Location, strict feeds.yaml keys and types,
and unknown command-line flags."""
from __future__ import annotations

import dataclasses

import pytest

from newsbeam.transforms.feedstate import FeedState
from newsbeam.transforms.fetch import FetchError, blocked_address, fetch, new_session
from newsbeam.transforms.poll import apply_outcome, poll_one
from newsbeam.transforms.settings import Feed, FetchSettings
from tests.hostileserver import HostileServer, respond

GUARDED = FetchSettings(connect_timeout=1, read_timeout=1, total_timeout=2, max_bytes=200_000,
                        max_decompressed_bytes=1_000_000, concurrency=4, allow_private_addresses=True)


@pytest.fixture
def server():
    with HostileServer() as hostile:
        yield hostile


@pytest.fixture
def session():
    client = new_session(GUARDED)
    yield client
    client.close()


# IPv6 spellings of private IPv4 destinations, by the form that carries the IPv4 address.
CARRYING_PRIVATE = {
    "IPv4-compatible loopback": "::127.0.0.1",
    "IPv4-compatible private": "::10.0.0.1",
    "IPv4-mapped loopback": "::ffff:127.0.0.1",
    "IPv4-translated metadata": "::ffff:0:169.254.169.254",
    "NAT64 loopback": "64:ff9b::127.0.0.1",
    "NAT64 private": "64:ff9b::192.168.1.1",
    "NAT64 metadata": "64:ff9b::a9fe:a9fe",
    "local-use NAT64": "64:ff9b:1::8.8.8.8",
    "6to4 loopback": "2002:7f00:1::1",
    "6to4 private": "2002:c0a8:101::1",
    "Teredo, private client": "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # client 10.0.0.1
}
# The same forms around public addresses: a DNS64 network or a dual-stack socket shows these.
CARRYING_PUBLIC = {"IPv4-mapped": "::ffff:8.8.8.8", "NAT64": "64:ff9b::8.8.8.8", "6to4": "2002:808:808::1"}


@pytest.mark.parametrize("form", sorted(CARRYING_PRIVATE))
def test_ipv6_forms_of_private_addresses_are_blocked(form):
    assert blocked_address(CARRYING_PRIVATE[form])


@pytest.mark.parametrize("form", sorted(CARRYING_PUBLIC))
def test_ipv6_forms_of_public_addresses_stay_allowed(form):
    assert not blocked_address(CARRYING_PUBLIC[form])


def test_a_feed_url_naming_an_ipv4_compatible_loopback_is_refused_before_connecting(server, session):
    server.route("/feed.xml", respond(200, b"<rss/>"))
    guarded = dataclasses.replace(GUARDED, allow_private_addresses=False)
    with pytest.raises(FetchError) as caught:
        fetch(session, Feed(url=f"http://[::127.0.0.1]:{server.port}/feed.xml"), guarded)
    assert caught.value.kind == "blocked_address" and "::127.0.0.1" in str(caught.value)
    assert server.hits("/feed.xml") == 0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 300])
def test_a_3xx_without_location_is_a_fetch_error_with_its_reason(server, session, status):
    url = server.route("/moved", respond(status, b"<rss><channel><title>t</title></channel></rss>"))
    with pytest.raises(FetchError) as caught:
        fetch(session, Feed(url=url), GUARDED)
    assert caught.value.kind == "bad_redirect" and caught.value.status == status
    assert f"HTTP {status}" in str(caught.value) and "no Location" in str(caught.value)
    assert server.hits("/moved") == 1


def test_a_3xx_without_location_counts_against_the_feed_and_is_dead_lettered(server, session):
    feed = Feed(url=server.route("/moved", respond(302)))
    outcome = poll_one(session, feed, None, None, None, GUARDED)
    state, articles, dead = apply_outcome(FeedState(url=feed.url), feed, outcome, 60.0, GUARDED)
    assert articles == [] and state.consecutive_failures == 1 and state.error_class == "bad_redirect"
    assert [(d["stage"], d["reason"]) for d in dead] == [("fetch", "bad_redirect")]
