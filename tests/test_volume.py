"""Volume alerts (transforms/volume.py) over generated histories on the real Elasticsearch.

The history is nine days of back-dated articles, each with the time it was published and the
time it reached the index, written by the pipeline's BulkWriter into indices made by
ensure_indices. What a window may see is what was indexed by its cut-off, so a live loop
stepped through the history with an injected clock sees exactly what it would have seen.
One end-to-end case serves a history as RSS from a loopback feed server through `newsbeam run`."""
from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from newsbeam.pipeline import cli
from newsbeam.pipeline.config import ElasticsearchSettings, Settings
from newsbeam.transforms.alerts import RuleBook, volume_alerts, volume_job
from newsbeam.transforms.clock import iso
from newsbeam.transforms.delivery import DeliveryLoop, Outbox, target_id
from newsbeam.transforms.elastic import BulkWriter, connect, ensure_indices
from newsbeam.transforms.rules import Rule, RuleError, parse_target, spacy_lemmatizer
from newsbeam.transforms.volume import CATCH_UP, Firing, compile_volume, due_at, replay
from tests.support.cli import newsbeam
from tests.support.feedserver import rss
from tests.support.receivers import WebhookReceiver
from tests.test_alerts import cli_config

HOUR, DAY = 3600, 86400
T0 = 1767225600  # 2026-01-01T00:00:00Z: the history's first hour
END = T0 + 9 * DAY
BUSY = [f"s{i}.example" for i in range(4)]


def article(key: str, at: float, words: str, source: str, late: float = 300, story: str | None = None,
            persons: tuple[str, ...] = ()) -> dict:
    """An article as IndexArticles writes it: published at `at`, indexed `late` seconds after."""
    return {"article_id": key, "url": f"https://{source}/{key}", "title": f"{words} ({key})", "lemmas": words,
            "source": source, "feed_url": f"https://{source}/rss", "language": "en", "published_at": iso(at),
            "indexed_at": iso(at + late), "story_id": story or key, "persons": list(persons),
            "entities": [{"name": p, "label": "PERSON", "text": p, "count": 1} for p in persons], "topics": []}


def stream(prefix: str, words: str, start: float, hours: int, per_hour: int, sources=BUSY, skip=(), **kw) -> list:
    """`per_hour` articles every hour, spread over the hour and the sources; none in `skip` hours."""
    return [article(f"{prefix}-{h}-{i}", start + h * HOUR + 60 + i * (HOUR - 120) / per_hour, words,
                    sources[(h * per_hour + i) % len(sources)], **kw)
            for h in range(hours) if start + h * HOUR not in skip for i in range(per_hour)]


def burst(prefix: str, words: str, hour: float, count: int, sources=BUSY, **kw) -> list:
    return [article(f"{prefix}-{i}", hour + 30 + i * 60, words, sources[i % len(sources)], **kw)
            for i in range(count)]


