"""Elasticsearch: the client, the indices newsbeam owns, and the bulk sinks
(`IndexArticles`, `WriteDeadLetters`).

Everything created here uses only what the minimal server has (the `standard` analyzer,
index templates and aliases), so it works on the integ-test zip and on the full
distribution alike. Enrichment happens in Beam; there are no ingest pipelines.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from elasticsearch import ApiError, Elasticsearch, NotFoundError, TransportError

from newsbeam.transforms import clock, timing
from newsbeam.transforms.article import Article
from newsbeam.transforms.batching import PooledBatchingDoFn
from newsbeam.transforms.deadletter import DEAD, rejected
from newsbeam.transforms.redact import redact_url
from newsbeam.transforms.settings import AlertSettings, ElasticsearchSettings, StageSizes

_LOG = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
KEYWORD = {"type": "keyword", "ignore_above": 1024}
DATE = {"type": "date", "format": "strict_date_optional_time||epoch_millis"}
TEXT_WITH_KEYWORD = {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 512}}}
INDEX_SETTINGS = {"index.auto_expand_replicas": "0-1", "number_of_shards": 1}

ARTICLE_MAPPINGS: dict[str, Any] = {
    "dynamic": False,
    # Lemmas are searchable (alerts and back-fill match on them) but not kept in _source.
    "_source": {"excludes": ["lemmas"]},
    "properties": {
        "article_id": KEYWORD, "url": KEYWORD, "guid": KEYWORD,
        "title": TEXT_WITH_KEYWORD, "summary": {"type": "text"}, "body": {"type": "text"},
        "lemmas": {"type": "text"},
        "feed_url": KEYWORD, "source": KEYWORD, "publisher": KEYWORD, "author": KEYWORD,
        "language": KEYWORD,
        # Syndicated copies share a story_id (transforms/neardup.py); the bands find them.
        "story_id": KEYWORD, "story_bands": KEYWORD,
        "story_minhash": {"type": "keyword", "index": False, "doc_values": False},
        "body_source": KEYWORD, "nlp_skipped": {"type": "boolean"},
        "published_at": DATE, "fetched_at": DATE, "indexed_at": DATE,
        "entities": {"properties": {"name": KEYWORD, "label": KEYWORD, "text": KEYWORD,
                                    "count": {"type": "integer"}}},
        "persons": KEYWORD, "organizations": KEYWORD, "locations": KEYWORD,
        "topics": KEYWORD,
        "topic_evidence": {"properties": {"topic": KEYWORD, "score": {"type": "float"},
                                          "evidence": KEYWORD}},
    },
}

DEADLETTER_MAPPINGS: dict[str, Any] = {
    "dynamic": False,
    "properties": {
        "dead_letter_id": KEYWORD, "stage": KEYWORD, "reason": KEYWORD,
        "error": {"type": "text"}, "feed_url": KEYWORD, "article_id": KEYWORD, "url": KEYWORD,
        "failed_at": DATE, "payload": {"type": "text", "index": False},
    },
}


FEED_MAPPINGS: dict[str, Any] = {
    "dynamic": False,
    "properties": {
        "feed_id": KEYWORD, "feed_url": KEYWORD, "final_url": KEYWORD, "name": KEYWORD,
        "publisher": KEYWORD, "host": KEYWORD, "last_attempt": DATE, "last_success": DATE,
        "last_change": DATE, "next_poll": DATE, "updated_at": DATE, "http_status": {"type": "integer"},
        "error_class": KEYWORD, "error": {"type": "text"}, "consecutive_failures": {"type": "integer"},
        "unchanged_polls": {"type": "integer"}, "items_seen": {"type": "integer"}, "dead": {"type": "boolean"},
        "refresh_hint_seconds": {"type": "float"}, "last_lag_seconds": {"type": "float"},
        "etag": {"type": "keyword", "index": False}, "last_modified": {"type": "keyword", "index": False},
        "body_hash": {"type": "keyword", "index": False}, "items_hash": {"type": "keyword", "index": False},
    },
}


RULE_MAPPINGS: dict[str, Any] = {
    "dynamic": False,
    "properties": {
        "name": KEYWORD, "query": {"type": "keyword", "index": False, "doc_values": False},
        "topics": KEYWORD, "sources": KEYWORD, "languages": KEYWORD, "notify": KEYWORD,
        "digest_seconds": {"type": "integer"}, "enabled": {"type": "boolean"},
        "created_at": DATE, "updated_at": DATE,
    },
}

ALERT_MAPPINGS: dict[str, Any] = {
    "dynamic": False,
    "properties": {
        "alert_id": KEYWORD, "rule": KEYWORD, "query": {"type": "keyword", "index": False, "doc_values": False},
        "article_id": KEYWORD, "title": TEXT_WITH_KEYWORD, "url": KEYWORD, "source": KEYWORD,
        "publisher": KEYWORD, "published_at": DATE, "fetched_at": DATE, "topics": KEYWORD,
        "matched_terms": KEYWORD, "snippet": {"type": "text"}, "matched_at": DATE,
        "pending_targets": KEYWORD, "next_attempt": DATE,
        "deliveries": {"properties": {
            "target_id": KEYWORD, "target_label": KEYWORD, "status": KEYWORD, "attempts": {"type": "integer"},
            "digest_seconds": {"type": "integer"}, "next_attempt": DATE, "claimed_until": DATE,
            "delivered_at": DATE, "last_error": {"type": "text", "index": False}}},
        # A volume firing (transforms/volume.py): its window, counts and evidence.
        "kind": KEYWORD, "volume_key": KEYWORD, "window_start": DATE, "window_end": DATE,
        "count": {"type": "long"}, "distinct_sources": {"type": "long"}, "baseline": {"type": "double"},
        "baseline_counts": {"type": "long"}, "threshold": {"type": "double"}, "article_ids": KEYWORD,
        "articles": {"type": "object", "enabled": False},
    },
}

# Each failing alert target's back-off (transforms/delivery.py, TargetStates).
TARGET_STATE_MAPPINGS: dict[str, Any] = {
    "dynamic": False,
    "properties": {"target_id": KEYWORD, "target_label": KEYWORD, "failures": {"type": "integer"},
                   "not_before": DATE, "last_error": {"type": "text", "index": False}, "updated_at": DATE},
}


def target_state_index(settings: AlertSettings) -> str:
    return f"{settings.alerts_index}-targets"


class ElasticsearchUnavailable(RuntimeError):
    """Elasticsearch cannot be reached or refused our credentials; the message is one line."""


def secret(name: str) -> str:
    """A secret from $NAME, or from the file named by $NAME_FILE (Docker/Kubernetes secrets)."""
    if os.environ.get(name):
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as err:
        raise ElasticsearchUnavailable(f"cannot read {name}_FILE ({path}): {err.strerror}") from None


def client_kwargs(settings: ElasticsearchSettings) -> dict[str, Any]:
    """Connection options; secrets come from the environment at connect time, never from
    the command line or the pipeline graph."""
    kwargs: dict[str, Any] = {"request_timeout": settings.request_timeout, "max_retries": 0,
                              "retry_on_timeout": False}
    api_key = secret("ELASTICSEARCH_API_KEY")
    if api_key:
        kwargs["api_key"] = api_key
    elif os.environ.get("ELASTICSEARCH_USERNAME"):
        kwargs["basic_auth"] = (os.environ["ELASTICSEARCH_USERNAME"], secret("ELASTICSEARCH_PASSWORD"))
    if settings.ca_certs:
        kwargs["ca_certs"] = settings.ca_certs
    return kwargs


def connect(settings: ElasticsearchSettings, check: bool = True) -> Elasticsearch:
    client = Elasticsearch(settings.url, **client_kwargs(settings))
    where = redact_url(settings.url)  # the URL may carry user:password@
    if check:
        try:
            client.cluster.health()
        except ApiError as err:
            if err.meta.status in (401, 403):
                raise ElasticsearchUnavailable(
                    f"Elasticsearch at {where} refused the credentials (HTTP {err.meta.status}); "
                    "set ELASTICSEARCH_API_KEY or ELASTICSEARCH_USERNAME/ELASTICSEARCH_PASSWORD") from None
            raise ElasticsearchUnavailable(f"Elasticsearch at {where} answered HTTP {err.meta.status}: "
                                           f"{err.message}") from None
        except TransportError as err:
            raise ElasticsearchUnavailable(f"cannot reach Elasticsearch at {where}: "
                                           f"{type(err).__name__}: {err.message}") from None
    return client


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """One index newsbeam owns: its name, its mappings, and whether the name is an alias over
    `NAME-000001` (articles, so they can roll over) or the index itself."""

    name: str
    mappings: dict[str, Any]
    alias: bool = False

    @property
    def pattern(self) -> str:
        return f"{self.name}-*" if self.alias else self.name


def index_registry(es: ElasticsearchSettings, alerts: AlertSettings | None = None) -> tuple[IndexSpec, ...]:
    """Every index newsbeam writes, with its mappings: the one list `ensure_indices` creates,
    the Kibana objects and the pipeline's role are checked against."""
    specs = [IndexSpec(es.articles_alias, ARTICLE_MAPPINGS, alias=True),
             IndexSpec(es.deadletter_index, DEADLETTER_MAPPINGS), IndexSpec(es.feeds_index, FEED_MAPPINGS)]
    if alerts is not None:
        specs += [IndexSpec(alerts.rules_index, RULE_MAPPINGS), IndexSpec(alerts.alerts_index, ALERT_MAPPINGS),
                  IndexSpec(target_state_index(alerts), TARGET_STATE_MAPPINGS)]
    return tuple(specs)


