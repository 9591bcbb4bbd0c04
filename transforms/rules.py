"""Alert rules: the rule model, the query language, and its two back-ends.

The query language (documented for users in docs/alerts.md):

    ventilator AND entity:Russia
    "medical equipment" OR ventilator NOT topic:sport
    (mask OR ventilator) AND (location:Italy OR location:Spain) AND source:reuters.com

* A word or a "quoted phrase" matches the article's lemmas (`lemmas`: the space-joined,
  lower-case spaCy lemmas that TagEntities writes). Query text is lemmatized with the same
  spaCy model, so "ventilators" finds "ventilator" and "shipped" finds "ships". Because a
  lone word has no context to tag it by, its plain lower-case form is accepted as well
  ("shipping" the noun and "ship" the verb are different lemmas; "data" lemmatizes to
  "datum"): a word matches when either form occurs, a phrase when either form occurs as
  consecutive lemmas.
* `AND`, `OR`, `NOT` (upper case only; a lower-case "and" is a word), parentheses.
  Precedence NOT > AND > OR; terms side by side are ANDed.
* Field filters, case-insensitive: `topic:` (a topic name), `entity:` (an exact canonical
  entity name: `entity:"Vladimir Putin"`), `person:`, `org:`, `location:` (a whole word or
  words of the name: `person:Putin` finds "Vladimir Putin"), `source:` (the feed's host or
  a parent domain: `source:reuters.com` finds feeds.reuters.com), `language:` (`en`).
* Limits (MAX_NESTING, MAX_TERMS, MAX_QUERY_CHARS): up to 10 levels of '(' and NOT, 100
  terms with the rule's filters, 4000 characters; a rule beyond them is refused when saved.

One AST, two back-ends that must agree: `matches()` over an enriched article dict (the
stream) and `to_elasticsearch()` (back-fill over the articles index). Both see lemmas the
way Elasticsearch's `standard` analyzer tokenizes them; `analyze()` reproduces it.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

from newsbeam.transforms.article import Article
from newsbeam.transforms.settings import ConfigError

# Query field -> article field. Aliases map to the same article field.
FIELDS: dict[str, str] = {
    "topic": "topics", "entity": "entities", "person": "persons", "org": "organizations",
    "organization": "organizations", "location": "locations", "source": "source",
    "language": "language", "lang": "language",
}
# Names matched word-wise (person:Putin -> "Vladimir Putin"), not as the whole value.
_WORDWISE = frozenset({"persons", "organizations", "locations"})
_OPERATORS = frozenset({"AND", "OR", "NOT"})
_QUOTES = frozenset('"“”')  # typographic quotes pasted from documents count too
_CLOSING_QUOTES = frozenset('"”')
_WORD_ENDS = _QUOTES | {"(", ")"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_DURATION = re.compile(r"^(\d+)\s*([smhd]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Limits on a query, so that whatever the parser accepts runs in both back-ends: each level
# of '(' or NOT costs the Elasticsearch query up to two levels of bool (its default
# indices.query.bool.max_nested_depth is 30), and terms become clauses.
MAX_NESTING = 10
MAX_TERMS = 100  # words, phrases and field:value filters, the rule's --topic/--source/--language included
MAX_QUERY_CHARS = 4000

# Elasticsearch's `standard` tokenizer (Unicode word boundaries, UAX #29), as far as news
# lemmas need it: letters, digits and combining marks run together; '.', apostrophes and ':'
# join letters ("u.s", "o'brien"); '.', ',', ';' and apostrophes join digits ("1,000",
# "3.5"); a Han or Hiragana character, or an emoji, is a token of its own.
# tests/test_rules.py checks it against Elasticsearch's _analyze.
_HAN = "\u3040-\u309f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_EMOJI = ("\u00a9\u00ae\u203c\u2049\u2122\u2139\u2194-\u21aa\u231a-\u23ff\u24c2\u25aa\u25ab\u25b6\u25c0\u25fb-\u25fe"
          "\u2600-\u27bf\u2934\u2935\u2b05-\u2b55\u3030\u303d\u3297\u3299\U0001f000-\U0001f1e5\U0001f200-\U0001faff")
_WORD = rf"(?:[^\W{_HAN}]|[\u0300-\u036f])"
_APOSTROPHES = "'’‘"
_TOKEN = re.compile(
    rf"[{_HAN}{_EMOJI}]|{_WORD}+(?:(?:(?<=[^\W\d_])[.:{_APOSTROPHES}](?=[^\W\d_{_HAN}])"
    rf"|(?<=\d)[.,;{_APOSTROPHES}](?=\d)){_WORD}+)*")


def analyze(text: str) -> tuple[str, ...]:
    """Tokens of `text` as the `lemmas` field's standard analyzer produces them."""
    if not text.isascii():  # '½', '²': numbers to Python's \w, not to Unicode word boundaries
        text = "".join(" " if c.isalnum() and not (c.isalpha() or c.isdecimal()) else c for c in text)
    return tuple(token.lower() for token in _TOKEN.findall(text))


