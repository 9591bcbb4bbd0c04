"""Offline tagging with exactly the pipeline's code: clean -> entities -> topics.
Used by `newsbeam tag` (evaluation, debugging, back-fills)."""
from __future__ import annotations

from typing import Any

from newsbeam.transforms.clean import clean_article
from newsbeam.transforms.entities import load_model, tag_entities
from newsbeam.transforms.settings import Settings
from newsbeam.transforms.topics import Taxonomy, tag_topics

OUTPUT_FIELDS = ("entities", "persons", "organizations", "locations", "topics", "topic_evidence")


class Tagger:
    def __init__(self, nlp, taxonomy: Taxonomy, settings: Settings):
        self._nlp = nlp
        self._taxonomy = taxonomy
        self._settings = settings

    @property
    def taxonomy(self) -> Taxonomy:
        return self._taxonomy

    @property
    def settings(self) -> Settings:
        return self._settings

    @classmethod
    def load(cls, settings: Settings) -> Tagger:
        return cls(load_model(settings.nlp.model, settings.nlp.gazetteer), Taxonomy.load(settings.topics_file), settings)

    def tag_articles(self, articles: list[dict[str, Any]], with_mentions: bool = False) -> list[dict[str, Any]]:
        """`with_mentions` keeps each entity mention's span (for `newsbeam eval entities`)."""
        cleaned = [clean_article(article) for article in articles]
        return [tag_topics(self._taxonomy, article)
                for article in tag_entities(self._nlp, cleaned, self._settings.nlp, with_mentions)]

    def tag_records(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`{"id", "title", "text"}` records, returned with the tag fields added."""
        articles = [{"title": r.get("title") or "", "content_html": r.get("text") or ""} for r in records]
        return [{**record, **{field: article[field] for field in OUTPUT_FIELDS}}
                for record, article in zip(records, self.tag_articles(articles))]