SETUP_COMMAND = "newsbeam es setup"


def _setup_version(spec: IndexSpec) -> str:
    """A digest of what the setup puts for `spec`: a template carrying another one was put by
    another release (or by hand) and is set up again."""
    shape = {"pattern": spec.pattern, "settings": INDEX_SETTINGS, "mappings": spec.mappings}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def ensure_indices(client: Elasticsearch, es: ElasticsearchSettings, alerts: AlertSettings | None = None) -> None:
    """The setup (`newsbeam es setup`, needs template and index administration): puts a template
    and creates the index or alias for every index in the registry, idempotently and safe to race.
    The templates also give an index recreated by a write (after someone deleted it mid-run)
    newsbeam's mappings instead of guessed ones."""
    for spec in index_registry(es, alerts):
        client.indices.put_index_template(name=spec.name, index_patterns=[spec.pattern], priority=200,
                                          template={"settings": INDEX_SETTINGS, "mappings": spec.mappings},
                                          meta={"managed_by": "newsbeam", "setup_version": _setup_version(spec)})
    for spec in index_registry(es, alerts):
        if spec.alias:
            _bootstrap_alias(client, spec.name)
        elif not client.indices.exists(index=spec.name):
            _create(client, spec.name)
        else:  # an index made by an earlier release gets the fields added since
            client.indices.put_mapping(index=spec.name, properties=spec.mappings["properties"])