class RuleError(ConfigError):
    """A rule cannot be saved: bad name, target, digest or query."""


class RuleSyntaxError(RuleError):
    """A malformed query; `position` is the 0-based offset of the problem."""

    def __init__(self, problem: str, query: str, position: int):
        self.problem, self.query, self.position = problem, query, position
        line = query.replace("\n", " ")
        super().__init__(f"query: {problem} at position {position + 1}\n  {line}\n  {' ' * position}^")


# --- the AST -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Words:
    """A word or a quoted phrase; `forms` (alternative token sequences) are filled in by
    `resolve()` with the query lemmatizer, and both back-ends need them."""
    text: str
    quoted: bool = False
    forms: tuple[tuple[str, ...], ...] = ()

    def label(self) -> str:
        return f'"{self.text}"' if self.quoted else self.text


@dataclasses.dataclass(frozen=True)
class Field:
    field: str  # the article field, a value of FIELDS
    value: str
    written: str = ""  # the field name as the user wrote it, for messages

    def label(self) -> str:
        value = f'"{self.value}"' if " " in self.value else self.value
        return f"{self.written or self.field}:{value}"


@dataclasses.dataclass(frozen=True)
class And:
    children: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Not:
    child: Node


Node = Words | Field | And | Or | Not


# --- the parser --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Token:
    kind: str  # '(' ')' AND OR NOT WORD PHRASE FIELD
    text: str
    position: int
    field: str = ""
    written: str = ""


def _read_phrase(query: str, start: int) -> tuple[str, int]:
    """The text inside the quote at `start` and the offset after the closing quote."""
    close = next((i for i in range(start + 1, len(query)) if query[i] in _CLOSING_QUOTES), -1)
    if close < 0:
        raise RuleSyntaxError("this quote is never closed", query, start)
    return query[start + 1:close], close + 1


def _tokens(query: str) -> list[_Token]:
    tokens, i = [], 0
    while i < len(query):
        char = query[i]
        if char.isspace():
            i += 1
        elif char in "()":
            tokens.append(_Token(char, char, i))
            i += 1
        elif char in _QUOTES:
            text, end = _read_phrase(query, i)
            if not text.strip():
                raise RuleSyntaxError("empty phrase", query, i)
            tokens.append(_Token("PHRASE", text.strip(), i))
            i = end
        else:
            end = i
            while end < len(query) and not query[end].isspace() and query[end] not in _WORD_ENDS:
                end += 1
            word = query[i:end]
            name, colon, value = word.partition(":")
            if colon and name.isalpha():
                field = FIELDS.get(name.lower())
                if field is None:
                    raise RuleSyntaxError(f"unknown field {name!r} (known: {', '.join(sorted(FIELDS))}; "
                                          f"quote the word to search for it)", query, i)
                if not value:
                    if end < len(query) and query[end] in _QUOTES:
                        value, end = _read_phrase(query, end)
                    if not value.strip():
                        raise RuleSyntaxError(f"{name}: needs a value, e.g. {name}:\"…\"", query, i)
                tokens.append(_Token("FIELD", value.strip(), i, field=field, written=name.lower()))
            elif word in _OPERATORS:
                tokens.append(_Token(word, word, i))
            elif word.startswith("-") and len(word) > 1:
                raise RuleSyntaxError(f"use NOT {word[1:]} to exclude a word ('-' is not an operator)", query, i)
            else:
                tokens.append(_Token("WORD", word, i))
            i = end
    return tokens


