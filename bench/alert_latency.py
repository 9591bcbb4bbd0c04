"""Alert latency: from the moment a matching item is visible in a feed to the moment its
webhook call is received, through `newsbeam run` (the local runner) and a real
Elasticsearch, with the feed and the webhook receiver on 127.0.0.1.

    .venv/bin/python -m bench.alert_latency --items 60 --poll-interval 2

Items are real news articles from ../shared/corpus (ReCOVery; falls back to the project's
own fixtures) that mention the coronavirus; the rule is the lemma query
`coronavirus OR covid OR pandemic OR virus`. One item is appended to the feed every
`--spacing` seconds after a warm-up item has been alerted (start-up is not counted).
Latency is bounded below by the polling: on average half a poll interval passes before the
item is even fetched. Prints p50/p95; --json PATH writes the figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from newsbeam.pipeline import local_es
from tests.support import REPO
from tests.support.cli import COMMAND
from tests.support.config import prefixed, write_config
from tests.support.feedserver import FeedServer, fixture_articles, rss
from tests.support.receivers import WebhookReceiver

QUERY = "coronavirus OR covid OR pandemic OR virus"
WORDS = ("coronavirus", "covid", "pandemic", "virus")


def load_items(corpus: Path, count: int) -> list[dict]:
    """`count` + 1 feed items (the first is the warm-up) that the rule matches."""
    items = []
    if corpus.exists():
        with open(corpus, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                text = f"{record.get('title', '')} {record.get('body_text', '')}"
                if record.get("url") and any(word in text.lower() for word in WORDS):
                    paragraphs = [p for p in record["body_text"].split("\n") if p.strip()][:8]
                    items.append({"title": record["title"], "link": record["url"],
                                  "html": "".join(f"<p>{p}</p>" for p in paragraphs)})
                if len(items) > count:
                    return items
    base = fixture_articles()["ventilators"]
    while len(items) <= count:  # our own fixture, made distinct, mentioning the pandemic
        n = len(items)
        items.append({"title": f"{base['title']} ({n})", "link": f"https://news.example.org/bench/{n}",
                      "html": base["html"] + "<p>The coronavirus pandemic strained hospitals.</p>"})
    return items


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--spacing", type=float, default=0.7, help="seconds between new items")
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared/corpus/articles/recovery-reliable.jsonl")
    parser.add_argument("--es-url", default=None, help="default: start a throw-away Elasticsearch")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    items = load_items(args.corpus, args.items)
    workdir = Path(tempfile.mkdtemp(prefix="newsbeam-alert-latency-"))
    es_dir = None
    es_url = args.es_url
    if not es_url:
        es_dir = Path(tempfile.mkdtemp(prefix="newsbeam-bench-es-"))  # its own: the server runs as another user
        es_url = local_es.start(es_dir, port=local_es.free_port()).url
    es, alerts = prefixed(es_url, f"bench{int(time.time())}")
    config = write_config(workdir, es, args.poll_interval, alerts=alerts)
    newsbeam = list(COMMAND)
    visible: dict[str, float] = {}
    run = None
    try:
        with FeedServer() as feeds, WebhookReceiver() as hook:
            served: list[dict] = []
            feed = feeds.serve("/bench.xml", lambda: rss(served, title="bench"))
            subprocess.run(newsbeam + ["alerts", "add", "bench", "--query", QUERY, "--notify",
                                       f"webhook:{hook.url('/hook')}", "--config", str(config)],
                           cwd=REPO, check=True, capture_output=True)
            duration = 120 + args.items * args.spacing + 4 * args.poll_interval
            log = open(workdir / "run.log", "w")
            run = subprocess.Popen(newsbeam + ["run", "--config", str(config), "--feed", feed,
                                               "--duration", str(duration)], cwd=REPO, stdout=log, stderr=log)
            served.append(items[0])
            if not hook.wait_for(1, timeout=120):
                print((workdir / "run.log").read_text()[-3000:], file=sys.stderr)
                raise SystemExit("the warm-up item was never alerted")
            print(f"pipeline up; adding {args.items} items, one every {args.spacing}s "
                  f"(poll interval {args.poll_interval}s)", file=sys.stderr)
            for item in items[1:]:
                visible[item["link"]] = time.time()
                served.append(item)
                time.sleep(args.spacing)
            hook.wait_for(len(items), timeout=30 + 4 * args.poll_interval)
            received = {r["body"]["article"]["url"]: r["time"] for r in hook.received}
    finally:
        if run is not None:
            run.terminate()
            run.wait(timeout=60)
        if es_dir:
            local_es.stop(es_dir)
            shutil.rmtree(es_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)

    latencies = [received[url] - at for url, at in visible.items() if url in received]
    result = {"items": len(visible), "alerted": len(latencies), "poll_interval_s": args.poll_interval,
              "p50_s": round(percentile(latencies, 50), 2), "p95_s": round(percentile(latencies, 95), 2),
              "mean_s": round(statistics.mean(latencies), 2), "max_s": round(max(latencies), 2)}
    for key, value in result.items():
        print(f"{key:16s} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if len(latencies) == len(visible) else 1


if __name__ == "__main__":
    sys.exit(main())
