"""`newsbeam status` (what the last runs left in the indices), `newsbeam es setup` (the index
templates and indices, made once with an administrator's credentials) and
`newsbeam es create-api-key` (a least-privilege key for the pipeline)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from elasticsearch import ApiError, Elasticsearch

from newsbeam.pipeline import es_role
from newsbeam.pipeline.config import Settings, settings_from_args
from newsbeam.transforms.delivery import target_state_index
from newsbeam.transforms.elastic import (
    ElasticsearchUnavailable,
    connect,
    ensure_indices,
    index_registry,
    missing_setup,
)


def add_parsers(sub: Any) -> None:
    status = sub.add_parser("status", help="summary from the indices: articles, feed health, dead letters, alerts")
    status.add_argument("--config", default=None)
    status.add_argument("--es-url", dest="es_url", default=None)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    es = sub.add_parser("es", help="Elasticsearch administration")
    es_sub = es.add_subparsers(dest="es_command", required=True)
    setup = es_sub.add_parser("setup", help="create or update newsbeam's index templates and indices "
                                            "(needs an admin's credentials in the environment; an unsecured "
                                            "node needs none, `newsbeam run` does it there)")
    setup.add_argument("--config", default=None)
    setup.add_argument("--es-url", dest="es_url", default=None)
    key = es_sub.add_parser("create-api-key", help="create a least-privilege API key for `newsbeam run` "
                                                   "(needs an admin's credentials in the environment)")
    key.add_argument("--name", default="newsbeam-pipeline")
    key.add_argument("--expiration", default=None, help="e.g. 90d; default: no expiry")
    key.add_argument("--config", default=None)
    key.add_argument("--es-url", dest="es_url", default=None)


def pipeline_role(settings: Settings) -> dict[str, Any]:
    """The pipeline's role (pipeline/es_role.py) on the indices these settings name."""
    es, alerts = settings.elasticsearch, settings.alerts
    return es_role.pipeline_role(es.articles_alias, es.deadletter_index, es.feeds_index, alerts.alerts_index,
                                 alerts.rules_index)


