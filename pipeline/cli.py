"""The `newsbeam` command: run the pipeline, tag text offline, search the index."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import faulthandler
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from newsbeam.pipeline.config import (
    ConfigError,
    Feed,
    Settings,
    load_feeds,
    load_settings,
    with_connection,
)
from newsbeam.transforms.logs import drop_beam_import_notice
from newsbeam.transforms.redact import redact_url

_LOG = logging.getLogger("newsbeam")


def _unknown_flags_message(unknown: list[str], known: list[str]) -> str:
    """'unrecognized arguments: --notfy (did you mean --notify?)': flags only, never their values,
    which may be secret (a webhook URL)."""
    flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
    hints = []
    for flag in flags:
        close = difflib.get_close_matches(flag, known, n=1)
        hints += [f"{flag}: did you mean {close[0]}?"] if close else []
    named = " ".join(flags) if flags else f"{len(unknown)} positional value(s)"
    return f"unrecognized arguments: {named}" + (f" ({'; '.join(hints)})" if hints else "")


class _StrictParser(argparse.ArgumentParser):
    """Refuses arguments it does not know, naming the closest flag it does, so a misspelt
    option fails instead of being dropped. `passes_through` (only `run`) collects them for Beam."""

    def __init__(self, *args: Any, passes_through: bool = False, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)  # `--conf` must not quietly mean `--config`
        super().__init__(*args, **kwargs)
        self._passes_through = passes_through

    def parse_known_args(self, args=None, namespace=None):
        namespace, unknown = super().parse_known_args(args, namespace)
        if self._passes_through:
            return namespace, []  # `run` hands them to Beam, which checks them (`check_beam_args`)
        if unknown:
            self.error(_unknown_flags_message(unknown, list(self._option_string_actions)))
        return namespace, unknown


def check_beam_args(argv: list[str]) -> list[str]:
    """The Beam options among `newsbeam run`'s arguments (names only: values may be secret);
    raises ConfigError for any argument neither newsbeam nor Beam knows."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from newsbeam.pipeline.options import NewsbeamOptions

    parsers: list[argparse.ArgumentParser] = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)  # the parser of every Beam option
    known = [flag for action in parsers[0]._actions for flag in action.option_strings]
    _, unknown = parsers[0].parse_known_args(argv)
    if unknown:
        raise ConfigError(f"run: {_unknown_flags_message(unknown, known)}")
    ours = argparse.ArgumentParser(add_help=False)
    NewsbeamOptions._add_argparse_args(ours)
    newsbeam_flags = set(ours._option_string_actions)
    given = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]
    return list(dict.fromkeys(flag for flag in given if flag in known and flag not in newsbeam_flags))


def _settings_for_run(options) -> Settings:
    settings = load_settings(options.config)
    if options.feed:
        settings = dataclasses.replace(settings, feeds=tuple(Feed(url=url) for url in options.feed))
    elif options.feeds_file:
        settings = dataclasses.replace(settings, feeds=load_feeds(Path(options.feeds_file)))
    settings = with_connection(settings, options.es_url, options.es_ca_certs)
    if options.poll_interval:
        settings = dataclasses.replace(settings, poll_interval=options.poll_interval)
    if not settings.feeds:
        raise ConfigError("no feeds: list some in configs/feeds.yaml or pass --feed URL")
    return settings


def _report_progress(client, settings: Settings, stop: threading.Event, every: float = 30.0) -> None:
    """One status line every `every` seconds, read from the indices (what users can search)."""
    started = time.monotonic()
    while not stop.wait(every):
        try:
            articles = client.count(index=settings.elasticsearch.articles_alias)["count"]
            dead = client.count(index=settings.elasticsearch.deadletter_index)["count"]
            _LOG.info("running %ds: %d articles searchable, %d dead letters", time.monotonic() - started,
                      articles, dead)
        except Exception as err:  # status only; the pipeline reports its own errors
            _LOG.info("running %ds: Elasticsearch status unavailable (%s)", time.monotonic() - started,
                      type(err).__name__)


def _workers(processes: int) -> str:
    return f"{processes} worker process(es)" if processes else "the pipeline process"


def _exit_within(seconds: float, code: int, why: str) -> None:
    """Ends the process `seconds` from now with `code`, unless it ended by itself first. A fetch,
    parse or tokenizer still running in a thread or a worker process must not keep a stopped
    run alive (the interpreter joins every pool thread at exit); what was in flight is polled
    again by the next run, and articles already handed to Elasticsearch are kept."""
    def leave() -> None:
        time.sleep(seconds)
        _LOG.warning("%s %gs ago and work is still in flight: exiting now", why, seconds)
        for child in multiprocessing.active_children():  # our own worker processes, by handle
            child.kill()
        logging.shutdown()
        os._exit(code)

    threading.Thread(target=leave, name="newsbeam-exit", daemon=True).start()


