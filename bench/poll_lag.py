"""Poll-cycle lag: 1,000 feeds (the 200 real feeds of ../shared/corpus/feeds, repeated under
different URLs) on 50 loopback hosts (127.0.0.2-51), plus misbehaving endpoints (stall,
trickle, gzip bomb, 404, entity declarations, redirect loop), polled by PollFeeds for a few
cycles into a real Elasticsearch (feed health, dead letters; articles are parsed but not
sent to NLP: this measures the scheduler, not spaCy).

    .venv/bin/python -m bench.poll_lag [--feeds 1000] [--interval 60] [--cycles 3]

Lag = when a feed's request reached the server minus when it was due (the start for its first
poll, its previous request plus the interval after that), over every request of the regular
feeds; cycle span = first to last request of the k-th poll of every feed (server's log).
Beam's own `poll_lag_ms` metric is not queried: the FnApiRunner consolidates metrics
recursively, one level per bundle, which overflows on long runs. Peak RSS is the pipeline process's (the feed server
runs in a child process). Starts a throw-away Elasticsearch unless --es-url is given.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support import REPO

HOSTS = [f"127.0.0.{i}" for i in range(2, 52)]
MISBEHAVING = ("stall", "trickle", "bomb", "missing", "laughs", "loop")


def serve(port: int, corpus: str, ready, log_path: str, item_period: float = 600.0, first_items: int = 3) -> None:
    """The feed server (child process): /feed/<n>.xml -> corpus file n % len, with ETag and 304;
    /syn/<n>.xml -> a synthetic RSS feed (bench/synthetic.py articles) that starts with
    `first_items` items and gains one every `item_period` seconds (feeds staggered), showing
    its 10 newest; /bad/<name>.xml -> a misbehaving endpoint (MISBEHAVING)."""
    import gzip

    from bench.synthetic import article
    from tests.support.feedserver import rss
    files = sorted(Path(corpus).glob("*/*.xml"))
    started = time.time()
    bodies = [path.read_bytes() for path in files]
    bomb = gzip.compress(b"\0" * (64 << 20))
    laughs = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
              b"<rss><channel><title>&b;</title></channel></rss>")
    log: list[tuple[float, str]] = []

    def synthetic_feed(number: int) -> bytes:
        newest = first_items - 1 + int((time.time() - started + (number * 7919) % item_period) // item_period)
        items = []
        for k in range(max(0, newest - 9), newest + 1):
            record = article(number * 100_000 + k)
            items.append({"title": record["title"], "link": record["url"],
                          "html": "".join(f"<p>{p}</p>" for p in record["body_text"].split("\n")),
                          "published": "Thu, 26 Nov 2026 00:00:00 +0000"})
        return rss(items, title=f"Synthetic {number}")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            host = self.headers.get("Host", "")
            log.append((time.time(), host + self.path))
            name = self.path.rsplit("/", 1)[-1].split(".")[0]
            try:
                if name == "stall":
                    time.sleep(60)
                    return
                if name == "trickle":
                    self._start(200, {"Content-Length": "100000"})
                    for _ in range(1000):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.2)
                    return
                if name == "loop":
                    return self._send(302, b"", {"Location": self.path})
                if name == "missing":
                    return self._send(404, b"gone")
                if name == "bomb":
                    return self._send(200, bomb, {"Content-Encoding": "gzip"})
                if name == "laughs":
                    return self._send(200, laughs)
                if "/syn/" in self.path:
                    body = synthetic_feed(int(name))
                else:
                    body = bodies[int(name) % len(bodies)]
                etag = '"' + hashlib.md5(body).hexdigest() + '"'
                if self.headers.get("If-None-Match") == etag:
                    return self._send(304, b"", {"ETag": etag})
                self._send(200, body, {"ETag": etag, "Content-Type": "application/xml"})
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _start(self, status, headers):
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()

        def _send(self, status, body, headers=None):
            self._start(status, {**(headers or {}), "Content-Length": str(len(body))})
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    httpd.daemon_threads = True
    httpd.request_queue_size = 1024
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    ready.set()
    while True:
        time.sleep(1)
        Path(log_path).write_text(json.dumps(log))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared/corpus/feeds")
    parser.add_argument("--feeds", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=60)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--per-host-delay", type=float, default=1.0)
    parser.add_argument("--es-url", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.corpus.is_dir():
        parser.error(f"corpus {args.corpus} not found")

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from elasticsearch import Elasticsearch

    from newsbeam.pipeline import local_es
    from newsbeam.pipeline.config import ElasticsearchSettings, Feed, FetchSettings
    from newsbeam.transforms.deadletter import DEAD
    from newsbeam.transforms.elastic import WriteDeadLetters, WriteFeedHealth, connect, ensure_indices
    from newsbeam.transforms.poll import PollFeeds

    es_dir = None
    es_url = args.es_url
    if not es_url:
        es_dir = Path(tempfile.mkdtemp(prefix="newsbeam-bench-es-"))
        es_url = local_es.start(es_dir, port=local_es.free_port()).url
    port = free_port()
    log_path = tempfile.mktemp(suffix=".json")
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(port, str(args.corpus), ready, log_path), daemon=True)
    server.start()
    ready.wait(60)
    prefix = f"pollbench-{int(time.time())}"
    es_settings = ElasticsearchSettings(url=es_url, articles_alias=f"{prefix}-articles",
                                        deadletter_index=f"{prefix}-deadletters", feeds_index=f"{prefix}-feeds")
    fetch = FetchSettings(allow_private_addresses=True, per_host_delay=args.per_host_delay,
                          unchanged_backoff_max=1, total_timeout=10)
    feeds = [Feed(url=f"http://{HOSTS[i % len(HOSTS)]}:{port}/feed/{i}.xml") for i in range(args.feeds)]
    feeds += [Feed(url=f"http://{HOSTS[i]}:{port}/bad/{name}.xml") for i, name in enumerate(MISBEHAVING)]
    client = connect(es_settings)
    ensure_indices(client, es_settings)
    duration = args.interval * args.cycles - args.interval / 2
    try:
        options = PipelineOptions([])
        options.view_as(StandardOptions).streaming = True
        pipeline = beam.Pipeline(options=options)
        polled = pipeline | PollFeeds(tuple(feeds), args.interval, fetch, es_settings, duration=duration, shards=8)
        polled.health | WriteFeedHealth(es_settings)
        polled[DEAD] | WriteDeadLetters(es_settings)
        print(f"polling {len(feeds)} feeds on {len(HOSTS)} hosts every {args.interval:g}s for {duration:.0f}s",
              file=sys.stderr)
        started = time.time()
        result = pipeline.run()
        result.wait_until_finish()
        wall = time.time() - started
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        time.sleep(1.5)
        log = json.loads(Path(log_path).read_text())
    finally:
        server.terminate()
        client.close()
    by_feed = defaultdict(list)
    for at, url in log:
        if "/feed/" in url:
            by_feed[url].append(at)
    lags = []
    for hits in by_feed.values():
        hits.sort()
        lags.append(hits[0] - started)
        lags.extend(later - (earlier + args.interval) for earlier, later in zip(hits, hits[1:]))
    lags.sort()
    spans = []
    for cycle in range(args.cycles):
        times = [hits[cycle] for hits in by_feed.values() if len(hits) > cycle]
        if times:
            spans.append((cycle + 1, len(times), round(max(times) - min(times), 1), round(min(times) - started, 1)))
    es = Elasticsearch(es_url)
    es.indices.refresh(index=[es_settings.feeds_index, es_settings.deadletter_index])
    failing = es.count(index=es_settings.feeds_index, query={"exists": {"field": "error_class"}})["count"]
    bad = {hit["_source"]["feed_url"].rsplit("/", 1)[-1]: hit["_source"]["error_class"] for hit in es.search(
        index=es_settings.feeds_index, size=50, query={"exists": {"field": "error_class"}})["hits"]["hits"]}
    report = {
        "feeds": len(feeds), "hosts": len(HOSTS), "interval_s": args.interval, "per_host_delay_s": args.per_host_delay,
        "wall_s": round(wall, 1), "requests": len(lags), "lag_median_s": round(lags[len(lags) // 2], 1),
        "lag_p95_s": round(lags[int(len(lags) * 0.95)], 1), "lag_max_s": round(lags[-1], 1),
        "cycles (k, feeds, span_s, first_request_at_s)": spans, "feeds_failing_in_health_index": failing, "misbehaving": bad,
        "dead_letters": es.count(index=es_settings.deadletter_index)["count"], "peak_rss_mb": round(peak_rss_mb),
    }
    es.close()
    for key, value in report.items():
        print(f"{key:50s} {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if es_dir:
        local_es.stop(es_dir)
        shutil.rmtree(es_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