def history() -> list[dict]:
    """Nine days; every event the tests look for, and everything around it that must not fire."""
    docs = stream("vent", "ventilator supply", T0, 9 * 24, 4)
    for hour in (T0 + 8 * DAY + 10 * HOUR, T0 + 8 * DAY + 11 * HOUR, T0 + 8 * DAY + 12 * HOUR):  # a lasting spike
        docs += burst(f"vent-burst-{hour}", "ventilator supply", hour, 20)
    docs += burst("vent-early", "ventilator supply", T0 + 1 * DAY + 5 * HOUR, 20)  # before a 7d baseline exists
    docs += stream("mask", "mask order", T0, 9 * 24, 4, persons=("Known Person",),
                   skip={T0 + 8 * DAY + h * HOUR for h in (2, 3, 4)})  # a drop to nothing
    # Late arrivals: published in their hour, indexed 20 minutes after it ends.
    docs += stream("oxygen", "oxygen tank", T0, 9 * 24, 2)
    docs += burst("oxygen-late", "oxygen tank", T0 + 6 * DAY + 10 * HOUR, 10, late=HOUR + 1200)
    # First mentions (persons; unseen 3d).
    docs += burst("nova", "people news", T0 + 7 * DAY + 10 * HOUR, 3, persons=("Nova Name",))
    docs += burst("nova-more", "people news", T0 + 7 * DAY + 11 * HOUR, 3, persons=("Nova Name",))
    docs += burst("solo", "people news", T0 + 7 * DAY + 12 * HOUR, 3, sources=["one.example"], persons=("Solo Name",))
    docs += [article("old-first", T0 + 5 * DAY, "people news", "s0.example", persons=("Old Name",))]
    docs += burst("old", "people news", T0 + 7 * DAY + 14 * HOUR, 3, persons=("Old Name",))
    docs += burst("early-name", "people news", T0 + 1 * DAY + 2 * HOUR, 3, persons=("Early Name",))
    docs += burst("hanta", "hantavirus case", T0 + 7 * DAY + 15 * HOUR, 3)
    # Stories.
    six = [f"wire{i}.example" for i in range(6)]
    docs += burst("story-a", "story text", T0 + 7 * DAY + 3 * HOUR, 6, sources=six, story="story-a")
    docs += burst("story-a-more", "story text", T0 + 7 * DAY + 4 * HOUR, 2, sources=["w7.example", "w8.example"],
                  story="story-a")
    docs += burst("story-b", "story text", T0 + 7 * DAY + 5 * HOUR, 6, sources=six[:2], story="story-b")
    docs += burst("story-c", "story text", T0, 6, sources=six, story="story-c")  # in the first window of data
    # Silence: quiet.example stops at 7d - 30m; irregular.example posts every 3 hours throughout.
    docs += [article(f"quiet-{h}", T0 + h * HOUR + 1800, "quiet word", "quiet.example") for h in range(7 * 24)]
    docs += [article(f"irregular-{h}", T0 + h * HOUR + 600, "irregular word", "irregular.example")
             for h in range(0, 9 * 24, 3)]
    return docs


@pytest.fixture(scope="module")
def archive(es_url) -> ElasticsearchSettings:
    """The history, indexed once for the module's tests (they only read it)."""
    prefix = f"v{uuid.uuid4().hex[:10]}"
    settings = ElasticsearchSettings(url=es_url, articles_alias=f"{prefix}-articles",
                                     deadletter_index=f"{prefix}-deadletters", feeds_index=f"{prefix}-feeds")
    client = connect(settings)
    ensure_indices(client, settings)
    docs = history()
    outcomes = BulkWriter(client, settings.articles_alias, "article_id").write(docs)
    assert {outcome for outcome, _ in outcomes} == {"written"}
    client.indices.refresh(index=settings.articles_alias)
    assert client.count(index=settings.articles_alias)["count"] == len(docs)
    yield settings
    client.close()


@pytest.fixture(scope="module")
def lemmatize(nlp):
    return spacy_lemmatizer(nlp)


def rule(name: str, query: str = "", **doc) -> Rule:
    return Rule.from_doc({"name": name, "query": query, **doc})


def fired(es, archive, lemmatize, the_rule: Rule, since: float = T0, until: float = END) -> list[Firing]:
    return replay(es, archive.articles_alias, compile_volume(the_rule, lemmatize), since, until)


def at(firings: list[Firing]) -> list[tuple[str, str]]:
    """(window start, key) of each firing."""
    return [(iso(f.window_start)[:16], f.key) for f in firings]


def day_hour(days: int, hours: int) -> str:
    return iso(T0 + days * DAY + hours * HOUR)[:16]


