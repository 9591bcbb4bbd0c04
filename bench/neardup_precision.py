"""Near-duplicate linking (transforms/neardup.py) on the ReCOVery articles against the
hand-checked pairs in bench/neardup_truth.tsv: precision and recall of "same story".

    .venv/bin/python -m bench.neardup_precision [--threshold 0.6]

Articles are linked in corpus order, exactly as LinkStories links a stream; two articles
are predicted copies when they end up with the same story_id.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

from newsbeam.pipeline.config import DedupeSettings
from newsbeam.transforms.article import Article
from newsbeam.transforms.neardup import StoryIndex, link_stories
from tests.support import REPO


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared/corpus/articles/recovery-reliable.jsonl")
    parser.add_argument("--truth", type=Path, default=REPO / "bench/neardup_truth.tsv")
    parser.add_argument("--threshold", type=float, default=DedupeSettings.near_duplicate_threshold)
    args = parser.parse_args()
    if not args.corpus.exists():
        parser.error(f"corpus {args.corpus} not found")
    records = [json.loads(line) for line in args.corpus.open(encoding="utf-8")]
    articles = [Article(article_id=r["url"], title=r["title"], body=r["body_text"])
                for r in records if r.get("body_text")]
    truth = {frozenset(line.split("\t")[1:3]) for line in args.truth.read_text().splitlines()
             if line.startswith("same\t")}
    stories = defaultdict(list)
    for article in link_stories(articles, StoryIndex(), args.threshold):
        stories[article.story_id].append(article.article_id)
    predicted = {frozenset(pair) for members in stories.values() for pair in itertools.combinations(members, 2)}
    correct = predicted & truth
    precision = len(correct) / len(predicted) if predicted else 1.0
    print(f"articles {len(articles)}; threshold {args.threshold}; linked pairs {len(predicted)}; "
          f"hand-checked copies {len(truth)}")
    print(f"precision {len(correct)}/{len(predicted)} = {precision:.0%}; recall {len(correct)}/{len(truth)} = "
          f"{len(correct) / len(truth):.0%}")
    for pair in sorted(predicted - truth, key=sorted):
        print("  wrongly linked:", " | ".join(sorted(pair)))
    for pair in sorted(truth - predicted, key=sorted):
        print("  missed:", " | ".join(sorted(pair)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
