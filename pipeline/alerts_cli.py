"""`newsbeam alerts ...`: manage alert rules in Elasticsearch and back-fill them over history.

    newsbeam alerts add NAME --query Q [--topic T] [--source S] [--language L]
                        [--notify TARGET ...] [--digest 15m] [--disabled] [--replace]
                        [--spike 3x | --first-mention FIELD | --spread N | --silence 6h|auto]
                        [--window 1h] [--baseline 7d] [--min 5] [--min-sources 2] ... (volume rules)
    newsbeam alerts list | show NAME | enable NAME | disable NAME | remove NAME
    newsbeam alerts import configs/alerts.yaml
    newsbeam alerts test NAME | --query Q [--since 7d] [--until DATE] [--limit 20]
    newsbeam alerts deliver [--duration SECONDS]

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
from newsbeam.transforms.rules import (
    NEW_VALUE_FIELDS,
    TIME_FIELDS,
    Rule,
    RuleError,
    VolumeSpec,
    format_duration,
    parse_duration,
)


def _client(settings: Settings):
    from newsbeam.transforms.elastic import connect, prepare_indices
    client = connect(settings.elasticsearch)
    prepare_indices(client, settings.elasticsearch, settings.alerts)
    return client


def _now() -> str:
    from newsbeam.transforms.clock import iso
    return iso(time.time())


# Volume options -> the rule kind's YAML keys (configs/alerts.yaml); kinds say which they take.
_VOLUME_OPTIONS = {"window": "window", "by": "by", "settle": "settle", "cooldown": "cooldown", "evidence": "limit",
                   "feed": "feeds", "baseline": "baseline", "min": "min", "min_sources": "sources",
                   "direction": "direction", "unseen": "unseen", "factor": "factor"}


def _volume_from_args(args: argparse.Namespace) -> VolumeSpec | None:
    given = {key: getattr(args, option) for option, key in _VOLUME_OPTIONS.items() if getattr(args, option) is not None}
    kinds = {"spike": args.spike, "first_mention": args.first_mention, "spread": args.spread, "silence": args.silence}
    kind = next((kind for kind, value in kinds.items() if value is not None), None)
    if kind is None:
        if given:
            raise ConfigError(f"--{next(iter(given)).replace('_', '-')} is for volume rules: add --spike, "
                              "--first-mention, --spread or --silence")
        return None
    value = kinds[kind]
    given.update({"spike": {"ratio": value}, "first_mention": {"field": value}, "spread": {"sources": value},
                  "silence": {"after": value}}[kind])
    return VolumeSpec.from_doc(kind, given)


def _rule_from_args(args: argparse.Namespace, name: str | None = None) -> Rule:
    volume = _volume_from_args(args)
    if args.query is None and volume is None:
        raise ConfigError("--query is required (a volume rule may go without one)")
    return Rule(name=name or args.name, query=args.query or "", topics=tuple(args.topic or ()),
                sources=tuple(args.source or ()), languages=tuple(args.language or ()),
                notify=tuple(getattr(args, "notify", None) or ("log",)),
                digest_seconds=parse_duration(getattr(args, "digest", None) or 0),
                enabled=not getattr(args, "disabled", False), volume=volume)


def _describe(rule: Rule) -> str:
    filters = [f"{label}: {', '.join(values)}" for label, values in
               (("topics", rule.topics), ("sources", rule.sources), ("languages", rule.languages)) if values]
    if rule.volume:
        spec = rule.volume.to_doc()
        filters.append(f"{rule.kind}: " + ", ".join(f"{key} {', '.join(value) if isinstance(value, list) else value}"
                                                    for key, value in spec.items()))
    digest = f"digest every {format_duration(rule.digest_seconds)}" if rule.digest_seconds else "each match"
    if rule.volume:
        digest = f"each firing, {digest}" if rule.digest_seconds else "each firing"
    state = "enabled" if rule.enabled else "DISABLED"
    return (f"{rule.name} [{state}]\n  query:  {rule.query or '(every article)'}\n" +
            "".join(f"  {f}\n" for f in filters) + f"  notify: {', '.join(rule.notify)} ({digest})")


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
        kind = f"[{rule.kind}] " if rule.volume else ""
        print(f"{'on ' if rule.enabled else 'off'}  {rule.name:24s} {kind}{rule.query}   -> "
              f"{', '.join(rule.notify)}{digest}")
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
    if rule.volume:
        latest = client.search(index=index, query={"term": {"rule": rule.name}}, size=5, sort=[{"window_end": "desc"}],
                               source_includes=["window_end", "title"])["hits"]["hits"]
        for hit in latest:
            print(f"    {hit['_source'].get('window_end', '')[:16]}  {hit['_source'].get('title', '')}")
    if args.es_query:
        print(json.dumps(_compile(rule, settings).es_query(), indent=2))  # volume rules: the query they count
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
        print(f"imported {rule.name}: {f'[{rule.kind}] ' if rule.volume else ''}{rule.query}")
    return 0


def _compile(rule: Rule, settings: Settings):
    from newsbeam.transforms.rules import compile_rule
    return compile_rule(rule, _lemmatizer(settings))


def _lemmatizer(settings: Settings):
    """The query lemmatizer; the spaCy model is loaded only for a query with words in it."""
    from newsbeam.transforms.entities import load_model
    from newsbeam.transforms.rules import spacy_lemmatizer
    loaded = []

    def lemmatize(text: str) -> tuple[str, ...]:
        if not loaded:
            loaded.append(spacy_lemmatizer(load_model(settings.nlp.model)))
        return loaded[0](text)
    return lemmatize


def _moment(text: str, now: float) -> float:
    """'30d' -> 30 days before now; a date or a date-time (UTC unless it says) -> its epoch."""
    from datetime import UTC, datetime
    try:
        return now - parse_duration(text)
    except RuleError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{text!r}: use a relative time (30d, 12h) or a date (2026-01-31)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _test_volume(client, rule: Rule, args: argparse.Namespace, settings: Settings) -> int:
    """Back-fill of a volume rule: the firings the live loop makes over the windows of the period."""
    from newsbeam.transforms.volume import compile_volume, describe, replay
    now = time.time()
    since = _moment(args.since or "7d", now)
    until = _moment(args.until, now) if args.until else now
    if until <= since:
        raise ConfigError("alerts test: --until must be after --since")
    firings = replay(client, settings.elasticsearch.articles_alias, compile_volume(rule, _lemmatizer(settings)),
                     since, until)
    for line in describe(firings[:args.limit]):
        print(line)
    print(f"{len(firings)} firing(s) of {rule.name} ({rule.kind}) from {iso_minutes(since)} to {iso_minutes(until)}"
          f" ({min(len(firings), args.limit)} shown)", file=sys.stderr)
    return 0


def iso_minutes(moment: float) -> str:
    from newsbeam.transforms.clock import iso
    return iso(moment)[:16] + "Z"


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
    if bool(args.name) == bool(args.query or _volume_from_args(args)):
        raise ConfigError("alerts test: give a rule NAME or --query Q (not both)")
    client = _client(settings)
    if args.name:
        rule = Rule.from_doc(_get_rule(client, settings, args.name))
    else:
        rule = _rule_from_args(args, name="adhoc")
    if not client.indices.exists(index=settings.elasticsearch.articles_alias):
        raise ConfigError(f"nothing indexed yet: {settings.elasticsearch.articles_alias} does not exist")
    if rule.volume:
        return _test_volume(client, rule, args, settings)
    if args.until:
        raise ConfigError("alerts test: --until is for volume rules")
    query = backfill_query(_compile(rule, settings).es_query(), args.since)
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


def cmd_deliver(args: argparse.Namespace, settings: Settings) -> int:
    """The delivery loop on its own, until --duration passes, Ctrl-C or SIGTERM; the delivery
    in progress finishes (within its deadline) and releases its claim before the exit."""
    import logging
    import signal
    import threading

    from newsbeam.transforms.alerts import volume_job
    from newsbeam.transforms.delivery import DeliveryLoop

    stopping = threading.Event()
    stopped_by: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        stopped_by.append(signum)
        stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    loop = DeliveryLoop(_client(settings), settings.alerts, jobs=[
        volume_job(settings.elasticsearch, settings.alerts, settings.nlp.model)]).start()
    logging.getLogger("newsbeam").info(
        "delivering alerts from %s every %gs%s", settings.alerts.alerts_index, settings.alerts.sweep_interval,
        f" for {args.duration:g}s" if args.duration else "; Ctrl-C to stop")
    deadline = time.monotonic() + args.duration if args.duration else float("inf")
    while not stopping.is_set() and time.monotonic() < deadline:
        stopping.wait(min(1.0, max(0.0, deadline - time.monotonic())))
    loop.stop()
    if stopped_by:
        logging.getLogger("newsbeam").info("stopped by %s; undelivered alerts stay pending",
                                           signal.Signals(stopped_by[0]).name)
        return 128 + stopped_by[0]
    return 0


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


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
    add.add_argument("--query", help="required, but for a volume rule (then every article counts)")
    for flag in ("topic", "source", "language"):
        add.add_argument(f"--{flag}", action="append", help=f"only articles with this {flag} (repeatable: any)")
    add.add_argument("--notify", nargs="+", action="extend",
                     help="log, stdout, webhook:URL, slack:URL, email:ADDRESS (default: log)")
    add.add_argument("--digest", help="one message per window listing every match, e.g. 15m")
    add.add_argument("--disabled", action="store_true", help="save it switched off")
    add.add_argument("--replace", action="store_true", help="overwrite a rule of the same name")
    _add_volume_options(add)
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
    test.add_argument("--until", help="volume rules: the end of the replay (default: now)")
    test.add_argument("--limit", type=int, default=20)
    _add_volume_options(test)
    deliver = actions.add_parser("deliver", parents=[common],
                                 help="send pending alerts (the delivery loop on its own, for distributed runs)")
    deliver.add_argument("--duration", type=_positive_seconds, default=None,
                         help="stop after this many seconds (default: until Ctrl-C or SIGTERM)")


def _add_volume_options(parser: argparse.ArgumentParser) -> None:
    """The volume rule kinds and their settings (docs/volume-alerts.md)."""
    group = parser.add_argument_group("volume rules (docs/volume-alerts.md)")
    kinds = group.add_mutually_exclusive_group()
    kinds.add_argument("--spike", metavar="RATIO", help="matches per window RATIO (3x) times the baseline's")
    kinds.add_argument("--first-mention", dest="first_mention", choices=sorted(NEW_VALUE_FIELDS),
                       help="a value of this field (term: the query itself) unseen before, in --min articles")
    kinds.add_argument("--spread", type=int, metavar="N", help="one story (story_id) in N distinct sources")
    kinds.add_argument("--silence", metavar="DURATION", help="no match for this long (auto: its usual gap)")
    group.add_argument("--window", help="window size (default 1h)")
    group.add_argument("--baseline", help="spike: the period compared against; silence auto: learnt over (7d)")
    group.add_argument("--min", type=int, help="spike: matches at least (5); first mention: articles (3)")
    group.add_argument("--min-sources", dest="min_sources", type=int, help="first mention: distinct sources (2)")
    group.add_argument("--direction", choices=["up", "down", "both"], help="spike: up (default), down or both")
    group.add_argument("--unseen", help="first mention: not seen for this long before (30d)")
    group.add_argument("--factor", type=float, help="silence auto: times the longest usual gap (2)")
    group.add_argument("--by", choices=TIME_FIELDS, help="count by publication (default) or indexing time")
    group.add_argument("--settle", help="evaluate a window this long after it ends (30m)")
    group.add_argument("--cooldown", help="quiet time after a firing (6 windows)")
    group.add_argument("--evidence", type=int, help="articles kept in the alert (20)")
    group.add_argument("--feed", action="append", help="only articles of this feed URL (repeatable: any)")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    action = args.alerts_action
    try:
        if action in ("enable", "disable"):
            return _set_enabled(args, settings, action == "enable")
        return {"add": cmd_add, "list": cmd_list, "show": cmd_show, "remove": cmd_remove, "import": cmd_import,
                "test": cmd_test, "deliver": cmd_deliver}[action](args, settings)
    except RuleError as err:
        raise ConfigError(f"alert rule: {err}") from None
