"""Alert rules: the query language, malformed rules, and the two back-ends (the in-stream
matcher and the Elasticsearch back-fill query) agreeing over a corpus in a real index."""
import json
import time
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from newsbeam.transforms.article import Article
from newsbeam.transforms.elastic import BulkWriter, connect, ensure_indices
from newsbeam.transforms.rules import (
    And,
    ArticleView,
    Field,
    Not,
    Or,
    Rule,
    RuleError,
    RuleSyntaxError,
    Words,
    analyze,
    compile_rule,
    match,
    parse_duration,
    parse_query,
    parse_target,
    resolve,
    spacy_lemmatizer,
)
from newsbeam.transforms.tagging import Tagger
from newsbeam.transforms.topics import Taxonomy
from tests.support import REPO
from tests.support.feedserver import FIXTURES, fixture_articles


def test_the_query_language_parses_with_precedence_and_fields():
    assert parse_query('ventilator AND entity:Russia') == And(
        (Words("ventilator"), Field("entities", "Russia", "entity")))
    # NOT binds tighter than AND, AND tighter than OR; side-by-side terms are ANDed.
    assert parse_query('a OR b c NOT d') == Or((Words("a"), And((Words("b"), Words("c"), Not(Words("d"))))))
    assert parse_query('(a OR b) AND "medical equipment"') == And(
        (Or((Words("a"), Words("b"))), Words("medical equipment", quoted=True)))
    assert parse_query('topic:"medical equipment aid" person:Putin org:Kremlin location:“New York” '
                       'source:reuters.com language:en') == And((
                           Field("topics", "medical equipment aid", "topic"), Field("persons", "Putin", "person"),
                           Field("organizations", "Kremlin", "org"), Field("locations", "New York", "location"),
                           Field("source", "reuters.com", "source"), Field("language", "en", "language")))
    # Lower-case operators are words; a colon after digits is not a field.
    assert parse_query("war and peace 12:30") == And((Words("war"), Words("and"), Words("peace"), Words("12:30")))


@pytest.mark.parametrize("query, position, problem", [
    ("", 0, "empty query"),
    ("ventilator AND", 14, "'AND' needs a word"),
    ("ventilator AND (", 16, "'(' needs a word"),
    ("OR russia", 0, "'OR' needs a term before it"),
    ("(mask OR ventilator", 0, "this '(' is never closed"),
    ("mask) OR x", 4, "')' without a matching '('"),
    ("mask AND () ", 9, "empty parentheses"),
    ('ventilator "medical equipment', 11, "this quote is never closed"),
    ('x ""', 2, "empty phrase"),
    ("title:ventilator", 0, "unknown field 'title'"),
    ("x AND topic:", 6, "topic: needs a value"),
    ("russia -sport", 7, "use NOT sport"),
    ("x AND NOT", 9, "'NOT' needs a word"),
    ("mask AND OR x", 9, "'AND' needs a word"),
    ("&&", 0, "has no letters or digits"),
])
def test_malformed_queries_are_refused_with_the_position(query, position, problem):
    with pytest.raises(RuleSyntaxError) as caught:
        parse_query(query)
    assert caught.value.position == position
    assert problem in caught.value.problem
    message = str(caught.value)
    assert f"at position {position + 1}" in message
    # The message shows the query and a caret under the problem.
    assert message.splitlines()[-1] == "  " + " " * position + "^"


def test_rules_are_validated_whole():
    targets = ("webhook:http://127.0.0.1:9/x", "log", "webhook:http://127.0.0.1:9/x", "email:a@example.org, b@example.org")
    rule = Rule("desk-1", "ventilator", notify=targets, digest_seconds=parse_duration("15m"))
    assert rule.notify == ("webhook:http://127.0.0.1:9/x", "log", "email:a@example.org,b@example.org")
    assert rule.digest_seconds == 900
    assert parse_target("slack:https://hooks.example.org/T/B").kind == "slack"
    for bad in ("webhook:ftp://x", "email:nobody", "pager:123", "slack:"):
        with pytest.raises(RuleError):
            parse_target(bad)
    with pytest.raises(RuleError, match="rule name"):
        Rule("no spaces allowed", "x")
    with pytest.raises(RuleError, match="duration"):
        parse_duration("15 minutes")
    with pytest.raises(RuleSyntaxError):
        Rule("ok", "x AND")
    with pytest.raises(RuleError, match="unknown key"):
        Rule.from_doc({"name": "x", "query": "y", "realert": "5m"})
    stored = Rule.from_doc({"name": "x", "query": "y", "topic": "sport", "digest": "1h", "enabled": False})
    assert (stored.topics, stored.digest_seconds, stored.enabled) == (("sport",), 3600, False)
    assert Rule.from_doc(stored.to_doc()) == stored


