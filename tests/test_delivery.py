"""Alert delivery against real services on loopback: Elasticsearch (alerts, rules, per-target
back-off), webhook receivers that refuse, stall, trickle or flood, an SMTP server (aiosmtpd),
and `newsbeam run` / `newsbeam alerts deliver` / `newsbeam status` as a user runs them."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest
from elasticsearch import helpers

from newsbeam.pipeline.config import Settings
from newsbeam.pipeline.ops_cli import collect_status
from newsbeam.transforms.alerts import build_alert
from newsbeam.transforms.delivery import (
    DeliveryError,
    DeliveryLoop,
    Outbox,
    PeriodicJob,
    Senders,
    target_id,
    target_state_index,
)
from newsbeam.transforms.elastic import ElasticsearchUnavailable, connect
from newsbeam.transforms.rules import Rule, parse_target
from newsbeam.transforms.settings import ConfigError, ElasticsearchSettings
from tests.support import REPO
from tests.support.cli import newsbeam
from tests.support.faultproxy import FaultProxy
from tests.support.feedserver import fixture_articles, rss
from tests.support.loopback import LoopbackServer, QuietHandler
from tests.support.receivers import SmtpReceiver, WebhookReceiver
from tests.support.waiting import wait_until
from tests.test_alerts import alert_docs, cli_config, delivered, enriched, match_in_pipeline, save_rule


@pytest.fixture
def alert_settings(settings) -> Settings:
    """Per-test rules and alerts indices; quick sweeps, short back-off and deadlines."""
    prefix = settings.elasticsearch.articles_alias.rsplit("-", 1)[0]
    alerts = dataclasses.replace(settings.alerts, rules_index=f"{prefix}-rules", alerts_index=f"{prefix}-alerts",
                                 sweep_interval=0.5, retry_initial=0.5, retry_max=2.0, webhook_timeout=1.0,
                                 claim_seconds=30.0, smtp=dataclasses.replace(settings.alerts.smtp, timeout=2.0))
    return dataclasses.replace(settings, alerts=alerts, poll_interval=5.0)


def store_alerts(es, settings: Settings, rule: Rule, numbers: range, matched_at: float) -> list[str]:
    """Alert documents as MatchAlerts writes them, `matched_at` spaced 1 ms apart."""
    docs = [build_alert(rule, enriched(n), [], matched_at + i / 1000) for i, n in enumerate(numbers)]
    helpers.bulk(es, ({"_op_type": "create", "_index": settings.alerts.alerts_index, "_id": d["alert_id"],
                       "_source": d} for d in docs), refresh=True)
    return [d["alert_id"] for d in docs]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class HostileEndpoint(LoopbackServer):
    """A webhook endpoint that misbehaves after reading the request: `trickle` answers one
    header line every 0.2 s for ever, `flood` answers 500 with a 400 MiB body. `sent` counts
    the bytes it managed to write before the client hung up."""

    def __init__(self, behaviour: str):
        self.requests = 0
        self.sent = 0
        self.hung_up = threading.Event()
        endpoint = self

        class Handler(QuietHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                endpoint.requests += 1
                try:
                    if behaviour == "trickle":
                        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                        for i in range(100_000):
                            line = f"X-Slow-{i}: 1\r\n".encode()
                            self.wfile.write(line)
                            self.wfile.flush()
                            endpoint.sent += len(line)
                            time.sleep(0.2)
                    else:
                        self.wfile.write(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % (400 << 20))
                        block = b"x" * (1 << 16)
                        for _ in range(400 << 4):
                            self.wfile.write(block)
                            endpoint.sent += len(block)
                except OSError:
                    endpoint.hung_up.set()
                self.close_connection = True

        super().__init__(Handler)


# --- targets isolated --------------------------------------------------------------------

def test_a_dead_webhook_with_500_older_alerts_never_starves_a_healthy_target(es, alert_settings):
    """The 520 oldest due alerts belong to a target that is down; the healthy target's newer
    ones still go out in the first sweeps, and the dead target is tried once per back-off,
    by every sweeper, across restarts (fresh Outbox instances share the back-off in ES)."""
    settings = dataclasses.replace(alert_settings, alerts=dataclasses.replace(
        alert_settings.alerts, retry_initial=120.0, retry_max=120.0))
    with WebhookReceiver() as hook:
        hook.fail("/down")
        dead = Rule("dead", "ventilators", notify=(f"webhook:{hook.url('/down')}",))
        healthy = Rule("healthy", "ventilators", notify=(f"slack:{hook.url('/slack')}",))
        save_rule(es, settings, dead)
        save_rule(es, settings, healthy)
        store_alerts(es, settings, dead, range(520), time.time() - 600)
        fresh = store_alerts(es, settings, healthy, range(1000, 1005), time.time())
        for _ in range(5):
            Outbox(es, settings.alerts).sweep()  # a new instance each time: a restarted deliverer
        assert len(hook.bodies("/slack")) == 5, f"{len(hook.bodies('/slack'))} of 5 reached the healthy target"
        assert len(hook.refused) == 1  # the dead target was tried once, then backed off for everyone
        es.indices.refresh(index=target_state_index(settings.alerts))
        state = es.get(index=target_state_index(settings.alerts),
                       id=target_id(parse_target(f"webhook:{hook.url('/down')}")))["_source"]
        assert state["failures"] == 1 and state["last_error"].startswith("HTTP 503")
    docs = alert_docs(es, settings, "healthy")
    assert sorted(d["alert_id"] for d in docs if d["pending_targets"] == []) == sorted(fresh)


def test_a_target_longer_than_1024_characters_is_counted_pending_and_delivered(es, alert_settings):
    with SmtpReceiver() as smtp:
        settings = dataclasses.replace(alert_settings, alerts=dataclasses.replace(
            alert_settings.alerts, smtp=dataclasses.replace(alert_settings.alerts.smtp, port=smtp.port)))
        recipients = [f"night-desk-editor-{n:02d}@regional-newsroom.example.org" for n in range(40)]
        rule = Rule("desk", "ventilators", notify=("email:" + ",".join(recipients),))
        assert len(rule.notify[0]) > 1024
        save_rule(es, settings, rule)
        store_alerts(es, settings, rule, range(2), time.time())
        assert collect_status(es, settings)["alerts"]["pending_delivery"] == 2
        assert Outbox(es, settings.alerts).sweep() == 2
        messages = smtp.wait_for(2)
        assert len(messages) == 2 and sorted(smtp.envelopes[0][1]) == sorted(recipients)
    assert collect_status(es, settings)["alerts"]["pending_delivery"] == 0


# --- a target that fails, then recovers ----------------------------------------------------

def keys_by_alert(records: list[dict]) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for record in records:
        keys.setdefault(record["body"]["alert_id"], set()).add(record["headers"]["Idempotency-Key"])
    return keys


@pytest.mark.parametrize("how", ["503", "hang", "trickle", "slow-body"])
def test_a_webhook_that_fails_its_first_attempts_gets_each_alert_once_with_one_idempotency_key(
        how, es, alert_settings):
    """503s, a target that accepts and never answers (webhook_timeout 1 s), one that trickles
    its headers and one that trickles its error body: the first three attempts fail, each is
    retried, and once the target answers every alert arrives once, its retries under the same
    Idempotency-Key."""
    with WebhookReceiver() as hook:
        hook.fail("/hook", how=how, times=3)
        rule = Rule("vents", "ventilators", notify=(f"webhook:{hook.url('/hook')}",))
        save_rule(es, alert_settings, rule)
        ids = store_alerts(es, alert_settings, rule, range(4), time.time())
        loop = DeliveryLoop(es, alert_settings.alerts).start()
        try:
            docs = wait_until(lambda: delivered(es, alert_settings, "vents", 4), timeout=120)
        finally:
            loop.stop()
        assert docs, f"not delivered: {[d['deliveries'] for d in alert_docs(es, alert_settings, 'vents')]}"
        assert [r["how"] for r in hook.refused] == [how] * 3  # the fault happened, three times
        assert sorted(body["alert_id"] for body in hook.bodies()) == sorted(ids)  # each once
        retried = keys_by_alert(hook.refused)
        assert set(retried) == {ids[0]}  # the target is paused as a whole: only its oldest alert was tried
        assert keys_by_alert(hook.received)[ids[0]] == retried[ids[0]]  # one key for every try of it
        assert len({key for keys in keys_by_alert(hook.received).values() for key in keys}) == 4
        first = next(d for d in docs if d["alert_id"] == ids[0])["deliveries"][0]
        assert first["attempts"] == 4 and first["last_error"] == ""


def test_a_webhook_refusing_connections_gets_each_alert_once_when_it_comes_up(es, alert_settings):
    port = closed_port()
    rule = Rule("vents", "ventilators", notify=(f"webhook:http://127.0.0.1:{port}/hook",))
    save_rule(es, alert_settings, rule)
    ids = store_alerts(es, alert_settings, rule, range(3), time.time())
    loop = DeliveryLoop(es, alert_settings.alerts).start()
    try:
        def refused_twice() -> bool:
            return any(d["deliveries"][0]["attempts"] >= 2 for d in alert_docs(es, alert_settings, "vents"))

        assert wait_until(refused_twice, timeout=60), "the target was not retried"
        errors = {d["deliveries"][0]["last_error"] for d in alert_docs(es, alert_settings, "vents")} - {""}
        assert errors and all("ConnectionRefusedError" in error for error in errors), errors
        with WebhookReceiver(port=port) as hook:
            docs = wait_until(lambda: delivered(es, alert_settings, "vents", 3), timeout=120)
            assert docs, f"not delivered: {[d['deliveries'] for d in alert_docs(es, alert_settings, 'vents')]}"
    finally:
        loop.stop()
    assert sorted(body["alert_id"] for body in hook.bodies()) == sorted(ids)
    assert max(d["deliveries"][0]["attempts"] for d in docs) >= 3


# --- the guarded sender ------------------------------------------------------------------

def test_a_trickling_webhook_is_cut_at_the_deadline(alert_settings):
    with HostileEndpoint("trickle") as endpoint:
        started = time.monotonic()
        with pytest.raises(DeliveryError, match="within 1s"):
            Senders(alert_settings.alerts).send(parse_target(f"webhook:{endpoint.url('/hook')}"), "r",
                                                [{"alert_id": "a1", "rule": "r"}], False, time.time())
        held = time.monotonic() - started
    assert endpoint.requests == 1 and endpoint.sent > 0  # it was trickling when we gave up
    assert held < alert_settings.alerts.webhook_timeout + 4, f"send() held {held:.1f}s"


def test_a_huge_error_body_is_not_read(alert_settings):
    with HostileEndpoint("flood") as endpoint:
        with pytest.raises(DeliveryError, match="HTTP 500"):
            Senders(alert_settings.alerts).send(parse_target(f"webhook:{endpoint.url('/hook')}"), "r",
                                                [{"alert_id": "a1", "rule": "r"}], False, time.time())
        assert endpoint.hung_up.wait(30)
    assert endpoint.sent < 64 << 20, f"{endpoint.sent >> 20} MiB of the 400 MiB body were taken"


def test_claims_outlive_the_longest_send(alert_settings, es):
    with pytest.raises(ConfigError, match="claim_seconds"):
        Outbox(es, dataclasses.replace(alert_settings.alerts, claim_seconds=3.0, webhook_timeout=10.0))


def test_webhooks_ignore_proxies_and_netrc(tmp_path, alert_settings, monkeypatch):
    with WebhookReceiver() as hook, WebhookReceiver() as proxy:
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login stolen password netrc-secret\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        monkeypatch.setenv("HTTP_PROXY", proxy.url(""))
        monkeypatch.setenv("http_proxy", proxy.url(""))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        Senders(alert_settings.alerts).send(parse_target(f"webhook:{hook.url('/hook')}"), "r",
                                            [{"alert_id": "a1", "rule": "r"}], False, time.time())
        assert proxy.received == [] and len(hook.received) == 1
        assert "Authorization" not in hook.received[0]["headers"]


# --- the loop ----------------------------------------------------------------------------

@pytest.mark.slow
def test_matching_only_stores_alerts_and_the_loop_delivers_them_and_runs_periodic_jobs(es, alert_settings):
    with WebhookReceiver() as hook:
        save_rule(es, alert_settings, Rule("vents", "ventilators", notify=(f"webhook:{hook.url('/hook')}",)))
        articles = [enriched(n) for n in range(3)]
        match_in_pipeline(alert_settings, articles, [a.article_id for a in articles])
        assert hook.received == []  # no worker sends: the pipeline is done and nothing went out
        assert len(alert_docs(es, alert_settings, "vents")) == 3
        ticks: list[float] = []

        def broken() -> None:
            raise RuntimeError("a job that always fails")

        loop = DeliveryLoop(es, alert_settings.alerts, jobs=[PeriodicJob("ticks", 0.2, lambda: ticks.append(1)),
                                                             PeriodicJob("broken", 0.2, broken)]).start()
        try:
            assert len(hook.wait_for(3, timeout=60)) == 3
            assert wait_until(lambda: len(ticks) >= 3)  # the failing job stops neither delivery nor the others
        finally:
            loop.stop()
        stopped_at = len(ticks)
    time.sleep(0.5)
    assert len(ticks) == stopped_at  # stop() ended the jobs too


@pytest.mark.slow
def test_alerts_deliver_stops_cleanly_on_sigterm_and_leaves_the_rest_pending(tmp_path, es, alert_settings):
    config = str(cli_config(tmp_path, alert_settings))
    with WebhookReceiver() as hook:
        rule = Rule("vents", "ventilators", notify=(f"webhook:{hook.url('/hook')}",))
        save_rule(es, alert_settings, rule)
        store_alerts(es, alert_settings, rule, range(5), time.time())
        hook.stall("/hook", 2.0)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICSEARCH_")}
        deliver = subprocess.Popen([sys.executable, "-m", "newsbeam.pipeline.cli", "alerts", "deliver", "--config",
                                    config], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        try:
            assert wait_until(lambda: hook.bodies("/hook"), timeout=120)  # mid-way through the first send
            deliver.send_signal(signal.SIGTERM)
            output, _ = deliver.communicate(timeout=60)
        finally:
            deliver.kill()
        assert deliver.returncode == 128 + signal.SIGTERM, output[-3000:]
        assert "stopped by SIGTERM" in output
        assert len(hook.bodies("/hook")) == 1
        docs = alert_docs(es, alert_settings, "vents")
        assert all(r["claimed_until"] is None for d in docs for r in d["deliveries"])
        assert sum(1 for d in docs if d["pending_targets"]) == 4
        hook.stall("/hook", 0)
        resumed = newsbeam("alerts", "deliver", "--duration", "5", "--config", config)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(hook.bodies("/hook")) == 5
    assert all(not d["pending_targets"] for d in alert_docs(es, alert_settings, "vents"))


# --- no secret outside the rules index ---------------------------------------------------

SECRET = "T0SECRET/B0SECRET/xoxb-SECRET-token"


@pytest.mark.slow
def test_no_target_address_reaches_alert_documents_errors_logs_or_status(es, alert_settings, caplog):
    with WebhookReceiver() as hook:
        hook.fail(f"/services/{SECRET}")
        refused = f"http://hooker:pa55word@127.0.0.1:{closed_port()}/hooks/{SECRET}"
        recipients = "secret.editor@example.org,other.secret@example.org"
        rule = Rule("vents", "ventilators", notify=(f"slack:{hook.url(f'/services/{SECRET}')}",
                                                    f"webhook:{refused}", f"email:{recipients}"))
        save_rule(es, alert_settings, rule)
        smtp_down = dataclasses.replace(alert_settings.alerts, smtp=dataclasses.replace(
            alert_settings.alerts.smtp, port=closed_port()))
        articles = [enriched(n) for n in range(2)]
        match_in_pipeline(alert_settings, articles, [a.article_id for a in articles])
        with caplog.at_level(logging.INFO):
            Outbox(es, smtp_down).sweep()
        refused = len(hook.refused)
    docs = alert_docs(es, alert_settings, "vents")
    assert len(docs) == 2 and all(any(d["deliveries"][n]["last_error"] for d in docs) for n in range(3))
    es.indices.refresh(index=target_state_index(alert_settings.alerts))
    states = es.search(index=target_state_index(alert_settings.alerts))["hits"]["hits"]
    assert len(states) == 3  # all three targets failed and back off
    status = collect_status(es, alert_settings)
    stored = json.dumps([docs, states, status]) + caplog.text
    for secret in ("SECRET", "pa55word", "hooker", "secret.editor", "other.secret"):
        assert secret not in stored, f"{secret!r} leaked"
    assert "slack:127.0.0.1" in stored and "email:2 recipient(s) at example.org" in stored
    assert refused == 1  # the Slack target answered 503 once, then backed off


def test_credentials_in_the_elasticsearch_url_are_not_in_errors():
    settings = ElasticsearchSettings(url=f"http://newsbeam:hunter2-secret@127.0.0.1:{closed_port()}",
                                     request_timeout=5)
    with pytest.raises(ElasticsearchUnavailable) as raised:
        connect(settings)
    assert "127.0.0.1" in str(raised.value) and "hunter2" not in str(raised.value)


# --- links and Slack text ----------------------------------------------------------------

HOSTILE = {"alert_id": "a1", "rule": "desk", "article_id": "x1", "source": "news.example.org",
           "title": "Breaking *now* _here_ ~gone~", "url": "javascript:alert(document.cookie)",
           "published_at": "2020-04-09T11:00:00Z", "matched_terms": ["ventilators"],
           "matched_at": "2020-04-09T11:01:00.000Z", "topics": [],
           "snippet": "100 **ventilators** *bold* _it_ ~strike~ `code` see https://evil.example/x or "
                      "www.evil.example or mail phish@evil.example"}


def test_unsafe_links_and_slack_formatting_never_reach_a_target(alert_settings):
    with WebhookReceiver() as hook, SmtpReceiver() as smtp:
        settings = dataclasses.replace(alert_settings.alerts, smtp=dataclasses.replace(
            alert_settings.alerts.smtp, port=smtp.port))
        senders = Senders(settings)
        for url in ("javascript:alert(document.cookie)", "data:text/html,<script>alert(1)</script>",
                    " JAVASCRIPT:alert(1)"):
            alert = {**HOSTILE, "url": url}
            senders.send(parse_target(f"slack:{hook.url('/slack')}"), "desk", [alert], False, time.time())
            senders.send(parse_target(f"webhook:{hook.url('/hook')}"), "desk", [alert], False, time.time())
            senders.send(parse_target("email:desk@example.org"), "desk", [alert], False, time.time())
        messages = smtp.wait_for(3)
        assert len(messages) == 3
        seen = json.dumps(hook.bodies()) + "".join(m.get_body(("html",)).get_content() +
                                                   m.get_body(("plain",)).get_content() for m in messages)
        assert not re.search(r"(?i)javascript:|data:text", seen)
        assert all(body["article"]["url"] is None for body in hook.bodies("/hook"))

        senders.send(parse_target(f"slack:{hook.url('/slack')}"), "desk",
                     [{**HOSTILE, "url": "https://news.example.org/a"}], False, time.time())
        text = hook.bodies("/slack")[-1]["text"]
    ours = re.sub(r"<https://news\.example\.org/a\|[^>]*>", "", text)
    assert ours.count("*") == 4  # *newsbeam: desk* and the highlight *ventilators*: nothing from the article
    assert "*ventilators*" in ours and not re.search(r"[_~`]", ours)
    assert "://" not in ours and not re.search(r"\w\.\w|\w@\w", ours)  # nothing Slack would link
    assert "https://news.example.org/a|" in text  # our own link stays


# --- a bounded run -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_bounded_run_exits_leaves_undelivered_alerts_pending_and_status_counts_them(tmp_path, es, alert_settings,
                                                                                   feed_server):
    fixtures = fixture_articles()
    feed = feed_server.serve("/world.xml", rss([fixtures["ventilators"], fixtures["late"]]))
    config = cli_config(tmp_path, alert_settings)
    dead = f"webhook:http://127.0.0.1:{closed_port()}/hooks/{SECRET}"
    save_rule(es, alert_settings, Rule("relief", "ventilator OR mask", notify=(dead,)))
    es_url = alert_settings.elasticsearch.url.replace("http://", "http://newsbeam:hunter2-secret@")
    run = newsbeam("run", "--config", str(config), "--feed", feed, "--es-url", es_url, "--duration", "25")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "hunter2" not in run.stderr and "SECRET" not in run.stderr
    assert "alert delivery to webhook:127.0.0.1" in run.stderr  # it was tried, and failed
    status = newsbeam("status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stderr
    alerts = json.loads(status.stdout)["alerts"]
    assert alerts["total"] == 2 and alerts["pending_delivery"] == 2 and alerts["pending_targets"] == 1
    [backing_off] = alerts["targets_backing_off"]
    assert backing_off["target_label"].startswith("webhook:127.0.0.1") and backing_off["failures"] >= 1
    assert "SECRET" not in status.stdout
    text = newsbeam("status", "--config", str(config))
    assert "2 awaiting delivery (to 1 target(s))" in text.stdout and "backing off" in text.stdout


def test_credentials_in_a_feed_url_reach_no_article_feed_health_or_dead_letter():
    from newsbeam.transforms.deadletter import dead_letter
    from newsbeam.transforms.feedstate import FeedState, health_doc
    from newsbeam.transforms.fetch import FetchResult
    from newsbeam.transforms.parse import parse_dead_letter, read_feed
    from newsbeam.transforms.settings import Feed

    url = "https://reader:feed-pa55@feeds.example.org/private.xml"
    feed = Feed(url=url)
    result = FetchResult(feed, url, 200, {}, rss([fixture_articles()["ventilators"]]), time.time(), 0.1)
    [article] = read_feed(result, 10).articles
    stored = json.dumps([
        json.loads(article.to_payload()),  # every field of the record, the working ones included
        health_doc(FeedState(url=url, final_url=url, error=f"HTTP 500 from {url}"), feed),
        dead_letter("fetch", "http_5xx", f"HTTP 500 from {url}", feed_url=url, url=url),
        parse_dead_letter(dataclasses.replace(result, body=b"<html>"), read_feed(
            dataclasses.replace(result, body=b"<html>"), 10)),
    ])
    assert "feed-pa55" not in stored and "reader" not in stored
    assert article.feed_url == "https://***@feeds.example.org/private.xml"


def test_alerts_stored_with_the_address_get_an_id_and_are_still_delivered(es, alert_settings):
    """Alert documents written before targets had ids carried the address itself."""
    with WebhookReceiver() as hook:
        target = f"webhook:{hook.url(f'/hooks/{SECRET}')}"
        rule = Rule("vents", "ventilators", notify=(target,))
        save_rule(es, alert_settings, rule)
        [alert] = [build_alert(rule, enriched(1), [], time.time())]
        for record in alert["deliveries"]:
            del record["target_id"], record["target_label"]
            record["target"] = target
        alert["pending_targets"] = [target]
        es.index(index=alert_settings.alerts.alerts_index, id=alert["alert_id"], document=alert, refresh=True)
        outbox = Outbox(es, alert_settings.alerts)
        assert wait_until(lambda: outbox.sweep() or hook.bodies(), timeout=30)
        assert [body["alert_id"] for body in hook.bodies()] == [alert["alert_id"]]
    [doc] = alert_docs(es, alert_settings, "vents")
    assert doc["pending_targets"] == [] and SECRET not in json.dumps(doc)


@pytest.mark.slow
def test_a_target_with_more_than_a_page_pending_gets_all_of_them(es, alert_settings):
    with WebhookReceiver() as hook:
        rule = Rule("many", "ventilators", notify=(f"webhook:{hook.url('/hook')}",))
        save_rule(es, alert_settings, rule)
        ids = store_alerts(es, alert_settings, rule, range(250), time.time())
        loop = DeliveryLoop(es, alert_settings.alerts).start()
        try:
            assert len(hook.wait_for(250, timeout=120)) == 250
        finally:
            loop.stop()
    assert sorted(body["alert_id"] for body in hook.bodies()) == sorted(ids)  # each once


# --- recording what was sent -------------------------------------------------------------

@pytest.mark.parametrize("fault", ["outage", "concurrent-write"])
def test_an_alert_sent_whose_write_back_fails_is_recorded_delivered_later_and_not_sent_again(
        es, alert_settings, caplog, fault):
    """The webhook takes the alert, then the outbox cannot record it: Elasticsearch is
    unreachable for a moment (a proxy refuses) or someone else wrote the alert meanwhile."""
    settings = dataclasses.replace(alert_settings.alerts, webhook_timeout=5.0)
    target = urlsplit(alert_settings.elasticsearch.url)
    proxy = FaultProxy(target.hostname, target.port)
    client = connect(dataclasses.replace(alert_settings.elasticsearch, url=proxy.url), check=False)
    with WebhookReceiver() as hook:
        rule = Rule("vents", "ventilators", notify=(f"webhook:{hook.url('/hook')}",))
        save_rule(es, alert_settings, rule)
        [alert_id] = store_alerts(es, alert_settings, rule, range(1), time.time())
        hook.stall("/hook", 2.0)  # the receiver has the alert 2 s before the outbox hears so
        loop = DeliveryLoop(client, settings).start()
        try:
            assert wait_until(lambda: hook.bodies(), timeout=60)
            if fault == "outage":
                proxy.refuse()
            else:
                es.update(index=alert_settings.alerts.alerts_index, id=alert_id, doc={"note": "seen"})
            if fault == "outage":  # said, and kept for the next sweep
                wait_until(lambda: "was sent to webhook" in caplog.text, timeout=60, what="the failed write-back logged")
                proxy.restore()
            docs = wait_until(lambda: delivered(es, alert_settings, "vents", 1), timeout=120)
        finally:
            loop.stop()
            proxy.close()
    assert proxy.dropped >= 1 or fault != "outage"  # the outage cut the outbox's connection
    [record] = docs[0]["deliveries"]
    assert record["attempts"] == 1 and record["claimed_until"] is None, record
    assert len(hook.bodies()) == 1  # recorded, not sent again once the claim expired


def test_a_permission_refusal_is_said_once_as_such_and_the_loop_goes_on(es, alert_settings, caplog):
    """A real 403 from the real node: the alerts index is write-blocked, so every claim is refused."""
    with WebhookReceiver() as hook:
        rule = Rule("vents", "ventilators", notify=(f"webhook:{hook.url('/hook')}",))
        save_rule(es, alert_settings, rule)
        store_alerts(es, alert_settings, rule, range(1), time.time())
        index = alert_settings.alerts.alerts_index
        es.indices.put_settings(index=index, settings={"index.blocks.write": True})
        loop = DeliveryLoop(es, alert_settings.alerts).start()
        try:
            assert loop.flush(timeout=60) and loop.flush(timeout=60) and loop.flush(timeout=60)
            refusals = [r.getMessage() for r in caplog.records if "HTTP 403" in r.getMessage()]
            assert len(refusals) == 1, refusals  # three sweeps refused, one line
            assert index in refusals[0] and "unavailable" not in caplog.text, caplog.text[-2000:]
            es.indices.put_settings(index=index, settings={"index.blocks.write": False})
            assert len(hook.wait_for(1, timeout=60)) == 1  # the loop outlived the refusals
        finally:
            loop.stop()
            es.indices.put_settings(index=index, settings={"index.blocks.write": False})
