"""Good feeds beside hostile feeds and hostile items, for several poll cycles of a real
`newsbeam run --duration N` into a real Elasticsearch, all on loopback.

    .venv/bin/python -m bench.hostile --es-url http://127.0.0.1:9200 [--duration 120] [--interval 10]

Good feeds (4) gain an item every poll interval; beside their good items they carry hostile
ones: a run of 16,000 `(` (quadratic in spaCy's tokenizer), 40,000 nested <div>s, bad
character references (`&#xD800;`, `&#x110000;`). Hostile feeds: a 26 MiB feed of 400,000 items
sent gzipped, a stalled server, a trickling body, a keep-alive server that trickles on the
reused socket, and a full-text feed whose article page is a 46 MiB gzip bomb.

Prints: good articles indexed / expected (items published at least one interval + 5 s before
the end), p95 item-visible -> searchable of the good items (visible: when the feed server first
served it; searchable: the article's `indexed_at`; target <= interval + 3 s), peak RSS of the run
and its worker processes (target <= 1.5 GB), and whether the run exited within its duration plus
`fetch.shutdown_grace`; and alerts: two rules match every good article, one notifying a
healthy webhook, one a webhook that answers 503 the whole run: alerts delivered to the healthy
target / alerts stored for its rule (target: all), and how many the dead one's were tried.
Each section adds its lines to the report.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import yaml
from elasticsearch import Elasticsearch

from newsbeam.transforms.elastic import ensure_indices
from newsbeam.transforms.rules import Rule
from newsbeam.transforms.settings import AlertSettings, ElasticsearchSettings
from tests.support.feedserver import rss
from tests.support.hostileserver import HostileServer, gzipped, respond, stall, trickle_body
from tests.support.receivers import WebhookReceiver

REPO = Path(__file__).resolve().parent.parent

GRACE = 10.0
GOOD_FEEDS = 4


class GoodFeeds:
    """Feeds that gain one good item per interval; each also carries the hostile items."""

    def __init__(self, interval: float, hostile: bool = True):
        self.interval = interval
        self.hostile = hostile
        self.started = time.time()
        self.first_served: dict[str, float] = {}  # title -> when a response first carried it
        self._lock = threading.Lock()

    def items(self, feed: int) -> list[dict]:
        count = 2 + int((time.time() - self.started) // self.interval)
        good = [{"title": f"Harbour report {feed}-{k}", "link": f"https://wire.example.org/{feed}/{k}",
                 "html": f"<p>Dock workers in Rotterdam unloaded cargo ship {feed}-{k} on Tuesday.</p>"}
                for k in range(count)]
        hostile = [{"title": f"Parentheses {feed}", "link": f"https://wire.example.org/{feed}/parens",
                    "html": "(" * 16000},
                   {"title": f"Nested {feed}", "link": f"https://wire.example.org/{feed}/nested",
                    "html": "<div>" * 40000 + "deep" + "</div>" * 40000},
                   {"title": f"References {feed} BADREF", "link": f"https://wire.example.org/{feed}/refs",
                    "html": "<p>x</p>"}]
        return good + hostile if self.hostile else good

    def behaviour(self, feed: int):
        def behave(handler) -> None:
            items = self.items(feed)
            now = time.time()
            with self._lock:
                for item in items:
                    if item["title"].startswith("Harbour"):
                        self.first_served.setdefault(item["title"], now)
            body = rss(items).replace(b"BADREF", b"&#xD800; &#x110000;")
            respond(200, body, {"Content-Type": "application/rss+xml"})(handler)
        return behave


def huge_feed() -> bytes:
    """About 26 MiB of RSS in 400,000 short items, gzipped."""
    items = b"".join(b"<item><title>Flood %d</title><link>https://h.example.org/%d</link></item>" % (i, i)
                     for i in range(400_000))
    return gzipped(b'<?xml version="1.0"?><rss version="2.0"><channel><title>Huge</title>' + items
                   + b"</channel></rss>")


def page_bomb() -> bytes:
    return gzipped(b"<html><body>" + b"<div><p>hostile page text</p></div>" * 1_400_000 + b"</body></html>")


def write_config(folder: Path, es_url: str, prefix: str, interval: float, feeds: list[dict]) -> Path:
    config = yaml.safe_load((REPO / "configs" / "pipeline.yaml").read_text())
    config.update(poll_interval=interval, topics_file=str(REPO / "configs" / "topics.yaml"), feeds_file="feeds.yaml")
    config["nlp"]["gazetteer"] = str(REPO / "configs" / config["nlp"]["gazetteer"])
    config["elasticsearch"].update(url=es_url, articles_alias=f"{prefix}-articles",
                                   deadletter_index=f"{prefix}-deadletters", feeds_index=f"{prefix}-feeds")
    config["alerts"].update(rules_index=f"{prefix}-rules", alerts_index=f"{prefix}-alerts")
    config["fetch"].update(allow_private_addresses=True, unchanged_backoff_max=1, total_timeout=5,
                           read_timeout=3, connect_timeout=3, shutdown_grace=GRACE)
    (folder / "feeds.yaml").write_text(yaml.safe_dump({"feeds": feeds}))
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def run_pipeline(config: Path, duration: float) -> dict:
    """Runs `newsbeam run`; returns its exit code, log, peak RSS and seconds from its first poll to its exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICSEARCH_")}
    process = subprocess.Popen([sys.executable, "-m", "newsbeam.pipeline.cli", "run", "--config", str(config),
                                "--duration", f"{duration:g}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    polling_at: list[float] = []

    def read_log() -> None:
        for line in process.stderr:
            log.append(line)
            if "polling" in line and "feed(s)" in line and not polling_at:
                polling_at.append(time.monotonic())

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    peak = 0
    give_up = time.monotonic() + duration + 600
    while process.poll() is None and time.monotonic() < give_up:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.5)
    if process.poll() is None:
        process.kill()
    ended = time.monotonic()
    process.wait()
    reader.join(timeout=5)
    return {"code": process.returncode, "log": "".join(log), "peak_rss": peak,
            "ran": ended - polling_at[0] if polling_at else float("nan")}


def article_section(es: Elasticsearch, alias: str, feeds: GoodFeeds, run: dict, duration: float,
                    run_ended: float) -> list[str]:
    es.indices.refresh(index=alias)
    hits = es.search(index=alias, size=10_000, query={"prefix": {"title.keyword": "Harbour report"}},
                     source=["title", "indexed_at"])["hits"]["hits"] if es.indices.exists_alias(name=alias) else []
    from newsbeam.transforms import clock
    indexed = {hit["_source"]["title"]: clock.epoch(hit["_source"]["indexed_at"]) for hit in hits}
    cutoff = run_ended - (run["ran"] - duration) - feeds.interval - 5  # published early enough to be polled
    expected = {title for title, at in feeds.first_served.items() if at <= cutoff}
    latencies = sorted(indexed[title] - feeds.first_served[title] for title in expected if title in indexed)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    hostile = es.count(index=alias, query={"bool": {"must_not": {"prefix": {"title.keyword": "Harbour"}}}})["count"]
    return [f"good articles indexed / expected: {len(expected & set(indexed))} / {len(expected)}",
            f"p95 item visible -> searchable (good feeds): {p95:.1f} s (target <= {feeds.interval + 3:g} s)",
            f"hostile-feed and hostile-item articles indexed beside them: {hostile}"]


def save_alert_rules(es: Elasticsearch, es_url: str, prefix: str, hook: WebhookReceiver) -> None:
    """Two rules on the good articles: one for a healthy webhook, one for a webhook that is down."""
    es_settings = ElasticsearchSettings(url=es_url, articles_alias=f"{prefix}-articles",
                                        deadletter_index=f"{prefix}-deadletters", feeds_index=f"{prefix}-feeds")
    alerts = AlertSettings(rules_index=f"{prefix}-rules", alerts_index=f"{prefix}-alerts")
    ensure_indices(es, es_settings, alerts)
    hook.fail("/down")
    for name, path in (("harbour-healthy", "/up"), ("harbour-down", "/down")):
        rule = Rule(name, "harbour", notify=(f"webhook:{hook.url(path)}",))
        es.index(index=alerts.rules_index, id=name, document=rule.to_doc(), refresh=True)


def alert_section(es: Elasticsearch, prefix: str, hook: WebhookReceiver) -> list[str]:
    index = f"{prefix}-alerts"
    es.indices.refresh(index=index)
    stored = es.count(index=index, query={"term": {"rule": "harbour-healthy"}})["count"]
    down = es.count(index=index, query={"term": {"rule": "harbour-down"}})["count"]
    delivered = len({body["alert_id"] for body in hook.bodies("/up")})
    tried = len([r for r in hook.refused if r["path"] == "/down"])
    return [f"alerts delivered to a healthy target while another is down: {delivered} / {stored} (target: all)",
            f"the down target's alerts: {down} stored, pending; {tried} attempts refused (it backs off on its own)"]


def run_section(run: dict, duration: float) -> list[str]:
    on_time = run["ran"] <= duration + GRACE
    return [f"peak RSS (run + workers): {run['peak_rss'] / 2**30:.2f} GB (target <= 1.5 GB)",
            f"exited on time: {'yes' if on_time else 'no'} ({run['ran']:.1f} s from first poll to exit; "
            f"limit {duration:g} + {GRACE:g} s grace; exit code {run['code']})"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--es-url", default=os.environ.get("ELASTICSEARCH_URL", "http://127.0.0.1:9200"))
    parser.add_argument("--duration", type=float, default=120)
    parser.add_argument("--interval", type=float, default=10, help="poll interval, seconds")
    parser.add_argument("--log", type=Path, default=None, help="write the run's log here")
    parser.add_argument("--good-only", action="store_true",
                        help="the good feeds alone, without hostile items or feeds: the baseline")
    args = parser.parse_args()
    es = Elasticsearch(args.es_url, request_timeout=60)
    prefix = f"bench-hostile-{uuid.uuid4().hex[:8]}"
    good = GoodFeeds(args.interval, hostile=not args.good_only)
    report: list[str] = []
    with contextlib.ExitStack() as stack:
        # One loopback host per hostile server: per-host politeness must not make the good feeds wait.
        server, huge, stalled, trickling, full_text_host = (
            stack.enter_context(HostileServer(f"127.0.0.{n}")) for n in range(1, 6))
        keep_alive = stack.enter_context(HostileServer("127.0.0.6", keep_alive=True))
        hook = stack.enter_context(WebhookReceiver())
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        feeds = [{"url": server.route(f"/good/{n}.xml", good.behaviour(n))} for n in range(GOOD_FEEDS)]
        page = full_text_host.route("/page/bomb.html", respond(200, page_bomb(), {"Content-Encoding": "gzip",
                                                                                  "Content-Type": "text/html"}))
        full_text = rss([{"title": "Bomb page", "link": page, "html": "<p>summary only</p>"}])
        kept_open = rss([{"title": "Kept open", "link": "https://keep.example.org/1", "html": "<p>x</p>"}])
        keep_alive.route("/first.xml", respond(200, kept_open, {"Content-Type": "application/rss+xml"}, close=False))
        feeds += [] if args.good_only else [
            {"url": huge.route("/huge.xml", respond(200, huge_feed(), {"Content-Encoding": "gzip"}))},
            {"url": stalled.route("/stalled.xml", stall(3600))},
            {"url": trickling.route("/trickle.xml", trickle_body(every=0.2, total=1_000_000))},
            {"url": keep_alive.url("/first.xml")},
            {"url": keep_alive.route("/second.xml", trickle_body(every=0.2, total=1_000_000))},
            {"url": full_text_host.route("/fulltext.xml", respond(200, full_text)), "full_text": True},
        ]
        config = write_config(Path(folder), args.es_url, prefix, args.interval, feeds)
        save_alert_rules(es, args.es_url, prefix, hook)
        run = run_pipeline(config, args.duration)
        if args.log:
            args.log.write_text(run["log"])
        run_ended = time.time()
        try:
            report += article_section(es, f"{prefix}-articles", good, run, args.duration, run_ended)
            report += run_section(run, args.duration)
            report += alert_section(es, prefix, hook)
            dead = es.count(index=f"{prefix}-deadletters")["count"] if es.indices.exists(
                index=f"{prefix}-deadletters") else 0
            report.append(f"dead letters: {dead}")
        finally:
            indices = [name for name in es.indices.get(index=f"{prefix}-*") if name.startswith(prefix)]
            for name in indices:
                es.indices.delete(index=name)
    print(f"hostile bench: {GOOD_FEEDS} good feeds{'' if args.good_only else ' + 6 hostile feeds and hostile items'}, "
          f"poll interval {args.interval:g} s, --duration {args.duration:g} s")
    print("\n".join(report))
    if run["code"] != 0:
        print(run["log"][-3000:], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