def test_volume_rules_round_trip_and_bad_settings_are_named():
    for doc in ({"name": "a", "query": "ventilator", "spike": {"ratio": "2.5x", "direction": "both"}},
                {"name": "b", "first_mention": {"field": "org", "unseen": "10d"}, "digest": "1h"},
                {"name": "c", "spread": {"sources": 4, "window": "30m", "by": "indexed_at"}},
                {"name": "d", "silence": {"after": "auto", "feeds": ["https://x.example/rss"]}}):
        saved = Rule.from_doc(doc)
        assert Rule.from_doc(saved.to_doc()) == saved and saved.kind == next(iter(set(doc) & {
            "spike", "first_mention", "spread", "silence"}))
    assert Rule.from_doc({"name": "b", "first_mention": {}}).volume.min_count == 3
    for doc, problem in (({"spike": {"ratio": "1x"}}, "spike: ratio '1x' must be above 1"),
                         ({"spike": {"baseline": "90m"}}, "spike: baseline must be a whole number of windows"),
                         ({"spread": {}}, "spread: needs sources"),
                         ({"spread": {"sources": 3, "ratio": 2}}, "spread: unknown key(s) ratio"),
                         ({"silence": {"after": "soon"}}, "duration 'soon'"),
                         ({"spike": {}, "spread": {"sources": 2}}, "one rule kind at a time"),
                         ({"first_mention": {"field": "colour"}}, "field must be one of"),
                         ({"spike": {"window": "90s"}}, "must be whole minutes")):
        with pytest.raises(RuleError, match=re.escape(problem)):
            Rule.from_doc({"name": "bad", **doc})
    with pytest.raises(RuleError, match="needs a 'name' and a 'query'"):
        Rule.from_doc({"name": "match-rule-without-query"})


def test_the_per_article_matcher_leaves_volume_rules_alone(es, live_alerts, lemmatize):
    book = RuleBook(es, live_alerts.alerts.rules_index, 0.0, lambda: lemmatize)
    es.index(index=live_alerts.alerts.rules_index, id="per-article", refresh=True,
             document=rule("per-article", "ventilator").to_doc())
    assert [c.rule.name for c in book.current()] == ["per-article"]  # the live rules here are all volume rules


# --- each kind: the event fires once, what is steady never does, the warm-up holds -----------------

@pytest.mark.slow
def test_a_spike_fires_once_for_a_lasting_burst_and_not_before_its_baseline_exists(es, archive, lemmatize):
    spike = {"ratio": "3x", "window": "1h", "baseline": "7d", "min": 5}
    [firing] = fired(es, archive, lemmatize, rule("vents", "ventilator", spike=spike))
    assert at([firing]) == [(day_hour(8, 10), "up")]  # three hours of burst, one alert; the day-1 burst: warm-up
    assert (firing.count, firing.baseline, firing.distinct_sources) == (24, 4.0, 4)
    assert len(firing.baseline_counts) == 168 and set(firing.baseline_counts) == {4}
    assert len(firing.articles) == 20 and all(a["published_at"] >= day_hour(8, 10) for a in firing.articles)
    # The same rule with a baseline the history covers early on also sees the day-1 burst.
    short = fired(es, archive, lemmatize, rule("vents-1d", "ventilator", spike={**spike, "baseline": "1d"}))
    assert at(short) == [(day_hour(1, 5), "up"), (day_hour(8, 10), "up")]
    # A cool-down shorter than the burst lets a lasting spike fire again once it is over.
    again = fired(es, archive, lemmatize, rule("vents-cd", "ventilator", spike={**spike, "cooldown": "2h"}))
    assert at(again) == [(day_hour(8, 10), "up"), (day_hour(8, 12), "up")]
    # Steady streams never fire, up or down.
    assert fired(es, archive, lemmatize, rule("masks-up", "mask", spike=spike)) == []
    down = {**spike, "direction": "down", "min": 3}
    assert fired(es, archive, lemmatize, rule("vents-down", "ventilator", spike=down)) == []
    # A drop to nothing fires once, down.
    [drop] = fired(es, archive, lemmatize, rule("masks-down", "mask", spike=down))
    assert at([drop]) == [(day_hour(8, 2), "down")] and (drop.count, drop.baseline) == (0, 4.0)


