"""Soak run: the whole pipeline (`newsbeam run`, local runner, real Elasticsearch) polling
1,000+ feeds served locally for a long stretch, reporting whether polling kept its schedule
and whether memory stayed flat.

    .venv/bin/python -m bench.soak --minutes 30 --json soak.json

Feeds, on 50 loopback hosts (127.0.0.2-51), from the server in bench/poll_lag.py:
* the real feeds of ../shared/corpus/feeds (`--real-feeds`, default all 200; skipped without ../shared),
* synthetic feeds up to `--feeds` in all, each starting with 3 articles and gaining one every
  `--item-period` seconds (staggered), so NLP has steady work for the whole run,
* 6 misbehaving endpoints (stall, trickle, gzip bomb, 404, entity declarations, redirect loop).
Prints: RSS of the pipeline process and of it with its worker processes at start (after
the first minute), middle and end, and the peak; the poll lag (each poll's start minus the
time the scheduler had it due, from the pipeline's own record, see transforms/timing.py);
how late each shard's tick reached the poller and how many shard-ticks one poll bundle
carried (several: ticks queued behind other work); per-cycle completion; articles indexed;
the misbehaving feeds as `newsbeam feeds status` and the dead-letter index show them.
A shorter run with several cycles, to compare changes (the runner after `--`):

    .venv/bin/python -m bench.soak --minutes 8 --interval 60 --es-url URL -- --runner PrismRunner
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from elasticsearch import Elasticsearch

from bench.e2e import RssSampler, _stop, percentile
from bench.poll_lag import HOSTS, MISBEHAVING, free_port, serve
from newsbeam.pipeline import local_es
from tests.support import REPO
from tests.support.cli import COMMAND


def feed_urls(port: int, real: int, total: int) -> list[str]:
    urls = [f"http://{HOSTS[i % len(HOSTS)]}:{port}/feed/{i}.xml" for i in range(real)]
    urls += [f"http://{HOSTS[i % len(HOSTS)]}:{port}/syn/{i}.xml" for i in range(real, total)]
    return urls + [f"http://{HOSTS[i]}:{port}/bad/{name}.xml" for i, name in enumerate(MISBEHAVING)]


def rss_at(samples: list[tuple[float, int, int]], at: float) -> tuple[int, int]:
    sample = min(samples, key=lambda s: abs(s[0] - at))
    return sample[1], sample[2]


def spread(values: list[float]) -> tuple[float | None, float | None, float | None]:
    values = sorted(values)
    return (percentile(values, 0.5), percentile(values, 0.95), values[-1]) if values else (None, None, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--feeds", type=int, default=1000, help="regular feeds in all (real + synthetic)")
    parser.add_argument("--real-feeds", type=int, default=200)
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared/corpus/feeds")
    parser.add_argument("--interval", type=float, default=120, help="poll interval, seconds")
    parser.add_argument("--item-period", type=float, default=1200, help="a synthetic feed gains an item this often")
    parser.add_argument("--per-host-delay", type=float, default=1.0)
    parser.add_argument("--es-url", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None, help="keep the pipeline's log here")
    parser.add_argument("beam_args", nargs="*", help="passed to newsbeam run (after --)")
    args = parser.parse_args()
    real = args.real_feeds if args.corpus.is_dir() else 0
    if not real:
        print(f"[soak] {args.corpus} not found: synthetic feeds only", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="newsbeam-soak-"))
    es_dir = None
    es_url = args.es_url
    if not es_url:
        es_dir = Path(tempfile.mkdtemp(prefix="newsbeam-soak-es-"))  # the ES user must reach it
        es_url = local_es.start(es_dir, port=local_es.free_port(), heap="1g").url
    port = free_port()
    log_path = str(work / "requests.json")
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(port, str(args.corpus), ready, log_path, args.item_period),
                                     daemon=True)
    server.start()
    ready.wait(60)
    urls = feed_urls(port, real, args.feeds)
    (work / "feeds.yaml").write_text(json.dumps({"feeds": [{"url": url} for url in urls]}))
    prefix = f"soak-{int(time.time())}"
    config = work / "pipeline.yaml"
    config.write_text(
        f"poll_interval: {args.interval}\ntopics_file: {REPO / 'configs/topics.yaml'}\n"
        f"elasticsearch:\n  url: {es_url}\n  articles_alias: {prefix}-articles\n"
        f"  deadletter_index: {prefix}-deadletters\n  feeds_index: {prefix}-feeds\n"
        f"alerts:\n  rules_index: {prefix}-rules\n  alerts_index: {prefix}-alerts\n"
        f"fetch:\n  allow_private_addresses: true\n  per_host_delay: {args.per_host_delay}\n"
        "  total_timeout: 10\n  unchanged_backoff_max: 1\n")
    env = {**os.environ, "NEWSBEAM_STAGE_TIMES": str(work / "stages.json")}
    cli = list(COMMAND)
    subprocess.run([*cli, "alerts", "add", "aid", "--query", '"medical equipment" OR ventilator',
                    "--config", str(config)], cwd=REPO, env=env, check=True, capture_output=True)
    duration = args.minutes * 60
    print(f"[soak] {len(urls)} feeds ({real} real, {args.feeds - real} synthetic, {len(MISBEHAVING)} misbehaving) "
          f"on {len(HOSTS)} hosts, every {args.interval:g}s, for {args.minutes:g} min", file=sys.stderr)
    log = open(work / "pipeline.log", "w")
    started = time.time()
    run = subprocess.Popen([*cli, "run", "--config", str(config), "--feeds-file", str(work / "feeds.yaml"),
                            "--duration", str(duration), *args.beam_args],
                           cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = RssSampler(run.pid, every=5.0)
    sampler.start()
    try:
        while run.poll() is None and time.time() < started + duration + 600:
            time.sleep(10)
            elapsed = time.time() - started
            if sampler.samples and int(elapsed) % 120 < 10:
                _, own, total = sampler.samples[-1]
                print(f"[soak] {elapsed / 60:.0f} min: RSS {own} MB (with workers {total} MB)", file=sys.stderr)
    finally:
        sampler.stopped.set()
        _stop(run)
        log.close()
        time.sleep(1.5)
        server.terminate()
    wall = time.time() - started
    output = (work / "pipeline.log").read_text()
    if run.returncode != 0:
        print(output[-4000:], file=sys.stderr)
    timing = json.loads((work / "stages.json").read_text())
    lags = sorted(timing["observed"].get("poll_lag_s", []))
    requests = json.loads(Path(log_path).read_text())
    per_feed = defaultdict(int)
    for _, url in requests:
        if "/bad/" not in url:
            per_feed[url.split("/", 1)[1]] += 1  # "host:port/feed/7.xml" -> "feed/7.xml"
    expected = int(duration // args.interval) + 1
    es = Elasticsearch(es_url, request_timeout=60)
    es.indices.refresh(index=f"{prefix}-*")
    health = es.search(index=f"{prefix}-feeds", size=100, query={"exists": {"field": "error_class"}},
                       source=["feed_url", "error_class", "consecutive_failures"])["hits"]["hits"]
    hinted = {h["_source"]["feed_url"].split("/", 3)[3] for h in es.search(
        index=f"{prefix}-feeds", size=2000, source=["feed_url"],
        query={"range": {"refresh_hint_seconds": {"gt": args.interval}}})["hits"]["hits"]}
    on_schedule = [n for url, n in per_feed.items() if url not in hinted]
    dead = es.search(index=f"{prefix}-deadletters", size=0, aggs={
        "by": {"terms": {"field": "reason", "size": 30}}})["aggregations"]["by"]["buckets"]
    status = subprocess.run([*cli, "feeds", "status", "--config", str(config), "--failing"], cwd=REPO,
                            capture_output=True, text=True)
    third = (duration - 60) / 2
    report = {
        "feeds": len(urls), "real_feeds": real, "synthetic_feeds": args.feeds - real, "misbehaving": len(MISBEHAVING),
        "interval_s": args.interval, "minutes": args.minutes, "wall_s": round(wall),
        "exit_code": run.returncode,
        "rss_mb_start_middle_end (process, with workers)": [rss_at(sampler.samples, started + 60 + k * third)
                                                            for k in range(3)] if sampler.samples else [],
        "peak_rss_mb_process": sampler.peak(1), "peak_rss_mb_with_workers": sampler.peak(2),
        "polls": len(lags), "poll_lag_p50_s": percentile(lags, 0.5), "poll_lag_p95_s": percentile(lags, 0.95),
        "poll_lag_max_s": round(lags[-1], 2) if lags else None,
        "polls_late_over_10s": sum(lag > 10 for lag in lags),
        "shard_tick_lag_p50_p95_max_s": spread(timing["observed"].get("tick_lag_s", [])),
        "poll_shards_per_bundle_p50_p95_max": spread(timing["observed"].get("poll_shards_per_bundle", [])),
        "feeds_asking_for_a_longer_interval (ttl, sy:update*, max-age)": len(hinted),
        "other_regular_feeds_polled_every_cycle": f"{sum(n >= expected - 1 for n in on_schedule)}/{len(on_schedule)} "
                                                  f"(>= {expected - 1} of {expected} polls)",
        "requests_per_feed": dict(sorted(Counter(per_feed.values()).items())),
        "articles_indexed": es.count(index=f"{prefix}-articles")["count"],
        "alerts": es.count(index=f"{prefix}-alerts")["count"],
        "feeds_failing_in_health_index": {h["_source"]["feed_url"].split("/", 3)[-1]: h["_source"]["error_class"]
                                          for h in health},
        "dead_letters_by_reason": {b["key"]: b["doc_count"] for b in dead},
        "stage_seconds": {name: v["seconds"] for name, v in sorted(timing["stages"].items())},
    }
    es.close()
    for key, value in report.items():
        print(f"{key:50s} {value}")
    print("\nnewsbeam feeds status --failing:\n" + status.stdout[-3000:])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.log:
        shutil.copyfile(work / "pipeline.log", args.log)
    if es_dir:
        local_es.stop(es_dir)
        shutil.rmtree(es_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
