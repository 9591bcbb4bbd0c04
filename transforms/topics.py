"""TagTopics: a user-editable taxonomy (`configs/topics.yaml`) matched on lemmas.

A topic scores weighted evidence: terms (lemma phrases) found in the article, and
`near` rules that need one term of each group within a window of tokens (an aid verb
near a supply noun). The topic is tagged when the score reaches its threshold and its
required entity labels are present; `topic_evidence` records why it fired.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import apache_beam as beam

from pipeline.config import ConfigError, load_yaml
from transforms.deadletter import DEAD, SafeMapFn

Phrase = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class NearRule:
    groups: tuple[tuple[Phrase, ...], ...]
    window: int
    weight: float


@dataclasses.dataclass(frozen=True)
class Topic:
    name: str
    description: str
    terms: tuple[tuple[Phrase, float], ...]
    near: tuple[NearRule, ...]
    threshold: float
    requires_entities: frozenset[str]
    title_bonus: float


def _phrase(text: Any, where: str) -> Phrase:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: a term must be a non-empty string, got {text!r}")
    return tuple(text.lower().split())


def _topic(raw: Any, where: str) -> Topic:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise ConfigError(f"{where}: each topic needs a 'name'")
    where = f"{where} ({raw['name']})"
    terms_raw = raw.get("terms") or {}
    if isinstance(terms_raw, list):
        terms_raw = {term: 1.0 for term in terms_raw}
    if not isinstance(terms_raw, dict):
        raise ConfigError(f"{where}: 'terms' must be a list or a mapping of term -> weight")
    terms = tuple((_phrase(term, where), float(weight)) for term, weight in terms_raw.items())
    near = []
    for number, rule in enumerate(raw.get("near") or [], 1):
        groups = rule.get("groups") if isinstance(rule, dict) else None
        if not isinstance(groups, list) or len(groups) < 2 or not all(isinstance(g, list) and g for g in groups):
            raise ConfigError(f"{where}: near rule #{number} needs 'groups': two or more lists of terms")
        near.append(NearRule(groups=tuple(tuple(_phrase(t, where) for t in g) for g in groups),
                             window=int(rule.get("window", 12)), weight=float(rule.get("weight", 1.0))))
    if not terms and not near:
        raise ConfigError(f"{where}: needs 'terms' or 'near' rules")
    threshold = raw.get("threshold", 2.0)
    if not isinstance(threshold, (int, float)) or threshold <= 0:
        raise ConfigError(f"{where}: 'threshold' must be a positive number")
    return Topic(name=raw["name"].strip(), description=str(raw.get("description", "")), terms=terms,
                 near=tuple(near), threshold=float(threshold),
                 requires_entities=frozenset(raw.get("requires_entities") or ()),
                 title_bonus=float(raw.get("title_bonus", 1.0)))


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    topics: tuple[Topic, ...]

    @classmethod
    def load(cls, path: Path | str) -> "Taxonomy":
        raw = load_yaml(Path(path))
        items = raw.get("topics") if isinstance(raw, dict) else None
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{path}: expected a non-empty list under 'topics'")
        topics = tuple(_topic(item, f"{path}: topic #{n}") for n, item in enumerate(items, 1))
        names = [t.name for t in topics]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{path}: duplicate topic name(s): {', '.join(duplicates)}")
        return cls(topics)


def _positions(tokens: list[str], phrase: Phrase) -> list[int]:
    n = len(phrase)
    first = phrase[0]
    return [i for i, token in enumerate(tokens) if token == first and tuple(tokens[i:i + n]) == phrase]


def _near_hit(tokens: list[str], rule: NearRule) -> str | None:
    hits = []
    for group in rule.groups:
        found = [(pos, " ".join(phrase)) for phrase in group for pos in _positions(tokens, phrase)]
        if not found:
            return None
        hits.append(sorted(found))
    anchor, rest = hits[0], hits[1:]
    for pos, text in anchor:
        matched = [text]
        for group in rest:
            close = [t for p, t in group if abs(p - pos) <= rule.window]
            if not close:
                break
            matched.append(close[0])
        else:
            return " ~ ".join(matched)
    return None


def score_topic(topic: Topic, tokens: list[str], title_tokens: list[str],
                labels: set[str]) -> tuple[float, list[str]]:
    score, evidence = 0.0, []
    for phrase, weight in topic.terms:
        if _positions(tokens, phrase):
            bonus = topic.title_bonus if _positions(title_tokens, phrase) else 0.0
            score += weight + bonus
            evidence.append(f"term:{' '.join(phrase)}" + ("(title)" if bonus else ""))
    for rule in topic.near:
        hit = _near_hit(tokens, rule)
        if hit:
            score += rule.weight
            evidence.append(f"near:{hit}")
    if topic.requires_entities and not topic.requires_entities & labels:
        return 0.0, []
    return score, evidence


def tag_topics(taxonomy: Taxonomy, article: dict[str, Any]) -> dict[str, Any]:
    """Adds `topics` and `topic_evidence` from the article's lemmas and entities."""
    tokens = (article.get("lemmas") or "").split()
    title_words = len((article.get("title") or "").split())
    title_tokens = tokens[:title_words + 5] if title_words else []
    labels = {entity["label"] for entity in article.get("entities", ())}
    topics, evidence = [], []
    for topic in taxonomy.topics:
        score, reasons = score_topic(topic, tokens, title_tokens, labels)
        if score >= topic.threshold:
            topics.append(topic.name)
            evidence.append({"topic": topic.name, "score": round(score, 2), "evidence": reasons})
    return {**article, "topics": topics, "topic_evidence": evidence}


class TagTopics(beam.PTransform):
    def __init__(self, taxonomy: Taxonomy):
        super().__init__()
        self._taxonomy = taxonomy

    def expand(self, articles):
        tag = functools.partial(tag_topics, self._taxonomy)
        return articles | "MatchTaxonomy" >> beam.FlatMap(SafeMapFn(tag, "topics")).with_outputs(
            DEAD, main="tagged")
