"""Volume alerts' cost: the time of one evaluation round (every rule's newly closed window)
against an articles index, divided by the articles that arrive per window.

    .venv/bin/python bench/volume_cost.py --es-url http://127.0.0.1:9250 --articles 20000 --days 7 --rules 8

Indexes `--articles` synthetic articles spread over `--days` (back-dated, with sources, stories,
persons and words for every rule kind) into indices of its own, through the pipeline's
BulkWriter, then times `--rounds` rounds of `evaluate_window` for `--rules` rules (the four
kinds in turn, hourly windows) on the last closed window, as the live loop does once per
window (each round a window an hour earlier, so that no answer comes from Elasticsearch's
request cache). Prints the median round, the articles per window and the cost per article; with
--nlp also spaCy's time per article over the project's fixture articles in the same minute.
The indices are deleted at the end.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from elasticsearch import Elasticsearch  # noqa: E402

from newsbeam.transforms.clock import iso  # noqa: E402
from newsbeam.transforms.elastic import BulkWriter, ensure_indices  # noqa: E402
from newsbeam.transforms.rules import Rule, analyze  # noqa: E402
from newsbeam.transforms.settings import ElasticsearchSettings  # noqa: E402
from newsbeam.transforms.volume import compile_volume, due_windows, evaluate_window  # noqa: E402

HOUR = 3600
KINDS = [
    {"query": "ventilator", "spike": {"ratio": "3x", "window": "1h", "baseline": "7d", "min": 5, "direction": "both"}},
    {"first_mention": {"field": "person", "unseen": "3d", "min": 3, "sources": 2}},
    {"spread": {"sources": 5, "window": "1h"}},
    {"query": "source:s3.example", "silence": {"after": "auto", "baseline": "3d"}},
]
WORDS = ["ventilator shortage", "mask order", "election result", "flood warning", "chip export"]


def articles(count: int, start: float, end: float) -> list[dict]:
    step = (end - start) / count
    docs = []
    for n in range(count):
        at = start + n * step
        source = f"s{n % 40}.example"
        docs.append({"article_id": f"bench-{n}", "url": f"https://{source}/{n}", "title": f"{WORDS[n % 5]} {n}",
                     "lemmas": WORDS[n % 5], "source": source, "feed_url": f"https://{source}/rss",
                     "published_at": iso(at), "indexed_at": iso(at + 300),
                     # one article in fifty is one of seven syndicated copies from seven sources
                     "story_id": f"story-{n // 7}" if n % 350 < 7 else f"story-u{n}",
                     "persons": [f"Person {n % 3000}"], "language": "en", "topics": [],
                     "entities": [{"name": f"Person {n % 3000}", "label": "PERSON", "text": "", "count": 1}]})
    return docs


def nlp_seconds_per_article(repeat: int) -> float:
    from newsbeam.transforms.entities import load_model
    fixtures = json.loads((REPO / "tests" / "fixtures" / "articles.json").read_text())
    records = fixtures if isinstance(fixtures, list) else list(fixtures.values())
    texts = [f"{a['title']}\n{re.sub(r'<[^>]+>', ' ', a['html'])}" for a in records] * repeat
    nlp = load_model()
    started = time.perf_counter()
    for _ in nlp.pipe(texts):
        pass
    return (time.perf_counter() - started) / len(texts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--es-url", default="http://127.0.0.1:9200")
    parser.add_argument("--articles", type=int, default=20000)
    parser.add_argument("--days", type=float, default=7)
    parser.add_argument("--rules", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--nlp", action="store_true", help="also time spaCy per article, for the ratio")
    args = parser.parse_args()

    prefix = f"bench-volume-{uuid.uuid4().hex[:8]}"
    settings = ElasticsearchSettings(url=args.es_url, articles_alias=f"{prefix}-articles",
                                     deadletter_index=f"{prefix}-deadletters", feeds_index=f"{prefix}-feeds")
    client = Elasticsearch(args.es_url, request_timeout=60)
    now = time.time() // HOUR * HOUR
    start = now - args.days * 86400
    try:
        ensure_indices(client, settings)
        docs = articles(args.articles, start, now)
        writer = BulkWriter(client, settings.articles_alias, "article_id")
        for chunk in range(0, len(docs), 1000):
            writer.write(docs[chunk:chunk + 1000])
        client.indices.refresh(index=settings.articles_alias)
        client.indices.forcemerge(index=settings.articles_alias, max_num_segments=1)
        rules = [compile_volume(Rule.from_doc({"name": f"r{i}", **KINDS[i % len(KINDS)]}), analyze)
                 for i in range(args.rules)]
        rounds, fired, by_kind = [], 0, collections.defaultdict(list)
        for back in range(args.rounds):  # a different window each round, as live: no request-cache hits
            began = time.perf_counter()
            for rule in rules:
                window_start, window_end = due_windows(rule.spec, now, now + 2 * HOUR)[0]
                one = time.perf_counter()
                fired += len(evaluate_window(client, settings.articles_alias, rule, window_start - back * HOUR,
                                             window_end - back * HOUR))
                by_kind[rule.spec.kind].append(time.perf_counter() - one)
            rounds.append(time.perf_counter() - began)
        per_window = args.articles / (args.days * 24)
        median = statistics.median(rounds)
        print(f"index: {args.articles} articles over {args.days:g} days ({per_window:.0f} per 1h window); "
              f"{args.rules} rules ({', '.join(sorted({r.spec.kind for r in rules}))}); {fired // args.rounds} "
              f"firings per round")
        print(f"one evaluation round: median {median * 1000:.1f} ms (min {min(rounds) * 1000:.1f}, "
              f"max {max(rounds) * 1000:.1f}) over {args.rounds} rounds")
        print("per rule and window: " + ", ".join(f"{kind} {statistics.median(times) * 1000:.1f} ms"
                                                  for kind, times in sorted(by_kind.items())))
        print(f"cost per article: {median / per_window * 1e6:.0f} µs "
              f"({median / per_window / args.rules * 1e6:.1f} µs per rule)")
        if args.nlp:
            nlp = nlp_seconds_per_article(repeat=20)
            print(f"spaCy (en_core_web_sm) per fixture article, same minute: {nlp * 1e3:.1f} ms; "
                  f"volume evaluation is {median / per_window / nlp:.2%} of it")
    finally:
        client.indices.delete(index=f"{settings.articles_alias}-000001", ignore_unavailable=True)
        for index in (settings.deadletter_index, settings.feeds_index):
            client.indices.delete(index=index, ignore_unavailable=True)
        for template in (settings.articles_alias, settings.deadletter_index, settings.feeds_index):
            client.options(ignore_status=404).indices.delete_index_template(name=template)
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