class _Parser:
    """Recursive descent: or := and (OR and)*; and := unary ([AND] unary)*;
    unary := NOT unary | '(' or ')' | WORD | PHRASE | FIELD."""

    _STARTS = frozenset({"(", "NOT", "WORD", "PHRASE", "FIELD"})
    _JOINED = _STARTS | {"AND"}

    def __init__(self, query: str):
        self._query = query
        if len(query) > MAX_QUERY_CHARS:
            raise RuleSyntaxError(f"longer than {MAX_QUERY_CHARS} characters", query, MAX_QUERY_CHARS)
        self._tokens = _tokens(query)
        self._i = 0
        self._nesting = 0

    def parse(self) -> Node:
        if not self._tokens:
            raise RuleSyntaxError("empty query", self._query, 0)
        terms = [token for token in self._tokens if token.kind in ("WORD", "PHRASE", "FIELD")]
        if len(terms) > MAX_TERMS:
            raise RuleSyntaxError(f"more than {MAX_TERMS} terms", self._query, terms[MAX_TERMS].position)
        node = self._or()
        if self._i < len(self._tokens):
            token = self._tokens[self._i]
            problem = "')' without a matching '('" if token.kind == ")" else f"unexpected {token.text!r}"
            raise RuleSyntaxError(problem, self._query, token.position)
        return node

    def _peek(self) -> _Token | None:
        return self._tokens[self._i] if self._i < len(self._tokens) else None

    def _operand_after(self, operator: _Token) -> None:
        token = self._peek()
        if token is None or token.kind not in self._STARTS:
            where = token.position if token else len(self._query)
            raise RuleSyntaxError(f"{operator.text!r} needs a word, a \"phrase\", field:value or '(' after it",
                                  self._query, where)

    def _or(self) -> Node:
        children = [self._and()]
        while (token := self._peek()) is not None and token.kind == "OR":
            self._i += 1
            self._operand_after(token)
            children.append(self._and())
        return children[0] if len(children) == 1 else Or(tuple(children))

    def _and(self) -> Node:
        children = [self._unary()]
        while (token := self._peek()) is not None and token.kind in self._JOINED:
            if token.kind == "AND":
                self._i += 1
                self._operand_after(token)
            children.append(self._unary())
        return children[0] if len(children) == 1 else And(tuple(children))

    def _unary(self) -> Node:
        token = self._peek()
        if token is None:
            raise RuleSyntaxError("a term is missing", self._query, len(self._query))
        if token.kind in ("AND", "OR"):
            raise RuleSyntaxError(f"{token.text!r} needs a term before it", self._query, token.position)
        if token.kind == ")":
            raise RuleSyntaxError("')' without a matching '('", self._query, token.position)
        self._i += 1
        if token.kind in ("NOT", "("):
            self._nesting += 1
            if self._nesting > MAX_NESTING:
                raise RuleSyntaxError(f"nested too deeply (at most {MAX_NESTING} levels of '(' and NOT)",
                                      self._query, token.position)
            node = self._negation(token) if token.kind == "NOT" else self._group(token)
            self._nesting -= 1
            return node
        if token.kind == "FIELD":
            return Field(token.field, token.text, token.written)
        if not analyze(token.text):
            raise RuleSyntaxError(f"{token.text!r} has no letters or digits to match", self._query, token.position)
        return Words(token.text, quoted=token.kind == "PHRASE")

    def _negation(self, token: _Token) -> Node:
        self._operand_after(token)
        return Not(self._unary())

    def _group(self, token: _Token) -> Node:
        if (inner := self._peek()) is not None and inner.kind == ")":
            raise RuleSyntaxError("empty parentheses", self._query, token.position)
        self._operand_after(token)
        node = self._or()
        closing = self._peek()
        if closing is None or closing.kind != ")":
            raise RuleSyntaxError("this '(' is never closed", self._query, token.position)
        self._i += 1
        return node