def test_late_arrivals_count_in_the_window_they_were_published_in(es, archive, lemmatize):
    spike = {"ratio": "3x", "window": "1h", "baseline": "2d", "min": 5}
    [late] = fired(es, archive, lemmatize, rule("oxygen", "oxygen", spike=spike))  # settle 30m > 20m late
    assert at([late]) == [(day_hour(6, 10), "up")] and late.count == 12
    assert sum(a["article_id"].startswith("oxygen-late") for a in late.articles) == 10
    # Arriving later than the settle delay, they are not counted: the window was closed without them.
    assert fired(es, archive, lemmatize, rule("oxygen-10m", "oxygen", spike={**spike, "settle": "10m"})) == []
    # Counted by indexing time, the same articles make the next hour spike.
    by_index = fired(es, archive, lemmatize, rule("oxygen-idx", "oxygen", spike={**spike, "by": "indexed_at"}))
    assert at(by_index) == [(day_hour(6, 11), "up")]


def test_a_first_mention_fires_once_per_new_name_with_enough_articles_and_sources(es, archive, lemmatize):
    first = {"field": "person", "unseen": "3d", "min": 3, "sources": 2, "window": "1h"}
    firings = fired(es, archive, lemmatize, rule("names", first_mention=first))
    # Known Person: every hour; Solo Name: one source; Old Name: seen two days before; Early Name:
    # before the history covers three days; Nova Name: once, though mentioned again the next hour.
    assert at(firings) == [(day_hour(7, 10), "Nova Name")]
    assert (firings[0].count, firings[0].distinct_sources) == (3, 3)
    # A term: the query itself, new.
    [term] = fired(es, archive, lemmatize, rule("hanta", "hantavirus", first_mention={**first, "field": "term"}))
    assert at([term]) == [(day_hour(7, 15), "")] and term.count == 3
    assert fired(es, archive, lemmatize, rule("vent-new", "ventilator", first_mention={**first, "field": "term"})) == []


def test_a_story_spreading_to_enough_sources_fires_once(es, archive, lemmatize):
    firings = fired(es, archive, lemmatize, rule("spread", spread={"sources": 5, "window": "1h"}))
    # story-b: six copies, two sources; story-c: in the history's first window (warm-up).
    assert at(firings) == [(day_hour(7, 3), "story-a")]
    assert (firings[0].count, firings[0].distinct_sources, len(firings[0].articles)) == (6, 6, 6)


@pytest.mark.slow
def test_silence_fires_once_per_gap_fixed_or_learnt_and_never_for_a_regular_source(es, archive, lemmatize):
    last_quiet = iso(T0 + 7 * DAY - 1800)
    [fixed] = fired(es, archive, lemmatize, rule("quiet", "source:quiet.example", silence={"after": "6h"}))
    assert (fixed.key, iso(fixed.window_end)[:16]) == (last_quiet, day_hour(7, 6))  # two days of silence, one alert
    assert fixed.articles[0]["article_id"] == f"quiet-{7 * 24 - 1}" and "nothing for 6h30m" in fixed.summary
    [learnt] = fired(es, archive, lemmatize, rule("quiet-auto", "source:quiet.example", silence={"after": "auto"}))
    assert (learnt.key, iso(learnt.window_end)[:16], learnt.threshold) == (last_quiet, day_hour(7, 2), 2.0 * HOUR)
    [by_feed] = fired(es, archive, lemmatize, rule("quiet-feed", silence={
        "after": "6h", "feeds": ["https://quiet.example/rss"]}))
    assert by_feed.firing_id != fixed.firing_id and by_feed.key == fixed.key
    # Every three hours is irregular.example's usual gap: never silent for the learnt threshold; silent
    # once in each gap for a fixed threshold shorter than it (72 posts, 71 gaps, the first before the
    # warm-up, the last still open at the end).
    assert fired(es, archive, lemmatize, rule("irregular", "source:irregular.example", silence={"after": "auto"})) == []
    gaps = fired(es, archive, lemmatize, rule("irregular-2h", "source:irregular.example", silence={"after": "2h"}))
    assert len(gaps) == 70 and len({f.key for f in gaps}) == 70
    assert fired(es, archive, lemmatize, rule("busy", "source:s0.example", silence={"after": "auto"})) == []


# --- live equals back-fill; restarts double nothing ---------------------------------------------

