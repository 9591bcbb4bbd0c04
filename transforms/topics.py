"""TagTopics: a user-editable taxonomy (`configs/topics.yaml`) matched on lemmas.

A topic scores weighted evidence: terms (lemma phrases; "#number" stands for any numeral)
and `near` rules that need one term of each group within a window of tokens (an aid verb
near a supply noun, a quantity before it, a receiver after it). Weights may be negative:
counter-evidence such as "wear" for masks. The topic is tagged when the score reaches its
threshold and its required entity labels are present; `topic_evidence` records why it fired.

Two scopes:
* `article` (default): all the text is one bag of evidence; a term also found in the
  headline adds `title_bonus`.
* `passage`: the headline and each paragraph (a message is one paragraph) are scored on
  their own, as a reader judges whether a story is about a topic from its headline or from
  one paragraph that reports it. Score = headline_weight x headline + the best paragraph,
  times `body_weight` when there is a headline (a story whose headline shows nothing of the
  topic needs stronger evidence in its body), so passing mentions spread over a long article
  do not add up. With `headline_terms: false` only `near` rules and counter-evidence count in
  the headline: a headline that names ventilators is not yet one about sending them.
`tag_entities` writes `lemmas` with one line per paragraph, the headline first.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import apache_beam as beam

from newsbeam.transforms.article import Article, TopicEvidence
from newsbeam.transforms.deadletter import DEAD, SafeMapFn
from newsbeam.transforms.settings import ConfigError, load_yaml

Phrase = tuple[str, ...]
NUMBER = "#number"
_NUMERAL = re.compile(r"^\d[\d,.]*$")
_NUMBER_WORDS = frozenset("""two three four five six seven eight nine ten eleven twelve fifteen twenty thirty forty
fifty sixty seventy eighty ninety hundred thousand million billion dozen""".split())
SCOPES = ("article", "passage")


def _is_number(token: str) -> bool:
    """A numeral ("1,000", "3.5") or a number word. The regex runs only on tokens that start
    with a digit: topics index every token of every article."""
    return token in _NUMBER_WORDS or (token[:1].isdecimal() and _NUMERAL.match(token) is not None)


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
    scope: str = "article"
    headline_weight: float = 1.0
    body_weight: float = 1.0
    headline_terms: bool = True


def _phrase(text: Any, where: str) -> Phrase:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: a term must be a non-empty string, got {text!r}")
    return tuple(text.lower().split())


def _number(raw: dict, key: str, default: float, where: str, minimum: float = 0.0) -> float:
    value = raw.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}: {key!r} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _flag(raw: dict, key: str, default: bool, where: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key!r} must be true or false, got {value!r}")
    return value


def _weight(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{where}: weights must be numbers, got {value!r}")
    return float(value)


def _topic(raw: Any, where: str) -> Topic:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise ConfigError(f"{where}: each topic needs a 'name'")
    where = f"{where} ({raw['name']})"
    terms_raw = raw.get("terms") or {}
    if isinstance(terms_raw, list):
        terms_raw = {term: 1.0 for term in terms_raw}
    if not isinstance(terms_raw, dict):
        raise ConfigError(f"{where}: 'terms' must be a list or a mapping of term -> weight")
    terms = tuple((_phrase(term, where), _weight(weight, where)) for term, weight in terms_raw.items())
    near = []
    for number, rule in enumerate(raw.get("near") or [], 1):
        groups = rule.get("groups") if isinstance(rule, dict) else None
        if not isinstance(groups, list) or len(groups) < 2 or not all(isinstance(g, list) and g for g in groups):
            raise ConfigError(f"{where}: near rule #{number} needs 'groups': two or more lists of terms")
        window = rule.get("window", 12)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ConfigError(f"{where}: near rule #{number}: 'window' must be a positive number of tokens")
        near.append(NearRule(groups=tuple(tuple(_phrase(t, where) for t in g) for g in groups),
                             window=window, weight=_weight(rule.get("weight", 1.0), where)))
    if not terms and not near:
        raise ConfigError(f"{where}: needs 'terms' or 'near' rules")
    threshold = raw.get("threshold", 2.0)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold <= 0:
        raise ConfigError(f"{where}: 'threshold' must be a positive number")
    scope = raw.get("scope", "article")
    if scope not in SCOPES:
        raise ConfigError(f"{where}: 'scope' must be one of {', '.join(SCOPES)}, got {scope!r}")
    return Topic(name=raw["name"].strip(), description=str(raw.get("description", "")), terms=terms,
                 near=tuple(near), threshold=float(threshold),
                 requires_entities=frozenset(raw.get("requires_entities") or ()),
                 title_bonus=_number(raw, "title_bonus", 1.0, where), scope=scope,
                 headline_weight=_number(raw, "headline_weight", 1.0, where),
                 body_weight=_number(raw, "body_weight", 1.0, where),
                 headline_terms=_flag(raw, "headline_terms", True, where))


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    topics: tuple[Topic, ...]

    @classmethod
    def load(cls, path: Path | str) -> Taxonomy:
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


class Passage:
    """The lemma tokens of one passage, indexed once so each phrase is a dictionary lookup."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self._index: dict[str, list[int]] = {}
        for position, token in enumerate(tokens):
            self._index.setdefault(token, []).append(position)
            if _is_number(token):
                self._index.setdefault(NUMBER, []).append(position)

    def positions(self, phrase: Phrase) -> list[int]:
        starts = self._index.get(phrase[0], ())
        if len(phrase) == 1:
            return list(starts)
        return [i for i in starts if i + len(phrase) <= len(self.tokens)
                and all(self._is(self.tokens[i + k], word) for k, word in enumerate(phrase[1:], 1))]

    @staticmethod
    def _is(token: str, word: str) -> bool:
        return token == word or (word == NUMBER and _is_number(token))

    def __bool__(self) -> bool:
        return bool(self.tokens)


