"""The enrich chain, defined once: the ordered stages between parsing and alerting.

`ENRICH_CHAIN` lists each stage with its Beam transform (what the pipeline applies, see
newsbeam.pipeline.build `enrich`) and, for the stages that need neither Elasticsearch nor the
network, the function `newsbeam tag` runs on a list of articles: the same function the
transform runs per element or per batch. So `Tagger` (`newsbeam tag`, `newsbeam eval`) is the
pipeline's code: clean -> language routing -> entities -> topics.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import apache_beam as beam

from newsbeam.transforms.article import Article
from newsbeam.transforms.clean import CleanText, clean_article
from newsbeam.transforms.dedupe import DedupeArticles
from newsbeam.transforms.entities import TagEntities, load_model, tag_entities
from newsbeam.transforms.fulltext import FetchFullText
from newsbeam.transforms.language import DetectLanguage, load_identifier, model_languages, route_language
from newsbeam.transforms.neardup import LinkStories
from newsbeam.transforms.settings import Settings
from newsbeam.transforms.topics import TagTopics, Taxonomy, tag_topics

OUTPUT_FIELDS = ("language", "nlp_skipped", "entities", "persons", "organizations", "locations", "topics",
                 "topic_evidence")

Articles = list[Article]


@dataclasses.dataclass(frozen=True)
class EnrichStage:
    """One step of the chain. `main`: the main output's tag when the transform also has a `dead`
    output. `offline`: what `Tagger` runs for it (None: the step needs Elasticsearch or the
    network). `applies`: whether the settings use the step at all."""

    name: str
    transform: Callable[[Settings, Taxonomy], beam.PTransform]
    main: str | None = None
    offline: Callable[[Tagger, Articles, bool], Articles] | None = None
    applies: Callable[[Settings], bool] = lambda settings: True


ENRICH_CHAIN: tuple[EnrichStage, ...] = (
    EnrichStage("DedupeArticles", lambda s, t: DedupeArticles(s.elasticsearch, s.dedupe.retention,
                                                                   s.sizes.dedupe_batch)),
    EnrichStage("FetchFullText", lambda s, t: FetchFullText(s.feeds, s.fetch, s.sizes.lookup_batch),
                applies=lambda s: any(feed.full_text for feed in s.feeds)),
    EnrichStage("CleanText", lambda s, t: CleanText(s.fetch.max_html_depth), main="cleaned",
                offline=lambda tagger, articles, _: [clean_article(article, tagger.settings.fetch.max_html_depth)
                                                     for article in articles]),
    EnrichStage("LinkStories", lambda s, t: LinkStories(s.elasticsearch, s.dedupe, s.sizes.lookup_batch)),
    # One stream through NER (marked, not split): on the FnApiRunner a Flatten waits for the end.
    EnrichStage("DetectLanguage", lambda s, t: DetectLanguage(model_languages(s.nlp.model)),
                offline=lambda tagger, articles, _: [
                    route_language(tagger.identifier, tagger.languages, article) for article in articles]),
    EnrichStage("TagEntities", lambda s, t: TagEntities(s.nlp, s.sizes), main="tagged",
                offline=lambda tagger, articles, with_mentions: tag_entities(
                    tagger.nlp, articles, tagger.settings.nlp, with_mentions)),
    EnrichStage("TagTopics", lambda s, t: TagTopics(t), main="tagged",
                offline=lambda tagger, articles, _: [tag_topics(tagger.taxonomy, article) for article in articles]),
)


class Tagger:
    """The offline part of `ENRICH_CHAIN` on lists of articles, with the models loaded once."""

    def __init__(self, nlp, taxonomy: Taxonomy, settings: Settings):
        self.nlp = nlp
        self.taxonomy = taxonomy
        self.settings = settings
        self.languages = model_languages(settings.nlp.model)
        self.identifier = load_identifier()

    @classmethod
    def load(cls, settings: Settings) -> Tagger:
        return cls(load_model(settings.nlp.model, settings.nlp.gazetteer), Taxonomy.load(settings.topics_file), settings)

    def tag_articles(self, articles: Articles, with_mentions: bool = False) -> Articles:
        """`with_mentions` keeps each entity mention's span (for `newsbeam eval entities`)."""
        for stage in ENRICH_CHAIN:
            if stage.offline is not None:
                articles = stage.offline(self, articles, with_mentions)
        return articles

    def tag_records(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`{"id", "title", "text"}` records, returned with the tag fields added (as JSON values)."""
        articles = [Article(title=r.get("title") or "", content_html=r.get("text") or "") for r in records]
        documents = (article.to_document() for article in self.tag_articles(articles))
        return [{**record, **{field: document.get(field) for field in OUTPUT_FIELDS}}
                for record, document in zip(records, documents)]
