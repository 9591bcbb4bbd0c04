"""The article record against the articles index mapping, field by field, and its round trip
through Beam's coders and the dead-letter helper."""
from __future__ import annotations

import dataclasses
import json
import pickle
import types
import typing
from typing import Any

import pytest
from apache_beam.coders import registry

from newsbeam.transforms.article import Article, Entity, TopicEvidence
from newsbeam.transforms.deadletter import dead_letter_for
from newsbeam.transforms.elastic import ARTICLE_MAPPINGS

# The Python types each mapping type holds; a field may also be a tuple of them (an array).
FITS = {"keyword": {str}, "text": {str}, "date": {str}, "boolean": {bool}, "integer": {int}, "long": {int},
        "float": {float}, "double": {float}}


def _value_types(hint: Any) -> set[Any]:
    """The types a field holds, without None and with a tuple's item type in place of the tuple."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return set().union(*(_value_types(arg) for arg in typing.get_args(hint) if arg is not type(None)))
    if typing.get_origin(hint) is tuple:
        item, ellipsis = typing.get_args(hint)
        assert ellipsis is Ellipsis, f"{hint}: a field's tuple is an array of one type"
        return _value_types(item)
    return {hint}


def mapping_mismatches(record: type, properties: dict[str, Any], not_indexed: frozenset[str],
                       where: str = "") -> list[str]:
    """Every way the record and the mapping disagree: a mapped field the record lacks or holds
    with a type the mapping type does not fit, a record field neither mapped nor declared not
    indexed. Object mappings are checked against the nested record type the same way."""
    hints = typing.get_type_hints(record)
    fields = {field.name for field in dataclasses.fields(record)}
    problems = [f"{where}{name}: record field neither mapped nor declared not indexed"
                for name in sorted(fields - set(properties) - not_indexed)]
    problems += [f"{where}{name}: declared not indexed but mapped" for name in sorted(not_indexed & set(properties))]
    for name, mapping in properties.items():
        if name not in fields:
            problems.append(f"{where}{name}: mapped, not a field of {record.__name__}")
            continue
        held = _value_types(hints[name])
        if "properties" in mapping:
            nested = [t for t in held if dataclasses.is_dataclass(t)]
            if len(nested) != 1 or len(held) != 1:
                problems.append(f"{where}{name}: an object mapping needs one record type, the field holds {held}")
            else:
                problems += mapping_mismatches(nested[0], mapping["properties"], frozenset(), f"{where}{name}.")
        elif not held <= FITS[mapping["type"]]:
            problems.append(f"{where}{name}: mapped {mapping['type']}, the field holds {held}")
    return problems


def test_the_articles_mapping_and_the_record_agree_field_by_field():
    assert mapping_mismatches(Article, ARTICLE_MAPPINGS["properties"], Article.NOT_INDEXED) == []


def test_the_check_finds_an_unmapped_field_a_missing_one_and_a_wrong_type():
    extended = dataclasses.make_dataclass("Extended", [("sentiment", float, 0.0)], bases=(Article,), frozen=True)
    assert mapping_mismatches(extended, ARTICLE_MAPPINGS["properties"], Article.NOT_INDEXED) == [
        "sentiment: record field neither mapped nor declared not indexed"]
    mapped = {**ARTICLE_MAPPINGS["properties"], "word_count": {"type": "integer"},
              "nlp_skipped": {"type": "keyword"},
              "entities": {"properties": {**ARTICLE_MAPPINGS["properties"]["entities"]["properties"],
                                          "salience": {"type": "float"}}}}
    assert mapping_mismatches(Article, mapped, Article.NOT_INDEXED) == [
        "nlp_skipped: mapped keyword, the field holds {<class 'bool'>}",
        "entities.salience: mapped, not a field of Entity",
        "word_count: mapped, not a field of Article"]


def _tagged() -> Article:
    return Article(article_id="a1", url="https://example.com/a", title="Ventilators", summary_html="<p>x</p>",
                   content_html="<p>y</p>", body="Ventilators shipped.", feed_url="https://example.com/rss",
                   author=None, language="en", story_bands=("0:ab",), entities=(Entity("Russia", "GPE", "Russia", 2),),
                   locations=("Russia",), lemmas="ventilator ship", topics=("aid",),
                   topic_evidence=(TopicEvidence("aid", 2.5, ("term:ventilator",)),))


def test_the_document_is_the_indexed_fields_as_json():
    doc = _tagged().to_document()
    assert not set(doc) & Article.NOT_INDEXED
    assert set(doc) <= set(ARTICLE_MAPPINGS["properties"])
    assert "author" not in doc and "indexed_at" not in doc  # not set: not written
    assert doc["entities"] == [{"name": "Russia", "label": "GPE", "text": "Russia", "count": 2}]
    assert doc["topic_evidence"] == [{"topic": "aid", "score": 2.5, "evidence": ["term:ventilator"]}]
    assert doc["story_bands"] == ["0:ab"] and doc["nlp_skipped"] is False
    assert json.loads(json.dumps(doc)) == doc


def test_a_dead_letter_carries_the_records_ids_and_every_field_to_replay():
    article = _tagged()
    record = dead_letter_for(article, "entities", "ValueError", "boom")
    assert (record["article_id"], record["url"], record["feed_url"]) == ("a1", "https://example.com/a",
                                                                          "https://example.com/rss")
    payload = json.loads(record["payload"])
    assert payload["content_html"] == "<p>y</p>" and payload["entities"][0]["name"] == "Russia"
    assert Article(**{**payload, "entities": (), "topic_evidence": ()}).content_html == "<p>y</p>"


@pytest.mark.parametrize("encode", ["pickle", "beam"])
def test_the_record_survives_the_runners_encoding(encode):
    article = _tagged()
    if encode == "pickle":
        assert pickle.loads(pickle.dumps(article)) == article
    else:
        coder = registry.get_coder(Article)
        assert coder.decode(coder.encode(article)) == article