def _near_hit(passage: Passage, rule: NearRule) -> str | None:
    """The first match of one term per group within the window, the terms on different words:
    "medical assistance" alone is not the verb "assistance" near the supply "medical assistance"."""
    hits = []
    for group in rule.groups:
        found = [(pos, pos + len(phrase), " ".join(phrase)) for phrase in group for pos in passage.positions(phrase)]
        if not found:
            return None
        hits.append(sorted(found))
    anchor, rest = hits[0], hits[1:]
    for start, end, text in anchor:
        matched, taken = [text], [(start, end)]
        for group in rest:
            close = [(s, e, t) for s, e, t in group if abs(s - start) <= rule.window
                     and all(e <= a or s >= b for a, b in taken)]
            if not close:
                break
            matched.append(close[0][2])
            taken.append(close[0][:2])
        else:
            return " ~ ".join(matched)
    return None


def passage_evidence(topic: Topic, passage: Passage, where: str = "", terms: bool = True,
                     title: Passage | None = None) -> tuple[float, list[str]]:
    """Score and reasons of one passage: each term once, each near rule once. With `terms` false
    only counter-evidence terms (negative weights) count; a positive term also in `title` adds
    the topic's `title_bonus`."""
    score, evidence = 0.0, []
    if not passage:
        return score, evidence
    for phrase, weight in topic.terms if terms else [(p, w) for p, w in topic.terms if w < 0]:
        if passage.positions(phrase):
            bonus = topic.title_bonus if title and weight > 0 and title.positions(phrase) else 0.0
            score += weight + bonus
            evidence.append(f"{'' if weight > 0 else '-'}term:{' '.join(phrase)}{'(title)' if bonus else where}")
    for rule in topic.near:
        hit = _near_hit(passage, rule)
        if hit:
            score += rule.weight
            evidence.append(f"{'' if rule.weight > 0 else '-'}near:{hit}{where}")
    return score, evidence


class ArticleText:
    """An article's lemma passages, indexed once for all topics."""

    def __init__(self, lemmas: str, titled: bool):
        lines = [line.split() for line in lemmas.split("\n")]
        self.titled = titled and bool(lines)
        self.headline = Passage(lines[0] if self.titled else [])
        self.paragraphs = [Passage(line) for line in (lines[1:] if self.titled else lines)]
        self.whole = Passage([token for line in lines for token in line])


def score_topic(topic: Topic, text: ArticleText, labels: set[str]) -> tuple[float, list[str]]:
    if topic.requires_entities and not topic.requires_entities & labels:
        return 0.0, [f"no {'/'.join(sorted(topic.requires_entities))} entity (required)"]
    if topic.scope == "article":
        return passage_evidence(topic, text.whole, title=text.headline)
    head_score, head_evidence = passage_evidence(topic, text.headline, "(title)", topic.headline_terms)
    best_score, best_evidence = 0.0, []
    for passage in text.paragraphs:
        score, evidence = passage_evidence(topic, passage)
        if score > best_score:
            best_score, best_evidence = score, evidence
    body_weight = topic.body_weight if text.titled else 1.0
    return topic.headline_weight * head_score + body_weight * best_score, head_evidence + best_evidence


@dataclasses.dataclass(frozen=True)
class TopicScore:
    topic: str
    score: float
    threshold: float
    evidence: tuple[str, ...]

    @property
    def tagged(self) -> bool:
        return self.score >= self.threshold


def score_article(taxonomy: Taxonomy, article: Article) -> list[TopicScore]:
    """Every topic's score and evidence for an article with `lemmas` and `entities`."""
    text = ArticleText(article.lemmas, bool(article.title.strip()))
    labels = {entity.label for entity in article.entities}
    scores = []
    for topic in taxonomy.topics:
        score, reasons = score_topic(topic, text, labels)
        # Rounded before the comparison, so the recorded score always explains the decision.
        scores.append(TopicScore(topic.name, round(score, 2), topic.threshold, tuple(reasons)))
    return scores


def tag_topics(taxonomy: Taxonomy, article: Article) -> Article:
    """Adds `topics` and `topic_evidence` from the article's lemmas and entities."""
    fired = [s for s in score_article(taxonomy, article) if s.tagged]
    return dataclasses.replace(article, topics=tuple(s.topic for s in fired),
                               topic_evidence=tuple(TopicEvidence(s.topic, s.score, s.evidence) for s in fired))


class TagTopics(beam.PTransform):
    def __init__(self, taxonomy: Taxonomy):
        super().__init__()
        self._taxonomy = taxonomy

    def expand(self, articles):
        tag = functools.partial(tag_topics, self._taxonomy)
        return articles | "MatchTaxonomy" >> beam.FlatMap(SafeMapFn(tag, "topics")).with_outputs(
            DEAD, main="tagged")