LIVE_RULES = [
    rule("live-spike", "ventilator", spike={"ratio": "3x", "window": "1h", "baseline": "7d", "min": 5}),
    rule("live-drop", "mask", spike={"ratio": "3x", "baseline": "7d", "min": 3, "direction": "down"}),
    rule("live-oxygen", "oxygen", spike={"ratio": "3x", "baseline": "2d", "min": 5}),
    rule("live-names", first_mention={"field": "person", "unseen": "3d", "sources": 2}),
    rule("live-spread", spread={"sources": 5, "window": "30m", "cooldown": "1h"}),
    rule("live-quiet", "source:quiet.example", silence={"after": "auto"}),
    rule("live-irregular", "source:irregular.example", silence={"after": "2h"}),
]


@pytest.fixture
def live_alerts(es, archive) -> Settings:
    """A rules and an alerts index of this test's own, the rules saved in it."""
    prefix = f"l{uuid.uuid4().hex[:10]}"
    settings = Settings(elasticsearch=archive)
    settings = dataclasses.replace(settings, alerts=dataclasses.replace(
        settings.alerts, rules_index=f"{prefix}-rules", alerts_index=f"{prefix}-alerts", reload_interval=0.0))
    ensure_indices(es, settings.elasticsearch, settings.alerts)
    for the_rule in LIVE_RULES:
        es.index(index=settings.alerts.rules_index, id=the_rule.name, document=the_rule.to_doc(), refresh=True)
    yield settings
    es.indices.delete(index=[settings.alerts.rules_index, settings.alerts.alerts_index])


def stored_alerts(es, settings: Settings) -> list[dict]:
    es.indices.refresh(index=settings.alerts.alerts_index)
    return [hit["_source"] for hit in es.search(index=settings.alerts.alerts_index, size=1000)["hits"]["hits"]]


@pytest.mark.slow  # a soak: the live loop ticked every 20 min through three simulated days, with restarts
def test_the_live_loop_makes_exactly_the_back_fills_firings_and_a_restart_doubles_nothing(es, live_alerts, lemmatize):
    start, tick = T0 + 6 * DAY + 5 * 60, 20 * 60  # ticks at :05, :25, :45 — never on a window's due time
    live = volume_alerts(live_alerts.elasticsearch, live_alerts.alerts, "", lemmatize)
    made: list[Firing] = []
    restarts = 0
    now = start
    while now <= END:
        made += live.run_due(now)
        # Restart right after a firing was stored (in the middle of the next window), and once more later.
        if made and (restarts == 0 or (restarts == 1 and now > T0 + 8 * DAY + 11 * HOUR)):
            live.close()
            live = volume_alerts(live_alerts.elasticsearch, live_alerts.alerts, "", lemmatize)
            restarts += 1
            assert live.run_due(now) == []  # the restarted loop re-evaluates its catch-up: all there already
        now += tick
    live.close()
    assert restarts == 2

    alerts = stored_alerts(es, live_alerts)
    assert len(alerts) == len(made) == len({f.firing_id for f in made})  # stored once each, nothing doubled
    expected: dict[str, list[str]] = {}
    for the_rule in LIVE_RULES:
        firings = replay(es, live_alerts.elasticsearch.articles_alias, compile_volume(the_rule, lemmatize),
                         start - CATCH_UP, END)
        expected[the_rule.name] = sorted(f.firing_id for f in firings)
        assert sorted(f.firing_id for f in made if f.rule == the_rule.name) == expected[the_rule.name], the_rule.name
    assert {name for name, ids in expected.items() if ids} == {r.name for r in LIVE_RULES}  # every kind fired
    assert len(expected["live-spike"]) == 1 and len(expected["live-irregular"]) > 10
    # Each alert is due no earlier than its window's settle time, and carries its evidence.
    for alert in alerts:
        assert alert["kind"] in ("spike", "first_mention", "spread", "silence") and alert["pending_targets"] == [target_id(parse_target("log"))]
        assert (alert["article_ids"] or alert["volume_key"] == "down") and alert["window_end"] > alert["window_start"]
    spike = next(a for a in alerts if a["rule"] == "live-spike")
    assert (spike["count"], spike["baseline"], len(spike["baseline_counts"])) == (24, 4.0, 168)


