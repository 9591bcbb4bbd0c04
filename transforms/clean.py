"""CleanText: feed HTML -> plain text (no tags, scripts or styles; entities decoded;
whitespace and unicode normalised)."""
from __future__ import annotations

import re
import unicodedata
from typing import Any

import apache_beam as beam
from selectolax.lexbor import LexborHTMLParser

from newsbeam.transforms.deadletter import DEAD, SafeMapFn

_DROP_TAGS = ["script", "style", "noscript", "iframe", "svg", "template", "object", "embed", "head"]
# Block-level boundaries become line breaks so words of adjacent paragraphs never fuse.
_BLOCK_END = re.compile(r"(?i)(<br\s*/?>|</(?:p|div|li|h[1-6]|tr|blockquote|section|article|pre|ul|ol|table)>)")
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")
_CONTROL = dict.fromkeys(c for c in range(32) if c not in (9, 10))


def html_to_text(html: str) -> str:
    if not html:
        return ""
    if "<" not in html and "&" not in html:
        text = html
    else:
        tree = LexborHTMLParser(_BLOCK_END.sub(r"\1\n", html))
        tree.strip_tags(_DROP_TAGS)
        root = tree.body or tree.root
        text = root.text(separator="", strip=False) if root else ""
    text = unicodedata.normalize("NFKC", text).translate(_CONTROL).replace("\u00ad", "")
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_article(article: dict[str, Any]) -> dict[str, Any]:
    """Adds `title`, `summary` and `body` as plain text; drops the raw HTML."""
    cleaned = dict(article)
    summary_html = cleaned.pop("summary_html", "")
    content_html = cleaned.pop("content_html", "")
    cleaned["title"] = html_to_text(cleaned.get("title", "")).replace("\n", " ")
    cleaned["summary"] = html_to_text(summary_html)
    body = html_to_text(content_html)
    cleaned["body"] = body if len(body) >= len(cleaned["summary"]) else cleaned["summary"]
    return cleaned


class CleanText(beam.PTransform):
    """Articles with plain-text title/summary/body; failures on the `dead` output."""

    def expand(self, articles):
        return articles | "HtmlToText" >> beam.FlatMap(SafeMapFn(clean_article, "clean")).with_outputs(
            DEAD, main="cleaned")