def parse_query(query: str) -> Node:
    """Parses a rule query; raises RuleSyntaxError pointing at the problem."""
    return _Parser(query).parse()


# --- lemmatizing the query ---------------------------------------------------------------

Lemmatizer = Callable[[str], tuple[str, ...]]


def spacy_lemmatizer(nlp) -> Lemmatizer:
    """Query text -> lemma tokens, exactly as tag_entities builds an article's `lemmas`."""
    cache: dict[str, tuple[str, ...]] = {}

    def lemmatize(text: str) -> tuple[str, ...]:
        if text not in cache:
            doc = nlp(text)
            cache[text] = analyze(" ".join(t.lemma_.lower() for t in doc if not (t.is_space or t.is_punct)))
        return cache[text]
    return lemmatize


def resolve(node: Node, lemmatize: Lemmatizer) -> Node:
    """Fills in each Words node's forms: its lemmas and its plain lower-case tokens."""
    if isinstance(node, Words):
        forms = tuple(dict.fromkeys(f for f in (lemmatize(node.text), analyze(node.text)) if f))
        return dataclasses.replace(node, forms=forms)
    if isinstance(node, (And, Or)):
        return type(node)(tuple(resolve(child, lemmatize) for child in node.children))
    if isinstance(node, Not):
        return Not(resolve(node.child, lemmatize))
    return node


# --- back-end 1: an enriched article in the stream ---------------------------------------

class ArticleView:
    """What rules look at in one article, computed once for all rules."""

    def __init__(self, article: Article):
        self.tokens = analyze(article.lemmas)
        self.positions: dict[str, list[int]] = {}
        for i, token in enumerate(self.tokens):
            self.positions.setdefault(token, []).append(i)
        self.values: dict[str, list[str]] = {
            "entities": [entity.name.lower() for entity in article.entities if entity.name],
            **{f: [v.lower() for v in getattr(article, f) if v]
               for f in ("topics", "persons", "organizations", "locations")},
            "source": [article.source.lower()] if article.source else [],
            "language": [article.language.lower()] if article.language else [],
        }

    def has_sequence(self, form: tuple[str, ...]) -> bool:
        n = len(form)
        return any(self.tokens[i:i + n] == form for i in self.positions.get(form[0], ()))


def _field_hit(field: str, wanted: str, value: str) -> bool:
    if field in _WORDWISE:
        return value == wanted or value.startswith(wanted + " ") or value.endswith(" " + wanted) \
            or f" {wanted} " in value
    if field == "source":
        return value == wanted or value.endswith("." + wanted)
    return value == wanted


def _evaluate(node: Node, view: ArticleView, hits: list[Node]) -> bool:
    if isinstance(node, Words):
        if not node.forms:
            raise ValueError(f"query term {node.text!r} was not resolved (call resolve() first)")
        matched = any(view.has_sequence(form) for form in node.forms)
    elif isinstance(node, Field):
        wanted = node.value.lower()
        matched = any(_field_hit(node.field, wanted, value) for value in view.values[node.field])
    elif isinstance(node, And):
        # No short cut: every satisfied term is reported (and highlighted).
        matched = all([_evaluate(child, view, hits) for child in node.children])
    elif isinstance(node, Or):
        matched = any([_evaluate(child, view, hits) for child in node.children])
    else:
        return not _evaluate(node.child, view, [])  # what a NOT saw is not what matched
    if matched and isinstance(node, (Words, Field)):
        hits.append(node)
    return matched


def match(node: Node, article: Article | ArticleView) -> list[Node] | None:
    """The query's satisfied terms when the article matches, else None."""
    view = article if isinstance(article, ArticleView) else ArticleView(article)
    hits: list[Node] = []
    return list(dict.fromkeys(hits)) if _evaluate(node, view, hits) else None


