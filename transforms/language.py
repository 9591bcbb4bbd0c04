"""DetectLanguage: every article gets a `language` (ISO 639-1), detected from its text with
py3langid (a maintained fork of langid.py; its model ships inside the package) when the
feed did not state one. Only languages the configured spaCy model reads go to NER and
topics: the others get `nlp_skipped: true`, pass TagEntities and TagTopics untagged, and
are indexed with their language.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from newsbeam.transforms import timing
from newsbeam.transforms.article import Article

MIN_CONFIDENCE = 0.8
MIN_WORDS = 4


def model_languages(model: str) -> frozenset[str] | None:
    """Languages a spaCy model package reads, from its name (`en_core_web_sm` -> {'en'});
    None when any language may go to it (`xx_*` models, paths, unknown names)."""
    prefix = model.split("_", 1)[0].lower()
    if "_" not in model or prefix == "xx" or not prefix.isalpha() or len(prefix) not in (2, 3):
        return None
    return frozenset({prefix})


def detect(identifier: Any, text: str) -> str | None:
    """The language of `text`, or None when it is too short or the detector is unsure."""
    if len(text.split()) < MIN_WORDS:
        return None
    language, confidence = identifier.classify(text)
    return language if confidence >= MIN_CONFIDENCE else None


@functools.cache
def load_identifier() -> Any:
    """The detector, loaded once per process: the SDK worker makes an
    instance of each DoFn for every bundle Prism runs at once, and `classify` only reads the model."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def wants_nlp(language: str | None, languages: frozenset[str] | None) -> bool:
    """Articles of unknown language go to NER too: most feeds are in the model's language."""
    return languages is None or not language or language in languages


def route_language(identifier: Any, languages: frozenset[str] | None, article: Article) -> Article:
    """The article with its `language` (the feed's, else detected) and `nlp_skipped`."""
    language = article.language
    if not language:
        with timing.stage("language"):
            language = detect(identifier, article.language_sample())
    return dataclasses.replace(article, language=language, nlp_skipped=not wants_nlp(language, languages))


class DetectLanguageFn(beam.DoFn):
    def __init__(self, languages: frozenset[str] | None):
        self._languages = languages
        self._detected = Metrics.counter("newsbeam", "languages_detected")
        self._skipped = Metrics.counter("newsbeam", "articles_nlp_skipped_for_language")

    def setup(self) -> None:
        self._identifier = load_identifier()

    def process(self, article: Article) -> Iterator[Article]:
        routed = route_language(self._identifier, self._languages, article)
        if routed.language and not article.language:
            self._detected.inc()
        if routed.nlp_skipped:
            self._skipped.inc()
        yield routed


class DetectLanguage(beam.PTransform):
    """Articles with `language` and `nlp_skipped` (a language outside `languages`, the
    ones the spaCy model reads; None: all)."""

    def __init__(self, languages: frozenset[str] | None):
        super().__init__()
        self._languages = languages

    def expand(self, articles):
        return articles | "Py3Langid" >> beam.ParDo(DetectLanguageFn(self._languages))
