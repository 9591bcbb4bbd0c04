"""`newsbeam eval topics|entities`: tagging quality on labelled files, measured through the
same `Tagger` that `newsbeam tag` and the pipeline's TagEntities/TagTopics run.

Topics
  * disaster-response: `topics/disaster_response_validation.csv`, rows with genre=news; a
    message is positive for one of our topics when any of its mapped columns is 1
    (`DISASTER_TOPICS`: "medical equipment aid" = medical_products, ...).
  * recovery: `topics/recovery-medical-aid-dev.jsonl` (label per url, see topics/GUIDE.md) for
    the articles in `articles/recovery-reliable.jsonl`, title + full text as a feed would carry it.
  Plus named checks: the seed article and Reuters' "U.S. to send Russia 200 ventilators" must be
  tagged "medical equipment aid".

Entities
  * `entities/conll2003-valid.txt`: each -DOCSTART- document becomes one article (sentences one
    per line, tokens joined by spaces). Scored on exact spans: a mention is the span of one entity
    AFTER our fixes (titles, "the" and possessives trimmed, labels corrected, one label per
    canonical name), with PERSON->PER, ORG->ORG, GPE/LOC/FAC->LOC; other labels and gold MISC are
    not scored. Canonical names ("Donald Trump" for "Trump") are not what CoNLL marks, so they are
    checked separately on the seed article (persons and locations).

The default data folder is `../shared/corpus` beside the repository (`--corpus` to change it).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from newsbeam.pipeline.config import ConfigError
from newsbeam.transforms.article import Article

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
DEFAULT_SEED = REPO.parent / "shared" / "seed-article.txt"
AID = "medical equipment aid"
# disaster_response columns -> our topics; a message is positive when any column is 1.
DISASTER_TOPICS = {
    AID: ("medical_products",),
    "natural disasters": ("floods", "storm", "earthquake"),
    "food security": ("food",),
    "armed conflict": ("military",),
    "humanitarian crisis": ("refugees",),
}
CONLL_LABELS = {"PERSON": "PER", "ORG": "ORG", "GPE": "LOC", "LOC": "LOC", "FAC": "LOC"}
SEED_TITLE = "Trump promises Putin ventilators for Russia"
SEED_PERSONS = {"Donald Trump", "Vladimir Putin", "Jared Kushner", "Sean Hannity"}
SEED_LOCATIONS = {"Russia", "United States", "New York"}
REUTERS_TITLE = "U.S. to send Russia 200 ventilators"
_BATCH = 128


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    title: str
    text: str
    gold: frozenset[str]


@dataclasses.dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"gold": self.tp + self.fn, "tagged": self.tp + self.fp, "tp": self.tp, "fp": self.fp,
                "fn": self.fn, "tn": self.tn, "precision": round(self.precision, 4),
                "recall": round(self.recall, 4), "f1": round(self.f1, 4)}


# --- labelled data -----------------------------------------------------------------------

def _require(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"{path}: labelled file not found (pass --corpus DIR, the folder holding topics/, "
                          "articles/ and entities/)")
    return path


def load_disaster_response(path: Path) -> list[Example]:
    """News messages of the disaster-response set with the topics their columns map to."""
    examples = []
    with open(_require(path), encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("genre") != "news":
                continue
            gold = frozenset(topic for topic, columns in DISASTER_TOPICS.items()
                             if any(row.get(column) == "1" for column in columns))
            examples.append(Example(row["id"], "", row["message"], gold))
    return examples


def _recovery_articles(path: Path) -> Iterator[dict[str, Any]]:
    with open(_require(path), encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def load_recovery(labels_path: Path, articles_path: Path) -> list[Example]:
    """ReCOVery articles labelled for "medical equipment aid" (labels keyed by url)."""
    labels = {}
    with open(_require(labels_path), encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                labels[record["url"]] = record["label"]
    examples = [Example(a["url"], a.get("title", ""), a.get("body_text", ""),
                        frozenset({AID}) if labels[a["url"]] == 1 else frozenset())
                for a in _recovery_articles(articles_path) if a.get("url") in labels]
    missing = len(labels) - len(examples)
    if missing:
        raise ConfigError(f"{labels_path}: {missing} labelled url(s) are not in {articles_path}")
    return examples


def seed_example(path: Path) -> Example:
    """The seed article as the external suite serves it: its headline and paragraphs."""
    paragraphs = [p.strip() for p in _require(path).read_text(encoding="utf-8").split("\n\n")]
    text = "\n\n".join(p for p in paragraphs if p and p != "Skip to main content")
    return Example("seed-article", SEED_TITLE, text, frozenset({AID}))


def reuters_example(articles_path: Path) -> Example | None:
    """Reuters' "U.S. to send Russia 200 ventilators" (2020-05-19), when the file has it."""
    for article in _recovery_articles(articles_path):
        if article.get("title", "").startswith(REUTERS_TITLE):
            return Example(article["url"], article["title"], article["body_text"], frozenset({AID}))
    return None