def _stop_on_sigterm(grace: float) -> list[int]:
    """SIGTERM (`kill PID`, `docker stop`, systemd) stops the run as Ctrl-C does; the returned
    list gets the signal once it came. A shell starts background jobs (`newsbeam run &`) with
    Ctrl-C ignored, so SIGTERM is how those are stopped. The process is gone `grace` seconds
    after the signal, whatever is still running."""
    stopped_by: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        if not stopped_by:
            _exit_within(grace, 128 + signal.SIGTERM, "stopped by SIGTERM")
        stopped_by.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        _LOG.info("Ctrl-C is ignored in this process (started in the background): stop it with kill %d", os.getpid())
    return stopped_by


def _stop_delivery(delivery, finished: bool, exit_at: float | None) -> None:
    """After a bounded run, one more sweep gives the alerts of its last moments their first
    try (bounded by the send deadline); whatever is still undelivered stays pending for the
    next run or `newsbeam alerts deliver`, and `newsbeam status` counts it. Both waits end
    before `exit_at` (monotonic), when the process is ended whatever runs: a send cut there
    would keep its claim."""
    left = None if exit_at is None else exit_at - time.monotonic() - 1
    if finished and (left is None or left > 0):
        budget = delivery.outbox.longest_send + 5
        delivery.flush(timeout=budget if left is None else min(budget, left))
    delivery.stop(timeout=None if exit_at is None else max(0.0, exit_at - time.monotonic() - 1))


def cmd_run(argv: list[str]) -> int:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from newsbeam.pipeline import beam_fixes
    from newsbeam.pipeline.build import build_pipeline
    from newsbeam.pipeline.options import NewsbeamOptions
    from newsbeam.pipeline.runner import apply_profile, choose_runner, make_runner, profile_for, quiet_stop_noise
    from newsbeam.transforms.alerts import volume_job
    from newsbeam.transforms.delivery import DeliveryLoop
    from newsbeam.transforms.elastic import connect, prepare_indices
    from newsbeam.transforms.topics import Taxonomy

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack: for a run that seems stuck
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    passed = check_beam_args(argv)
    _LOG.info("Beam options passed on: %s", ", ".join(passed) or "none")
    beam_options = PipelineOptions(argv)
    options = beam_options.view_as(NewsbeamOptions)
    settings = _settings_for_run(options)
    choice = choose_runner(beam_options)
    _LOG.info("runner: %s (%s)", choice.name, choice.reason)
    profile = profile_for(choice, settings)
    settings = apply_profile(settings, profile)
    grace = settings.fetch.shutdown_grace
    stopped_by = _stop_on_sigterm(grace)
    quiet_stop_noise()  # after the SIGTERM handler exists: it wraps the handlers installed so far
    taxonomy = Taxonomy.load(settings.topics_file)
    beam_options.view_as(StandardOptions).streaming = True
    _LOG.info("spaCy runs in %s, feedparser in %s", _workers(settings.nlp.processes),
              _workers(settings.fetch.parse_processes))
    client = connect(settings.elasticsearch)
    prepare_indices(client, settings.elasticsearch, settings.alerts)
    _LOG.info("polling %d feed(s) every %gs into %s (alias %s)%s", len(settings.feeds), settings.poll_interval,
              redact_url(settings.elasticsearch.url), settings.elasticsearch.articles_alias,
              f" for {options.duration:g}s" if options.duration else "; Ctrl-C to stop")
    if choice.local:
        beam_fixes.apply()
    pipeline = beam.Pipeline(runner=make_runner(choice, beam_options), options=beam_options)
    build_pipeline(pipeline, settings, taxonomy, profile, options.duration, options.fetch_shards)
    stop = threading.Event()
    threading.Thread(target=_report_progress, args=(client, settings, stop), daemon=True).start()
    # Alerts are delivered here, beside the pipeline, never from a worker: see `alerts deliver`.
    delivery = DeliveryLoop.connect(settings.elasticsearch, settings.alerts, jobs=[
        volume_job(settings.elasticsearch, settings.alerts, settings.nlp.model)]).start()
    started = time.monotonic()
    exit_at = started + options.duration + grace if options.duration else None
    if options.duration:  # a bounded run ends on time even when a stage never finishes its bundle
        _exit_within(options.duration + grace, 0, f"the run reached --duration {options.duration:g}s")
    finished = False
    try:
        pipeline.run().wait_until_finish()
        finished = True
    except (KeyboardInterrupt, RuntimeError) as err:
        # Beam re-raises a Ctrl-C that lands inside a DoFn as "RuntimeError: KeyboardInterrupt [while running …]".
        if isinstance(err, RuntimeError) and not str(err).startswith("KeyboardInterrupt"):
            raise
        if stopped_by:
            _LOG.warning("stopped by SIGTERM; articles already handed to Elasticsearch are kept")
            return 128 + signal.SIGTERM
        _LOG.warning("interrupted; articles already handed to Elasticsearch are kept")
        _exit_within(grace, 130, "interrupted")
        return 130
    finally:
        stop.set()
        if not finished:  # SIGTERM and Ctrl-C end the process `grace` after they came
            exit_at = min(exit_at or float("inf"), time.monotonic() + grace)
        _stop_delivery(delivery, finished, exit_at)
    client.indices.refresh(index=[settings.elasticsearch.articles_alias, settings.elasticsearch.deadletter_index])
    articles = client.count(index=settings.elasticsearch.articles_alias)["count"]
    dead = client.count(index=settings.elasticsearch.deadletter_index)["count"]
    _LOG.info("finished after %.0fs: %d articles in %s, %d dead letters", time.monotonic() - started,
              articles, settings.elasticsearch.articles_alias, dead)
    _exit_within(grace, 0, "the run finished")
    return 0


