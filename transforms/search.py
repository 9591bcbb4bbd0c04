"""Searching the articles index: the query `newsbeam search` sends, paging, highlighting, and
how a hit prints (as text or as JSON)."""
from __future__ import annotations

import re
from typing import Any

from elasticsearch import Elasticsearch

from newsbeam.transforms.settings import ConfigError

_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_SPACES = re.compile(r"\s+")
# Elasticsearch's default index.max_result_window: from + size beyond it is refused.
MAX_RESULT_WINDOW = 10_000
SOURCE_FIELDS = ["article_id", "title", "url", "source", "published_at", "topics", "persons", "organizations",
                 "locations"]
# Tags Elasticsearch puts around matched words; the text output swaps them for its own emphasis.
HIGHLIGHT_TAGS = ("<em>", "</em>")


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


def page_offset(page: int, size: int) -> int:
    """The `from` of a 1-based page of `size` hits; refuses pages Elasticsearch would refuse."""
    if page < 1 or size < 1:
        raise ConfigError("--page and --limit must be 1 or more")
    offset = (page - 1) * size
    if offset + size > MAX_RESULT_WINDOW:
        raise ConfigError(f"page {page} of {size} reaches past result {MAX_RESULT_WINDOW}, the deepest "
                          "Elasticsearch pages; narrow the search (--since, --topic, --entity)")
    return offset


def highlight_spec() -> dict[str, Any]:
    """The whole title with matches marked, and up to two short fragments of the text."""
    # max_analyzed_offset: a very long body is highlighted in its first 100k characters instead
    # of failing the whole search at the index's limit.
    return {"pre_tags": [HIGHLIGHT_TAGS[0]], "post_tags": [HIGHLIGHT_TAGS[1]], "max_analyzed_offset": 100_000,
            "fields": {"title": {"number_of_fragments": 0},
                       "summary": {"fragment_size": 160, "number_of_fragments": 1},
                       "body": {"fragment_size": 160, "number_of_fragments": 2}}}


def search_articles(client: Elasticsearch, index: str, text: str, *, topic: str | None = None,
                    entity: str | None = None, since: str | None = None, limit: int = 10,
                    page: int = 1) -> dict[str, Any]:
    newest_first = {"published_at": {"order": "desc", "missing": "_last"}}
    # article_id breaks ties, so the same search pages the same way every time.
    sort = ["_score", newest_first] if text.strip() else [newest_first]
    return client.search(index=index, query=article_query(text, topic, entity, since), size=limit,
                         from_=page_offset(page, limit), sort=[*sort, {"article_id": "asc"}],
                         source_includes=SOURCE_FIELDS, highlight=highlight_spec(), track_total_hits=True,
                         track_scores=bool(text.strip()))


def _fragments(hit: dict[str, Any]) -> list[str]:
    highlight = hit.get("highlight") or {}
    return [_SPACES.sub(" ", fragment).strip()
            for fragment in (highlight.get("body") or highlight.get("summary") or [])]


def format_hit(hit: dict[str, Any], emphasis: tuple[str, str] = ("*", "*")) -> str:
    """Three or four lines: date, source and title; topics; matched text; URL. Matched words are
    wrapped in `emphasis` (bold on a terminal)."""
    def emphasise(text: str) -> str:
        return text.replace(HIGHLIGHT_TAGS[0], emphasis[0]).replace(HIGHLIGHT_TAGS[1], emphasis[1])

    doc = hit["_source"]
    date = (doc.get("published_at") or "")[:10] or "----------"
    title = emphasise((hit.get("highlight") or {}).get("title", [doc.get("title", "")])[0])
    topics = ", ".join(doc.get("topics") or []) or "-"
    lines = [f"{date}  {doc.get('source', '')}  {title}", f"            topics: {topics}"]
    fragments = _fragments(hit)
    if fragments:
        lines.append(f"            …{emphasise(' … '.join(fragments))}…")
    lines.append(f"            {doc.get('url', '')}")
    return "\n".join(lines)


def results_json(response: dict[str, Any], page: int, limit: int) -> dict[str, Any]:
    """`newsbeam search --json`: one document with the total, the page, and per article its
    stored fields, score and highlighted fragments (matches in <em>)."""
    return {
        "total": response["hits"]["total"]["value"],
        "page": page,
        "page_size": limit,
        "articles": [{**hit["_source"], "score": hit.get("_score"), "highlight": hit.get("highlight") or {}}
                     for hit in response["hits"]["hits"]],
    }


def page_summary(shown: int, total: int, page: int, limit: int) -> str:
    """'11-20 of 57 matching article(s); next: --page 3'."""
    first = (page - 1) * limit + 1
    if not shown:
        return f"0 of {total} matching article(s)" + (f" (page {page} is past the end)" if total else "")
    summary = f"{first}-{first + shown - 1} of {total} matching article(s)"
    return summary + (f"; next: --page {page + 1}" if first + shown - 1 < total else "")
