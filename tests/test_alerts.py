"""Watch-term alerts against real services on loopback: Elasticsearch (rules, alerts and the
outbox), a webhook receiver that fails on command, an SMTP server (aiosmtpd), and
`newsbeam alerts` / `newsbeam run` as a user runs them."""
import dataclasses
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import pytest
import yaml
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from newsbeam.pipeline import cli
from newsbeam.pipeline.config import Settings
from newsbeam.transforms.alerts import MatchAlerts, RuleBook, alert_id
from newsbeam.transforms.article import Article
from newsbeam.transforms.clock import epoch
from newsbeam.transforms.delivery import DeliveryError, DeliveryLoop, Outbox, Senders, target_id
from newsbeam.transforms.elastic import connect, ensure_indices
from newsbeam.transforms.rules import Rule, parse_target, spacy_lemmatizer
from tests.support import REPO
from tests.support.cli import newsbeam, start_newsbeam, stop_newsbeam
from tests.support.config import write_config
from tests.support.feedserver import fixture_articles, rss
from tests.support.receivers import SmtpReceiver, WebhookReceiver
from tests.support.waiting import wait_until


@pytest.fixture
def alert_settings(settings) -> Settings:
    """Per-test rules and alerts indices; quick sweeps and short back-off for the tests."""
    prefix = settings.elasticsearch.articles_alias.rsplit("-", 1)[0]
    alerts = dataclasses.replace(settings.alerts, rules_index=f"{prefix}-rules", alerts_index=f"{prefix}-alerts",
                                 sweep_interval=0.5, retry_initial=0.5, retry_max=2.0)
    return dataclasses.replace(settings, alerts=alerts, poll_interval=5.0)


@pytest.fixture
def delivery(es, alert_settings):
    """The delivery loop, as `newsbeam run` starts it beside the pipeline."""
    loop = DeliveryLoop(es, alert_settings.alerts).start()
    yield loop
    loop.stop()


def tid(target: str) -> str:
    return target_id(parse_target(target))


def save_rule(es, settings: Settings, rule: Rule) -> None:
    ensure_indices(es, settings.elasticsearch, settings.alerts)
    es.index(index=settings.alerts.rules_index, id=rule.name, document=rule.to_doc(), refresh=True)


def enriched(number: int) -> Article:
    """An article as TagTopics emits it (lemmas as TagEntities writes them)."""
    return Article(article_id=f"art-{number:03d}", title=f"Hospital {number} receives ventilators",
                   url=f"https://news.example.org/ventilators/{number}", source="news.example.org",
                   language="en", published_at="2020-05-21T14:05:00Z",
                   body=f"Hospital number {number} received ventilators from the government on Monday.",
                   lemmas=f"hospital {number} receive ventilator\nhospital number {number} receive ventilator from "
                          f"the government on monday")


def match_in_pipeline(settings: Settings, articles: list[Article], created: list[str]) -> None:
    """Runs MatchAlerts over `articles`; asserts which article ids got a new alert."""
    with BeamTestPipeline() as pipeline:
        alerts = pipeline | beam.Create(articles) | MatchAlerts(settings)
        assert_that(alerts["created"] | beam.Map(lambda alert: alert["article_id"]), equal_to(created),
                    label="CreatedAlerts")
        assert_that(alerts["dead"], equal_to([]), label="NoDeadLetters")
        assert_that(alerts["articles"] | beam.Map(lambda article: article.article_id),
                    equal_to([a.article_id for a in articles]), label="EveryArticlePassesOn")


def alert_docs(es, settings: Settings, rule: str) -> list[dict]:
    es.indices.refresh(index=settings.alerts.alerts_index)
    hits = es.search(index=settings.alerts.alerts_index, query={"term": {"rule": rule}}, size=500)["hits"]["hits"]
    return [hit["_source"] for hit in hits]


def delivered(es, settings: Settings, rule: str, count: int) -> list[dict]:
    """The rule's alert documents once all `count` show every delivery done; [] until then."""
    docs = alert_docs(es, settings, rule)
    done = len(docs) == count and all(not doc["pending_targets"] and
                                      all(d["status"] == "delivered" for d in doc["deliveries"]) for doc in docs)
    return docs if done else []