def _read_jsonl(stream: TextIO) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"input line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text", ""), str):
            raise ConfigError(f"input line {number}: expected an object with a string 'text'")
        yield number, record


def cmd_tag(args: argparse.Namespace) -> int:
    from newsbeam.transforms.tagging import Tagger

    settings = load_settings(args.config)
    tagger = Tagger.load(settings)
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    sink = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    batch: list[dict[str, Any]] = []
    count = 0

    def flush() -> None:
        nonlocal count
        for record in tagger.tag_records(batch):
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += len(batch)
        batch.clear()
        if args.output != "-":
            print(f"tagged {count} records", file=sys.stderr, end="\r")

    with source, sink:
        for _, record in _read_jsonl(source):
            batch.append(record)
            if len(batch) >= 256:
                flush()
        flush()
    if args.output != "-":
        print(file=sys.stderr)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from newsbeam.transforms.elastic import connect
    from newsbeam.transforms.search import format_hit, page_summary, results_json, search_articles

    settings = with_connection(load_settings(args.config), args.es_url, args.es_ca_certs)
    client = connect(settings.elasticsearch)
    response = search_articles(client, settings.elasticsearch.articles_alias, " ".join(args.query),
                               topic=args.topic, entity=args.entity, since=args.since, limit=args.limit,
                               page=args.page)
    if args.json:
        print(json.dumps(results_json(response, args.page, args.limit), ensure_ascii=False))
        return 0
    hits = response["hits"]["hits"]
    emphasis = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("*", "*")
    for hit in hits:
        print(format_hit(hit, emphasis))
    print(page_summary(len(hits), response["hits"]["total"]["value"], args.page, args.limit), file=sys.stderr)
    return 0