def test_the_analyzer_tokenizes_like_the_standard_analyzer(es, nlp):
    samples = ["u.s. 1,000 ventilator covid-19 's o'brien a:b 3.5 a.1 foo_bar 12:30 x.y.z ’s it‘s don’t e-mail "
               "東京都 café naïve 1.2.3 3½ m² ©2020 ⭐ ► ● 😷 #tag @user $100 50% 2020-05-21"]
    tagger = Tagger(nlp, Taxonomy.load(REPO / "configs" / "topics.yaml"), _settings())
    samples += [article.lemmas for article in tagger.tag_articles(
        [Article(title=a["title"], content_html=a["html"]) for a in _fixture_items()])]
    for text in samples:
        expected = tuple(t["token"] for t in es.indices.analyze(analyzer="standard", text=text)["tokens"])
        assert analyze(text) == expected


def test_query_words_are_lemmatized_like_article_text(nlp):
    tree = resolve(parse_query('ventilators AND "medical supplies" AND shipping AND data'), spacy_lemmatizer(nlp))
    assert [w.forms for w in tree.children] == [
        (("ventilator",), ("ventilators",)), (("medical", "supply"), ("medical", "supplies")), (("shipping",),),
        (("datum",), ("data",))]


def _settings():
    from newsbeam.pipeline.config import load_settings
    return load_settings(REPO / "configs" / "pipeline.yaml")


def _fixture_items() -> list[dict]:
    return list(fixture_articles().values()) + json.loads((FIXTURES / "alert_articles.json").read_text())


@pytest.fixture
def corpus(nlp, es, settings):
    """The fixture articles enriched by the pipeline's own functions and indexed."""
    tagger = Tagger(nlp, Taxonomy.load(settings.topics_file), settings)
    raw = [Article(article_id=item["key"], url=item["link"], title=item["title"], content_html=item["html"],
                   source=urlsplit(item["link"]).hostname, language=item.get("language", "en"),
                   nlp_skipped=item.get("language", "en") != "en") for item in _fixture_items()]
    articles = tagger.tag_articles(raw)
    client = connect(settings.elasticsearch)
    ensure_indices(client, settings.elasticsearch)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    outcomes = BulkWriter(client, settings.elasticsearch.articles_alias, "article_id").write(
        [{**a.to_document(), "indexed_at": stamp} for a in articles])
    assert {outcome for outcome, _ in outcomes} == {"written"}
    es.indices.refresh(index=settings.elasticsearch.articles_alias)
    return articles


# Rules over the corpus, with the articles each must match: both back-ends are held to it.
RULES = {
    "ventilators": {"ventilators", "reuters-ventilators", "hospital-masks", "medical-phrase", "channel-injection"},
    "ventilator AND entity:Russia": {"ventilators", "reuters-ventilators"},
    'ventilator AND entity:russia AND NOT source:example.org': {"reuters-ventilators"},
    '"medical equipment"': {"ventilators", "medical-phrase"},
    '"equipment medical"': set(),
    "shipped": {"ventilators", "reuters-ventilators"},
    "shipping": {"bbc-shipping"},
    "person:Putin": {"ventilators", "reuters-ventilators", "putin-oil"},
    'person:"vladimir putin" AND NOT org:OPEC': {"ventilators", "reuters-ventilators"},
    "location:york": {"hospital-masks"},
    "location:yor": set(),
    "source:reuters.com": {"reuters-ventilators", "putin-oil"},
    "source:euters.com": set(),
    "language:de": {"german-aid"},
    "beatmungsgeräte": set(),  # German is not lemmatized by the English model: no lemmas
    'topic:"natural disasters"': {"floods"},
    "(mask OR gown) AND location:\"New York\"": {"hospital-masks"},
    "1,000 masks": {"reuters-ventilators"},
    "u.s. AND ventilator": {"ventilators", "reuters-ventilators"},
    "oil NOT (opec OR saudi)": {"ventilators"},
    "NOT (ventilator OR flood OR election OR putin)": {"chips", "late", "bbc-shipping", "football", "german-aid"},
    "bundesliga title": {"football"},
    "script": {"channel-injection"},
}