def missing_setup(client: Elasticsearch, es: ElasticsearchSettings, alerts: AlertSettings | None = None) -> list[str]:
    """What the setup has not made yet, or made for another release: template and index names.
    Needs only `monitor` and `view_index_metadata`, which the pipeline's role has."""
    missing = []
    for spec in index_registry(es, alerts):
        try:
            [found] = client.indices.get_index_template(name=spec.name)["index_templates"]
            current = (found["index_template"].get("_meta") or {}).get("setup_version") == _setup_version(spec)
        except NotFoundError:
            current = False
        if not current:
            missing.append(f"template {spec.name}")
        exists = client.indices.exists_alias(name=spec.name) if spec.alias else client.indices.exists(index=spec.name)
        if not exists:
            missing.append(f"{'alias' if spec.alias else 'index'} {spec.name}")
    return missing


def prepare_indices(client: Elasticsearch, es: ElasticsearchSettings, alerts: AlertSettings | None = None) -> None:
    """Start-up of `newsbeam run` and the alert commands: nothing to do when the setup is there
    and current; otherwise it is done now, which works with credentials that may administer
    indices (an unsecured node, an admin). The pipeline's role may not, and gets one line saying
    what is missing and which command to run."""
    missing = missing_setup(client, es, alerts)
    if not missing:
        return
    try:
        ensure_indices(client, es, alerts)
    except ApiError as err:
        if err.meta.status != 403:
            raise
        raise ElasticsearchUnavailable(
            f"newsbeam's indices are not set up for this release ({', '.join(missing)}) and these credentials "
            f"may not set them up: run `{SETUP_COMMAND}` once with an administrator's credentials") from None


