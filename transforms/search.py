"""Searching the articles index: the query `newsbeam search` sends, and how a hit prints."""
from __future__ import annotations

import re
from typing import Any

from elasticsearch import Elasticsearch

_RELATIVE = re.compile(r"^(\d+)([smhdw])$")


def since_expression(since: str) -> str:
    """'7d' -> 'now-7d'; a date passes through (Elasticsearch validates it)."""
    match = _RELATIVE.match(since.strip())
    return f"now-{match.group(1)}{match.group(2)}" if match else since.strip()


def article_query(text: str, topic: str | None = None, entity: str | None = None,
                  since: str | None = None) -> dict[str, Any]:
    must: list[dict[str, Any]] = []
    if text.strip():
        must.append({"simple_query_string": {"query": text, "fields": ["title^3", "summary^2", "body", "lemmas"],
                                             "default_operator": "and"}})
    filters: list[dict[str, Any]] = []
    if topic:
        filters.append({"term": {"topics": {"value": topic, "case_insensitive": True}}})
    if entity:
        filters.append({"term": {"entities.name": {"value": entity, "case_insensitive": True}}})
    if since:
        filters.append({"range": {"published_at": {"gte": since_expression(since)}}})
    return {"bool": {"must": must or [{"match_all": {}}], "filter": filters}}


def search_articles(client: Elasticsearch, index: str, text: str, *, topic: str | None = None,
                    entity: str | None = None, since: str | None = None, limit: int = 10) -> dict[str, Any]:
    sort = ["_score", {"published_at": {"order": "desc", "missing": "_last"}}] if text.strip() else \
        [{"published_at": {"order": "desc", "missing": "_last"}}]
    return client.search(index=index, query=article_query(text, topic, entity, since), size=limit, sort=sort,
                         source_includes=["title", "source", "published_at", "topics", "url", "persons"],
                         track_total_hits=True)


def format_hit(hit: dict[str, Any]) -> str:
    doc = hit["_source"]
    date = (doc.get("published_at") or "")[:10] or "----------"
    topics = ", ".join(doc.get("topics") or []) or "-"
    return f"{date}  {doc.get('source', '')}  {doc.get('title', '')}\n            topics: {topics}\n            {doc.get('url', '')}"
