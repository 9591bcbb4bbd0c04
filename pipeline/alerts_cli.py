"""`newsbeam alerts ...`: manage alert rules in Elasticsearch and back-fill them over history.

    newsbeam alerts add NAME --query Q [--topic T] [--source S] [--language L]
                        [--notify TARGET ...] [--digest 15m] [--disabled] [--replace]
    newsbeam alerts list | show NAME | enable NAME | disable NAME | remove NAME
    newsbeam alerts import configs/alerts.yaml
    newsbeam alerts test NAME | --query Q [--since 7d] [--limit 20]

A running pipeline picks changes up within one poll interval (transforms/alerts.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from newsbeam.pipeline.config import ConfigError, Settings, load_yaml, settings_from_args
from newsbeam.transforms.rules import Rule, RuleError, format_duration, parse_duration


def _client(settings: Settings):
    from newsbeam.transforms.elastic import connect, ensure_indices
    client = connect(settings.elasticsearch)
    ensure_indices(client, settings.elasticsearch, settings.alerts)
    return client


def _now() -> str:
    from newsbeam.transforms.clock import iso
    return iso(time.time())


def _rule_from_args(args: argparse.Namespace) -> Rule:
    return Rule(name=args.name, query=args.query, topics=tuple(args.topic or ()), sources=tuple(args.source or ()),
                languages=tuple(args.language or ()), notify=tuple(args.notify or ("log",)),
                digest_seconds=parse_duration(args.digest or 0), enabled=not args.disabled)


def _describe(rule: Rule) -> str:
    filters = [f"{label}: {', '.join(values)}" for label, values in
               (("topics", rule.topics), ("sources", rule.sources), ("languages", rule.languages)) if values]
    digest = f"digest every {format_duration(rule.digest_seconds)}" if rule.digest_seconds else "each match"
    state = "enabled" if rule.enabled else "DISABLED"
    return (f"{rule.name} [{state}]\n  query:  {rule.query}\n" + "".join(f"  {f}\n" for f in filters) +
            f"  notify: {', '.join(rule.notify)} ({digest})")


def _get_rule(client, settings: Settings, name: str) -> dict[str, Any]:
    from elasticsearch import NotFoundError
    try:
        return client.get(index=settings.alerts.rules_index, id=name)["_source"]
    except NotFoundError:
        raise ConfigError(f"no alert rule named {name!r} (see `newsbeam alerts list`)") from None


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    from elasticsearch import ConflictError
    rule = _rule_from_args(args)  # validated completely before anything is written
    client = _client(settings)
    now = _now()
    document = {**rule.to_doc(), "created_at": now, "updated_at": now}
    try:
        client.index(index=settings.alerts.rules_index, id=rule.name, document=document,
                     op_type="index" if args.replace else "create", refresh="wait_for")
    except ConflictError:
        raise ConfigError(f"an alert rule named {rule.name!r} exists; pass --replace to change it") from None
    print(f"saved {_describe(rule)}")
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from newsbeam.transforms.alerts import read_rules
    rules = read_rules(_client(settings), settings.alerts.rules_index, enabled_only=False)
    for rule in rules:
        digest = f" digest {format_duration(rule.digest_seconds)}" if rule.digest_seconds else ""
        print(f"{'on ' if rule.enabled else 'off'}  {rule.name:24s} {rule.query}   -> {', '.join(rule.notify)}{digest}")
    print(f"{len(rules)} rule(s)", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(settings)
    rule = Rule.from_doc(_get_rule(client, settings, args.name))
    index = settings.alerts.alerts_index
    client.indices.refresh(index=index)
    alerts = client.count(index=index, query={"term": {"rule": rule.name}})["count"]
    pending = client.count(index=index, query={"bool": {"filter": [
        {"term": {"rule": rule.name}}, {"exists": {"field": "pending_targets"}}]}})["count"]
    print(_describe(rule))
    print(f"  alerts: {alerts} ({pending} with deliveries pending)")
    if args.es_query:
        print(json.dumps(_compile(rule, settings).es_query(), indent=2))
    return 0


def _set_enabled(args: argparse.Namespace, settings: Settings, enabled: bool) -> int:
    client = _client(settings)
    _get_rule(client, settings, args.name)
    client.update(index=settings.alerts.rules_index, id=args.name, doc={"enabled": enabled, "updated_at": _now()},
                  refresh="wait_for")
    print(f"{'enabled' if enabled else 'disabled'} {args.name}")
    return 0


def cmd_remove(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(settings)
    _get_rule(client, settings, args.name)
    client.delete(index=settings.alerts.rules_index, id=args.name, refresh="wait_for")
    print(f"removed {args.name} (its alerts stay in {settings.alerts.alerts_index})")
    return 0


def load_rules_file(path: Path) -> list[Rule]:
    """Rules from YAML (`alerts: [{name, query, notify, digest, ...}]`), all validated."""
    raw = load_yaml(path)
    items = raw.get("alerts") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list under 'alerts'")
    rules = [Rule.from_doc(item, f"{path}: alert #{number}") for number, item in enumerate(items, 1)]
    names = [rule.name for rule in rules]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{path}: rule name(s) used twice: {', '.join(duplicates)}")
    return rules


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    rules = load_rules_file(Path(args.file))  # nothing is written unless every rule is valid
    client = _client(settings)
    now = _now()
    operations: list[dict[str, Any]] = []
    for rule in rules:
        operations += [{"update": {"_index": settings.alerts.rules_index, "_id": rule.name}},
                       {"doc": {**rule.to_doc(), "updated_at": now},
                        "upsert": {**rule.to_doc(), "created_at": now, "updated_at": now}}]
    response = client.bulk(operations=operations, refresh="wait_for")
    failed = [item["update"] for item in response["items"] if item["update"].get("error")]
    if failed:
        raise ConfigError("could not save: " + "; ".join(f"{f['_id']}: {f['error'].get('reason')}" for f in failed))
    for rule in rules:
        print(f"imported {rule.name}: {rule.query}")
    return 0


def _compile(rule: Rule, settings: Settings):
    from newsbeam.transforms.entities import load_model
    from newsbeam.transforms.rules import compile_rule, spacy_lemmatizer
    return compile_rule(rule, spacy_lemmatizer(load_model(settings.nlp.model)))


def backfill_query(rule_query: dict[str, Any], since: str | None) -> dict[str, Any]:
    """The rule's query, limited to articles published (or, undated, indexed) since `since`."""
    if not since:
        return rule_query
    from newsbeam.transforms.search import since_expression
    start = since_expression(since)
    recent = {"bool": {"should": [
        {"range": {"published_at": {"gte": start}}},
        {"bool": {"must_not": [{"exists": {"field": "published_at"}}],
                  "filter": [{"range": {"indexed_at": {"gte": start}}}]}}], "minimum_should_match": 1}}
    return {"bool": {"filter": [rule_query, recent]}}


