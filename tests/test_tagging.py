"""Entities and topics, through the same functions the pipeline uses."""
import pytest

from pipeline.config import ConfigError, NlpSettings
from tests.feedserver import fixture_articles
from transforms.clean import clean_article
from transforms.entities import canonical_entities, strip_mention, tag_entities
from transforms.topics import Taxonomy, tag_topics
from tests.conftest import REPO


@pytest.fixture(scope="module")
def taxonomy():
    return Taxonomy.load(REPO / "configs" / "topics.yaml")


def tagged(nlp, taxonomy, key):
    fixture = fixture_articles()[key]
    article = clean_article({"title": fixture["title"], "content_html": fixture["html"], "summary_html": ""})
    (article,) = tag_entities(nlp, [article], NlpSettings())
    return tag_topics(taxonomy, article)


def test_default_taxonomy_has_at_least_15_topics(taxonomy):
    names = [t.name for t in taxonomy.topics]
    assert len(names) >= 15
    assert "medical equipment aid" in names


def test_ventilator_story_gets_canonical_entities_and_topic(nlp, taxonomy):
    article = tagged(nlp, taxonomy, "ventilators")
    assert {"Donald Trump", "Vladimir Putin"} <= set(article["persons"])
    assert "Trump" not in article["persons"] and "Putin" not in article["persons"]
    assert {"Russia", "United States"} <= set(article["locations"])
    assert "U.S." not in article["locations"]
    assert "medical equipment aid" in article["topics"]
    evidence = next(e for e in article["topic_evidence"] if e["topic"] == "medical equipment aid")
    assert any(reason.startswith("near:") for reason in evidence["evidence"])
    by_name = {e["name"]: e for e in article["entities"]}
    assert by_name["Donald Trump"]["label"] == "PERSON"
    assert by_name["Donald Trump"]["count"] >= 3  # "Trump" mentions folded into the full name
    assert "ventilator" in article["lemmas"].split()


def test_other_stories_get_their_topics_and_not_the_aid_topic(nlp, taxonomy):
    floods = tagged(nlp, taxonomy, "floods")
    assert "natural disasters" in floods["topics"]
    assert "medical equipment aid" not in floods["topics"]
    election = tagged(nlp, taxonomy, "election")
    assert "elections" in election["topics"]
    chips = tagged(nlp, taxonomy, "chips")
    assert "technology" in chips["topics"]
    assert chips["topics"] == ["technology"]


def test_strip_mention_removes_titles_possessives_and_articles():
    assert strip_mention("President Donald Trump's", "PERSON") == "Donald Trump"
    assert strip_mention("the White House", "ORG") == "White House"
    assert strip_mention("Russia’s", "GPE") == "Russia"


def test_canonical_entities_unify_country_variants_and_drop_non_names(nlp):
    doc = nlp("The U.S. and the United States of America are one country. The US said COVID-19 spread. "
              "Fox News host Sean Hannity spoke.")
    entities = canonical_entities(doc)
    names = {e["name"]: e["label"] for e in entities}
    assert names.get("United States") == "GPE"
    assert not {"U.S.", "US", "COVID-19"} & set(names)
    assert names.get("Sean Hannity") == "PERSON"


def test_taxonomy_errors_name_the_problem(tmp_path):
    bad = tmp_path / "topics.yaml"
    bad.write_text("topics:\n  - name: x\n    threshold: -1\n    terms: [a]\n")
    with pytest.raises(ConfigError, match=r"\(x\).*threshold"):
        Taxonomy.load(bad)
    bad.write_text("topics:\n  - name: y\n    near:\n      - groups: [[a]]\n")
    with pytest.raises(ConfigError, match="near rule #1"):
        Taxonomy.load(bad)
    bad.write_text("topics: []\n")
    with pytest.raises(ConfigError, match="non-empty list"):
        Taxonomy.load(bad)