def cmd_setup(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    client = connect(settings.elasticsearch)
    missing = missing_setup(client, settings.elasticsearch, settings.alerts)
    ensure_indices(client, settings.elasticsearch, settings.alerts)
    names = [spec.name for spec in index_registry(settings.elasticsearch, settings.alerts)]
    print(f"set up: {', '.join(missing)}" if missing else "already set up", f"({len(names)} indices: "
          f"{', '.join(names)})", file=sys.stderr)
    return 0


def cmd_create_api_key(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    client = connect(settings.elasticsearch)
    body: dict[str, Any] = {"name": args.name, "role_descriptors": {"newsbeam_pipeline": pipeline_role(settings)}}
    if args.expiration:
        body["expiration"] = args.expiration
    try:
        key = client.security.create_api_key(**body)
    except ApiError as err:
        reason = err.info.get("error", {}).get("reason", err.message) if isinstance(err.info, dict) else err.message
        raise ElasticsearchUnavailable(
            f"Elasticsearch refused to create the API key (HTTP {err.meta.status}: {reason}). API keys need "
            "security enabled and the .security index; the bare integ-test server cannot create it") from None
    print(f"created API key {key['name']!r} (id {key['id']}). Set it for newsbeam run, e.g.:", file=sys.stderr)
    print(f"export ELASTICSEARCH_API_KEY={key['encoded']}")
    return 0


def _count(client: Elasticsearch, index: str, query: dict[str, Any] | None = None) -> int:
    return client.count(index=index, query=query)["count"] if query else client.count(index=index)["count"]


def collect_status(client: Elasticsearch, settings: Settings) -> dict[str, Any]:
    es, alerts = settings.elasticsearch, settings.alerts
    status: dict[str, Any] = {}
    if client.indices.exists(index=es.articles_alias):
        newest = client.search(index=es.articles_alias, size=0, aggs={
            "newest": {"max": {"field": "indexed_at"}}})["aggregations"]["newest"].get("value_as_string")
        status["articles"] = {"total": _count(client, es.articles_alias),
                              "last_hour": _count(client, es.articles_alias,
                                                  {"range": {"indexed_at": {"gte": "now-1h"}}}),
                              "newest_indexed_at": newest}
    if client.indices.exists(index=es.deadletter_index):
        # Nested terms, not multi_terms: that one is an x-pack analytics aggregation.
        response = client.search(index=es.deadletter_index, size=0, query={
            "range": {"failed_at": {"gte": "now-24h"}}}, aggs={"stage": {"terms": {"field": "stage", "size": 20},
                                                                         "aggs": {"reason": {"terms": {"field": "reason", "size": 20}}}}})
        by_reason = {f"{stage['key']}/{reason['key']}": reason["doc_count"]
                     for stage in response["aggregations"]["stage"]["buckets"]
                     for reason in stage["reason"]["buckets"]}
        status["dead_letters"] = {"total": _count(client, es.deadletter_index), "last_24h_by_stage_reason": by_reason}
    if client.indices.exists(index=es.feeds_index):
        failing = client.search(index=es.feeds_index, size=10, query={"range": {"consecutive_failures": {"gt": 0}}},
                                sort=[{"consecutive_failures": "desc"}],
                                source_includes=["feed_url", "error_class", "consecutive_failures", "dead"])
        status["feeds"] = {"total": _count(client, es.feeds_index),
                           "failing": failing["hits"]["total"]["value"],
                           "dead": _count(client, es.feeds_index, {"term": {"dead": True}}),
                           "worst": [hit["_source"] for hit in failing["hits"]["hits"]]}
    if client.indices.exists(index=alerts.alerts_index):
        client.indices.refresh(index=alerts.alerts_index)
        pending = client.search(index=alerts.alerts_index, size=0, track_total_hits=True,
                                query={"exists": {"field": "pending_targets"}},
                                aggs={"targets": {"cardinality": {"field": "pending_targets"}}})
        status["alerts"] = {"total": _count(client, alerts.alerts_index),
                            "pending_delivery": pending["hits"]["total"]["value"],
                            "pending_targets": pending["aggregations"]["targets"]["value"],
                            "targets_backing_off": _backing_off(client, target_state_index(alerts))}
    return status


def _backing_off(client: Elasticsearch, index: str) -> list[dict[str, Any]]:
    """The targets whose last delivery failed: label (never the address), failures, next try."""
    if not client.indices.exists(index=index):
        return []
    hits = client.search(index=index, size=20, sort=[{"failures": "desc"}], source_includes=[
        "target_label", "failures", "not_before", "last_error"])["hits"]["hits"]
    return [hit["_source"] for hit in hits]


def print_status(status: dict[str, Any]) -> None:
    if not status:
        print("no newsbeam indices yet: run `newsbeam run` first")
        return
    if "articles" in status:
        a = status["articles"]
        print(f"articles      {a['total']} indexed, {a['last_hour']} in the last hour, newest {a['newest_indexed_at']}")
    if "feeds" in status:
        f = status["feeds"]
        print(f"feeds         {f['total']} known, {f['failing']} failing, {f['dead']} dead")
        for feed in f["worst"]:
            print(f"  {'DEAD ' if feed.get('dead') else ''}{feed.get('error_class') or '?':12s} "
                  f"x{feed.get('consecutive_failures')}  {feed.get('feed_url')}")
    if "dead_letters" in status:
        d = status["dead_letters"]
        print(f"dead letters  {d['total']} in all; last 24h by stage/reason:")
        for key, count in d["last_24h_by_stage_reason"].items():
            print(f"  {count:6d}  {key}")
    if "alerts" in status:
        a = status["alerts"]
        print(f"alerts        {a['total']} written, {a['pending_delivery']} awaiting delivery "
              f"(to {a['pending_targets']} target(s))")
        for target in a["targets_backing_off"]:
            print(f"  backing off x{target['failures']}  {target['target_label']}  next try {target['not_before']}: "
                  f"{target['last_error'][:120]}")


def run(args: argparse.Namespace) -> int:
    if args.command == "es":
        return cmd_setup(args) if args.es_command == "setup" else cmd_create_api_key(args)
    settings = settings_from_args(args)
    status = collect_status(connect(settings.elasticsearch), settings)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status)
    return 0