def _create(client: Elasticsearch, index: str, **body: Any) -> None:
    try:
        client.indices.create(index=index, **body)
    except ApiError as err:
        if err.error != "resource_already_exists_exception":
            raise


def _bootstrap_alias(client: Elasticsearch, alias: str) -> None:
    if client.indices.exists_alias(name=alias):
        return
    if client.indices.exists(index=alias):
        raise ElasticsearchUnavailable(
            f"an index named {alias!r} exists; newsbeam needs that name for an alias. "
            f"Reindex or delete it, or set elasticsearch.articles_alias")
    _create(client, f"{alias}-000001", aliases={alias: {"is_write_index": True}})


class BulkWriter:
    """Bulk-writes documents with our own retry: transport errors and 429/502/503/504 are
    retried with capped exponential back-off and jitter, a 409 on `create` counts as
    already written, any other per-item error is returned as permanent. A batch refused
    with 429 as a whole (the request, or every item in it) `split_after` times in a row is
    sent in halves: a node whose indexing pressure limit is below the batch's size would
    refuse it for ever. A request over the server's size limit (413) is sent in halves at
    once, and a document too large on its own is returned as failed."""

    def __init__(self, client: Elasticsearch, index: str, id_field: str, op: str = "create",
                 max_backoff: float = 30.0, on_retry=None, split_after: int = 2):
        self._client = client
        self._index = index
        self._id_field = id_field
        self._op = op
        self._max_backoff = max_backoff
        self._on_retry = on_retry or (lambda count: None)
        self._split_after = split_after

    def write(self, docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """Returns one (outcome, detail) per doc: ('written'|'exists'|'failed', reason)."""
        outcomes: list[tuple[str, str] | None] = [None] * len(docs)
        pending = list(range(len(docs)))
        attempt = 0
        refused_in_a_row = 0  # attempts in which Elasticsearch answered 429 for every pending doc
        while pending:
            operations: list[Any] = []
            for i in pending:
                operations.append({self._op: {"_index": self._index, "_id": docs[i][self._id_field]}})
                operations.append(docs[i])
            retry = []
            refused = False
            try:
                response = self._client.bulk(operations=operations)
                too_many = 0
                for i, item in zip(pending, response["items"]):
                    result = item[self._op]
                    status = result.get("status", 500)
                    if status < 300:
                        outcomes[i] = ("written", "")
                    elif status == 409 and self._op == "create":
                        outcomes[i] = ("exists", "")
                    elif status in RETRY_STATUSES:
                        retry.append(i)
                        too_many += status == 429
                    else:
                        error = result.get("error", {})
                        outcomes[i] = ("failed", f"{status} {error.get('type', '')}: {error.get('reason', '')}")
                refused = too_many == len(pending)
            except ApiError as err:
                if err.meta.status == 413:  # larger than http.max_content_length: smaller requests, no retry
                    if len(pending) > 1:
                        self._write_halves(docs, pending, outcomes, "was too large (HTTP 413)")
                        return outcomes  # type: ignore[return-value]
                    outcomes[pending[0]] = ("failed", "413 request_entity_too_large: the document alone is larger "
                                                      "than Elasticsearch's http.max_content_length")
                    pending = []
                    continue
                if err.meta.status not in RETRY_STATUSES:
                    raise
                _LOG.warning("Elasticsearch refused a bulk of %d documents for %s as a whole (HTTP %d)",
                             len(pending), self._index, err.meta.status)
                refused = err.meta.status == 429
                retry = pending
            except TransportError as err:
                _LOG.warning("Elasticsearch unreachable (%s); %d documents for %s wait for it", type(err).__name__,
                             len(pending), self._index)
                retry = pending
            refused_in_a_row = refused_in_a_row + 1 if refused else 0
            if retry:
                self._on_retry(len(retry))
                delay = min(self._max_backoff, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)
                _LOG.info("retrying %d documents in %.1fs (attempt %d)", len(retry), delay, attempt + 1)
                time.sleep(delay)
                attempt += 1
                if refused_in_a_row >= self._split_after and len(retry) > 1:
                    self._write_halves(docs, retry, outcomes, f"was refused with 429 {refused_in_a_row} times in a row")
                    return outcomes  # type: ignore[return-value]
            pending = retry
        return outcomes  # type: ignore[return-value]

    def _write_halves(self, docs: list[dict[str, Any]], pending: list[int],
                      outcomes: list[tuple[str, str] | None], why: str) -> None:
        _LOG.warning("a bulk of %d documents for %s %s; sending it in halves", len(pending), self._index, why)
        half = len(pending) // 2
        for part in (pending[:half], pending[half:]):
            for i, outcome in zip(part, self.write([docs[i] for i in part])):
                outcomes[i] = outcome


class WriteFn(PooledBatchingDoFn):
    """Buffers documents, flushes them with BulkWriter at a count or byte limit and at the
    end of each bundle; permanent failures go to the `dead` output.

    A bulk request is sent from a thread of its own and more batches (`in_flight` in all) may
    fill meanwhile: the pipeline thread would otherwise sit idle while Elasticsearch indexes.
    Documents leave (and the bundle ends) only once Elasticsearch has answered for them."""

    def __init__(self, settings: ElasticsearchSettings, index: str, id_field: str, op: str, stage: str,
                 client_factory: Callable[[ElasticsearchSettings], Any] | None = None,
                 in_flight: int = StageSizes.bulk_in_flight):
        self.max_in_flight = in_flight
        self._settings = settings
        # Tests pass a factory that wraps the real client to inject failures.
        self._client_factory = client_factory
        self._index = index
        self._id_field = id_field
        self._op = op
        self._stage = stage
        self.stage = f"write_{stage}"
        self.batch_size = settings.bulk_actions
        self.max_batch_bytes = settings.bulk_bytes
        self._written = Metrics.counter("newsbeam", f"{stage}_written")
        self._existing = Metrics.counter("newsbeam", f"{stage}_already_present")
        self._failed = Metrics.counter("newsbeam", f"{stage}_failed")
        self._retried = Metrics.counter("newsbeam", f"{stage}_retried")

    def setup(self) -> None:
        self._client = (self._client_factory(self._settings) if self._client_factory
                        else connect(self._settings, check=False))
        # Beam counts metrics only on the bundle's thread: the sender notes retries here.
        self._retries: collections.deque[int] = collections.deque()
        self._writer = BulkWriter(self._client, self._index, self._id_field, self._op,
                                  on_retry=self._retries.append)
        self._sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"newsbeam-{self.stage}")

    def element_bytes(self, doc: dict[str, Any]) -> int:
        # An estimate: the text fields dominate a document's size.
        return sum(len(value) for value in doc.values() if isinstance(value, str)) + 512

    def submit_batch(self, docs: list[dict[str, Any]]) -> concurrent.futures.Future:
        stamped = [{**doc, "indexed_at": clock.iso()} if self._op == "create" else doc for doc in docs]
        return self._sender.submit(self._write, stamped)

    def _write(self, docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        with timing.stage(self.stage, len(docs)):
            return self._writer.write(docs)

    def collect(self, docs: list[dict[str, Any]], future: concurrent.futures.Future) -> Iterator[list[Any]]:
        outcomes = future.result()
        while self._retries:
            self._retried.inc(self._retries.popleft())
        for doc, (outcome, detail) in zip(docs, outcomes):
            if outcome == "written":
                self._written.inc()
                yield [doc[self._id_field]]
            elif outcome == "exists":
                self._existing.inc()
                yield []
            else:
                self._failed.inc()
                _LOG.warning("%s: %s rejected: %s", self._stage, doc.get(self._id_field), detail)
                yield [rejected(doc, self._stage, detail)]

    def teardown(self) -> None:
        self._sender.shutdown(wait=True)
        self._client.close()


class IndexArticles(beam.PTransform):
    """Articles -> their documents (`Article.to_document`) in the articles alias (`create`,
    `_id` = article_id). Outputs the ids written; rejected documents on the `dead` output."""

    def __init__(self, settings: ElasticsearchSettings,
                 client_factory: Callable[[ElasticsearchSettings], Any] | None = None,
                 in_flight: int = StageSizes.bulk_in_flight):
        super().__init__()
        self._settings = settings
        self._client_factory = client_factory
        self._in_flight = in_flight

    def expand(self, articles):
        return articles | "ToDocument" >> beam.Map(Article.to_document) | "BulkCreate" >> beam.ParDo(
            WriteFn(self._settings, self._settings.articles_alias, "article_id", "create", "index",
                    self._client_factory, self._in_flight)
        ).with_outputs(DEAD, main="indexed")


class WriteDeadLetters(beam.PTransform):
    """Dead-letter records (one PCollection or a tuple of them) -> the dead-letter index,
    where people can search them by reason.

    A tuple gets one writer per input, for runners where a Flatten of unbounded inputs holds
    elements back (the runner profile's `fan_out_dead_letters`)."""

    def __init__(self, settings: ElasticsearchSettings, in_flight: int = StageSizes.bulk_in_flight):
        super().__init__()
        self._settings = settings
        self._in_flight = in_flight

    def expand(self, records):
        unwritable = []
        for number, pcoll in enumerate(records if isinstance(records, tuple) else (records,)):
            logged = pcoll | f"Log{number}" >> beam.Map(_log_dead_letter)
            result = logged | f"BulkIndex{number}" >> beam.ParDo(
                WriteFn(self._settings, self._settings.deadletter_index, "dead_letter_id", "index", "deadletter",
                        in_flight=self._in_flight)
            ).with_outputs(DEAD, main="written")
            # A dead letter Elasticsearch itself refuses is logged in full, the last place left.
            unwritable.append(result[DEAD] | f"LogUnwritable{number}" >> beam.Map(_log_dead_letter))
        return tuple(unwritable)


class WriteFeedHealth(beam.PTransform):
    """Feed health documents -> the feeds index (`_id` = feed_id, latest attempt wins)."""

    def __init__(self, settings: ElasticsearchSettings, in_flight: int = StageSizes.bulk_in_flight):
        super().__init__()
        self._settings = settings
        self._in_flight = in_flight

    def expand(self, docs):
        return docs | "BulkIndex" >> beam.ParDo(
            WriteFn(self._settings, self._settings.feeds_index, "feed_id", "index", "feedhealth",
                    in_flight=self._in_flight)
        ).with_outputs(DEAD, main="written")


def _log_dead_letter(record: dict[str, Any]) -> dict[str, Any]:
    _LOG.warning("dead letter [%s/%s] %s %s", record.get("stage"), record.get("reason"),
                 record.get("feed_url") or record.get("url"), record.get("error", "")[:300])
    return record