def test_stream_matcher_and_backfill_query_agree(corpus, es, settings, nlp):
    lemmatize = spacy_lemmatizer(nlp)
    for query, expected in RULES.items():
        compiled = compile_rule(Rule("consistency", query), lemmatize)
        in_stream = {a.article_id for a in corpus if match(compiled.tree, a) is not None}
        hits = es.search(index=settings.elasticsearch.articles_alias, query=compiled.es_query(), size=100,
                         source_includes=["article_id"])["hits"]["hits"]
        backfill = {hit["_source"]["article_id"] for hit in hits}
        assert in_stream == backfill == expected, query


def test_a_match_reports_its_terms(corpus, nlp):
    article = next(a for a in corpus if a.article_id == "reuters-ventilators")
    tree = resolve(parse_query('(ventilators OR gowns) AND entity:Russia AND NOT sport'), spacy_lemmatizer(nlp))
    assert [node.label() for node in match(tree, article)] == ["ventilators", "entity:Russia"]
    assert match(tree, next(a for a in corpus if a.article_id == "football")) is None


def _nested(n: int, pattern: str) -> str:
    """The deepest shapes a query can take per level of '(' or NOT: two bool levels per '('
    (an OR around an AND), one per NOT."""
    if pattern == "parentheses":
        return "ventilators OR person:Putin (" * n + "mask" + ")" * n
    if pattern == "not":
        return "NOT " * n + "person:Putin"
    return "ventilators OR person:Putin NOT (" * (n // 2) + "mask" + ")" * (n // 2)


@pytest.mark.parametrize("pattern", ["parentheses", "not", "mixed"])
def test_the_deepest_accepted_rule_runs_in_both_back_ends(pattern, corpus, es, settings, nlp):
    from newsbeam.pipeline.alerts_cli import backfill_query
    from newsbeam.transforms.rules import MAX_NESTING
    # With filters (one more AND, an OR) and a --since window (one more bool): all that wraps a query.
    rule = Rule("deepest", _nested(MAX_NESTING, pattern), sources=("reuters.com", "example.org"))
    compiled = compile_rule(rule, spacy_lemmatizer(nlp))
    in_stream = {a.article_id for a in corpus if compiled.match(ArticleView(a)) is not None}
    hits = es.search(index=settings.elasticsearch.articles_alias, query=backfill_query(compiled.es_query(), "3650d"),
                     size=100, source_includes=["article_id"])["hits"]["hits"]
    assert in_stream and in_stream == {hit["_source"]["article_id"] for hit in hits}
    with pytest.raises(RuleSyntaxError, match="nested too deeply"):
        Rule("deeper", _nested(MAX_NESTING + (2 if pattern == "mixed" else 1), pattern))


def test_the_largest_accepted_rule_runs_in_both_back_ends(corpus, es, settings, nlp):
    from newsbeam.transforms.rules import MAX_TERMS
    words = sorted({token for a in corpus for token in analyze(a.lemmas) if token.isalpha()})[:MAX_TERMS - 2]
    rule = Rule("largest", " OR ".join(words), languages=("en", "de"))
    compiled = compile_rule(rule, spacy_lemmatizer(nlp))
    in_stream = {a.article_id for a in corpus if compiled.match(ArticleView(a)) is not None}
    hits = es.search(index=settings.elasticsearch.articles_alias, query=compiled.es_query(), size=100,
                     source_includes=["article_id"])["hits"]["hits"]
    assert in_stream and in_stream == {hit["_source"]["article_id"] for hit in hits}
    with pytest.raises(RuleSyntaxError, match=f"more than {MAX_TERMS} terms"):
        Rule("larger", " OR ".join([*words, "x", "y", "z"]))
    with pytest.raises(RuleError, match=f"more than {MAX_TERMS} terms with its topic"):
        Rule("larger", " OR ".join(words), topics=("sport", "health", "science"))


@pytest.mark.parametrize("query, position", [
    ("mask OR gown (" * 16 + "x" + ")" * 16, 153),  # 16 deep: Elasticsearch refused its back-fill
    ("NOT " * 975 + "ventilator", 40),  # a RecursionError in the stream matcher
    ("(" * 1500 + "x" + ")" * 1500, 10),  # a RecursionError in the parser
])
def test_queries_nested_too_deeply_get_one_clear_error(query, position):
    with pytest.raises(RuleSyntaxError) as caught:
        parse_query(query)
    assert caught.value.problem == "nested too deeply (at most 10 levels of '(' and NOT)"
    assert caught.value.position == position


def test_alerts_add_and_import_refuse_a_rule_too_deep_before_connecting(tmp_path, capsys):
    from newsbeam.pipeline.cli import main
    deep = "mask OR gown (" * 16 + "x" + ")" * 16
    nowhere = "http://127.0.0.1:9"  # nothing listens: the rule is refused before any request
    assert main(["alerts", "add", "deep", "--query", deep, "--es-url", nowhere]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    rules = tmp_path / "alerts.yaml"
    rules.write_text(yaml.safe_dump({"alerts": [{"name": "fine", "query": "ventilator"},
                                                {"name": "deep", "query": "NOT " * 975 + "x"}]}))
    assert main(["alerts", "import", str(rules), "--es-url", nowhere]) == 2
    err = capsys.readouterr().err
    assert "alert #2 (deep): nested too deeply" in err and "Traceback" not in err


_TERMS = ["mask", "ventilators", '"medical equipment"', "person:Putin", "source:reuters.com", "topic:health"]
# Well-formed queries of any shape and depth, and token soup (mostly malformed).
_QUERIES = st.one_of(
    st.recursive(st.sampled_from(_TERMS), lambda inner: st.one_of(
        st.builds("NOT {}".format, inner),
        st.builds("({} OR {})".format, inner, inner),
        st.builds("{} AND {}".format, inner, inner),
        st.builds("{} OR {} NOT ({})".format, inner, inner, inner),
        st.builds(lambda n, q: "NOT " * n + q, st.integers(1, 40), inner),
        st.builds(lambda n, a, q: f"{a} OR {a} (" * n + q + ")" * n, st.integers(1, 20), inner, inner)),
        max_leaves=30),
    st.lists(st.sampled_from(["(", ")", "NOT", "AND", "OR", *_TERMS]), min_size=1, max_size=80).map(" ".join))


@hypothesis_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=_QUERIES)
def test_a_query_is_either_refused_clearly_or_runs_in_both_back_ends(query, es, es_settings):
    from newsbeam.pipeline.alerts_cli import backfill_query
    try:
        rule = Rule("generated", query, sources=("reuters.com", "example.org"))
    except RuleSyntaxError:
        return  # one clear error: malformed, too deep or too large
    compiled = compile_rule(rule, analyze)
    article = Article(lemmas="mask ventilator medical equipment", persons=("Vladimir Putin",), source="reuters.com")
    compiled.match(ArticleView(article))  # no RecursionError
    # Elasticsearch parses the whole query (and refuses one too deep with HTTP 400) even over no index.
    es.count(index=f"{es_settings.articles_alias}-none*", query=backfill_query(compiled.es_query(), "7d"),
             allow_no_indices=True)


def test_a_rule_file_says_enabled_with_true_or_false_only():
    with pytest.raises(RuleError, match="enabled must be true or false, got 'false'"):
        Rule.from_doc({"name": "x", "query": "y", "enabled": "false"})  # was saved enabled
    assert Rule.from_doc({"name": "x", "query": "y", "enabled": False}).enabled is False