@pytest.mark.slow
def test_a_webhook_down_for_a_stretch_gets_every_match_once_after_it_recovers(es, alert_settings, delivery):
    with WebhookReceiver() as hook:
        hook.fail("/hook")
        save_rule(es, alert_settings, Rule("vents", "ventilators", notify=(f"webhook:{hook.url('/hook')}",)))
        articles = [enriched(n) for n in range(12)]
        match_in_pipeline(alert_settings, articles, [a.article_id for a in articles])
        assert wait_until(lambda: len(hook.refused) >= 3, timeout=60), "the down target was not retried"
        assert hook.bodies() == []
        docs = alert_docs(es, alert_settings, "vents")
        assert len(docs) == 12 and all(doc["pending_targets"] == [tid(f"webhook:{hook.url('/hook')}")] for doc in docs)
        # One failing target is paused as a whole, not hammered once per pending alert: every
        # refused attempt was its oldest alert.
        assert len({r["body"]["alert_id"] for r in hook.refused}) == 1
        tried = [d for d in docs if d["deliveries"][0]["attempts"]]
        assert len(tried) == 1 and tried[0]["deliveries"][0]["last_error"].startswith("HTTP 503")

        hook.recover("/hook")
        docs = wait_until(lambda: delivered(es, alert_settings, "vents", 12), timeout=120)
        assert docs, "the alerts were not all delivered after the target recovered"
        bodies = hook.bodies()
        assert sorted(b["alert_id"] for b in bodies) == sorted(alert_id("vents", a.article_id) for a in articles)
        keys = {r["body"]["alert_id"]: r["headers"]["Idempotency-Key"] for r in hook.received}
        assert len(set(keys.values())) == 12
        # The retries of the oldest alert carried the key it was finally delivered with.
        assert {(r["body"]["alert_id"], r["headers"]["Idempotency-Key"]) for r in hook.refused} == {
            (alert_id, keys[alert_id]) for alert_id in {r["body"]["alert_id"] for r in hook.refused}}
        assert bodies[0]["type"] == "alert" and bodies[0]["matched_terms"] == ["ventilators"]
        assert "**ventilators**" in bodies[0]["snippet"]


