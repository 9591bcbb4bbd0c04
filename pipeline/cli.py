"""The `newsbeam` command: run the pipeline, tag text offline, search the index."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from pipeline.config import ConfigError, Feed, Settings, load_feeds, load_settings

_LOG = logging.getLogger("newsbeam")


def _settings_for_run(options) -> Settings:
    settings = load_settings(options.config)
    if options.feed:
        settings = dataclasses.replace(settings, feeds=tuple(Feed(url=url) for url in options.feed))
    elif options.feeds_file:
        settings = dataclasses.replace(settings, feeds=load_feeds(Path(options.feeds_file)))
    if options.es_url:
        settings = dataclasses.replace(settings, elasticsearch=dataclasses.replace(
            settings.elasticsearch, url=options.es_url))
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


def _runner_used(result: Any, requested: str | None) -> str:
    """Which engine ran the job: the DirectRunner tries Prism, then falls back."""
    if requested and requested not in ("DirectRunner", "direct"):
        return requested
    name = type(result).__name__
    if "portability" in type(result).__module__:
        return "PrismRunner (via DirectRunner)"
    return {"DirectPipelineResult": "BundleBasedDirectRunner (via DirectRunner)",
            "RunnerResult": "FnApiRunner (via DirectRunner; Prism unavailable)"}.get(name, name)


def cmd_run(argv: list[str]) -> int:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from pipeline.build import build_pipeline
    from pipeline.options import NewsbeamOptions
    from transforms.elastic import connect, ensure_indices
    from transforms.topics import Taxonomy

    beam_options = PipelineOptions(argv)
    options = beam_options.view_as(NewsbeamOptions)
    settings = _settings_for_run(options)
    taxonomy = Taxonomy.load(settings.topics_file)
    beam_options.view_as(StandardOptions).streaming = True
    client = connect(settings.elasticsearch)
    ensure_indices(client, settings.elasticsearch)
    _LOG.info("polling %d feed(s) every %gs into %s (alias %s)%s", len(settings.feeds), settings.poll_interval,
              settings.elasticsearch.url, settings.elasticsearch.articles_alias,
              f" for {options.duration:g}s" if options.duration else "; Ctrl-C to stop")
    pipeline = beam.Pipeline(options=beam_options)
    build_pipeline(pipeline, settings, taxonomy, options.duration, options.fetch_shards)
    stop = threading.Event()
    threading.Thread(target=_report_progress, args=(client, settings, stop), daemon=True).start()
    started = time.monotonic()
    try:
        result = pipeline.run()
        _LOG.info("runner: %s", _runner_used(result, beam_options.view_as(StandardOptions).runner))
        result.wait_until_finish()
    except KeyboardInterrupt:
        _LOG.warning("interrupted; articles already handed to Elasticsearch are kept")
        return 130
    finally:
        stop.set()
    client.indices.refresh(index=[settings.elasticsearch.articles_alias, settings.elasticsearch.deadletter_index])
    articles = client.count(index=settings.elasticsearch.articles_alias)["count"]
    dead = client.count(index=settings.elasticsearch.deadletter_index)["count"]
    _LOG.info("finished after %.0fs: %d articles in %s, %d dead letters", time.monotonic() - started,
              articles, settings.elasticsearch.articles_alias, dead)
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
    from transforms.tagging import Tagger

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
    from transforms.elastic import connect
    from transforms.search import format_hit, search_articles

    settings = load_settings(args.config)
    if args.es_url:
        settings = dataclasses.replace(settings, elasticsearch=dataclasses.replace(settings.elasticsearch,
                                                                                   url=args.es_url))
    client = connect(settings.elasticsearch)
    response = search_articles(client, settings.elasticsearch.articles_alias, " ".join(args.query),
                               topic=args.topic, entity=args.entity, since=args.since, limit=args.limit)
    hits = response["hits"]["hits"]
    total = response["hits"]["total"]["value"]
    for hit in hits:
        print(format_hit(hit))
    print(f"{len(hits)} of {total} matching article(s)", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="newsbeam", description="Streaming news monitoring with Beam and Elasticsearch")
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="poll feeds and index enriched articles (streaming Beam pipeline)",
                         description="Any Beam option (--runner, --direct_num_workers, --prism_location, ...) "
                                     "passes through. Flags: --config PATH --feed URL --feeds-file PATH "
                                     "--es-url URL --duration SECONDS --poll-interval SECONDS")
    run.add_argument("beam_args", nargs=argparse.REMAINDER)
    tag = sub.add_parser("tag", help='add entities and topics to JSON lines {"id", "title", "text"}')
    tag.add_argument("--input", default="-", help="JSON lines file, or - for stdin")
    tag.add_argument("--output", default="-", help="output file, or - for stdout")
    tag.add_argument("--config", default=None)
    search = sub.add_parser("search", help="search indexed articles")
    search.add_argument("query", nargs="*", help="words; AND by default; quotes for phrases")
    search.add_argument("--topic")
    search.add_argument("--entity", help="canonical entity name, e.g. 'Vladimir Putin'")
    search.add_argument("--since", help="a date (2026-01-31) or a relative time (7d, 12h)")
    search.add_argument("--limit", type=int, default=10)
    search.add_argument("--config", default=None)
    search.add_argument("--es-url", dest="es_url", default=None)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, _ = parser().parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("elastic_transport", "urllib3", "apache_beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transforms.elastic import ElasticsearchUnavailable
    try:
        if args.command == "run":
            return cmd_run(argv[argv.index("run") + 1:])
        if args.command == "tag":
            return cmd_tag(args)
        return cmd_search(args)
    except (ConfigError, ElasticsearchUnavailable, RuntimeError) as err:
        print(f"newsbeam: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