# --- back-end 2: the articles index ------------------------------------------------------

def _wildcard_escape(value: str) -> str:
    return re.sub(r"([\\*?])", r"\\\1", value)


def _field_query(node: Field) -> dict[str, Any]:
    field = "entities.name" if node.field == "entities" else node.field
    exact = {"term": {field: {"value": node.value, "case_insensitive": True}}}
    if node.field in _WORDWISE:
        value = _wildcard_escape(node.value)
        patterns = (f"{value} *", f"* {value}", f"* {value} *")
    elif node.field == "source":
        patterns = (f"*.{_wildcard_escape(node.value)}",)
    else:
        return exact
    wildcards = [{"wildcard": {field: {"value": p, "case_insensitive": True}}} for p in patterns]
    return {"bool": {"should": [exact, *wildcards], "minimum_should_match": 1}}


def to_elasticsearch(node: Node) -> dict[str, Any]:
    """The Elasticsearch query (filter context) that selects exactly the articles
    `match()` accepts."""
    if isinstance(node, Words):
        if not node.forms:
            raise ValueError(f"query term {node.text!r} was not resolved (call resolve() first)")
        phrases = [{"match_phrase": {"lemmas": " ".join(form)}} for form in node.forms]
        return phrases[0] if len(phrases) == 1 else {"bool": {"should": phrases, "minimum_should_match": 1}}
    if isinstance(node, Field):
        return _field_query(node)
    if isinstance(node, And):
        return {"bool": {"filter": [to_elasticsearch(child) for child in node.children]}}
    if isinstance(node, Or):
        return {"bool": {"should": [to_elasticsearch(child) for child in node.children], "minimum_should_match": 1}}
    return {"bool": {"must_not": [to_elasticsearch(node.child)]}}


# --- the rule ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    """Where a rule's alerts go: log, stdout, webhook:URL, slack:URL, email:ADDRESS[,ADDRESS]."""
    kind: str
    address: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.address}" if self.address else self.kind


def _described(text: str) -> str:
    """A target for an error message: its kind and host, never its path (a webhook's token) or
    its recipients."""
    kind, _, address = text.strip().partition(":")
    host = re.match(r"^\w+://([^/\s?#]*)", address)
    if host:
        return f"{kind}:{host.group(1).rpartition('@')[2]}/…"
    return f"{kind}:…" if address else kind


def parse_target(text: str) -> Target:
    kind, _, address = text.strip().partition(":")
    kind = kind.lower()
    if kind in ("log", "stdout") and not address:
        return Target(kind)
    if kind in ("webhook", "slack"):
        if not re.match(r"^https?://[^\s/]+", address):
            raise RuleError(f"target {_described(text)!r}: {kind}: needs an http(s) URL, e.g. {kind}:https://host/path")
        return Target(kind, address)
    if kind == "email":
        addresses = [a.strip() for a in address.split(",") if a.strip()]
        if not addresses or not all(re.match(r"^[^@\s,<>]+@[^@\s,<>]+$", a) for a in addresses):
            raise RuleError(f"target {_described(text)!r}: email: needs one or more addresses, e.g. email:desk@example.org")
        return Target(kind, ",".join(addresses))
    raise RuleError(f"target {_described(text)!r}: use log, stdout, webhook:URL, slack:URL or email:ADDRESS")


def parse_duration(text: str | int | float) -> int:
    """'15m' -> 900; a bare number is seconds; '0' turns a digest off."""
    match_ = _DURATION.match(str(text).strip().lower())
    if not match_:
        raise RuleError(f"duration {text!r}: use a number with s, m, h or d, e.g. 15m")
    return int(match_.group(1)) * _DURATION_UNITS[match_.group(2)]


def format_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _strings(values: Any, where: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in values):
        raise RuleError(f"{where} must be a list of non-empty strings")
    return tuple(v.strip() for v in values)


# --- volume rule kinds (docs/volume-alerts.md; evaluated by transforms/volume.py) ----------