@pytest.mark.slow
def test_a_process_that_exits_mid_delivery_leaves_no_alert_claimed(tmp_path, es, alert_settings):
    """The delivery loop is a daemon thread; exiting while it sends must not leave a claim that
    holds the alert back for `claim_seconds` (120 s) from the next run."""
    with WebhookReceiver() as hook:
        hook.fail("/hook")
        save_rule(es, alert_settings, Rule("vents", "ventilators", notify=(f"webhook:{hook.url('/hook')}",)))
        articles = [enriched(n) for n in range(3)]
        match_in_pipeline(alert_settings, articles, [a.article_id for a in articles])
        hook.recover("/hook")
        hook.stall("/hook", 5.0)
        pickled = tmp_path / "settings.pickle"
        pickled.write_bytes(pickle.dumps(alert_settings))
        exiting = ("import pickle, sys\n"
                   "from newsbeam.transforms.delivery import DeliveryLoop\n"
                   "settings = pickle.loads(open(sys.argv[1], 'rb').read())\n"
                   "DeliveryLoop.connect(settings.elasticsearch, settings.alerts).start().wake()\n"
                   "sys.stdin.readline()  # exit once told: the first webhook call has arrived and is stalled\n")
        process = subprocess.Popen([sys.executable, "-c", exiting, str(pickled)], cwd=REPO, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_until(hook.bodies, timeout=120), "the first webhook call never arrived"
            _, stderr = process.communicate("\n", timeout=120)
        finally:
            process.kill()
        assert process.returncode == 0, stderr[-3000:]
        assert len(hook.bodies()) == 1  # it was sending the first one when asked to exit
        docs = alert_docs(es, alert_settings, "vents")
        assert all(record["claimed_until"] is None for doc in docs for record in doc["deliveries"]), repr([d["deliveries"] for d in docs])
        hook.stall("/hook", 0)
        assert Outbox(es, alert_settings.alerts).sweep() == 2  # the next run sends the rest at once
        assert sorted(b["alert_id"] for b in hook.bodies()) == sorted(alert_id("vents", a.article_id)
                                                                      for a in articles)


@pytest.mark.slow
def test_a_burst_of_50_matches_under_a_digest_is_one_message(es, alert_settings):
    """The outbox's clock is moved on past the digest window: nothing goes out while the
    window is open, one message when it has closed, whatever the machine's speed."""
    with WebhookReceiver() as hook:
        save_rule(es, alert_settings, Rule("burst", "ventilator", notify=(f"webhook:{hook.url('/digest')}",),
                                           digest_seconds=600))
        burst = [enriched(n) for n in range(50)]
        match_in_pipeline(alert_settings, burst, [a.article_id for a in burst])
        first = min(epoch(doc["matched_at"]) for doc in alert_docs(es, alert_settings, "burst"))
        assert Outbox(es, alert_settings.alerts, clock=lambda: first + 599).sweep() == 0
        assert hook.bodies() == []  # the window is still open
        assert Outbox(es, alert_settings.alerts, clock=lambda: first + 601).sweep() == 50
        [digest] = hook.bodies()
        assert digest["type"] == "digest" and digest["rule"] == "burst" and digest["count"] == 50
        assert sorted(a["article"]["article_id"] for a in digest["alerts"]) == sorted(a.article_id for a in burst)
        assert delivered(es, alert_settings, "burst", 50)

        # Re-processed articles are already alerted; only the 5 new ones make the next digest.
        later = [enriched(n) for n in range(50, 55)]
        match_in_pipeline(alert_settings, burst[:3] + later, [a.article_id for a in later])
        newest = max(epoch(doc["matched_at"]) for doc in alert_docs(es, alert_settings, "burst"))
        assert Outbox(es, alert_settings.alerts, clock=lambda: newest + 601).sweep() == 5
        assert [body["count"] for body in hook.bodies()] == [50, 5]
        assert delivered(es, alert_settings, "burst", 55)


def nasty_alert() -> dict:
    return {"alert_id": "a1", "rule": "desk", "article_id": "x1", "source": "news.example.org",
            "title": "<!channel> Breaking: <b>ventilator</b> & mask\r\nBcc: victim@example.org",
            "url": "https://news.example.org/a?x=1&y=<2>|z", "published_at": "2020-04-09T11:00:00Z",
            "matched_terms": ["ventilators"], "matched_at": "2020-04-09T11:01:00.000Z", "topics": [],
            "snippet": "fewer than 100 **ventilators** <script>alert(1)</script> asked <@U123> and <!here> for help"}


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # loopback test server
def test_slack_and_email_escape_article_text_and_email_uses_env_credentials(alert_settings, monkeypatch):
    with WebhookReceiver() as hook, SmtpReceiver("alerts", "s3cret") as smtp:
        monkeypatch.setenv("NEWSBEAM_SMTP_USERNAME", "alerts")
        monkeypatch.setenv("NEWSBEAM_SMTP_PASSWORD", "s3cret")
        settings = dataclasses.replace(alert_settings.alerts, smtp=dataclasses.replace(
            alert_settings.alerts.smtp, host="127.0.0.1", port=smtp.port, sender="newsbeam@example.org"))
        senders = Senders(settings)
        senders.send(parse_target(f"slack:{hook.url('/slack')}"), "desk", [nasty_alert()], False, time.time())
        text = hook.bodies("/slack")[0]["text"]
        # The only Slack markup left is our own link; article text cannot ping or link.
        assert re.findall(r"<[^>]*>", text) == [
            "<https://news.example.org/a?x=1&amp;y=&lt;2&gt;%7Cz|&lt;!channel&gt; Breaking: "
            "&lt;b&gt;ventilator&lt;/b&gt; &amp; mask Bcc: victim@example.org>"]
        assert "&lt;@U123&gt;" in text and "&lt;!here&gt;" in text and "*ventilators*" in text

        senders.send(parse_target("email:desk@example.org,night@example.org"), "desk", [nasty_alert()], False,
                     time.time())
        [message] = smtp.wait_for(1)
        assert smtp.logins == ["alerts"]
        assert smtp.envelopes == [("newsbeam@example.org", ["desk@example.org", "night@example.org"])]
        assert message["Bcc"] is None and "\n" not in message["Subject"]
        html_part = message.get_body(("html",)).get_content()
        assert "<script>" not in html_part and "&lt;script&gt;alert(1)&lt;/script&gt;" in html_part
        assert "<b>ventilator" not in html_part and "<mark>ventilators</mark>" in html_part
        assert "<!channel> Breaking" in message.get_body(("plain",)).get_content()  # plain text is inert

        monkeypatch.setenv("NEWSBEAM_SMTP_PASSWORD", "wrong")
        with pytest.raises(DeliveryError, match="SMTP"):
            senders.send(parse_target("email:desk@example.org"), "desk", [nasty_alert()], False, time.time())


def cli_config(tmp_path: Path, settings: Settings, poll_interval: float = 3) -> Path:
    """A pipeline.yaml for `newsbeam` pointing at the test indices."""
    return write_config(tmp_path, settings.elasticsearch, poll_interval, alerts=settings.alerts,
                        overrides={"alerts": {"sweep_interval": 0.5, "retry_initial": 0.5, "retry_max": 2}})


@pytest.mark.slow
def test_rule_commands_and_a_running_matcher_see_every_change(tmp_path, es, alert_settings, nlp, capsys):
    config = str(cli_config(tmp_path, alert_settings))
    book = RuleBook(connect(alert_settings.elasticsearch), alert_settings.alerts.rules_index, 0.0,
                    lambda: spacy_lemmatizer(nlp))

    def active() -> list[tuple[str, str]]:
        return [(c.rule.name, c.rule.query) for c in book.current()]

    assert cli.main(["alerts", "add", "vents", "--query", "ventilator AND entity:Russia", "--notify", "log",
                     "--config", config]) == 0
    assert active() == [("vents", "ventilator AND entity:Russia")]
    assert cli.main(["alerts", "add", "vents", "--query", "mask", "--config", config]) == 2
    assert "exists; pass --replace" in capsys.readouterr().err
    assert cli.main(["alerts", "add", "vents", "--query", "mask", "--replace", "--config", config]) == 0
    assert active() == [("vents", "mask")]
    assert cli.main(["alerts", "disable", "vents", "--config", config]) == 0
    assert active() == []
    assert cli.main(["alerts", "enable", "vents", "--config", config]) == 0
    assert active() == [("vents", "mask")]

    # An import with one malformed rule saves nothing and says where the problem is.
    rules_file = tmp_path / "alerts.yaml"
    rules_file.write_text(yaml.safe_dump({"alerts": [
        {"name": "good", "query": "ventilator", "notify": ["log"]},
        {"name": "broken", "query": "ventilator AND (mask OR", "notify": ["log"]}]}))
    capsys.readouterr()
    assert cli.main(["alerts", "import", str(rules_file), "--config", config]) == 2
    error = capsys.readouterr().err
    assert "alert #2 (broken)" in error and "at position 24" in error
    assert active() == [("vents", "mask")]
    assert cli.main(["alerts", "import", str(REPO / "configs" / "alerts.yaml"), "--config", config]) == 0
    assert {name for name, _ in active()} == {"vents", "ventilators-russia", "medical-aid-digest"}
    assert cli.main(["alerts", "remove", "vents", "--config", config]) == 0
    assert "vents" not in {name for name, _ in active()}
    capsys.readouterr()
    assert cli.main(["alerts", "list", "--config", config]) == 0
    listing = capsys.readouterr().out
    assert "off  putin-kremlin" in listing and "ventilators-russia" in listing and "vents" not in listing


@pytest.mark.slow
def test_seed_scenario_one_webhook_call_one_alert_and_a_rule_added_mid_run(tmp_path, es, alert_settings,
                                                                           feed_server):
    fixtures = fixture_articles()
    items = [fixtures["ventilators"], fixtures["floods"], fixtures["election"]]
    feed = feed_server.serve("/world.xml", lambda: rss(items))
    config = str(cli_config(tmp_path, alert_settings))
    with WebhookReceiver() as hook:
        added = newsbeam("alerts", "add", "ventilators-russia", "--query", "ventilator AND entity:Russia",
                         "--notify", f"webhook:{hook.url('/hook')}", "--config", config)
        assert added.returncode == 0, added.stderr
        log = tmp_path / "run.log"
        with open(log, "w") as output:  # unbounded: a loaded machine's slow start-up takes no polls away
            run = start_newsbeam("run", "--config", config, "--feed", feed, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: hook.bodies("/hook") or run.poll() is not None, timeout=180,
                       what="the first webhook call")
            assert len(hook.bodies("/hook")) == 1, log.read_text()[-3000:]
            # A rule added while the pipeline runs catches the next matching article.
            late_rule = newsbeam("alerts", "add", "aid-italy", "--query", "mask AND location:Italy",
                                 "--notify", f"webhook:{hook.url('/late')}", "--config", config)
            assert late_rule.returncode == 0, late_rule.stderr
            # At least the rules' reload interval (the poll interval, 3 s) after the last reload, which
            # came with the articles before the rule: the next article gets the rules read anew.
            time.sleep(4)
            items.append(fixtures["late"])
            late = hook.wait_for(1, "/late", timeout=180)
        finally:
            code = stop_newsbeam(run)
        assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]
    [call] = hook.bodies("/hook")
    assert call["article"]["title"] == fixtures["ventilators"]["title"]
    assert call["rule"] == "ventilators-russia" and call["matched_terms"] == ["ventilator", "entity:Russia"]
    [alert] = alert_docs(es, alert_settings, "ventilators-russia")
    assert alert["deliveries"][0]["status"] == "delivered" and alert["pending_targets"] == []
    assert [body["article"]["title"] for body in late] == [fixtures["late"]["title"]]

    # Back-fill: the rule over what is already indexed.
    backfill = newsbeam("alerts", "test", "ventilators-russia", "--config", config)
    assert backfill.returncode == 0, backfill.stderr
    assert fixtures["ventilators"]["title"] in backfill.stdout
    assert "1 indexed article(s) match ventilators-russia" in backfill.stderr
    adhoc = newsbeam("alerts", "test", "--query", "flood OR election", "--since", "36500d", "--config", config)
    assert fixtures["floods"]["title"] in adhoc.stdout and fixtures["election"]["title"] in adhoc.stdout
    assert "2 indexed article(s) since 36500d" in adhoc.stderr


