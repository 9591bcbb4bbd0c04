"""End-to-end throughput: a corpus served as RSS feeds on 127.0.0.1, `newsbeam run` on the
local runner into a real Elasticsearch, and bare `nlp.pipe` over the same texts.

    .venv/bin/python bench/e2e.py --corpus ../shared/corpus/articles/recovery-reliable.jsonl

Prints a table and writes JSON (--json PATH). Starts a throw-away Elasticsearch unless
--es-url is given.
"""
from __future__ import annotations

import argparse
import html
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from elasticsearch import Elasticsearch  # noqa: E402

from pipeline import local_es  # noqa: E402
from tests.feedserver import FeedServer  # noqa: E402


def load_corpus(path: Path, limit: int | None) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("body_text") and record.get("url"):
                records.append(record)
            if limit and len(records) >= limit:
                break
    return records


def as_feeds(records: list[dict], per_feed: int) -> list[bytes]:
    feeds = []
    for start in range(0, len(records), per_feed):
        items = []
        for r in records[start:start + per_feed]:
            body = "".join(f"<p>{html.escape(p)}</p>" for p in r["body_text"].split("\n") if p.strip())
            items.append(f"<item><title>{html.escape(r['title'])}</title><link>{html.escape(r['url'])}</link>"
                         f"<content:encoded>{html.escape(body)}</content:encoded></item>")
        feeds.append(('<?xml version="1.0" encoding="UTF-8"?><rss version="2.0" '
                      'xmlns:content="http://purl.org/rss/1.0/modules/content/"><channel><title>bench</title>'
                      "<link>http://bench/</link><description>b</description>" + "".join(items) +
                      "</channel></rss>").encode())
    return feeds


def bare_spacy(records: list[dict], batch_size: int) -> float:
    """Articles/s of nlp.pipe alone, same model, components and text as the pipeline."""
    from pipeline.config import NlpSettings
    from transforms.entities import load_model, nlp_text
    nlp = load_model()
    texts = [nlp_text({"title": r["title"], "body": r["body_text"]}, NlpSettings().max_chars) for r in records]
    started = time.perf_counter()
    for _ in nlp.pipe(texts, batch_size=batch_size):
        pass
    return len(texts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared/corpus/articles/recovery-reliable.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N articles")
    parser.add_argument("--per-feed", type=int, default=50)
    parser.add_argument("--es-url", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of polling; the run then drains everything fetched")
    parser.add_argument("beam_args", nargs="*", help="passed to newsbeam run (after --)")
    args = parser.parse_args()
    if not args.corpus.exists():
        parser.error(f"corpus {args.corpus} not found")
    records = load_corpus(args.corpus, args.limit)
    es_dir = None
    es_url = args.es_url
    if not es_url:
        es_dir = Path(tempfile.mkdtemp(prefix="newsbeam-bench-es-"))
        es_url = local_es.start(es_dir, port=local_es.free_port(), heap="1g").url
    alias = f"bench-{int(time.time())}"
    config = Path(tempfile.mkdtemp()) / "pipeline.yaml"
    config.write_text(f"poll_interval: 3600\ntopics_file: {REPO / 'configs/topics.yaml'}\n"
                      f"elasticsearch:\n  url: {es_url}\n  articles_alias: {alias}-articles\n"
                      f"  deadletter_index: {alias}-deadletters\n  feeds_index: {alias}-feeds\n"
                      # One loopback host serves every feed: no politeness delay, fetch them all at once.
                      "fetch:\n  allow_private_addresses: true\n  per_host_delay: 0.01\n"
                      "  per_host_concurrency: 16\n")
    es = Elasticsearch(es_url, request_timeout=60)
    try:
        with FeedServer() as server:
            urls = [server.serve(f"/feed{i}.xml", body) for i, body in enumerate(as_feeds(records, args.per_feed))]
            command = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config),
                       "--duration", str(args.duration),
                       *sum((["--feed", u] for u in urls), []), *args.beam_args]
            print(f"serving {len(records)} articles in {len(urls)} feeds; running newsbeam", file=sys.stderr)
            started = time.time()
            run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            wall = time.time() - started
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return 1
        runner = next((line.split("newsbeam: runner: ", 1)[1] for line in run.stderr.splitlines()
                       if "newsbeam: runner: " in line), "?")
        es.indices.refresh(index=f"{alias}-articles")
        stats = es.search(index=f"{alias}-articles", size=0, aggs={
            "first_fetch": {"min": {"field": "fetched_at"}}, "last_index": {"max": {"field": "indexed_at"}}})
        indexed = stats["hits"]["total"]["value"]
        span = (stats["aggregations"]["last_index"]["value"] - stats["aggregations"]["first_fetch"]["value"]) / 1000
        bare = bare_spacy(records, 64)
        result = {"articles": len(records), "indexed": indexed, "runner": runner,
                  "wall_seconds_including_startup": round(wall, 1),
                  "pipeline_seconds_first_fetch_to_last_indexed": round(span, 1),
                  "end_to_end_articles_per_s": round(indexed / max(span, 1), 2),
                  "bare_spacy_articles_per_s": round(bare, 2)}
        result["ratio"] = round(result["end_to_end_articles_per_s"] / result["bare_spacy_articles_per_s"], 3)
        for key, value in result.items():
            print(f"{key:48s} {value}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0 if indexed == len(records) else 1
    finally:
        if es_dir:
            local_es.stop(es_dir)
            shutil.rmtree(es_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
