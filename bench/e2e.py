"""End-to-end benchmark: a corpus served as RSS feeds on 127.0.0.1, `newsbeam run` on the
local runner into a real Elasticsearch, and bare `nlp.pipe` over the same texts, in one run.

    .venv/bin/python -m bench.e2e                       # our synthetic corpus (bench/synthetic.py)
    .venv/bin/python -m bench.e2e --corpus ../shared/corpus/articles/recovery-reliable.jsonl
    .venv/bin/python -m bench.e2e --processes 0,2 --json bench.json
    .venv/bin/python -m bench.e2e --runner FnApiRunner,PrismRunner   # both local runners, same minutes

Per pipeline run (one per `--processes` value and `--runner`, in that order, runners inner;
repeat a value to see the spread: spaCy worker processes, 0 = spaCy in the pipeline process,
i.e. one process like bare spaCy):
0. warm-up: one article, so worker start-up and model loading are not counted;
1. throughput: then every article but the last `--latency-items` is added to the feeds;
   articles/s = articles / (first fetch -> last article indexed), read from the index;
2. latency: then the held-back articles are appended to the feeds one every `--spacing`
   seconds; a watcher searches Elasticsearch every 0.2 s and records when each one becomes
   searchable and when its alert is written (the benchmark's watch rule matches every probe and
   `--alert-share` of the other articles: a watch term, not every article, as users set them);
3. time per stage (transforms/timing.py), peak RSS of the pipeline process and of it plus its
   worker processes (sampled every 0.5 s from /proc), the runner actually used, and CPU per
   article of the pipeline process, its workers, the runner's own process (Prism), Elasticsearch
   (the one listening on --es-url's port, when given) and this script during phase 1.
Before the first run, an unreported run of `--warmup-articles` (spaCy in one worker process per
core) warms Elasticsearch up.
Bare spaCy: `nlp.pipe` in this process over the same texts, same model and components, and the
same in one forked process per core; measured before and after every pipeline run (shared
machines drift), and each run's ratios use the mean of its two. Each run also reports the CPU time
spaCy itself took in it (the thread that ran it, from /proc/thread-self/schedstat) and the ratio
to that: the same comparison with spaCy's speed measured in the same minutes as the pipeline.
Starts a throw-away Elasticsearch unless --es-url is given. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from elasticsearch import ApiError, Elasticsearch, NotFoundError

from bench.synthetic import corpus as synthetic_corpus
from newsbeam.pipeline import local_es
from tests.support import REPO
from tests.support.cli import COMMAND
from tests.support.feedserver import FeedServer


def load_corpus(path: Path | None, limit: int) -> list[dict]:
    if path is None:
        return list(synthetic_corpus(limit))
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("body_text") and record.get("url"):
                records.append(record)
            if len(records) >= limit:
                break
    return records


WATCH_WORD = "quillmark"  # in no corpus; the benchmark's alert rule watches for it


def mark_watched(records: list[dict], share: float, probes: int) -> list[dict]:
    """Adds a sentence with the watch word to every probe and to `share` of the other articles,
    spread evenly, so the alert rule matches those and only those."""
    every = round(1 / share) if share > 0 else 0
    marked = []
    for number, record in enumerate(records):
        if number >= len(records) - probes or (every and number % every == 0):
            record = {**record, "body_text": f"{record['body_text']}\nAnalysts at {WATCH_WORD.title()} "
                                             "followed the story."}
        marked.append(record)
    return marked


def item_xml(record: dict) -> str:
    body = "".join(f"<p>{html.escape(p)}</p>" for p in record["body_text"].split("\n") if p.strip())
    return (f"<item><title>{html.escape(record['title'])}</title><link>{html.escape(record['url'])}</link>"
            f"<content:encoded>{html.escape(body)}</content:encoded></item>")


def feed_xml(items: list[str]) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?><rss version="2.0" '
            'xmlns:content="http://purl.org/rss/1.0/modules/content/"><channel><title>bench</title>'
            "<link>http://bench/</link><description>b</description>" + "".join(items) + "</channel></rss>").encode()


def model_texts(records: list[dict], settings) -> list[str]:
    """What the pipeline's model reads: the served items parsed by feedparser, cleaned and
    true-cased as in the pipeline (transforms/parse.py, clean.py, entities.py)."""
    from newsbeam.pipeline.config import Feed
    from newsbeam.transforms.clean import clean_article
    from newsbeam.transforms.entities import truecase_headlines
    from newsbeam.transforms.fetch import FetchResult
    from newsbeam.transforms.parse import safe_read_feed
    url = "http://127.0.0.1/bench.xml"
    served = FetchResult(Feed(url=url), url, 200, {"content-type": "application/rss+xml"},
                         feed_xml([item_xml(r) for r in records]), time.time(), 0.0)
    parsed = safe_read_feed(served, len(records), 200_000)
    if parsed.problem or len(parsed.articles) != len(records):
        raise SystemExit(f"bench: the corpus did not parse as the pipeline parses it: {parsed.problem}")
    return [truecase_headlines(clean_article(article).nlp_text(settings.max_chars)) for article in parsed.articles]


class BareSpacy:
    """nlp.pipe alone: same model, components and texts as the pipeline; the model is loaded once."""

    def __init__(self, records: list[dict]):
        from newsbeam.pipeline.config import NlpSettings
        from newsbeam.transforms.entities import load_model
        self.settings = NlpSettings()
        self.nlp = load_model(self.settings.model)
        self.texts = model_texts(records, self.settings)
        for _ in self.nlp.pipe(self.texts[:20]):  # warm-up, as the pipeline's warm-up article (not timed)
            pass

    def measure(self) -> dict:
        """Articles/s and tokens/s in this process, and articles/s of one forked copy per core."""
        started, cpu = time.perf_counter(), time.thread_time()
        words = sum(len(doc) for doc in self.nlp.pipe(self.texts, batch_size=self.settings.batch_size))
        seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
        return {"articles_per_s": round(len(self.texts) / seconds, 2), "tokens_per_s": round(words / seconds),
                "cpu_ms_per_article": round(1000 * cpu / len(self.texts), 1),
                "articles_per_s_all_cores": bare_spacy_parallel(self.nlp, self.texts, self.settings.batch_size,
                                                                os.cpu_count() or 1)}


def _bare_process(nlp, texts: list[str], batch_size: int, ready, finished) -> None:
    for _ in nlp.pipe(texts[:5]):
        pass
    ready.wait()
    for _ in nlp.pipe(texts, batch_size=batch_size):
        pass
    finished.put(time.perf_counter())


def bare_spacy_parallel(nlp, texts: list[str], batch_size: int, processes: int) -> float:
    """Articles/s of `processes` forked copies of the model, each piping its share of the
    texts, started together: what this machine's cores can do with spaCy alone."""
    import multiprocessing
    context = multiprocessing.get_context("fork")
    ready, finished = context.Barrier(processes + 1), context.Queue()
    workers = [context.Process(target=_bare_process, args=(nlp, texts[i::processes], batch_size, ready, finished))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    ready.wait()
    started = time.perf_counter()
    ended = max(finished.get() for _ in workers)
    for worker in workers:
        worker.join()
    return round(len(texts) / (ended - started), 2)


class RssSampler(threading.Thread):
    """Resident memory of a process and of its descendants, every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, int, int]] = []  # (time, process MB, with children MB)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            tree = _descendants(self.pid)
            own = _rss_mb(self.pid)
            if own:
                self.samples.append((time.time(), own, own + sum(_rss_mb(pid) for pid in tree)))

    def peak(self, column: int) -> int:
        return max((sample[column] for sample in self.samples), default=0)


def _rss_mb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pipeline: int, es: int | None) -> dict[str, float]:
    """CPU seconds so far of the pipeline process, its worker processes (spaCy, feedparser),
    the runner's own process (Prism's binary), Elasticsearch and this benchmark (feed server,
    watcher, sampler): where the machine's cores went."""
    own = os.times()
    children = _descendants(pipeline)
    runner = [pid for pid in children if _command_name(pid) == "prism"]
    return {"pipeline_process": _cpu_seconds(pipeline),
            "worker_processes": sum(_cpu_seconds(pid) for pid in children if pid not in runner),
            "runner_process": sum(_cpu_seconds(pid) for pid in runner),
            "elasticsearch": _cpu_seconds(es), "benchmark_process": own.user + own.system}


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def listening_pid(port: int | None) -> int | None:
    """The process listening on TCP `port` on this machine (an Elasticsearch given with
    --es-url), from /proc; None when there is none or it is not visible."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                sockets.add(f"socket:[{fields[9]}]")
    for fds in Path("/proc").glob("[0-9]*/fd") if sockets else ():
        try:
            if any(os.readlink(fd) in sockets for fd in fds.iterdir()):
                return int(fds.parent.name)
        except OSError:
            continue
    return None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class Watcher(threading.Thread):
    """Records when each probe URL becomes searchable, and when its alert is written."""

    def __init__(self, es: Elasticsearch, articles: str, alerts: str):
        super().__init__(daemon=True)
        self.es, self.articles, self.alerts = es, articles, alerts
        self.appeared: dict[str, float] = {}
        self.searchable: dict[str, float] = {}
        self.alerted: dict[str, float] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            self._look(self.articles, self.searchable)
            self._look(self.alerts, self.alerted)

    def _look(self, index: str, seen: dict[str, float]) -> None:
        waiting = [url for url in list(self.appeared) if url not in seen]
        if not waiting:
            return
        try:
            found = self.es.search(index=index, size=len(waiting), source=["url"],
                                   query={"terms": {"url": waiting}})["hits"]["hits"]
        except NotFoundError:
            return
        now = time.time()
        for hit in found:
            seen.setdefault(hit["_source"]["url"], now)

    def latencies(self, seen: dict[str, float]) -> list[float]:
        return sorted(seen[url] - self.appeared[url] for url in seen if url in self.appeared)


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(fraction * 100) - 1], 2)


def run_pipeline(args, es_url: str, es_pid: int | None, records: list[dict], processes: str,
                 runner: str = "") -> dict:
    warmup, records = records[0], records[1:]
    backlog, probes = records[:-args.latency_items or None], records[len(records) - args.latency_items:]
    prefix = f"bench-{int(time.time() * 1000)}"
    work = Path(tempfile.mkdtemp(prefix="newsbeam-bench-"))
    names = {"articles_alias": f"{prefix}-articles", "deadletter_index": f"{prefix}-deadletters",
             "feeds_index": f"{prefix}-feeds"}
    config = work / "pipeline.yaml"
    config.write_text(
        f"poll_interval: {args.poll_interval}\ntopics_file: {REPO / 'configs/topics.yaml'}\n"
        f"nlp:\n  processes: {processes}\n"
        f"elasticsearch:\n  url: {es_url}\n" + "".join(f"  {k}: {v}\n" for k, v in names.items()) +
        f"alerts:\n  rules_index: {prefix}-rules\n  alerts_index: {prefix}-alerts\n  reload_interval: 1\n"
        # One loopback host serves every feed: no politeness delay. No back-off for feeds that
        # did not change (they all wait while the backlog runs): the probes measure the interval.
        "fetch:\n  allow_private_addresses: true\n  per_host_delay: 0.01\n  per_host_concurrency: 16\n"
        "  unchanged_backoff_max: 1\n"
        f"  scheduler_interval: {min(args.poll_interval, 5)}\n")
    es = Elasticsearch(es_url, request_timeout=60)
    env = {**os.environ, "NEWSBEAM_STAGE_TIMES": str(work / "stages.json")}
    cli = list(COMMAND)
    subprocess.run([*cli, "alerts", "add", "bench", "--query", WATCH_WORD, "--config", str(config)],
                   cwd=REPO, env=env, check=True, capture_output=True)
    per_feed: list[list[str]] = [[] for _ in range(args.feeds)]
    for number, record in enumerate(backlog):
        per_feed[number % args.feeds].append(item_xml(record))
    log = open(work / "pipeline.log", "w")
    with FeedServer() as server:
        # Phase 0: one warm-up article (worker start-up and model loading are not throughput).
        urls = [server.serve(f"/feed{i}.xml", feed_xml([item_xml(warmup)] if i == 0 else []))
                for i in range(args.feeds)]
        command = [*cli, "run", "--config", str(config), *sum((["--feed", u] for u in urls), []),
                   *(["--runner", runner] if runner else []), *args.beam_args]
        print(f"[bench] {runner or 'default runner'}, processes={processes}: {len(backlog)} articles in {len(urls)} feeds, then "
              f"{len(probes)} one every {args.spacing:g}s", file=sys.stderr)
        started = time.time()
        run = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        sampler = RssSampler(run.pid)
        sampler.start()
        watcher = Watcher(es, names["articles_alias"], f"{prefix}-alerts")
        watcher.start()
        try:
            _wait_for_count(es, names["articles_alias"], 1, run, args.timeout)
            released = time.time()
            cpu_before = cpu_snapshot(run.pid, es_pid)
            for number, items in enumerate(per_feed):  # phase 1: the backlog
                server.serve(f"/feed{number}.xml", feed_xml(([item_xml(warmup)] if number == 0 else []) + items))
            indexed = _wait_for_count(es, names["articles_alias"], len(backlog) + 1, run, args.timeout) - 1
            drained = time.time()
            cpu_after = cpu_snapshot(run.pid, es_pid)
            throughput = _throughput(es, names["articles_alias"], released)
            for number, record in enumerate(probes):  # phase 2: one new item at a time
                per_feed[number % args.feeds].append(item_xml(record))
                server.serve(f"/feed{number % args.feeds}.xml", feed_xml(per_feed[number % args.feeds]))
                watcher.appeared[record["url"]] = time.time()
                time.sleep(args.spacing)
            deadline = time.time() + args.poll_interval + 60
            while len(watcher.searchable) < len(probes) and time.time() < deadline and run.poll() is None:
                time.sleep(0.5)
            time.sleep(2)  # alerts of the last probes
        finally:
            watcher.stopped.set()
            sampler.stopped.set()
            _stop(run)
            log.close()
    output = (work / "pipeline.log").read_text()
    if run.returncode not in (0, 128 + signal.SIGTERM):
        print(output[-3000:], file=sys.stderr)
    runner_used = next((line.split(": runner: ", 1)[1] for line in output.splitlines() if ": runner: " in line), "?")
    times = json.loads((work / "stages.json").read_text()) if (work / "stages.json").exists() else {}
    stages = times.get("stages", {})
    bundles = {name.removesuffix("_bundle_elements"): values for name, values in times.get("observed", {}).items()
               if name.endswith("_bundle_elements")}
    searchable, alerted = watcher.latencies(watcher.searchable), watcher.latencies(watcher.alerted)
    third = max(1, len(sampler.samples) // 3)
    try:
        alerts_written = es.count(index=f"{prefix}-alerts")["count"]
    except NotFoundError:
        alerts_written = 0
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
    result = {
        "spacy_processes": processes, "runner": runner_used, "pipeline_exit_code": run.returncode,
        "articles": len(backlog), "indexed": indexed,
        **throughput,
        "seconds_start_to_warm": round(released - started, 1),
        "seconds_released_to_drained": round(drained - released, 1),
        "latency_probes": len(probes), "probes_searchable": len(searchable),
        "searchable_latency_p50_s": percentile(searchable, 0.5),
        "searchable_latency_p95_s": percentile(searchable, 0.95),
        "alerts_written": alerts_written, "probes_alerted": len(alerted),
        "alert_latency_p50_s": percentile(alerted, 0.5), "alert_latency_p95_s": percentile(alerted, 0.95),
        "poll_interval_s": args.poll_interval,
        "peak_rss_pipeline_process_mb": sampler.peak(1), "peak_rss_with_workers_mb": sampler.peak(2),
        "rss_with_workers_mb_start_middle_end": [sampler.samples[i][2] for i in (third, len(sampler.samples) // 2, -1)]
        if sampler.samples else [],
        # CPU per backlog article, per process, between release and drain; utilisation is all of
        # it over (seconds x cores): near 1 means the cores were busy, and the split says with what.
        "cpu_ms_per_article": {name: round(1000 * value / max(1, indexed), 1) for name, value in cpu.items()},
        "cpu_utilisation": round(sum(cpu.values()) / max(0.001, (drained - released) * (os.cpu_count() or 1)), 2),
        # CPU time of the threads that ran spaCy (the pipeline's or its workers'), per article.
        "spacy_cpu_ms_per_article_in_run": round(1000 * stages["entities_cpu"]["seconds"] / stages["entities_cpu"]["elements"], 1)
        if stages.get("entities_cpu", {}).get("elements") else None,
        # How the runner cut the stream: bundles per batching stage, and their median and largest size.
        "bundles_count_median_max": {name: [len(sizes), statistics.median(sizes), max(sizes)]
                                     for name, sizes in sorted(bundles.items())},
        "stage_seconds": {name: value["seconds"] for name, value in sorted(stages.items())},
        "stage_ms_per_article": {name: round(1000 * value["seconds"] / max(1, value["elements"]), 2)
                                 for name, value in sorted(stages.items())},
    }
    if run.returncode == -signal.SIGKILL:
        print(f"[bench] the pipeline did not stop within 60 s of SIGTERM; its log, with the stack of every "
              f"thread at that moment, is kept: {work / 'pipeline.log'}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _wait_for_count(es: Elasticsearch, index: str, count: int, run: subprocess.Popen, timeout: float) -> int:
    deadline, last, seen = time.time() + timeout, -1, 0
    while time.time() < deadline and run.poll() is None:
        try:
            seen = es.count(index=index)["count"]
        except NotFoundError:
            seen = 0
        except ApiError as err:  # 503 while a new index's shard starts: not searchable yet
            if err.meta.status != 503:
                raise
            print(f"[bench] {index} not searchable yet ({err.message})", file=sys.stderr)
        if seen >= count:
            return seen
        if seen != last:
            print(f"[bench] {seen}/{count} indexed", file=sys.stderr)
            last = seen
        time.sleep(1)
    raise SystemExit(f"only {seen} of {count} articles indexed (pipeline exit code {run.poll()})")


def _throughput(es: Elasticsearch, index: str, released: float) -> dict:
    """Backlog articles over (first backlog fetch -> last indexed), from the index."""
    es.indices.refresh(index=index)
    aggs = es.search(index=index, size=0, query={"range": {"fetched_at": {"gte": int((released - 1) * 1000)}}}, aggs={
        "first_fetch": {"min": {"field": "fetched_at"}}, "last_index": {"max": {"field": "indexed_at"}}})
    count = aggs["hits"]["total"]["value"]
    span = (aggs["aggregations"]["last_index"]["value"] - aggs["aggregations"]["first_fetch"]["value"]) / 1000
    return {"seconds_first_fetch_to_last_indexed": round(span, 1),
            "end_to_end_articles_per_s": round(count / max(span, 0.001), 2)}


def _stop(run: subprocess.Popen) -> None:
    """SIGTERM (`kill PID`: a background job ignores Ctrl-C) to the pipeline; SIGKILL to its
    process group if it hangs."""
    if run.poll() is None:
        os.kill(run.pid, signal.SIGTERM)
        try:
            run.wait(60)
        except subprocess.TimeoutExpired:  # have it print every thread's stack into its log first
            os.kill(run.pid, signal.SIGUSR1)
            time.sleep(2)
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    try:  # worker processes left behind
        os.killpg(run.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=None,
                        help="JSON lines with url, title, body_text (default: our synthetic corpus)")
    parser.add_argument("--articles", type=int, default=400, help="articles to use (the first N)")
    parser.add_argument("--feeds", type=int, default=20)
    parser.add_argument("--processes", default="0,auto",
                        help="comma-separated spaCy worker process counts, one pipeline run each "
                             "(0: spaCy in the pipeline process; auto: one per core)")
    parser.add_argument("--runner", default="",
                        help="comma-separated runners (FnApiRunner, PrismRunner), one pipeline run each per "
                             "--processes value (default: newsbeam's choice)")
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--latency-items", type=int, default=30)
    parser.add_argument("--spacing", type=float, default=1.0, help="seconds between latency probes")
    parser.add_argument("--alert-share", type=float, default=0.1,
                        help="share of the backlog articles the alert rule matches "
                             "(all probes match; 1: every article)")
    parser.add_argument("--warmup-articles", type=int, default=400,
                        help="articles of an unreported first run that warms Elasticsearch up (0: none)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--es-url", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("beam_args", nargs="*", help="passed to newsbeam run (after --)")
    args = parser.parse_args()
    if args.corpus and not args.corpus.exists():
        parser.error(f"corpus {args.corpus} not found")
    if not 0 <= args.latency_items < args.articles:
        parser.error("--latency-items must be below --articles")
    if not 0 <= args.warmup_articles < args.articles:
        parser.error("--warmup-articles must be below --articles")
    if not 0 <= args.alert_share <= 1:
        parser.error("--alert-share must be between 0 and 1")
    records = mark_watched(load_corpus(args.corpus, args.articles), args.alert_share, args.latency_items)
    bare = BareSpacy(records[:len(records) - args.latency_items])
    modes = [(value.strip(), runner.strip()) for value in args.processes.split(",")
             for runner in args.runner.split(",")]
    es_dir, es_pid = None, None
    es_url = args.es_url
    if es_url:
        es_pid = listening_pid(urllib.parse.urlsplit(es_url).port)
    else:
        es_dir = Path(tempfile.mkdtemp(prefix="newsbeam-bench-es-"))
        es_url = local_es.start(es_dir, port=local_es.free_port(), heap="1g").url
        es_pid = local_es.running_pid(es_dir)
    runs, brackets = [], []
    try:
        if args.warmup_articles:
            # Not reported: the first runs after Elasticsearch starts pay for its JIT compiling
            # (17-19 ms of its CPU an article instead of 5-8; 100 articles were not enough).
            print(f"[bench] warm-up run ({args.warmup_articles} articles, not reported)", file=sys.stderr)
            warmup_args = argparse.Namespace(**{**vars(args), "latency_items": 0})
            run_pipeline(warmup_args, es_url, es_pid, records[:args.warmup_articles + 1], "auto")
        # This shared machine drifts (bare spaCy moved by up to 16% within minutes): bare spaCy is
        # measured before and after every run, and each run's ratio uses the mean of the two.
        for mode, runner in modes:
            print("[bench] bare spaCy", file=sys.stderr)
            brackets.append(bare.measure())
            runs.append(run_pipeline(args, es_url, es_pid, records, mode, runner))
        print("[bench] bare spaCy", file=sys.stderr)
        brackets.append(bare.measure())
    finally:
        if es_dir:
            local_es.stop(es_dir)
            shutil.rmtree(es_dir, ignore_errors=True)
    for number, run in enumerate(runs):
        around = brackets[number:number + 2]
        one, all_cores = (statistics.mean(b[key] for b in around) for key in ("articles_per_s", "articles_per_s_all_cores"))
        run["bare_articles_per_s_before_after"] = [b["articles_per_s"] for b in around]
        run["ratio_to_bare_spacy"] = round(run["end_to_end_articles_per_s"] / one, 3)
        run["ratio_to_bare_spacy_all_cores"] = round(run["end_to_end_articles_per_s"] / all_cores, 3)
        run["bare_cpu_ms_per_article_before_after"] = [b["cpu_ms_per_article"] for b in around]
        if run["spacy_cpu_ms_per_article_in_run"]:
            # The same ratio with spaCy's speed taken from its own CPU time in this run, i.e. in the
            # same minutes as the pipeline, which the machine's drift does not move.
            run["ratio_to_spacy_in_run"] = round(
                run["end_to_end_articles_per_s"] * run["spacy_cpu_ms_per_article_in_run"] / 1000, 3)
    report = {"corpus": str(args.corpus or "synthetic"), "cpus": os.cpu_count(),
              "bare_spacy": {"components": ", ".join(bare.nlp.pipe_names), "measurements": brackets,
                             "tokens_per_s": round(statistics.mean(b["tokens_per_s"] for b in brackets)),
                             **{key: round(statistics.mean(b[key] for b in brackets), 2)
                                for key in ("articles_per_s", "articles_per_s_all_cores")}},
              "runs": runs, "summary": summary(runs)}
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(run["indexed"] >= run["articles"] for run in runs) else 1


def summary(runs: list[dict]) -> dict[str, dict]:
    """Per runner and spaCy-process setting: the median ratio to bare spaCy and the range over its runs."""
    modes: dict[str, list[dict]] = {}
    for run in runs:
        modes.setdefault(f"{run['runner'].split(' ', 1)[0]}, spaCy processes {run['spacy_processes']}", []).append(run)
    return {mode: {"runs": len(group), **_spread("ratio", [run["ratio_to_bare_spacy"] for run in group]),
                   **_spread("ratio_to_spacy_in_run", [run["ratio_to_spacy_in_run"] for run in group
                                                       if run.get("ratio_to_spacy_in_run")])}
            for mode, group in modes.items()}


def _spread(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {f"median_{name}": round(statistics.median(values), 3), f"min_{name}": min(values),
            f"max_{name}": max(values)}


def _print(report: dict) -> None:
    print(f"corpus {report['corpus']}, {report['cpus']} CPUs")
    bare = report["bare_spacy"]
    print(f"bare spaCy nlp.pipe ({bare['components']}): {bare['articles_per_s']} articles/s, "
          f"{bare['tokens_per_s']} tokens/s; {report['cpus']} processes: {bare['articles_per_s_all_cores']} articles/s "
          f"(mean of {len(bare['measurements'])}, one before and after each run: "
          f"{[b['articles_per_s'] for b in bare['measurements']]} / "
          f"{[b['articles_per_s_all_cores'] for b in bare['measurements']]})")
    for run in report["runs"]:
        print(f"\n== pipeline on {run['runner']}, spaCy processes: {run['spacy_processes']}")
        for key, value in run.items():
            if key not in ("stage_seconds", "stage_ms_per_article", "spacy_processes"):
                print(f"  {key:40s} {value}")
        print("  time per stage (s total / ms per element):")
        for name, seconds in run["stage_seconds"].items():
            print(f"    {name:24s} {seconds:10.2f} {run['stage_ms_per_article'][name]:10.2f}")
    print("\n== ratio to bare spaCy (one process) per setting: median [min, max]")
    for mode, figures in report["summary"].items():
        in_run = (f"; to spaCy's CPU time in the same run {figures['median_ratio_to_spacy_in_run']} "
                  f"[{figures['min_ratio_to_spacy_in_run']}, {figures['max_ratio_to_spacy_in_run']}]"
                  if "median_ratio_to_spacy_in_run" in figures else "")
        print(f"  {mode}: {figures['median_ratio']} [{figures['min_ratio']}, {figures['max_ratio']}]"
              f"{in_run} over {figures['runs']} run(s)")


if __name__ == "__main__":
    sys.exit(main())
