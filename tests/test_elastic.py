"""The indices and the bulk writer, against the real Elasticsearch.
Faults are injected by wrapping the real client, never by mocking it."""
import json

import pytest
from elasticsearch import Elasticsearch

from newsbeam.pipeline.config import ElasticsearchSettings
from newsbeam.transforms.deadletter import DEAD, dead_letter, failed, rejected
from newsbeam.transforms.elastic import (
    ARTICLE_MAPPINGS,
    DEADLETTER_MAPPINGS,
    BulkWriter,
    ElasticsearchUnavailable,
    connect,
    ensure_indices,
    index_registry,
)
from newsbeam.transforms.settings import AlertSettings


def test_ensure_indices_is_idempotent_and_creates_the_contract(es, es_settings):
    client = connect(es_settings)
    ensure_indices(client, es_settings)
    ensure_indices(client, es_settings)
    alias = es.indices.get_alias(name=es_settings.articles_alias)
    (index,) = alias.keys()
    assert alias[index]["aliases"][es_settings.articles_alias]["is_write_index"] is True
    mapping = es.indices.get_mapping(index=es_settings.articles_alias)[index]["mappings"]
    for field in ("article_id", "url", "title", "body", "summary", "feed_url", "source", "published_at",
                  "fetched_at", "indexed_at", "language", "entities", "persons", "organizations",
                  "locations", "topics"):
        assert field in mapping["properties"], field
    assert mapping["properties"]["published_at"]["type"] == "date"
    assert es.indices.exists(index=es_settings.deadletter_index)


def test_one_ensure_creates_every_registered_index_and_a_deleted_one_comes_back_with_its_mappings(es, es_settings):
    prefix = es_settings.articles_alias.rsplit("-", 1)[0]
    alerts = AlertSettings(rules_index=f"{prefix}-rules", alerts_index=f"{prefix}-alerts")
    specs = index_registry(es_settings, alerts)
    assert [spec.name for spec in specs] == [es_settings.articles_alias, es_settings.deadletter_index,
                                             es_settings.feeds_index, alerts.rules_index, alerts.alerts_index,
                                             f"{alerts.alerts_index}-targets"]
    ensure_indices(connect(es_settings), es_settings, alerts)
    for spec in specs:
        assert es.indices.exists(index=spec.name), spec.name
        (mapping,) = es.indices.get_mapping(index=spec.name).values()
        assert set(mapping["mappings"]["properties"]) == set(spec.mappings["properties"]), spec.name
    # Deleted mid-run: the next write recreates it from the template, not with guessed mappings.
    es.indices.delete(index=alerts.alerts_index)
    assert BulkWriter(es, alerts.alerts_index, "alert_id").write([{"alert_id": "a1", "rule": "r"}]) == [("written", "")]
    mapping = es.indices.get_mapping(index=alerts.alerts_index)[alerts.alerts_index]["mappings"]
    assert mapping["properties"]["rule"]["type"] == "keyword" and "deliveries" in mapping["properties"]


def test_every_stage_builds_its_dead_letters_in_one_shape():
    article = {"article_id": "a1", "url": "https://news.example.org/a", "feed_url": "https://news.example.org/rss",
               "title": "Ünïcode"}
    by_exception = failed(article, "entities", ValueError("boom"))
    by_refusal = rejected(article, "index", "mapper_parsing_exception")
    assert by_exception.tag == by_refusal.tag == DEAD
    for record, reason in ((by_exception.value, "ValueError"), (by_refusal.value, "rejected_by_elasticsearch")):
        assert set(record) == set(DEADLETTER_MAPPINGS["properties"])
        assert record["reason"] == reason
        assert (record["article_id"], record["url"], record["feed_url"]) == ("a1", article["url"], article["feed_url"])
        assert json.loads(record["payload"]) == article
    assert set(dead_letter("fetch", "timeout", "read timed out", feed_url="https://x/rss")) == \
        set(DEADLETTER_MAPPINGS["properties"]) - {"payload"}


def test_text_fields_use_only_analyzers_of_the_minimal_server():
    def analyzers(mapping):
        for value in mapping.values():
            if isinstance(value, dict):
                if "analyzer" in value:
                    yield value["analyzer"]
                yield from analyzers(value)
    assert set(analyzers(ARTICLE_MAPPINGS)) <= {"standard"}


def doc(i, **extra):
    return {"article_id": f"id-{i}", "title": f"title {i}", "published_at": "2020-05-21T14:05:00Z", **extra}


def test_create_counts_409_as_already_written(es, es_settings):
    client = connect(es_settings)
    ensure_indices(client, es_settings)
    writer = BulkWriter(client, es_settings.articles_alias, "article_id")
    assert writer.write([doc(1), doc(2)]) == [("written", ""), ("written", "")]
    assert writer.write([doc(1), doc(3)]) == [("exists", ""), ("written", "")]
    es.indices.refresh(index=es_settings.articles_alias)
    assert es.count(index=es_settings.articles_alias)["count"] == 3


def test_mapping_errors_are_permanent_failures_and_others_still_land(es, es_settings):
    client = connect(es_settings)
    ensure_indices(client, es_settings)
    writer = BulkWriter(client, es_settings.articles_alias, "article_id")
    outcomes = writer.write([doc(1), doc(2, published_at="not a date"), doc(3)])
    assert outcomes[0] == ("written", "") and outcomes[2] == ("written", "")
    assert outcomes[1][0] == "failed" and "400" in outcomes[1][1] and "published_at" in outcomes[1][1]


class TooManyRequestsFirst:
    """Wraps a real client: the first `times` bulk calls answer 429 for every other item."""

    def __init__(self, client: Elasticsearch, times: int):
        self._client = client
        self.times = times
        self.calls = 0

    def bulk(self, operations):
        self.calls += 1
        response = self._client.bulk(operations=operations)
        if self.calls <= self.times:
            for n, item in enumerate(response["items"]):
                if n % 2 == 0:
                    op = next(iter(item))
                    # Undo the write so the retry really has something to do.
                    self._client.delete(index=item[op]["_index"], id=item[op]["_id"], refresh=True)
                    item[op] = {"status": 429, "error": {"type": "es_rejected_execution_exception"}}
        return response


def test_429s_are_retried_until_written(es, es_settings):
    client = connect(es_settings)
    ensure_indices(client, es_settings)
    flaky = TooManyRequestsFirst(client, times=2)
    retried = []
    writer = BulkWriter(flaky, es_settings.articles_alias, "article_id", max_backoff=0.05, on_retry=retried.append)
    outcomes = writer.write([doc(i) for i in range(6)])
    assert [o for o, _ in outcomes] == ["written"] * 6
    assert retried == [3, 2]  # 3 items rejected on the first call, then 2 of those again
    es.indices.refresh(index=es_settings.articles_alias)
    assert es.count(index=es_settings.articles_alias)["count"] == 6


def test_connect_fails_with_one_clear_line_when_nothing_listens():
    with pytest.raises(ElasticsearchUnavailable, match=r"cannot reach Elasticsearch at http://127.0.0.1:9"):
        connect(ElasticsearchSettings(url="http://127.0.0.1:9", request_timeout=2))


def test_an_index_squatting_the_alias_name_is_reported(es, es_settings):
    es.indices.create(index=es_settings.articles_alias)
    with pytest.raises(ElasticsearchUnavailable, match="needs that name for an alias"):
        ensure_indices(connect(es_settings), es_settings)
