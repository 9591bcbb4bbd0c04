"""Volume alerts: spikes, first mentions, stories spreading and silence, evaluated as periodic
aggregations over the articles index (users' guide and the design: docs/volume-alerts.md).

    volume rules (rules index) -> evaluate(): each rule's newly closed windows, a few
    aggregation queries per window -> Firing -> alert document (`create`, a stable id per
    rule, key and window) -> the outbox delivers it like any alert, digests included

Windows are [k*W, (k+1)*W) seconds of the rule's time field (`published_at` unless the rule
says `indexed_at`). A window is *due* `settle + INDEX_LAG` seconds after it ends and counts only
articles indexed by `end + settle`: what a window says is a function of the stored history
alone, so the live loop (`VolumeAlerts.run_due`) and a back-fill (`replay`) run the same
function over the same windows and make the same firings. Late articles (published in the
window, indexed up to `settle` after it) count in their window.

A rule fires only once the index covers its look-back (the baseline, the unseen period, ...)
before the window: the warm-up. After a firing the same rule and key (the spike's direction,
the new name, the story) stays quiet for the cool-down, so a lasting spike is one alert.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from elasticsearch import Elasticsearch, NotFoundError

from newsbeam.transforms.clock import epoch, iso
from newsbeam.transforms.deadletter import dead_letter_for
from newsbeam.transforms.delivery import new_deliveries, summarize
from newsbeam.transforms.elastic import BulkWriter, connect
from newsbeam.transforms.entities import load_model
from newsbeam.transforms.redact import redact_url
from newsbeam.transforms.rules import (
    NEW_VALUE_FIELDS,
    Lemmatizer,
    Rule,
    VolumeSpec,
    compile_rule,
    spacy_lemmatizer,
)
from newsbeam.transforms.settings import AlertSettings, ElasticsearchSettings

_LOG = logging.getLogger(__name__)

INDEX_LAG = 60  # seconds within which an article stamped `indexed_at` is searchable (bulk write + refresh)
CATCH_UP = 86400  # a starting evaluator looks at the windows that became due this long ago
EVIDENCE_FIELDS = ["article_id", "title", "url", "source", "publisher", "feed_url", "published_at", "indexed_at",
                   "story_id"]
_CANDIDATES = 100  # new names / stories looked at per window
_GAP_SAMPLE = 10_000  # timestamps read to learn a silence rule's usual gap

# --- the rule and its firings --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VolumeRule:
    """A volume rule with its query (and feed filter) compiled for Elasticsearch."""
    rule: Rule
    query: dict[str, Any]

    @property
    def spec(self) -> VolumeSpec:
        assert self.rule.volume is not None
        return self.rule.volume


def compile_volume(rule: Rule, lemmatize: Lemmatizer) -> VolumeRule:
    if rule.volume is None:
        raise ValueError(f"rule {rule.name} is not a volume rule")
    query = compile_rule(rule, lemmatize).es_query()
    if rule.volume.feeds:
        # Articles store their feed URL without credentials (transforms/redact.py).
        feeds = [redact_url(feed) for feed in rule.volume.feeds]
        query = {"bool": {"filter": [query, {"terms": {"feed_url": feeds}}]}}
    return VolumeRule(rule, query)


@dataclasses.dataclass(frozen=True)
class Firing:
    """One volume alert: which window fired, for which key, and the evidence."""
    rule: str
    kind: str
    key: str  # spike: up|down; first_mention: the new value; spread: the story_id; silence: the last seen time
    window_start: int
    window_end: int
    count: int
    distinct_sources: int
    summary: str
    baseline: float | None = None
    baseline_counts: tuple[int, ...] = ()
    threshold: float | None = None
    articles: tuple[dict[str, Any], ...] = ()

    @property
    def firing_id(self) -> str:
        """Stable per rule, kind, key and window; a silence is one firing per gap, whatever the window."""
        window = "" if self.kind == "silence" else str(self.window_end)
        return hashlib.sha256(f"{self.rule}\x00{self.kind}\x00{self.key}\x00{window}".encode()).hexdigest()[:32]


class FiringLog:
    """The firings of one rule so far, which the cool-down looks at. A replay starts empty; the
    live evaluator loads it from the alerts index, so a restart sees what was fired before."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._ends: dict[str, list[int]] = {}

    def add(self, firing_id: str, key: str, window_end: int) -> None:
        self._ids.add(firing_id)
        self._ends.setdefault(key, []).append(window_end)

    def cooling(self, firing: Firing, cooldown: int) -> bool:
        return firing.firing_id in self._ids or any(
            firing.window_end - cooldown < end <= firing.window_end for end in self._ends.get(firing.key, ()))