def cmd_kibana(args: argparse.Namespace) -> int:
    from newsbeam.pipeline.kibana import DASHBOARD_ID, setup

    result = setup(args.kibana_url, args.space)
    counts = ", ".join(f"{count} {kind}" for kind, count in sorted(result.imported.items()))
    space = f"/s/{args.space}" if args.space else ""
    print(f"imported {result.total} saved objects ({counts}) into Kibana {result.version} at {result.kibana_url}; "
          f"open {result.kibana_url}{space}/app/dashboards#/view/{DASHBOARD_ID}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = _StrictParser(prog="newsbeam", description="Streaming news monitoring with Beam and Elasticsearch")
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="poll feeds and index enriched articles (streaming Beam pipeline)",
                   description="Any Beam option (--runner, --direct_num_workers, --prism_location, ...) "
                               "passes through. Flags: --config PATH --feed URL --feeds-file PATH "
                               "--es-url URL --duration SECONDS --poll-interval SECONDS; "
                               "an argument neither newsbeam nor Beam knows is refused",
                   passes_through=True)
    tag = sub.add_parser("tag", help='add entities and topics to JSON lines {"id", "title", "text"}')
    tag.add_argument("--input", default="-", help="JSON lines file, or - for stdin")
    tag.add_argument("--output", default="-", help="output file, or - for stdout")
    tag.add_argument("--config", default=None)
    evaluate = sub.add_parser("eval", help="tagging quality (precision, recall, F1) on labelled news, "
                                           "through the same code as `newsbeam tag`")
    evaluate.add_argument("what", choices=("topics", "entities"))
    evaluate.add_argument("--dataset", choices=("all", "disaster-response", "recovery"), default="all",
                          help="topics only (default all)")
    evaluate.add_argument("--corpus", default=None, help="folder with topics/, articles/, entities/ "
                                                         "(default ../shared/corpus)")
    evaluate.add_argument("--seed", default=None, help="seed article (default ../shared/seed-article.txt)")
    evaluate.add_argument("--misses", type=int, default=5, help="worst misses shown per topic or kind")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.add_argument("--config", default=None)
    search = sub.add_parser("search", help="search indexed articles")
    search.add_argument("query", nargs="*", help="words; AND by default; quotes for phrases")
    search.add_argument("--topic")
    search.add_argument("--entity", help="canonical entity name, e.g. 'Vladimir Putin'")
    search.add_argument("--since", help="a date (2026-01-31) or a relative time (7d, 12h)")
    search.add_argument("--limit", type=int, default=10, help="articles per page (default 10)")
    search.add_argument("--page", type=int, default=1, help="which page of --limit articles (default 1)")
    search.add_argument("--json", action="store_true", help="print one JSON document: total, page, articles "
                                                            "with highlighted fragments")
    search.add_argument("--config", default=None)
    search.add_argument("--es-url", dest="es_url", default=None)
    search.add_argument("--es-ca-certs", dest="es_ca_certs", default=None)
    kibana = sub.add_parser("kibana", help="Kibana: import the data views, saved searches and dashboards")
    kibana_sub = kibana.add_subparsers(dest="kibana_command", required=True)
    kibana_setup = kibana_sub.add_parser(
        "setup", help="import deploy/kibana/*.ndjson (overwrites; safe to repeat)",
        description="Credentials from KIBANA_USERNAME/KIBANA_PASSWORD, else ELASTICSEARCH_API_KEY, else "
                    "ELASTICSEARCH_USERNAME/ELASTICSEARCH_PASSWORD.")
    kibana_setup.add_argument("--kibana-url", dest="kibana_url", default=None,
                              help="default: $KIBANA_URL, else http://127.0.0.1:5601")
    kibana_setup.add_argument("--space", default=None, help="Kibana space id (default: the default space)")
    from newsbeam.pipeline import feeds_cli
    feeds_cli.add_parser(sub)
    from newsbeam.pipeline import alerts_cli
    alerts_cli.add_parser(sub)
    from newsbeam.pipeline import ops_cli
    ops_cli.add_parsers(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    # Before anything imports apache_beam (building the parser does); kept by basicConfig(force=True).
    drop_beam_import_notice()
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    # force: importing Beam (while building the parser) may already have configured the root logger.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("elastic_transport", "urllib3", "apache_beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from elasticsearch import ApiError

    from newsbeam.transforms.elastic import ElasticsearchUnavailable
    try:
        if args.command == "run":
            return cmd_run(argv[argv.index("run") + 1:])
        if args.command == "tag":
            return cmd_tag(args)
        if args.command == "kibana":
            return cmd_kibana(args)
        if args.command == "feeds":
            from newsbeam.pipeline import feeds_cli
            return feeds_cli.run(args)
        if args.command == "alerts":
            from newsbeam.pipeline import alerts_cli
            return alerts_cli.run(args)
        if args.command in ("status", "es"):
            from newsbeam.pipeline import ops_cli
            return ops_cli.run(args)
        if args.command == "eval":
            from newsbeam.pipeline import evaluate
            return evaluate.main(args)
        return cmd_search(args)
    except (ConfigError, ElasticsearchUnavailable, RuntimeError) as err:
        from newsbeam.pipeline.runner import error_stream
        print(f"newsbeam: error: {err}", file=error_stream())
        return 2
    except ApiError as err:  # e.g. a 403 for credentials whose role does not cover the command
        from newsbeam.pipeline.runner import error_stream
        error = err.info.get("error") if isinstance(err.info, dict) else None
        reason = str(error.get("reason", "") if isinstance(error, dict) else error or "")
        kind = f" {err.message}" if isinstance(err.message, str) and err.message not in ("", "None") else ""
        hint = "; the credentials' role does not allow it" if err.meta.status == 403 else ""
        print(f"newsbeam: error: Elasticsearch refused the request (HTTP {err.meta.status}{kind}){hint}"
              f"{': ' + reason[:500] if reason else ''}", file=error_stream())
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