@pytest.mark.slow
def test_a_restart_neither_loses_nor_repeats_notifications(tmp_path, es, alert_settings, feed_server, runner):
    fixtures = fixture_articles()
    items = [fixtures["ventilators"], fixtures["late"], fixtures["floods"], fixtures["chips"]]
    feed = feed_server.serve("/world.xml", rss(items))
    config = str(cli_config(tmp_path, alert_settings))
    with WebhookReceiver() as hook:
        rule = Rule("relief", "ventilator OR mask OR flood",
                    notify=(f"webhook:{hook.url('/ok')}", f"webhook:{hook.url('/flaky')}"))
        save_rule(es, alert_settings, rule)
        hook.fail("/flaky")
        first = newsbeam("run", *runner, "--config", config, "--feed", feed, "--duration", "12")
        assert first.returncode == 0, first.stderr[-3000:]
        assert len(hook.bodies("/ok")) == 3 and hook.bodies("/flaky") == []
        assert len([r for r in hook.refused if r["path"] == "/flaky"]) >= 1
        docs = alert_docs(es, alert_settings, "relief")
        assert len(docs) == 3 and all(doc["pending_targets"] == [tid(f"webhook:{hook.url('/flaky')}")] for doc in docs)

        hook.recover("/flaky")
        second = newsbeam("run", *runner, "--config", config, "--feed", feed, "--duration", "12")
        assert second.returncode == 0, second.stderr[-3000:]
    expected = sorted(alert_id("relief", doc["article_id"]) for doc in docs)
    assert sorted(body["alert_id"] for body in hook.bodies("/flaky")) == expected  # the pending ones, once
    assert sorted(body["alert_id"] for body in hook.bodies("/ok")) == expected  # not again
    docs = alert_docs(es, alert_settings, "relief")
    assert len(docs) == 3 and all(doc["pending_targets"] == [] for doc in docs)