def test_a_stored_firing_is_delivered_by_the_outbox_with_its_counts(es, live_alerts, lemmatize):
    with WebhookReceiver() as hook:
        the_rule = dataclasses.replace(LIVE_RULES[0], notify=(f"webhook:{hook.url('/volume')}",))
        es.index(index=live_alerts.alerts.rules_index, id=the_rule.name, document=the_rule.to_doc(), refresh=True)
        live = volume_alerts(live_alerts.elasticsearch, live_alerts.alerts, "", lemmatize)
        window_end = T0 + 8 * DAY + 11 * HOUR
        [firing] = [f for f in live.run_due(due_at(the_rule.volume, window_end)) if f.rule == the_rule.name]
        live.close()
        client = connect(live_alerts.elasticsearch)
        assert Outbox(client, live_alerts.alerts).sweep() >= 1
        client.close()
        [body] = hook.wait_for(1, "/volume", timeout=10)
    assert body["alert_id"] == firing.firing_id and body["rule"] == "live-spike"
    assert body["volume"]["kind"] == "spike" and body["volume"]["count"] == 24
    assert body["volume"]["window_end"] == iso(window_end) and len(body["volume"]["articles"]) == 20
    assert body["article"]["title"].startswith("spike: 24 articles in 1h")


# --- the commands and one run of the pipeline -----------------------------------------------------