# --- windows -------------------------------------------------------------------------------

def due_at(spec: VolumeSpec, window_end: int) -> int:
    return window_end + spec.settle + INDEX_LAG


def due_windows(spec: VolumeSpec, after: float, now: float) -> list[tuple[int, int]]:
    """The windows (start, end) that became due in (after, now], oldest first."""
    size, delay = spec.window, spec.settle + INDEX_LAG
    first_end = math.floor((after - delay) / size) * size + size
    last_end = math.floor((now - delay) / size) * size
    return [(end - size, end) for end in range(first_end, last_end + 1, size)]


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _between(field: str, start: float, end: float) -> dict[str, Any]:
    return {"range": {field: {"gte": _ms(start), "lt": _ms(end), "format": "epoch_millis"}}}


def _and(*queries: dict[str, Any]) -> dict[str, Any]:
    return {"bool": {"filter": list(queries)}}


# --- one window of one rule ----------------------------------------------------------------

class _Window:
    """Queries about one window: only articles indexed by its cut-off exist for them."""

    def __init__(self, client: Elasticsearch, index: str, rule: VolumeRule, start: int, end: int):
        self.client, self.index, self.rule, self.start, self.end = client, index, rule, start, end
        self.spec = rule.spec
        self.field = self.spec.time_field
        self.visible = {"range": {"indexed_at": {"lte": _ms(end + self.spec.settle), "format": "epoch_millis"}}}

    def aggregate(self, aggs: dict[str, Any], query: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Aggregations over the visible articles, with `coverage`: the oldest time in the index."""
        try:
            response = self.client.search(index=self.index, size=0, query=_and(self.visible, *(
                [query] if query else [])), aggs={"coverage": {"min": {"field": self.field}}, **aggs})
        except NotFoundError:
            return None
        return response["aggregations"]

    def warm(self, aggs: dict[str, Any], lookback: int) -> bool:
        """The index holds articles from at least `lookback` before the window."""
        oldest = aggs["coverage"]["value"]
        return oldest is not None and oldest <= _ms(self.start - lookback)

    def matching(self, start: float, end: float, sub: dict[str, Any]) -> dict[str, Any]:
        return {"filter": _and(self.rule.query, _between(self.field, start, end)), "aggs": sub}

    def evidence(self, size: int | None = None, newest_first: bool = False) -> dict[str, Any]:
        return {"top_hits": {"size": size or self.spec.limit, "sort": [{self.field: "desc" if newest_first else "asc"}],
                             "_source": {"includes": EVIDENCE_FIELDS}}}

    def evidence_by(self, field: str, values: list[str]) -> dict[str, dict[str, Any]]:
        """The evidence articles in the window for each of `values` of `field` (asked for only
        once they fire: top hits for every candidate would cost more than the counting)."""
        aggs = self.aggregate({"current": self.matching(self.start, self.end, {"values": {
            "terms": {"field": field, "size": len(values), "include": values}, "aggs": {"articles": self.evidence()}}})},
            query={"terms": {field: values}})
        found = {b["key"]: b["articles"] for b in aggs["current"]["values"]["buckets"]} if aggs else {}
        return {value: found.get(value, _NO_HITS) for value in values}

    def firing(self, key: str, count: int, sources: int, summary: str, hits: dict[str, Any], **extra: Any) -> Firing:
        articles = tuple(hit["_source"] for hit in hits["hits"]["hits"])
        return Firing(self.rule.rule.name, self.spec.kind, key, self.start, self.end, count, sources, summary,
                      articles=articles, **extra)


_SOURCES = {"sources": {"cardinality": {"field": "source"}}}
_NO_HITS: dict[str, Any] = {"hits": {"hits": []}}  # the index went away between two queries


def _spike(w: _Window) -> list[Firing]:
    spec = w.spec
    base_start = w.start - spec.baseline
    aggs = w.aggregate({"rule": w.matching(base_start, w.end, {
        "windows": {"date_histogram": {"field": w.field, "fixed_interval": f"{spec.window}s", "min_doc_count": 0,
                                       "extended_bounds": {"min": _ms(base_start), "max": _ms(w.end - spec.window)}}},
        "current": {"filter": _between(w.field, w.start, w.end), "aggs": {**_SOURCES, "articles": w.evidence()}}})})
    if aggs is None or not w.warm(aggs, spec.baseline):
        return []
    counts = {int(b["key"]) // 1000: b["doc_count"] for b in aggs["rule"]["windows"]["buckets"]}
    baseline = tuple(counts.get(t, 0) for t in range(base_start, w.start, spec.window))
    current = aggs["rule"]["current"]
    count, mean = current["doc_count"], sum(baseline) / len(baseline)
    directions = []
    if spec.direction in ("up", "both") and count >= spec.min_count and count >= spec.ratio * mean:
        directions.append("up")
    if spec.direction in ("down", "both") and mean >= spec.min_count and count * spec.ratio <= mean:
        directions.append("down")
    window = span(spec.window)
    return [w.firing(direction, count, current["sources"]["value"],
                     f"{'spike' if direction == 'up' else 'drop'}: {count} articles in {window} against "
                     f"{mean:.1f} per {window} over {span(spec.baseline)}",
                     current["articles"], baseline=mean, baseline_counts=baseline, threshold=spec.ratio)
            for direction in directions]


def _first_mention(w: _Window) -> list[Firing]:
    spec = w.spec
    field = NEW_VALUE_FIELDS[spec.field]
    seen = (w.start - spec.unseen, w.start - spec.window)  # the window before may hold the first mentions
    if not field:  # a term: the rule's own query, unseen before
        aggs = w.aggregate({"current": w.matching(w.start, w.end, {**_SOURCES, "articles": w.evidence()}),
                            "before": w.matching(*seen, {})})
        if aggs is None or not w.warm(aggs, spec.unseen):
            return []
        current = aggs["current"]
        if (aggs["before"]["doc_count"] or current["doc_count"] < spec.min_count
                or current["sources"]["value"] < spec.min_sources):
            return []
        return [w.firing("", current["doc_count"], current["sources"]["value"],
                         f"first mention: {current['doc_count']} articles from {current['sources']['value']} sources, "
                         f"none in the {span(spec.unseen)} before", current["articles"])]
    aggs = w.aggregate({"current": w.matching(w.start, w.end, {"values": {
        "terms": {"field": field, "size": _CANDIDATES, "min_doc_count": spec.min_count}, "aggs": _SOURCES}})})
    if aggs is None or not w.warm(aggs, spec.unseen):
        return []
    candidates = {b["key"]: b for b in aggs["current"]["values"]["buckets"]
                  if b["sources"]["value"] >= spec.min_sources}
    if not candidates:
        return []
    # Seen anywhere in the index, not only among the rule's matches: "new" means new to the news.
    before = w.aggregate({"seen": {"terms": {"field": field, "size": len(candidates), "include": sorted(candidates)}}},
                         query=_and({"terms": {field: sorted(candidates)}}, _between(w.field, *seen)))
    if before is None:
        return []
    known = {b["key"] for b in before["seen"]["buckets"]}
    new = sorted(value for value in candidates if value not in known)
    evidence = w.evidence_by(field, new) if new else {}
    return [w.firing(value, candidates[value]["doc_count"], candidates[value]["sources"]["value"],
                     f"first mention of {spec.field} {value!r}: {candidates[value]['doc_count']} articles from "
                     f"{candidates[value]['sources']['value']} sources, none in the {span(spec.unseen)} before",
                     evidence[value]) for value in new]


def _spread(w: _Window) -> list[Firing]:
    spec = w.spec
    aggs = w.aggregate({"current": w.matching(w.start, w.end, {"stories": {
        "terms": {"field": "story_id", "size": _CANDIDATES, "min_doc_count": spec.min_sources,
                  "order": [{"sources": "desc"}, {"_key": "asc"}]}, "aggs": _SOURCES}})})
    if aggs is None or not w.warm(aggs, spec.window):
        return []
    spread = [b for b in aggs["current"]["stories"]["buckets"] if b["sources"]["value"] >= spec.min_sources]
    evidence = w.evidence_by("story_id", sorted(b["key"] for b in spread)) if spread else {}
    return [w.firing(b["key"], b["doc_count"], b["sources"]["value"],
                     f"story spread: {b['doc_count']} copies from {b['sources']['value']} sources in "
                     f"{span(spec.window)}", evidence[b["key"]]) for b in spread]


def _usual_gap(w: _Window) -> float | None:
    """`factor` times the longest gap between the rule's articles within the baseline."""
    try:
        response = w.client.search(index=w.index, size=_GAP_SAMPLE, source=False, docvalue_fields=[
            {"field": w.field, "format": "epoch_millis"}], sort=[{w.field: "asc"}], query=_and(
            w.visible, w.rule.query, _between(w.field, w.end - w.spec.baseline, w.end)))
    except NotFoundError:
        return None
    times = [float(hit["fields"][w.field][0]) / 1000 for hit in response["hits"]["hits"]]
    if len(times) < 3:
        return None
    return max(w.spec.window, w.spec.factor * max(b - a for a, b in zip(times, times[1:])))


def _silence(w: _Window) -> list[Firing]:
    spec = w.spec
    lookback = spec.after or spec.baseline
    aggs = w.aggregate({"rule": {"filter": _and(w.rule.query, {"range": {w.field: {
        "lt": _ms(w.end), "format": "epoch_millis"}}}), "aggs": {
        "last": {"max": {"field": w.field}}, "articles": w.evidence(size=1, newest_first=True)}}})
    if aggs is None or not w.warm(aggs, lookback) or aggs["rule"]["last"]["value"] is None:
        return []  # a query that never matched is not silent: there is nothing to have stopped
    last = aggs["rule"]["last"]["value"] / 1000
    threshold = spec.after or _usual_gap(w)
    if threshold is None or w.end - last <= threshold:
        return []
    return [w.firing(iso(last), 0, 0, f"silence: nothing for {span(w.end - last)} (more than {span(threshold)})",
                     aggs["rule"]["articles"], threshold=float(threshold))]


_KINDS: dict[str, Callable[[_Window], list[Firing]]] = {
    "spike": _spike, "first_mention": _first_mention, "spread": _spread, "silence": _silence}


def evaluate_window(client: Elasticsearch, index: str, rule: VolumeRule, start: int, end: int) -> list[Firing]:
    """What one closed window of one rule says, before the cool-down."""
    return _KINDS[rule.spec.kind](_Window(client, index, rule, start, end))


def evaluate(client: Elasticsearch, index: str, rule: VolumeRule, after: float, now: float,
             log: FiringLog) -> list[Firing]:
    """The firings of the windows of `rule` that became due in (after, now], oldest first; each
    one is added to `log`, and what the log says is cooling down is left out."""
    firings = []
    for start, end in due_windows(rule.spec, after, now):
        for firing in evaluate_window(client, index, rule, start, end):
            if not log.cooling(firing, rule.spec.cooldown):
                log.add(firing.firing_id, firing.key, firing.window_end)
                firings.append(firing)
    return firings


def replay(client: Elasticsearch, index: str, rule: VolumeRule, since: float, until: float) -> list[Firing]:
    """Back-fill: the firings the live loop makes for windows due in (since, until]. The
    cool-down before `since` is replayed too, so a firing just before it still holds one back."""
    firings = evaluate(client, index, rule, since - rule.spec.cooldown, until, FiringLog())
    return [f for f in firings if due_at(rule.spec, f.window_end) > since]


# --- firings as alerts ---------------------------------------------------------------------

def firing_alert(rule: Rule, firing: Firing, now: float) -> dict[str, Any]:
    """The alert document of a firing, with its pending deliveries. Title, url, source and
    snippet are filled so that every sender and digest renders it like an article alert."""
    articles = [dict(a) for a in firing.articles]
    first = articles[0] if articles else {}
    sources = sorted({a.get("source") for a in articles if a.get("source")})
    doc = {
        "alert_id": firing.firing_id, "rule": rule.name, "query": rule.query, "kind": firing.kind,
        "volume_key": firing.key, "window_start": iso(firing.window_start), "window_end": iso(firing.window_end),
        "count": firing.count, "distinct_sources": firing.distinct_sources, "baseline": firing.baseline,
        "baseline_counts": list(firing.baseline_counts), "threshold": firing.threshold,
        "article_ids": [a.get("article_id") for a in articles if a.get("article_id")], "articles": articles,
        "title": firing.summary, "url": first.get("url", ""), "source": ", ".join(sources[:5]),
        "published_at": iso(firing.window_end), "topics": [], "matched_terms": [firing.kind],
        "snippet": " · ".join(a.get("title") or a.get("url") or "" for a in articles[:5]),
        "matched_at": iso(now), "deliveries": new_deliveries(rule.targets(), rule.digest_seconds, now),
    }
    return summarize(doc)


class VolumeAlerts:
    """The live evaluator: `run_due(now)` evaluates every enabled volume rule's windows that
    became due since its last call and stores their firings as alerts (`create`: a firing
    stored before is a 409 and is not sent again). Meant to be called from the alert
    delivery loop; safe to call often, it queries only when a window has become due.

    `read_rules(client)` returns the stored rules, `ensure_indices(client)` creates the alerts
    index (both from transforms/alerts.py, which wires them: `alerts.volume_alerts`)."""

    def __init__(self, es: ElasticsearchSettings, alerts: AlertSettings, model: str,
                 read_rules: Callable[[Elasticsearch], list[Rule]], ensure_indices: Callable[[Elasticsearch], None],
                 lemmatize: Lemmatizer | None = None, catch_up: float = CATCH_UP):
        self._es, self._alerts, self._model = es, alerts, model
        self._read_rules, self._ensure_indices = read_rules, ensure_indices
        self._catch_up = catch_up
        self._client: Elasticsearch | None = None
        self._lemmatize = lemmatize
        self._rules: list[VolumeRule] = []
        self._compiled: dict[str, VolumeRule] = {}
        self._loaded_at = float("-inf")
        self._after: dict[str, float] = {}  # rule version -> evaluated up to
        self._logs: dict[str, FiringLog] = {}
        self._indices_ready = False

    def _connect(self) -> Elasticsearch:
        if self._client is None:
            self._client = connect(self._es, check=False)
        return self._client

    def _lemmatizer(self, text: str) -> tuple[str, ...]:
        if self._lemmatize is None:  # the spaCy model only for a rule with words in its query
            self._lemmatize = spacy_lemmatizer(load_model(self._model))
        return self._lemmatize(text)

    def current_rules(self) -> list[VolumeRule]:
        if time.monotonic() - self._loaded_at >= self._alerts.reload_interval:
            rules = [rule for rule in self._read_rules(self._connect()) if rule.volume and rule.enabled]
            self._rules = [self._compile(rule) for rule in rules]
            self._loaded_at = time.monotonic()
        return self._rules

    def _compile(self, rule: Rule) -> VolumeRule:
        version = _version(rule)
        if version not in self._compiled:
            self._compiled[version] = compile_volume(rule, self._lemmatizer)
        return self._compiled[version]

    def run_due(self, now: float | None = None) -> list[Firing]:
        """Evaluates and stores; returns the firings newly stored."""
        now = time.time() if now is None else now
        client = self._connect()
        stored: list[Firing] = []
        rules = self.current_rules()
        if rules and not self._indices_ready:  # before reading earlier firings: their fields must be mapped
            self._ensure_indices(client)
            self._indices_ready = True
        for rule in rules:
            version = _version(rule.rule)
            if version not in self._after:
                self._after[version] = now - self._catch_up
                self._logs[version] = self._stored_log(client, rule, self._after[version])
            firings = evaluate(client, self._es.articles_alias, rule, self._after[version], now, self._logs[version])
            try:
                stored += self._store(client, rule.rule, firings, now)
            except Exception:
                del self._after[version]  # the log has them: start again from what the index holds
                raise
            self._after[version] = now
        return stored

    def _stored_log(self, client: Elasticsearch, rule: VolumeRule, after: float) -> FiringLog:
        """The rule's firings already in the alerts index that the cool-down can still see."""
        log = FiringLog()
        try:
            client.indices.refresh(index=self._alerts.alerts_index)
            hits = client.search(index=self._alerts.alerts_index, size=10_000, source_includes=[
                "alert_id", "volume_key", "window_end"], query=_and({"term": {"rule": rule.rule.name}}, {
                    "term": {"kind": rule.spec.kind}}, {"range": {"window_end": {
                        "gte": _ms(after - rule.spec.cooldown - rule.spec.window), "format": "epoch_millis"}}}))
        except NotFoundError:
            return log
        for hit in hits["hits"]["hits"]:
            doc = hit["_source"]
            log.add(doc["alert_id"], doc["volume_key"], int(epoch(doc["window_end"])))
        return log

    def _store(self, client: Elasticsearch, rule: Rule, firings: list[Firing], now: float) -> list[Firing]:
        if not firings:
            return []
        docs = [firing_alert(rule, firing, now) for firing in firings]
        outcomes = BulkWriter(client, self._alerts.alerts_index, "alert_id", "create").write(docs)
        stored = []
        for firing, doc, (outcome, detail) in zip(firings, docs, outcomes):
            if outcome == "written":
                stored.append(firing)
            elif outcome == "failed":
                _LOG.warning("volume alert %s of rule %s rejected: %s", firing.firing_id, rule.name, detail)
                record = dead_letter_for(doc, "volume_alerts", "rejected_by_elasticsearch", detail)
                client.index(index=self._es.deadletter_index, id=record["dead_letter_id"], document=record)
        return stored

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def span(seconds: float) -> str:
    """3.5 hours -> '3h30m' (whole minutes)."""
    minutes = int(seconds // 60)
    parts = [(minutes // 1440, "d"), (minutes // 60 % 24, "h"), (minutes % 60, "m")]
    return "".join(f"{value}{unit}" for value, unit in parts if value) or f"{int(seconds)}s"


def _version(rule: Rule) -> str:
    return json.dumps(rule.to_doc(), sort_keys=True)


def describe(firings: Iterable[Firing]) -> list[str]:
    """One line per firing, for `newsbeam alerts test`."""
    return [f"{iso(f.window_start)[:16]}..{iso(f.window_end)[11:16]}  {f.kind:13s} {f.key[:40]:14s} {f.summary}"
            for f in firings]