# --- tagging -------------------------------------------------------------------------------

def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"tagged {done}/{total}", file=sys.stderr, end="\r" if done < total else "\n")


def tag_examples(tagger, examples: list[Example], with_mentions: bool = False) -> list[Article]:
    """Examples through `Tagger.tag_articles`, as `newsbeam tag` feeds its records."""
    tagged: list[Article] = []
    for start in range(0, len(examples), _BATCH):
        batch = examples[start:start + _BATCH]
        tagged += tagger.tag_articles([Article(title=e.title, content_html=e.text) for e in batch], with_mentions)
        _progress(len(tagged), len(examples))
    return tagged


# --- topics ----------------------------------------------------------------------------------

def _snippet(example: Example, width: int = 140) -> str:
    text = " ".join(f"{example.title} | {example.text}".split()) if example.title else " ".join(example.text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def evaluate_topics(tagger, examples: list[Example], topics: Iterable[str], misses: int = 5) -> dict[str, Any]:
    """Per-topic precision/recall/F1, what was tagged instead of each missed topic, and the
    worst misses: the false positives that scored highest and the false negatives that scored
    lowest, each with its evidence."""
    from newsbeam.transforms.topics import score_article

    topics = list(topics)
    known = {t.name for t in tagger.taxonomy.topics}
    unknown = [t for t in topics if t not in known]
    if unknown:
        raise ConfigError(f"topic(s) not in the taxonomy: {', '.join(unknown)}")
    counts = {topic: Counts() for topic in topics}
    instead: dict[str, Counter] = {topic: Counter() for topic in topics}
    errors: dict[str, list[dict[str, Any]]] = {topic: [] for topic in topics}
    for example, article in zip(examples, tag_examples(tagger, examples)):
        scores = {s.topic: s for s in score_article(tagger.taxonomy, article)}
        predicted = set(article.topics)
        for topic in topics:
            gold, tagged = topic in example.gold, topic in predicted
            count = counts[topic]
            if gold and tagged:
                count.tp += 1
            elif tagged:
                count.fp += 1
            elif gold:
                count.fn += 1
                instead[topic].update(predicted or {"(nothing)"})
            else:
                count.tn += 1
            if gold != tagged:
                score = scores[topic]
                errors[topic].append({"kind": "FP" if tagged else "FN", "id": example.id, "score": score.score,
                                      "threshold": score.threshold, "evidence": list(score.evidence),
                                      "text": _snippet(example)})
    worst = {}
    for topic, found in errors.items():
        fps = sorted((e for e in found if e["kind"] == "FP"), key=lambda e: -e["score"])
        fns = sorted((e for e in found if e["kind"] == "FN"), key=lambda e: e["score"])
        worst[topic] = fps[:misses] + fns[:misses]
    return {"examples": len(examples),
            "topics": {topic: counts[topic].as_dict() for topic in topics},
            "missed_topics_tagged_as": {t: dict(c.most_common(5)) for t, c in instead.items()},
            "worst_misses": worst}


def topic_checks(tagger, examples: list[Example]) -> list[dict[str, Any]]:
    """Articles that must carry their gold topics."""
    results = []
    for example, article in zip(examples, tag_examples(tagger, examples)):
        results.append({"id": example.id, "title": example.title, "expected": sorted(example.gold),
                        "topics": list(article.topics), "ok": example.gold <= set(article.topics),
                        "evidence": article.to_document()["topic_evidence"]})
    return results


def run_topics(tagger, corpus: Path, dataset: str, misses: int, seed: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"datasets": {}}
    if dataset in ("all", "disaster-response"):
        examples = load_disaster_response(corpus / "topics" / "disaster_response_validation.csv")
        report["datasets"]["disaster-response"] = evaluate_topics(tagger, examples, DISASTER_TOPICS, misses)
    articles = corpus / "articles" / "recovery-reliable.jsonl"
    if dataset in ("all", "recovery"):
        examples = load_recovery(corpus / "topics" / "recovery-medical-aid-dev.jsonl", articles)
        result = evaluate_topics(tagger, examples, [AID], misses)
        aid = result["topics"][AID]
        negatives = aid["fp"] + aid["tn"]
        result["non_aid_tagged_share"] = round(aid["fp"] / negatives, 4) if negatives else 0.0
        result["aid_found_share"] = aid["recall"]
        report["datasets"]["recovery"] = result
    checks = [reuters_example(articles)] + ([seed_example(seed)] if seed.is_file() else [])
    report["checks"] = topic_checks(tagger, [check for check in checks if check])
    return report


def _pct(value: float) -> str:
    return f"{100 * value:5.1f}%"


def format_topics(report: dict[str, Any]) -> str:
    lines = []
    for name, result in report["datasets"].items():
        lines.append(f"== topics: {name} ({result['examples']} labelled texts)")
        lines.append(f"{'topic':<24} {'gold':>5} {'tagged':>6} {'TP':>5} {'FP':>5} {'FN':>5} "
                     f"{'precision':>9} {'recall':>7} {'F1':>6}")
        for topic, c in result["topics"].items():
            lines.append(f"{topic:<24} {c['gold']:>5} {c['tagged']:>6} {c['tp']:>5} {c['fp']:>5} {c['fn']:>5} "
                         f"{c['precision']:>9.3f} {c['recall']:>7.3f} {c['f1']:>6.3f}")
        if "non_aid_tagged_share" in result:
            lines.append(f"non-aid articles tagged: {_pct(result['non_aid_tagged_share'])}   "
                         f"aid articles found: {_pct(result['aid_found_share'])}")
        lines.append("confusion: topics tagged on the texts whose gold topic was missed")
        for topic, instead in result["missed_topics_tagged_as"].items():
            if instead:
                lines.append(f"  {topic}: " + ", ".join(f"{t} ×{n}" for t, n in instead.items()))
        lines.append("worst misses (FP: highest-scoring wrong tags; FN: lowest-scoring missed texts)")
        for topic, found in result["worst_misses"].items():
            for miss in found:
                lines.append(f"  {miss['kind']} {topic} score {miss['score']:g}/{miss['threshold']:g} "
                             f"[{'; '.join(miss['evidence'][:4]) or 'no evidence'}] {miss['text']}")
        lines.append("")
    lines.append("== checks")
    for check in report["checks"]:
        lines.append(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['title'][:70]!r}: topics {check['topics']}")
    return "\n".join(lines)


# --- entities --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConllDoc:
    tokens: tuple[str, ...]
    starts: tuple[int, ...]  # character offset of each token in `text`
    text: str
    spans: frozenset[tuple[int, int, str]]  # gold (first token, end token, label), PER/ORG/LOC


def _flush_span(spans: set, start: int | None, end: int, label: str | None) -> None:
    if start is not None and label in ("PER", "ORG", "LOC"):
        spans.add((start, end, label))


def load_conll(path: Path) -> list[ConllDoc]:
    """CoNLL-2003 documents; accepts IOB1 and IOB2 tags."""
    docs, sentences = [], []
    sentence: list[tuple[str, str]] = []

    def close_doc() -> None:
        if sentence:
            sentences.append(list(sentence))
            sentence.clear()
        if sentences:
            docs.append(_conll_doc(sentences))
            sentences.clear()

    with open(_require(path), encoding="utf-8") as handle:
        for line in handle:
            parts = line.split()
            if not parts:
                if sentence:
                    sentences.append(list(sentence))
                    sentence.clear()
            elif parts[0] == "-DOCSTART-":
                close_doc()
            else:
                sentence.append((parts[0], parts[-1]))
    close_doc()
    return docs


def _conll_doc(sentences: list[list[tuple[str, str]]]) -> ConllDoc:
    tokens, tags, starts, lines, offset = [], [], [], [], 0
    for sentence in sentences:
        words = [token for token, _ in sentence]
        for word in words:
            starts.append(offset)
            offset += len(word) + 1
        tokens += words
        tags += [tag for _, tag in sentence]
        lines.append(" ".join(words))
    spans: set[tuple[int, int, str]] = set()
    start, label = None, None
    for index, tag in enumerate(tags):
        kind, _, typ = tag.partition("-")
        if kind == "I" and start is not None and typ == label:
            continue
        _flush_span(spans, start, index, label)
        start, label = (index, typ) if kind in ("B", "I") else (None, None)
    _flush_span(spans, start, len(tags), label)
    return ConllDoc(tuple(tokens), tuple(starts), "\n".join(lines), frozenset(spans))


def _token_index(doc: ConllDoc, seen: str) -> tuple[dict[int, int], dict[int, int]] | None:
    """Character offset in the text the model saw -> token index (starts and ends), if the
    cleaned text still has the document's tokens."""
    if seen == doc.text:
        offsets = [(s, s + len(t)) for s, t in zip(doc.starts, doc.tokens)]
    else:
        offsets = [(m.start(), m.end()) for m in re.finditer(r"\S+", seen)]
        if [seen[a:b] for a, b in offsets] != list(doc.tokens):
            return None
    return ({a: i for i, (a, _) in enumerate(offsets)}, {b: i + 1 for i, (_, b) in enumerate(offsets)})


def evaluate_entities(tagger, docs: list[ConllDoc], misses: int = 15) -> dict[str, Any]:
    examples = [Example(str(n), "", doc.text, frozenset()) for n, doc in enumerate(docs)]
    counts = {label: Counts() for label in ("PER", "ORG", "LOC")}
    confusion: Counter = Counter()
    missed: Counter = Counter()
    spurious: Counter = Counter()
    unaligned = 0
    for doc, article in zip(docs, tag_examples(tagger, examples, with_mentions=True)):
        index = _token_index(doc, article.nlp_text(tagger.settings.nlp.max_chars))
        gold = set(doc.spans)
        if index is None:  # cleaning changed the tokens: every gold span counts as missed
            unaligned += 1
            for _start, _end, label in gold:
                counts[label].fn += 1
            continue
        starts, ends = index
        predicted = set()
        for mention in article.mentions:
            label = CONLL_LABELS.get(mention["label"])
            if label:
                predicted.add((starts.get(mention["start"], -1), ends.get(mention["end"], -1), label,
                               mention["text"]))
        exact = {(s, e, lab) for s, e, lab, _ in predicted}
        for start, end, label in gold:
            if (start, end, label) in exact:
                counts[label].tp += 1
                continue
            counts[label].fn += 1
            text = " ".join(doc.tokens[start:end])
            same_span = [lab for s, e, lab, _ in predicted if (s, e) == (start, end)]
            if same_span:
                confusion[f"{label} tagged {same_span[0]}"] += 1
            elif any(s < end and e > start for s, e, _, _ in predicted if s >= 0 and e >= 0):
                confusion[f"{label} boundary"] += 1
            else:
                confusion[f"{label} missed"] += 1
            missed[f"{text} ({label})"] += 1
        for start, end, label, text in predicted:
            if (start, end, label) not in gold:
                counts[label].fp += 1
                if not any(s < end and e > start for s, e, _ in gold):
                    confusion[f"spurious {label}"] += 1
                spurious[f"{text} ({label})"] += 1
    total = Counts(sum(c.tp for c in counts.values()), sum(c.fp for c in counts.values()),
                   sum(c.fn for c in counts.values()))
    return {"documents": len(docs), "unaligned_documents": unaligned,
            "labels": {label: c.as_dict() for label, c in counts.items()}, "micro": total.as_dict(),
            "confusion": dict(confusion.most_common()),
            "worst_misses": {"missed": dict(missed.most_common(misses)),
                             "spurious": dict(spurious.most_common(misses))}}


def seed_entities(tagger, seed: Path) -> dict[str, Any]:
    (article,) = tag_examples(tagger, [seed_example(seed)])
    persons, locations = set(article.persons), set(article.locations)
    return {"persons": list(article.persons), "locations": list(article.locations),
            "organizations": list(article.organizations),
            "ok": persons == SEED_PERSONS and SEED_LOCATIONS <= locations}


def run_entities(tagger, corpus: Path, misses: int, seed: Path) -> dict[str, Any]:
    report = evaluate_entities(tagger, load_conll(corpus / "entities" / "conll2003-valid.txt"), misses)
    if seed.is_file():
        report["seed"] = seed_entities(tagger, seed)
    return report


def format_entities(report: dict[str, Any]) -> str:
    lines = [f"== entities: CoNLL-2003 ({report['documents']} documents, exact spans, "
             f"{report['unaligned_documents']} not aligned)",
             f"{'label':<8} {'gold':>6} {'tagged':>6} {'TP':>6} {'FP':>6} {'FN':>6} {'precision':>9} "
             f"{'recall':>7} {'F1':>6}"]
    for label, c in [*report["labels"].items(), ("micro", report["micro"])]:
        lines.append(f"{label:<8} {c['gold']:>6} {c['tagged']:>6} {c['tp']:>6} {c['fp']:>6} {c['fn']:>6} "
                     f"{c['precision']:>9.3f} {c['recall']:>7.3f} {c['f1']:>6.3f}")
    lines.append("confusion: " + ", ".join(f"{kind} ×{n}" for kind, n in report["confusion"].items()))
    lines.append("most missed: " + ", ".join(f"{k} ×{n}" for k, n in report["worst_misses"]["missed"].items()))
    lines.append("most spurious: " + ", ".join(f"{k} ×{n}" for k, n in report["worst_misses"]["spurious"].items()))
    if "seed" in report:
        seed = report["seed"]
        lines.append(f"== checks\n  {'ok  ' if seed['ok'] else 'FAIL'} seed article: persons {seed['persons']}, "
                     f"locations {seed['locations']}")
    return "\n".join(lines)


def main(args) -> int:
    """Entry point of `newsbeam eval` (arguments parsed in pipeline/cli.py)."""
    from newsbeam.pipeline.config import load_settings
    from newsbeam.transforms.tagging import Tagger

    corpus = Path(args.corpus) if args.corpus else DEFAULT_CORPUS
    seed = Path(args.seed) if args.seed else DEFAULT_SEED
    tagger = Tagger.load(load_settings(args.config))
    if args.what == "topics":
        report = run_topics(tagger, corpus, args.dataset, args.misses, seed)
        text = format_topics(report)
    else:
        report = run_entities(tagger, corpus, args.misses, seed)
        text = format_entities(report)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else text)
    return 0
