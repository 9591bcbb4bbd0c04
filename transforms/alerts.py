"""MatchAlerts: every enriched article against every active alert rule, in the stream.

    enriched articles -> MatchRules -> CreateAlerts (newsbeam-alerts, op create) -> articles

    newsbeam-alerts -> DeliveryLoop (transforms/delivery.py; beside the pipeline, not in it)

* Rules live in the `newsbeam-rules` index (`newsbeam alerts add|import|...`). Each DoFn
  instance keeps them in a `RuleBook` that re-reads the index when it is older than
  `reload_seconds` (the smaller of `alerts.reload_interval` and the poll interval), so
  added, changed, disabled and removed rules take effect within one poll interval, on every
  runner, without a side input.
* An alert's `_id` is a hash of (rule, article_id) and it is written with `create`: a
  re-processed article gets a 409, which means "already alerted", and nothing is sent.
  Only a successful create enqueues notifications: the alert document itself carries one
  pending delivery per target (its id and a redacted label, never its address), and the
  delivery loop (transforms/delivery.py), which `newsbeam run` starts beside the pipeline
  or `newsbeam alerts deliver` runs on its own, sends them, retries them and marks them
  delivered. No worker sends anything.
* Articles leave MatchAlerts (on to IndexArticles) only after their alerts are stored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared
from elasticsearch import ApiError, Elasticsearch, NotFoundError, TransportError

from newsbeam.transforms import timing
from newsbeam.transforms.article import Article
from newsbeam.transforms.batching import BatchingDoFn
from newsbeam.transforms.clock import iso
from newsbeam.transforms.deadletter import DEAD, failed, rejected
from newsbeam.transforms.delivery import PeriodicJob, new_deliveries, summarize
from newsbeam.transforms.elastic import BulkWriter, connect, prepare_indices
from newsbeam.transforms.entities import load_model
from newsbeam.transforms.rules import (
    ArticleView,
    CompiledRule,
    Lemmatizer,
    Node,
    Rule,
    RuleError,
    compile_rule,
    spacy_lemmatizer,
    term_forms,
)
from newsbeam.transforms.settings import AlertSettings, ElasticsearchSettings, Settings, StageSizes
from newsbeam.transforms.volume import VolumeAlerts

_LOG = logging.getLogger(__name__)

def read_rules(client: Elasticsearch, index: str, enabled_only: bool = True) -> list[Rule]:
    """The stored rules (a stored document that is no longer valid is skipped, logged)."""
    query = {"term": {"enabled": True}} if enabled_only else {"match_all": {}}
    try:
        hits = client.search(index=index, query=query, size=10_000, sort=[{"name": "asc"}])["hits"]["hits"]
    except NotFoundError:
        return []
    rules = []
    for hit in hits:
        try:
            rules.append(Rule.from_doc(hit["_source"], f"{index}/{hit['_id']}"))
        except RuleError as err:
            _LOG.warning("skipping stored alert rule: %s", err)
    return rules


class RuleBook:
    """The active rules, compiled, re-read from Elasticsearch when older than `ttl` seconds.
    When Elasticsearch cannot be read the last rules stay in force."""

    def __init__(self, client: Elasticsearch, index: str, ttl: float, lemmatizer: Callable[[], Lemmatizer]):
        self._client = client
        self._index = index
        self._ttl = ttl
        self._lemmatizer = lemmatizer
        self._loaded_at = float("-inf")
        self._rules: list[CompiledRule] = []
        self._compiled: dict[str, CompiledRule] = {}

    def current(self) -> list[CompiledRule]:
        if time.monotonic() - self._loaded_at >= self._ttl:
            try:
                rules = [rule for rule in read_rules(self._client, self._index) if rule.volume is None]
                self._rules = [self._compile(rule) for rule in rules]
                self._loaded_at = time.monotonic()
            except (ApiError, TransportError) as err:
                _LOG.warning("cannot reload alert rules (%s); keeping %d", type(err).__name__, len(self._rules))
        return self._rules

    def _compile(self, rule: Rule) -> CompiledRule:
        key = json.dumps(rule.to_doc(), sort_keys=True)
        if key not in self._compiled:  # lemmatizing costs a spaCy call: once per rule version
            if len(self._compiled) > 10_000:  # old versions of changed rules
                self._compiled.clear()
            self._compiled[key] = compile_rule(rule, self._lemmatizer())
        return self._compiled[key]


def volume_alerts(es: ElasticsearchSettings, alerts: AlertSettings, model: str,
                  lemmatize: Lemmatizer | None = None) -> VolumeAlerts:
    """The volume rules' evaluator (transforms/volume.py), reading this module's rules index and
    writing to its alerts index."""
    return VolumeAlerts(es, alerts, model, read_rules=lambda client: read_rules(client, alerts.rules_index),
                        ensure_indices=lambda client: prepare_indices(client, es, alerts), lemmatize=lemmatize)


def volume_job(es: ElasticsearchSettings, alerts: AlertSettings, model: str,
               lemmatize: Lemmatizer | None = None) -> PeriodicJob:
    """The volume rules' evaluation as a job of the delivery loop: cheap between windows (it
    queries only when a window has become due), so it runs as often as the sweeps."""
    return PeriodicJob("volume alerts", alerts.sweep_interval, volume_alerts(es, alerts, model, lemmatize).run_due)


# --- alert documents ---------------------------------------------------------------------

def alert_id(rule: str, article_id: str) -> str:
    return hashlib.sha256(f"{rule}\x00{article_id}".encode()).hexdigest()[:32]


_TEXT_WORD = re.compile(r"\w+(?:['’.]\w+)*")


def _highlights(word: str, forms: set[str]) -> bool:
    """A text word shows a matched lemma: the same, or an inflection of it (ventilator ->
    ventilators, ship -> shipped)."""
    word = word.lower()
    return word in forms or any(word.startswith(f) and len(f) >= 3 and len(word) - len(f) <= 3 for f in forms)


def snippet(text: str, words: list[str], width: int = 280) -> str:
    """Up to `width` characters of `text` around the first matched word, matches as **word**."""
    forms = set(words)
    spans = [m.span() for m in _TEXT_WORD.finditer(text) if _highlights(m.group(), forms)]
    start = max(0, spans[0][0] - width // 3) if spans else 0
    if start:
        start = text.find(" ", start) + 1 or start
    end = min(len(text), start + width)
    if end < len(text) and (cut := text.rfind(" ", start, end)) > start:
        end = cut
    parts, cursor = [], start
    for begin, finish in spans:
        if begin >= start and finish <= end:
            parts += [text[cursor:begin], "**", text[begin:finish], "**"]
            cursor = finish
    parts.append(text[cursor:end])
    body = " ".join("".join(parts).split())
    return ("…" if start else "") + body + ("…" if end < len(text) else "")


def build_alert(rule: Rule, article: Article, hits: list[Node], now: float) -> dict[str, Any]:
    """The alert document for one (rule, article) match, with its pending deliveries."""
    doc = {
        "alert_id": alert_id(rule.name, article.article_id),
        "rule": rule.name,
        "query": rule.query,
        "article_id": article.article_id, "title": article.title, "url": article.url, "source": article.source,
        "publisher": article.publisher, "published_at": article.published_at, "fetched_at": article.fetched_at,
        "topics": list(article.topics),
        "matched_terms": [node.label() for node in hits],
        "snippet": snippet(article.alert_text(), term_forms(hits)),
        "matched_at": iso(now),
        "deliveries": new_deliveries(rule.targets(), rule.digest_seconds, now),
    }
    return summarize(doc)


# --- the transform -----------------------------------------------------------------------

class _ModelBox:
    """Shared.acquire needs a weak-referenceable object."""

    def __init__(self, lemmatize: Lemmatizer):
        self.lemmatize = lemmatize


class MatchRulesFn(beam.DoFn):
    """Article -> (article, alert documents of the active rules it matches)."""

    def __init__(self, es: ElasticsearchSettings, alerts: AlertSettings, model: str, reload_seconds: float,
                 model_handle: shared.Shared):
        self._es = es
        self._alerts = alerts
        self._model = model
        self._reload_seconds = reload_seconds
        self._model_handle = model_handle
        self._matched = Metrics.counter("newsbeam", "alerts_matched")

    def setup(self) -> None:
        self._client = connect(self._es, check=False)
        self._book = RuleBook(self._client, self._alerts.rules_index, self._reload_seconds, self._lemmatizer)

    def _lemmatizer(self) -> Lemmatizer:
        # The spaCy model is loaded only once a rule exists, and once per process.
        def load() -> _ModelBox:
            return _ModelBox(spacy_lemmatizer(load_model(self._model)))
        return self._model_handle.acquire(load).lemmatize

    def process(self, article: Article) -> Iterator[Any]:
        started = timing.now()
        try:
            rules = self._book.current()
            view = ArticleView(article) if rules else None
            now = time.time()
            alerts = [build_alert(c.rule, article, hits, now) for c in rules if (hits := c.match(view)) is not None]
            timing.record("alerts_match", 1, timing.now() - started)
        except Exception as err:  # a bad article (or rule) is a dead letter; the article is still indexed
            yield failed(article, "alerts", err)
            alerts = []
        self._matched.inc(len(alerts))
        yield article, alerts

    def teardown(self) -> None:
        self._client.close()


class CreateAlertsFn(BatchingDoFn):
    """(article, alerts) -> the article, once its alerts are created in bulk. `create`
    makes a second match of the same rule and article a 409, which is dropped; a created
    alert goes to the `created` output. Delivering it is the delivery loop's job.

    Articles leave only after their alerts are stored, so an article that reached the
    index has its alerts: a restart, which skips indexed articles, loses none."""
    stage = "alerts_store"

    def __init__(self, es: ElasticsearchSettings, alerts: AlertSettings, model: str,
                 batch_size: int = StageSizes.alert_batch):
        self.batch_size = batch_size
        self._es = es
        self._alerts = alerts
        self._model = model
        self._created = Metrics.counter("newsbeam", "alerts_created")
        self._existing = Metrics.counter("newsbeam", "alerts_already_present")
        self._failed = Metrics.counter("newsbeam", "alerts_failed")

    def setup(self) -> None:
        self._client = connect(self._es, check=False)
        self._writer = BulkWriter(self._client, self._alerts.alerts_index, "alert_id", "create")

    def handle_batch(self, pairs: list[tuple[Article, list[dict[str, Any]]]]) -> Iterator[list[Any]]:
        alerts = [alert for _, matched in pairs for alert in matched]
        outcomes = iter(self._writer.write(alerts) if alerts else [])
        for article, matched in pairs:
            outputs: list[Any] = []
            for alert in matched:
                outcome, detail = next(outcomes)
                if outcome == "written":
                    self._created.inc()
                    outputs.append(beam.pvalue.TaggedOutput(CREATED, alert))
                elif outcome == "exists":
                    self._existing.inc()
                else:
                    self._failed.inc()
                    outputs.append(rejected(alert, "alerts", detail))
            yield outputs + [article]

    def teardown(self) -> None:
        self._client.close()


CREATED = "created"
STORE_DEAD = "store_dead"


class MatchAlerts(beam.PTransform):
    """Enriched articles -> `articles` (the same, each once its alerts are stored), the
    alert documents `created` in `alerts.alerts_index`, whose notifications the delivery
    loop sends, and dead letters of matching (`dead`) and of storing (`store_dead`)."""

    def __init__(self, settings: Settings):
        super().__init__()
        self._es = settings.elasticsearch
        self._alerts = settings.alerts
        self._model = settings.nlp.model
        self._batch_size = settings.sizes.alert_batch
        self._reload_seconds = min(settings.alerts.reload_interval, settings.poll_interval)

    def expand(self, articles):
        matched = articles | "MatchRules" >> beam.ParDo(MatchRulesFn(
            self._es, self._alerts, self._model, self._reload_seconds, shared.Shared())).with_outputs(
            DEAD, main="matched")
        stored = matched.matched | "CreateAlerts" >> beam.ParDo(
            CreateAlertsFn(self._es, self._alerts, self._model, self._batch_size)).with_outputs(CREATED, DEAD, main="articles")
        # Two dead-letter outputs, not one Flatten: see WriteDeadLetters.
        return {"articles": stored.articles, CREATED: stored[CREATED], DEAD: matched[DEAD],
                STORE_DEAD: stored[DEAD]}