def cmd_test(args: argparse.Namespace, settings: Settings) -> int:
    if bool(args.name) == bool(args.query):
        raise ConfigError("alerts test: give a rule NAME or --query Q (not both)")
    client = _client(settings)
    if args.name:
        rule = Rule.from_doc(_get_rule(client, settings, args.name))
    else:
        rule = Rule(name="adhoc", query=args.query, topics=tuple(args.topic or ()), sources=tuple(args.source or ()),
                    languages=tuple(args.language or ()))
    query = backfill_query(_compile(rule, settings).es_query(), args.since)
    if not client.indices.exists(index=settings.elasticsearch.articles_alias):
        raise ConfigError(f"nothing indexed yet: {settings.elasticsearch.articles_alias} does not exist")
    response = client.search(index=settings.elasticsearch.articles_alias, query=query, size=args.limit,
                              sort=[{"published_at": {"order": "desc", "missing": "_last"}}], track_total_hits=True,
                              source_includes=["article_id", "title", "url", "source", "published_at", "topics"])
    for hit in response["hits"]["hits"]:
        doc = hit["_source"]
        date = (doc.get("published_at") or "")[:10] or "----------"
        print(f"{date}  {doc.get('source', '')}  {doc.get('title', '')}\n            {doc.get('url', '')}")
    total = response["hits"]["total"]["value"]
    window = f" since {args.since}" if args.since else ""
    print(f"{total} indexed article(s){window} match {rule.name if args.name else repr(rule.query)}"
          f" ({len(response['hits']['hits'])} shown)", file=sys.stderr)
    return 0


def add_parser(commands) -> None:
    """Adds `alerts` and its actions to the `newsbeam` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, help="pipeline settings (default: configs/pipeline.yaml)")
    common.add_argument("--es-url", dest="es_url", default=None)
    alerts = commands.add_parser(
        "alerts", help="watch-term alert rules: add, list, import, back-fill",
        description="Query language: words and \"phrases\" (matched on lemmas), AND, OR, NOT, ( ), "
                    "topic:, entity:, person:, org:, location:, source:, language:. See docs/alerts.md.")
    actions = alerts.add_subparsers(dest="alerts_action", required=True)
    add = actions.add_parser("add", parents=[common], help="save a rule")
    add.add_argument("name")
    add.add_argument("--query", required=True)
    for flag in ("topic", "source", "language"):
        add.add_argument(f"--{flag}", action="append", help=f"only articles with this {flag} (repeatable: any)")
    add.add_argument("--notify", nargs="+", action="extend",
                     help="log, stdout, webhook:URL, slack:URL, email:ADDRESS (default: log)")
    add.add_argument("--digest", help="one message per window listing every match, e.g. 15m")
    add.add_argument("--disabled", action="store_true", help="save it switched off")
    add.add_argument("--replace", action="store_true", help="overwrite a rule of the same name")
    actions.add_parser("list", parents=[common], help="all rules")
    show = actions.add_parser("show", parents=[common], help="one rule and its alert counts")
    show.add_argument("name")
    show.add_argument("--es-query", action="store_true", help="also print the Elasticsearch query")
    for action, text in (("enable", "switch a rule on"), ("disable", "switch a rule off"),
                         ("remove", "delete a rule (its alerts are kept)")):
        actions.add_parser(action, parents=[common], help=text).add_argument("name")
    imported = actions.add_parser("import", parents=[common], help="add or update the rules of a YAML file")
    imported.add_argument("file")
    test = actions.add_parser("test", parents=[common], help="back-fill: what a rule matches among indexed articles")
    test.add_argument("name", nargs="?")
    test.add_argument("--query")
    for flag in ("topic", "source", "language"):
        test.add_argument(f"--{flag}", action="append")
    test.add_argument("--since", help="a date (2026-01-31) or a relative time (7d, 12h)")
    test.add_argument("--limit", type=int, default=20)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    action = args.alerts_action
    try:
        if action in ("enable", "disable"):
            return _set_enabled(args, settings, action == "enable")
        return {"add": cmd_add, "list": cmd_list, "show": cmd_show, "remove": cmd_remove, "import": cmd_import,
                "test": cmd_test}[action](args, settings)
    except RuleError as err:
        raise ConfigError(f"alert rule: {err}") from None
