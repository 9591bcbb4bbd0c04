"""The article record: what every stage from PollFeeds' parse to IndexArticles takes and returns.

One frozen dataclass, `Article`; a stage returns a new one (`dataclasses.replace`) with the
fields it sets. The text each stage reads is derived here, once: `story_text` (LinkStories),
`nlp_text` (TagEntities), `language_sample` (DetectLanguage), `alert_text` (an alert's
snippet). `to_document()` is the Elasticsearch document IndexArticles writes: every field
but the working ones in `NOT_INDEXED`. The articles index mapping (`ARTICLE_MAPPINGS` in
transforms/elastic.py) is checked against these fields by tests/test_article.py.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, ClassVar

from newsbeam.transforms.settings import NlpSettings

_SAMPLE_CHARS = 2_000


@dataclasses.dataclass(frozen=True, slots=True)
class Entity:
    """One canonical name of an article (TagEntities), in order of first mention."""

    name: str
    label: str
    text: str  # the first mention as written
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class TopicEvidence:
    """Why one topic fired (TagTopics)."""

    topic: str
    score: float
    evidence: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Article:
    """One article; docs/architecture.md "The article record" says which stage sets each field."""

    article_id: str = ""
    url: str = ""
    guid: str = ""
    title: str = ""
    summary_html: str = ""  # raw feed HTML, until CleanText
    content_html: str = ""  # raw feed or extracted HTML, until CleanText
    summary: str = ""
    body: str = ""
    feed_url: str = ""  # redacted: no credentials
    source: str = ""
    publisher: str = ""
    author: str | None = None
    published_at: str | None = None
    fetched_at: str | None = None
    language: str | None = None
    body_source: str = "feed"
    story_id: str | None = None
    story_bands: tuple[str, ...] = ()
    story_minhash: str | None = None
    nlp_skipped: bool = False
    entities: tuple[Entity, ...] = ()
    persons: tuple[str, ...] = ()
    organizations: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()
    lemmas: str = ""
    topics: tuple[str, ...] = ()
    topic_evidence: tuple[TopicEvidence, ...] = ()
    mentions: tuple[dict[str, Any], ...] = ()  # entity spans in nlp_text, for `newsbeam eval entities` only
    indexed_at: str | None = None  # stamped on the document when it is written

    # Working fields: they travel between stages but are not part of the indexed document.
    NOT_INDEXED: ClassVar[frozenset[str]] = frozenset({"summary_html", "content_html", "mentions"})

    def story_text(self) -> str:
        """What LinkStories hashes: the headline and the body (else the summary)."""
        body = self.body or self.summary
        return f"{self.title}\n{body}" if not body.startswith(self.title) else body

    def nlp_text(self, max_chars: int, max_run: int = NlpSettings.max_char_run,
                 max_token: int = NlpSettings.max_token_chars) -> str:
        """What spaCy reads: the headline, a blank line, the body; runs tamed, cut at `max_chars`."""
        title, body = self.title, self.body
        text = f"{title}\n\n{body}" if title and not body.startswith(title) else body or title
        return tame_runs(text, max_run, max_token)[:max_chars]

    def language_sample(self) -> str:
        """What DetectLanguage classifies: headline, summary and body, the first 2,000 characters."""
        return "\n".join(part for part in (self.title, self.summary, self.body) if part)[:_SAMPLE_CHARS]

    def alert_text(self) -> str:
        """What an alert's snippet is cut from: the body, else the summary, else the headline."""
        return self.body or self.summary or self.title

    def to_document(self) -> dict[str, Any]:
        """The Elasticsearch document: the indexed fields, nested records as objects, without
        the fields that are not set (None)."""
        return {name: _plain(value) for name in _DOCUMENT_FIELDS if (value := getattr(self, name)) is not None}

    def to_payload(self) -> str:
        """Every field as JSON, the working ones included: a dead letter's payload, to replay."""
        return json.dumps({field.name: _plain(getattr(self, field.name)) for field in _FIELDS},
                          ensure_ascii=False, default=str)


def tame_runs(text: str, max_run: int = NlpSettings.max_char_run,
              max_token: int = NlpSettings.max_token_chars) -> str:
    """Text the tokenizer reads in linear time: a run of one punctuation character is cut to
    `max_run` characters, and an unbroken token gets a space every `max_token` characters
    (spaCy strips prefixes and suffixes one character at a time, each a scan of the rest)."""
    text = re.sub(rf"([^\w\s])\1{{{max_run},}}", lambda m: m.group(1) * max_run, text)
    return re.sub(rf"(\S{{{max_token}}})(?=\S)", r"\1 ", text)


def _plain(value: Any) -> Any:
    """JSON-ready: nested records as dicts, tuples as lists."""
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, (Entity, TopicEvidence)):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    return value


_FIELDS = dataclasses.fields(Article)
_DOCUMENT_FIELDS = tuple(field.name for field in _FIELDS if field.name not in Article.NOT_INDEXED)
