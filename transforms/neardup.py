"""LinkStories: syndicated copies of one story (a wire story republished with small edits)
get the same `story_id`, so Kibana and alerts can collapse them.

MinHash over 5-word shingles of the clean title and body (64 hash functions), indexed by
locality-sensitive hashing in 16 bands of 4 rows: two texts share a band with probability
1-(1-J^4)^16 (J = Jaccard similarity of their shingles: 0.5 -> 64%, 0.7 -> 98%). Candidates
sharing a band are confirmed when their estimated similarity reaches
`dedupe.near_duplicate_threshold` and their headlines agree (Jaccard similarity of their
words at least 0.4: scraped boilerplate, such as one publisher's cookie wall or teaser
under every URL, makes unrelated pages look alike; their headlines do not); the article then takes the candidate's `story_id`,
otherwise its own `article_id` starts a story.

Candidates come from Elasticsearch (`story_bands` of articles fetched within
`dedupe.near_duplicate_days`; the signature is kept in `story_minhash`), so links survive
restarts, and from a bounded in-process cache of recent articles that may not be
searchable yet.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from newsbeam.transforms import clock
from newsbeam.transforms.article import Article
from newsbeam.transforms.batching import BatchingDoFn
from newsbeam.transforms.settings import DedupeSettings, ElasticsearchSettings, StageSizes

_LOG = logging.getLogger(__name__)

SHINGLE_WORDS = 5
NUM_PERM = 64
BANDS = 16
ROWS = NUM_PERM // BANDS
MIN_SHINGLES = 8  # shorter texts (a headline, a one-line summary) are too thin to link safely
_MERSENNE = np.uint64((1 << 61) - 1)
_rng = np.random.RandomState(20_240_501)  # fixed: signatures must match across processes and restarts
_A = _rng.randint(1, 1 << 31, size=NUM_PERM).astype(np.uint64)
_B = _rng.randint(0, 1 << 31, size=NUM_PERM).astype(np.uint64)
_WORD = re.compile(r"\w+", re.UNICODE)
_CACHE_SIZE = 20_000
TITLE_OVERLAP = 0.4
_TITLE_STOPWORDS = frozenset("the and for with from that this have has are was were will its into over after "
                             "amid about than new says said more".split())


def shingles(text: str, size: int = SHINGLE_WORDS) -> set[str]:
    words = _WORD.findall(text.lower())
    return {" ".join(words[i:i + size]) for i in range(max(0, len(words) - size + 1))}


def minhash(items: Iterable[str]) -> np.ndarray | None:
    """A 64-value MinHash signature (uint32), or None for fewer than MIN_SHINGLES shingles."""
    values = np.fromiter((int.from_bytes(hashlib.blake2b(item.encode("utf-8"), digest_size=4).digest(), "little")
                          for item in items), dtype=np.uint64)
    if len(values) < MIN_SHINGLES:
        return None
    hashed = (np.outer(values, _A) + _B) % _MERSENNE
    return (hashed & np.uint64(0xFFFFFFFF)).min(axis=0).astype(np.uint32)


def bands(signature: np.ndarray) -> list[str]:
    return [f"{band}:{hashlib.blake2b(signature[band * ROWS:(band + 1) * ROWS].tobytes(), digest_size=8).hexdigest()}"
            for band in range(BANDS)]


def similarity(first: np.ndarray, second: np.ndarray) -> float:
    """Estimated Jaccard similarity of the shingle sets behind two signatures."""
    return float(np.mean(first == second))


def encode(signature: np.ndarray) -> str:
    return signature.astype("<u4").tobytes().hex()


def decode(text: str) -> np.ndarray | None:
    try:
        signature = np.frombuffer(bytes.fromhex(text), dtype="<u4")
    except (TypeError, ValueError):
        return None
    return signature if len(signature) == NUM_PERM else None


def title_words(title: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(title.lower()) if len(w) >= 3 and w not in _TITLE_STOPWORDS)


def titles_agree(first: frozenset[str], second: frozenset[str]) -> bool:
    """Headlines of copies share most words; an empty title gives no evidence either way."""
    if not first or not second:
        return True
    return len(first & second) / len(first | second) >= TITLE_OVERLAP


Candidate = tuple[str, str, np.ndarray, frozenset]  # article_id, story_id, signature, title words


class StoryIndex:
    """Bounded in-memory LSH index of recent signatures: band -> [article_id]."""

    def __init__(self, capacity: int = _CACHE_SIZE):
        self._capacity = capacity
        self._entries: collections.OrderedDict[str, tuple[str, np.ndarray, frozenset, list[str]]] = \
            collections.OrderedDict()
        self._bands: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, article_id: str, story_id: str, signature: np.ndarray, title: frozenset, keys: list[str]) -> None:
        if article_id in self._entries:
            return
        self._entries[article_id] = (story_id, signature, title, keys)
        for key in keys:
            self._bands[key].append(article_id)
        while len(self._entries) > self._capacity:
            old_id, (_, _, _, old_keys) = self._entries.popitem(last=False)
            for key in old_keys:
                members = self._bands.get(key)
                if members and old_id in members:
                    members.remove(old_id)
                    if not members:
                        del self._bands[key]

    def candidates(self, keys: list[str]) -> Iterator[Candidate]:
        seen = set()
        for key in keys:
            for article_id in self._bands.get(key, ()):
                if article_id not in seen:
                    seen.add(article_id)
                    story_id, signature, title, _ = self._entries[article_id]
                    yield article_id, story_id, signature, title


def best_story(signature: np.ndarray, title: frozenset, candidates: Iterable[Candidate],
               threshold: float) -> tuple[str | None, float]:
    """The story of the most similar candidate at or above `threshold` whose title agrees
    (ties: the smallest story id)."""
    best: tuple[float, str] | None = None  # (-score, story_id): the smallest wins
    for _, story_id, other, other_title in candidates:
        score = similarity(signature, other)
        if score >= threshold and titles_agree(title, other_title) and (best is None or (-score, story_id) < best):
            best = (-score, story_id)
    return (best[1], -best[0]) if best else (None, 0.0)


def signature_of(article: Article) -> np.ndarray | None:
    return minhash(shingles(article.story_text()))


def link_stories(articles: list[Article], index: StoryIndex, threshold: float,
                 stored: Iterable[Candidate] = (), signatures: list[np.ndarray | None] | None = None
                 ) -> list[Article]:
    """Adds `story_id`, `story_bands` and `story_minhash` to each article; `stored` are
    candidates from Elasticsearch, `signatures` the articles' own when already computed.
    Articles earlier in the list are candidates for later ones."""
    for article_id, story_id, signature, title in stored:
        index.add(article_id, story_id, signature, title, bands(signature))
    if signatures is None:
        signatures = [signature_of(article) for article in articles]
    linked = []
    for article, signature in zip(articles, signatures):
        if signature is None:
            linked.append(dataclasses.replace(article, story_id=article.article_id))
            continue
        keys = bands(signature)
        title = title_words(article.title)
        candidates = [c for c in index.candidates(keys) if c[0] != article.article_id]
        story_id, _ = best_story(signature, title, candidates, threshold)
        story_id = story_id or article.article_id
        index.add(article.article_id, story_id, signature, title, keys)
        linked.append(dataclasses.replace(article, story_id=story_id, story_bands=tuple(keys),
                                          story_minhash=encode(signature)))
    return linked


def stored_candidates(client: Any, alias: str, keys: list[str], days: float, limit: int) -> list[Candidate]:
    """Recent indexed articles sharing a band with `keys`."""
    since = clock.iso(time.time() - days * 86_400)
    response = client.search(
        index=alias, size=limit, ignore_unavailable=True, allow_no_indices=True,
        source=["story_id", "story_minhash", "title"],
        query={"bool": {"filter": [{"terms": {"story_bands": keys}}, {"range": {"fetched_at": {"gte": since}}}]}},
        sort=[{"fetched_at": "asc"}])
    found = []
    for hit in response["hits"]["hits"]:
        signature = decode(hit["_source"].get("story_minhash", ""))
        if signature is not None:
            found.append((hit["_id"], hit["_source"].get("story_id") or hit["_id"], signature,
                          title_words(hit["_source"].get("title") or "")))
    return found


class LinkStoriesFn(BatchingDoFn):
    stage = "near_duplicates"
    def __init__(self, es_settings: ElasticsearchSettings, settings: DedupeSettings,
                 batch_size: int = StageSizes.lookup_batch):
        if not 0 < settings.near_duplicate_threshold <= 1:
            raise ValueError("dedupe.near_duplicate_threshold must be in (0, 1]")
        self._es_settings = es_settings
        self._settings = settings
        self.batch_size = batch_size
        self._linked = Metrics.counter("newsbeam", "articles_linked_to_story")

    def setup(self) -> None:
        from newsbeam.transforms.elastic import connect
        self._client = connect(self._es_settings, check=False)
        self._index = StoryIndex()

    def handle_batch(self, articles: list[Article]) -> Iterator[list[Any]]:
        signatures = [signature_of(article) for article in articles]
        keys = sorted({key for signature in signatures if signature is not None for key in bands(signature)})
        stored: list[Candidate] = []
        if keys:
            try:
                stored = stored_candidates(self._client, self._es_settings.articles_alias, keys,
                                           self._settings.near_duplicate_days, limit=2_000)
            except Exception as err:  # recent in-process stories still link; a story may split
                _LOG.warning("cannot look up stories in %s (%s)", self._es_settings.articles_alias,
                             type(err).__name__)
        for article in link_stories(articles, self._index, self._settings.near_duplicate_threshold, stored,
                                    signatures):
            if article.story_id != article.article_id:
                self._linked.inc()
            yield [article]

    def teardown(self) -> None:
        self._client.close()


class LinkStories(beam.PTransform):
    """Clean articles -> the same articles with `story_id` (shared by near-duplicates)."""

    def __init__(self, es_settings: ElasticsearchSettings, settings: DedupeSettings,
                 batch_size: int = StageSizes.lookup_batch):
        super().__init__()
        self._es_settings = es_settings
        self._settings = settings
        self._batch_size = batch_size

    def expand(self, articles):
        return articles | "MinHashLsh" >> beam.ParDo(
            LinkStoriesFn(self._es_settings, self._settings, self._batch_size))