def test_alerts_add_show_and_test_a_volume_rule(tmp_path, es, archive, live_alerts, capsys):
    config = str(cli_config(tmp_path, live_alerts))
    assert cli.main(["alerts", "add", "vent-spike", "--query", "ventilator", "--spike", "3x", "--window", "1h",
                     "--baseline", "7d", "--min", "5", "--config", config]) == 0
    assert "spike: window 1h, by published_at, settle 30m, cooldown 6h" in capsys.readouterr().out
    assert cli.main(["alerts", "add", "bad", "--query", "x", "--window", "1h", "--config", config]) == 2
    assert "--window is for volume rules" in capsys.readouterr().err
    assert cli.main(["alerts", "add", "bad", "--spike", "3x", "--baseline", "90m", "--config", config]) == 2
    assert "baseline must be a whole number of windows" in capsys.readouterr().err
    assert cli.main(["alerts", "test", "vent-spike", "--since", "2026-01-01", "--until", "2026-01-10",
                     "--config", config]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["2026-01-09T10:00..11:00  spike         up             spike: 24 articles in 1h "
                                "against 4.0 per 1h over 7d"]
    assert "1 firing(s) of vent-spike (spike)" in err
    assert cli.main(["alerts", "test", "--query", "source:quiet.example", "--silence", "6h", "--since", "2026-01-01",
                     "--until", "2026-01-10", "--config", config]) == 0
    assert "silence: nothing for 6h30m (more than 6h)" in capsys.readouterr().out
    assert cli.main(["alerts", "list", "--config", config]) == 0
    assert "[spike] ventilator" in capsys.readouterr().out
    assert cli.main(["alerts", "show", "vent-spike", "--config", config]) == 0
    shown = capsys.readouterr().out
    assert "query:  ventilator" in shown and "ratio 3x, baseline 7d, min 5, direction up" in shown
    assert "alerts: 0 (0 with deliveries pending)" in shown


@pytest.mark.slow  # `newsbeam run --duration 25`
def test_a_burst_served_as_a_feed_through_newsbeam_run_fires_one_spike(tmp_path, es, settings, feed_server):
    """End to end: items published over the last day and a burst in this hour, polled from a loopback
    feed by `newsbeam run` (parse, NLP, index), then the window evaluated once it is due."""
    now = datetime.now(UTC).timestamp()
    hour = now // HOUR * HOUR
    items = [{"title": f"Hospital {h} ventilator supply steady", "link": f"https://news.example.org/steady/{h}",
              "html": f"<p>Hospital {h} reports its ventilator supply is steady.</p>",
              "published": format_datetime(datetime.fromtimestamp(hour - h * HOUR + 600 - HOUR, UTC))}
             for h in range(30)]  # one an hour, the 30 hours before this one
    items += [{"title": f"Ventilator shortage at hospital {i}", "link": f"https://news.example.org/burst/{i}",
               "html": f"<p>Hospital {i} is short of ventilators, doctors say.</p>",
               "published": format_datetime(datetime.fromtimestamp(hour + (now - hour) * i / 8, UTC))}
              for i in range(8)]  # eight in this hour, up to now
    feed = feed_server.serve("/news.xml", rss(items))
    prefix = settings.elasticsearch.articles_alias.rsplit("-", 1)[0]
    settings = dataclasses.replace(settings, alerts=dataclasses.replace(
        settings.alerts, rules_index=f"{prefix}-rules", alerts_index=f"{prefix}-alerts"))
    config = str(cli_config(tmp_path, settings))
    added = newsbeam("alerts", "add", "e2e-spike", "--query", "ventilator", "--spike", "3x", "--window", "1h",
                     "--baseline", "1d", "--min", "5", "--config", config)
    assert added.returncode == 0, added.stderr
    run = newsbeam("run", "--config", config, "--feed", feed, "--duration", "25")
    assert run.returncode == 0, run.stderr[-3000:]
    es.indices.refresh(index=settings.elasticsearch.articles_alias)
    assert es.count(index=settings.elasticsearch.articles_alias)["count"] == len(items)
    live = volume_alerts(settings.elasticsearch, settings.alerts, settings.nlp.model)
    assert live.run_due(now) == []  # this hour is not over: nothing to say yet
    [firing] = live.run_due(due_at(Rule.from_doc({"name": "x", "spike": {}}).volume, hour + HOUR))
    live.close()
    assert (firing.rule, firing.key, firing.window_start, firing.count) == ("e2e-spike", "up", hour, 8)
    assert firing.baseline == 1.0 and sorted(a["title"] for a in firing.articles) == sorted(
        item["title"] for item in items[-8:])
    [stored] = stored_alerts(es, settings)
    assert stored["alert_id"] == firing.firing_id and stored["count"] == 8


@pytest.mark.slow
def test_the_delivery_loop_runs_the_evaluation_and_sends_a_firing_with_real_time(es, es_settings, settings, lemmatize):
    """The delivery loop as `newsbeam run` starts it evaluates the volume rules beside its sweeps,
    on the real clock. The history is the last quarter of an hour, a minute per window."""
    minute = int(datetime.now(UTC).timestamp()) // 60 * 60 - 120  # the last minute that is due now
    docs = [article(f"steady-{m}", minute - m * 60 + 5, "ventilator supply", BUSY[m % 4], late=1) for m in range(14)]
    docs += [article(f"burst-{i}", minute + 10 + i, "ventilator supply", BUSY[i % 4], late=1) for i in range(8)]
    ensure_indices(es, es_settings)
    assert {o for o, _ in BulkWriter(es, es_settings.articles_alias, "article_id").write(docs)} == {"written"}
    es.indices.refresh(index=es_settings.articles_alias)
    prefix = es_settings.articles_alias.rsplit("-", 1)[0]
    alerts = dataclasses.replace(settings.alerts, rules_index=f"{prefix}-rules", alerts_index=f"{prefix}-alerts",
                                 sweep_interval=0.5)
    with WebhookReceiver() as hook:
        the_rule = rule("minute-spike", "ventilator", notify=[f"webhook:{hook.url('/loop')}"], spike={
            "ratio": "3x", "window": "1m", "baseline": "10m", "min": 5, "settle": "0"})
        ensure_indices(es, es_settings, alerts)
        es.index(index=alerts.rules_index, id=the_rule.name, document=the_rule.to_doc(), refresh=True)
        client = connect(es_settings)
        loop = DeliveryLoop(client, alerts, jobs=[volume_job(es_settings, alerts, "", lemmatize)]).start()
        try:
            [body] = hook.wait_for(1, "/loop", timeout=60)
        finally:
            loop.stop()
            client.close()
    assert body["rule"] == "minute-spike" and body["volume"]["count"] == 9
    assert body["volume"]["window_start"] == iso(minute) and body["volume"]["baseline"] == 1.0
