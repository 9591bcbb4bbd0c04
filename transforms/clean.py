"""CleanText: feed HTML -> plain text (no tags, scripts or styles; entities decoded;
whitespace and unicode normalised). HTML nested deeper than `max_depth` is read as plain text
without the HTML parser, whose cost grows with the depth of the tree."""
from __future__ import annotations

import dataclasses
import functools
import html as html_lib
import re
import unicodedata

import apache_beam as beam
from selectolax.lexbor import LexborHTMLParser

from newsbeam.transforms.article import Article
from newsbeam.transforms.deadletter import DEAD, SafeMapFn

_DROP_TAGS = ["script", "style", "noscript", "iframe", "svg", "template", "object", "embed", "head"]
# Block-level boundaries become line breaks so words of adjacent paragraphs never fuse.
_BLOCK_END = re.compile(r"(?i)(<br\s*/?>|</(?:p|div|li|h[1-6]|tr|blockquote|section|article|pre|ul|ol|table)>)")
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")
_CONTROL = dict.fromkeys(c for c in range(32) if c not in (9, 10))
_TAG = re.compile(r"<(/?)([a-zA-Z][\w:-]*)[^>]*?(/?)>")
_ANY_TAG = re.compile(r"<[^>]*>")
_DROPPED = re.compile(rf"(?is)<({'|'.join(_DROP_TAGS)})\b.*?</\1\s*>")
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
                   "track", "wbr"})
MAX_DEPTH = 256


def deeper_than(html: str, limit: int) -> bool:
    """True when elements open inside each other more than `limit` deep (a cheap scan of tags)."""
    depth = 0
    for match in _TAG.finditer(html):  # lazily: a hostile tree is refused at its 257th level
        closing, name, self_closing = match.groups()
        if closing:
            depth = max(0, depth - 1)
        elif not self_closing and name.lower() not in _VOID:
            depth += 1
            if depth > limit:
                return True
    return False


def html_to_text(html: str, max_depth: int = MAX_DEPTH) -> str:
    if not html:
        return ""
    if "<" not in html and "&" not in html:
        text = html
    elif deeper_than(html, max_depth):
        text = html_lib.unescape(_ANY_TAG.sub(" ", _DROPPED.sub(" ", html)))
    else:
        tree = LexborHTMLParser(_BLOCK_END.sub(r"\1\n", html))
        tree.strip_tags(_DROP_TAGS)
        root = tree.body or tree.root
        text = root.text(separator="", strip=False) if root else ""
    text = unicodedata.normalize("NFKC", text).translate(_CONTROL).replace("\u00ad", "")
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_article(article: Article, max_depth: int = MAX_DEPTH) -> Article:
    """The article with `title`, `summary` and `body` as plain text, and without the raw HTML."""
    summary = html_to_text(article.summary_html, max_depth)
    body = html_to_text(article.content_html, max_depth)
    return dataclasses.replace(article, title=html_to_text(article.title, max_depth).replace("\n", " "),
                               summary=summary, body=body if len(body) >= len(summary) else summary,
                               summary_html="", content_html="")


class CleanText(beam.PTransform):
    """Articles with plain-text title/summary/body; failures on the `dead` output."""

    def __init__(self, max_depth: int = MAX_DEPTH):
        super().__init__()
        self._max_depth = max_depth

    def expand(self, articles):
        clean = functools.partial(clean_article, max_depth=self._max_depth)
        return articles | "HtmlToText" >> beam.FlatMap(SafeMapFn(clean, "clean")).with_outputs(
            DEAD, main="cleaned")
