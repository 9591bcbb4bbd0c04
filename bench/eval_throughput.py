"""Tagging throughput: the ReCOVery articles through `Tagger.tag_records` (what `newsbeam tag`
and the pipeline's TagEntities + TagTopics run), in batches of 256 like `newsbeam tag`.

    .venv/bin/python -m bench.eval_throughput --corpus ../shared/corpus/articles/recovery-reliable.jsonl

It measures the newsbeam installed in the interpreter that runs it: for a before/after
comparison on the same machine minutes apart, install the other commit into a second venv
(`pip install .` from a `git archive` of it) and run this module with that venv's python. Model loading is not timed;
CPU time is reported beside wall time because it varies less when other work shares the cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="ReCOVery jsonl (title, body_text)")
    parser.add_argument("--config", type=Path, default=None, help="pipeline.yaml (default: the installed one)")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="best of N passes")
    args = parser.parse_args()
    from newsbeam import pipeline as installed
    from newsbeam.pipeline.config import load_settings
    from newsbeam.transforms.tagging import Tagger

    records = []
    with open(args.corpus, encoding="utf-8") as handle:
        for line in handle:
            raw = json.loads(line)
            records.append({"id": raw.get("news_id"), "title": raw.get("title", ""), "text": raw.get("body_text", "")})
    if args.limit:
        records = records[:args.limit]
    tagger = Tagger.load(load_settings(args.config))
    tagger.tag_records(records[:8])  # warm-up: lazy spaCy/vectors initialisation
    best, best_cpu = float("inf"), float("inf")
    for _ in range(args.rounds):
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, len(records), 256):
            tagger.tag_records(records[start:start + 256])
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - cpu_started)
    # CPU seconds (all threads) are steadier than wall time on a machine shared with other work.
    print(json.dumps({"newsbeam": str(Path(installed.__file__).parent.parent), "articles": len(records), "seconds": round(best, 1),
                      "articles_per_s": round(len(records) / best, 1), "cpu_seconds": round(best_cpu, 1),
                      "articles_per_cpu_s": round(len(records) / best_cpu, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
