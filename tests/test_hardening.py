"""The smaller holes of a hostile web and careless input, each refused with a clear reason:
IPv6 forms of private addresses, 3xx without a Location, strict feeds.yaml keys and types,
and unknown command-line flags."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from newsbeam.transforms.feedstate import FeedState
from newsbeam.transforms.fetch import FetchError, blocked_address, fetch, new_session
from newsbeam.transforms.poll import apply_outcome, poll_one
from newsbeam.transforms.settings import Feed, FetchSettings
from tests.support.hostileserver import HostileServer, respond

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


# ---------------------------------------------------------------- unknown flags

@pytest.mark.parametrize("argv, flag, meant", [
    (["search", "ventilator", "--limt", "3"], "--limt", "--limit"),
    (["tag", "--inptu", "x.jsonl"], "--inptu", "--input"),
    (["eval", "topics", "--mises", "3"], "--mises", "--misses"),
    (["feeds", "status", "--failng"], "--failng", "--failing"),
    (["feeds", "import", "list.opml", "--feeds-fiel", "feeds.yaml"], "--feeds-fiel", "--feeds-file"),
    (["alerts", "list", "--confg", "pipeline.yaml"], "--confg", "--config"),
    (["alerts", "test", "--qery", "ventilator"], "--qery", "--query"),
    (["alerts", "remove", "old", "--force"], "--force", None),
    (["status", "--jsn"], "--jsn", "--json"),
    (["status", "--js"], "--js", "--json"),  # a prefix is not taken for the flag it starts
    (["es", "create-api-key", "--expiry", "90d"], "--expiry", "--expiration"),
    (["kibana", "setup", "--spce", "news"], "--spce", "--space"),
    (["--verbsoe", "status"], "--verbsoe", "--verbose"),
])
def test_every_subcommand_refuses_a_flag_it_does_not_know(argv, flag, meant, capsys):
    from newsbeam.pipeline.cli import main
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {flag}" in err
    assert (f"did you mean {meant}?" in err) if meant else "did you mean" not in err


def test_a_misspelt_notify_saves_no_rule(tmp_path, es, es_settings, capsys):
    from newsbeam.pipeline.cli import main
    from tests.support.config import write_config
    config = write_config(tmp_path, es_settings, poll_interval=5)
    rules_index = f"{es_settings.articles_alias.rsplit('-', 1)[0]}-rules"  # outside the articles pattern
    settings = yaml.safe_load(config.read_text())
    settings.setdefault("alerts", {})["rules_index"] = rules_index
    config.write_text(yaml.safe_dump(settings))
    try:
        with pytest.raises(SystemExit):
            main(["alerts", "add", "r", "--query", "ventilator", "--notfy", "slack:https://hooks.example.org/T/B",
                  "--config", str(config)])
        err = capsys.readouterr().err
        assert "--notfy: did you mean --notify?" in err
        assert "hooks.example.org/T/B" not in err  # a misspelt flag's value may be a secret
        assert not es.indices.exists(index=rules_index) or not es.exists(index=rules_index, id="r")
        # The same line spelt right saves the rule: the refusal above is the misspelling's.
        assert main(["alerts", "add", "r", "--query", "ventilator", "--notify", "slack:https://hooks.example.org/T/B",
                     "--config", str(config)]) == 0
        assert es.get(index=rules_index, id="r")["_source"]["notify"] == ["slack:https://hooks.example.org/T/B"]
    finally:
        es.indices.delete(index=rules_index, ignore_unavailable=True)


def test_run_refuses_what_neither_newsbeam_nor_beam_knows_and_logs_the_beam_options_it_passes(tmp_path, es_settings):
    from tests.support.cli import newsbeam
    from tests.support.config import write_config
    config = write_config(tmp_path, es_settings, poll_interval=5)  # no feeds: the run stops after its checks
    misspelt = newsbeam("run", "--config", str(config), "--durration", "5", timeout=120)
    assert misspelt.returncode == 2
    assert "unrecognized arguments: --durration (--durration: did you mean --duration?)" in misspelt.stderr
    passed = newsbeam("run", "--config", str(config), "--runner", "PrismRunner", "--prism_location=/nowhere/prism",
                      "--duration", "5", timeout=120)
    assert "Beam options passed on: --runner, --prism_location" in passed.stderr
    assert passed.returncode == 2 and "no feeds" in passed.stderr
    assert "/nowhere/prism" not in passed.stderr.split("Beam options passed on:")[1].splitlines()[0]