VOLUME_KINDS = ("spike", "first_mention", "spread", "silence")
TIME_FIELDS = ("published_at", "indexed_at")
# first_mention `field` -> the article field whose values are watched; `term` watches the query.
NEW_VALUE_FIELDS = {"person": "persons", "org": "organizations", "location": "locations",
                    "entity": "entities.name", "topic": "topics", "term": ""}
_DIRECTIONS = ("up", "down", "both")


def _ratio(value: Any, where: str) -> float:
    text = str(value).strip().lower().removesuffix("x")
    try:
        ratio = float(text)
    except ValueError:
        raise RuleError(f"{where}: ratio {value!r}: use a number above 1, e.g. 3x") from None
    if not ratio > 1:
        raise RuleError(f"{where}: ratio {value!r} must be above 1")
    return ratio


def _count(value: Any, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RuleError(f"{where}: {name} must be a whole number of at least 1, not {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
    """A volume rule kind: counts of a rule's matches over closed windows of `window`
    seconds of `time_field`, instead of one alert per matching article."""
    kind: str
    window: int = 3600
    time_field: str = "published_at"
    settle: int = 1800  # a window is evaluated this long after it ends; later arrivals are not counted
    cooldown: int = 0  # after a firing the same rule (and key) stays quiet this long; 0 = 6 windows, at least 1
    limit: int = 20  # evidence articles kept in the alert
    feeds: tuple[str, ...] = ()
    # spike
    ratio: float = 3.0
    baseline: int = 7 * 86400
    min_count: int = 5
    direction: str = "up"
    # first_mention
    field: str = "entity"
    unseen: int = 30 * 86400
    min_sources: int = 2
    # spread (min_sources too)
    # silence
    after: int = 0  # 0 = learnt: `factor` times the longest gap within `baseline`
    factor: float = 2.0

    def __post_init__(self) -> None:
        where = f"{self.kind} rule"
        if self.kind not in VOLUME_KINDS:
            raise RuleError(f"unknown rule kind {self.kind!r} (known: {', '.join(VOLUME_KINDS)})")
        if self.window < 60 or self.window % 60:
            raise RuleError(f"{where}: window {format_duration(self.window)} must be whole minutes, at least 1m")
        if self.time_field not in TIME_FIELDS:
            raise RuleError(f"{where}: by must be one of {', '.join(TIME_FIELDS)}")
        if self.direction not in _DIRECTIONS:
            raise RuleError(f"{where}: direction must be one of {', '.join(_DIRECTIONS)}")
        if self.field not in NEW_VALUE_FIELDS:
            raise RuleError(f"{where}: field must be one of {', '.join(NEW_VALUE_FIELDS)}")
        if self.kind == "spike" and (self.baseline < self.window or self.baseline % self.window):
            raise RuleError(f"{where}: baseline must be a whole number of windows")
        if self.kind == "first_mention" and self.unseen < 2 * self.window:
            raise RuleError(f"{where}: unseen must be at least two windows")
        if self.settle < 0 or self.cooldown < 0 or self.after < 0 or not self.factor > 0:
            raise RuleError(f"{where}: settle, cooldown, after and factor must not be negative")
        _count(self.min_count, where, "min")
        _count(self.min_sources, where, "sources")
        _count(self.limit, where, "limit")
        object.__setattr__(self, "cooldown", max(self.cooldown or 6 * self.window, self.window))

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"window": format_duration(self.window), "by": self.time_field,
                               "settle": format_duration(self.settle),
                               "cooldown": format_duration(self.cooldown), "limit": self.limit}
        if self.feeds:
            doc["feeds"] = list(self.feeds)
        if self.kind == "spike":
            doc.update(ratio=f"{self.ratio:g}x", baseline=format_duration(self.baseline), min=self.min_count,
                       direction=self.direction)
        elif self.kind == "first_mention":
            doc.update(field=self.field, unseen=format_duration(self.unseen), min=self.min_count,
                       sources=self.min_sources)
        elif self.kind == "spread":
            doc.update(sources=self.min_sources)
        else:
            doc.update(after=format_duration(self.after) if self.after else "auto", factor=self.factor,
                       baseline=format_duration(self.baseline))
        return doc

    @classmethod
    def from_doc(cls, kind: str, doc: Any) -> VolumeSpec:
        """A spec from a rule's `spike:`/`first_mention:`/`spread:`/`silence:` mapping."""
        where = kind
        if not isinstance(doc, dict):
            raise RuleError(f"{where}: expected a mapping")
        known = {"window", "by", "settle", "cooldown", "limit", "feeds", "feed"} | {
            "spike": {"ratio", "baseline", "min", "direction"},
            "first_mention": {"field", "unseen", "min", "sources"},
            "spread": {"sources"},
            "silence": {"after", "factor", "baseline"}}.get(kind, set())
        unknown = sorted(set(doc) - known)
        if unknown:
            raise RuleError(f"{where}: unknown key(s) {', '.join(unknown)}")
        values: dict[str, Any] = {"kind": kind, **({"min_count": 3} if kind == "first_mention" else {})}
        for key, name in (("window", "window"), ("settle", "settle"), ("cooldown", "cooldown"),
                          ("baseline", "baseline"), ("unseen", "unseen")):
            if key in doc:
                values[name] = parse_duration(doc[key])
        if "after" in doc and str(doc["after"]).strip().lower() != "auto":
            values["after"] = parse_duration(doc["after"])
            if not values["after"]:
                raise RuleError(f"{where}: after must be a duration or auto")
        if kind == "spread" and "sources" not in doc:
            raise RuleError(f"{where}: needs sources (how many distinct sources make a story spread)")
        if "ratio" in doc:
            values["ratio"] = _ratio(doc["ratio"], where)
        if "factor" in doc:
            try:
                values["factor"] = float(doc["factor"])
            except (TypeError, ValueError):
                raise RuleError(f"{where}: factor must be a number") from None
        for key, name in (("min", "min_count"), ("sources", "min_sources"), ("limit", "limit")):
            if key in doc:
                values[name] = _count(doc[key], where, key)
        for key, name in (("by", "time_field"), ("direction", "direction"), ("field", "field")):
            if key in doc:
                values[name] = str(doc[key]).strip().lower()
        values["feeds"] = _strings(doc.get("feeds", doc.get("feed")), f"{where}: feeds")
        try:
            return cls(**values)
        except RuleError as err:
            raise RuleError(f"{where}: {str(err).split(': ', 1)[-1]}") from None


@dataclasses.dataclass(frozen=True)
class Rule:
    """A saved watch: a query plus optional filters (any of `topics`, any of `sources`,
    any of `languages`), delivery targets and an optional digest window."""
    name: str
    query: str
    topics: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    notify: tuple[str, ...] = ("log",)
    digest_seconds: int = 0
    enabled: bool = True
    volume: VolumeSpec | None = None  # a volume rule kind; None = an alert per matching article

    def __post_init__(self) -> None:
        if not _NAME.match(self.name or ""):
            raise RuleError(f"rule name {self.name!r}: use letters, digits, '.', '_' or '-' (up to 100)")
        if self.digest_seconds < 0:
            raise RuleError(f"rule {self.name}: digest must not be negative")
        if not self.notify:
            raise RuleError(f"rule {self.name}: needs at least one target (--notify)")
        # Stored in canonical form, each target once: the outbox keys deliveries by it.
        object.__setattr__(self, "notify", tuple(dict.fromkeys(str(parse_target(t)) for t in self.notify)))
        tree = self.tree()  # raises RuleSyntaxError for a malformed query
        filters = len(self.topics) + len(self.sources) + len(self.languages)
        if filters and count_terms(tree) > MAX_TERMS:
            raise RuleError(f"rule {self.name}: more than {MAX_TERMS} terms with its topic, source and "
                            "language filters")

    def targets(self) -> tuple[Target, ...]:
        return tuple(parse_target(t) for t in self.notify)

    def tree(self) -> Node:
        """The query ANDed with the filters, unresolved. A volume rule may have no query and no
        filters: then it is the empty And, which every article matches in both back-ends."""
        parts = [parse_query(self.query)] if self.query.strip() or self.volume is None else []
        for field, values in (("topics", self.topics), ("source", self.sources), ("language", self.languages)):
            if values:
                terms = tuple(Field(field, value) for value in values)
                parts.append(terms[0] if len(terms) == 1 else Or(terms))
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    @property
    def kind(self) -> str:
        return self.volume.kind if self.volume else "match"

    def to_doc(self) -> dict[str, Any]:
        doc = {"name": self.name, "query": self.query, "topics": list(self.topics), "sources": list(self.sources),
               "languages": list(self.languages), "notify": list(self.notify),
               "digest_seconds": self.digest_seconds, "enabled": self.enabled}
        if self.volume:
            doc[self.volume.kind] = self.volume.to_doc()
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any], where: str = "rule") -> Rule:
        """A rule from a stored document or a YAML entry (`digest: 15m` or `digest_seconds`)."""
        if not isinstance(doc, dict):
            raise RuleError(f"{where}: expected a mapping")
        known = {"name", "query", "topics", "topic", "sources", "source", "languages", "language", "notify",
                 "digest", "digest_seconds", "enabled", "created_at", "updated_at", *VOLUME_KINDS}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise RuleError(f"{where}: unknown key(s) {', '.join(unknown)}")
        kinds = [kind for kind in VOLUME_KINDS if kind in doc]
        if len(kinds) > 1:
            raise RuleError(f"{where}: one rule kind at a time, not {' and '.join(kinds)}")
        name = doc.get("name")
        query = doc.get("query", "" if kinds else None)
        if not isinstance(name, str) or not isinstance(query, str):
            raise RuleError(f"{where}: needs a 'name' and a 'query' (strings)")
        digest = doc.get("digest_seconds", doc.get("digest") or 0)
        if not isinstance(doc.get("enabled", True), bool):  # bool("false") would be True
            raise RuleError(f"{where}: enabled must be true or false, got {doc['enabled']!r}")
        try:
            volume = VolumeSpec.from_doc(kinds[0], doc[kinds[0]]) if kinds else None
            return cls(name=name, query=query, volume=volume,
                       topics=_strings(doc.get("topics", doc.get("topic")), f"{where}: topics"),
                       sources=_strings(doc.get("sources", doc.get("source")), f"{where}: sources"),
                       languages=_strings(doc.get("languages", doc.get("language")), f"{where}: languages"),
                       notify=_strings(doc.get("notify", ["log"]), f"{where}: notify"),
                       digest_seconds=parse_duration(digest), enabled=doc.get("enabled", True))
        except RuleSyntaxError as err:
            raise RuleSyntaxError(f"{where} ({name}): {err.problem}", err.query, err.position) from None
        except RuleError as err:
            raise RuleError(f"{where}: {err}") from None


@dataclasses.dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    tree: Node  # resolved

    def match(self, view: ArticleView) -> list[Node] | None:
        return match(self.tree, view)

    def es_query(self) -> dict[str, Any]:
        return to_elasticsearch(self.tree)


def compile_rule(rule: Rule, lemmatize: Lemmatizer) -> CompiledRule:
    return CompiledRule(rule, resolve(rule.tree(), lemmatize))


def count_terms(node: Node) -> int:
    """Words, phrases and field filters in a query."""
    if isinstance(node, (And, Or)):
        return sum(count_terms(child) for child in node.children)
    if isinstance(node, Not):
        return count_terms(node.child)
    return 1


def term_forms(hits: Iterable[Node]) -> list[str]:
    """Words to highlight in article text for the matched terms."""
    words: list[str] = []
    for node in hits:
        if isinstance(node, Words):
            words.extend(token for form in node.forms for token in form)
        elif node.field not in ("topics", "source", "language"):
            words.extend(analyze(node.value))
    return list(dict.fromkeys(words))
