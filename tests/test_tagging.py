"""Entities and topics, through the same functions the pipeline uses."""
import pytest

from newsbeam.pipeline.config import ConfigError, NlpSettings, load_settings
from newsbeam.transforms.article import Article
from newsbeam.transforms.clean import clean_article
from newsbeam.transforms.entities import (
    entities_from_mentions,
    entity_mentions,
    load_gazetteer,
    load_model,
    strip_mention,
    tag_entities,
    truecase_headlines,
)
from newsbeam.transforms.topics import Taxonomy, score_article, tag_topics
from tests.support import REPO
from tests.support.feedserver import fixture_articles


@pytest.fixture(scope="module")
def taxonomy():
    return Taxonomy.load(REPO / "configs" / "topics.yaml")


def _entities(doc):
    """What `tag_entities` makes of one Doc: one entity per canonical name."""
    return entities_from_mentions(entity_mentions(doc))


def tagged(nlp, taxonomy, key):
    fixture = fixture_articles()[key]
    article = clean_article(Article(title=fixture["title"], content_html=fixture["html"], summary_html=""))
    (article,) = tag_entities(nlp, [article], NlpSettings())
    return tag_topics(taxonomy, article)


def test_default_taxonomy_has_at_least_15_topics(taxonomy):
    names = [t.name for t in taxonomy.topics]
    assert len(names) >= 15
    assert "medical equipment aid" in names


def test_ventilator_story_gets_canonical_entities_and_topic(nlp, taxonomy):
    article = tagged(nlp, taxonomy, "ventilators")
    assert {"Donald Trump", "Vladimir Putin"} <= set(article.persons)
    assert "Trump" not in article.persons and "Putin" not in article.persons
    assert {"Russia", "United States"} <= set(article.locations)
    assert "U.S." not in article.locations
    assert "medical equipment aid" in article.topics
    evidence = next(e for e in article.topic_evidence if e.topic == "medical equipment aid")
    assert any(reason.startswith("near:") for reason in evidence.evidence)
    by_name = {e.name: e for e in article.entities}
    assert by_name["Donald Trump"].label == "PERSON"
    assert by_name["Donald Trump"].count >= 3  # "Trump" mentions folded into the full name
    assert "ventilator" in article.lemmas.split()


def test_other_stories_get_their_topics_and_not_the_aid_topic(nlp, taxonomy):
    floods = tagged(nlp, taxonomy, "floods")
    assert "natural disasters" in floods.topics
    assert "medical equipment aid" not in floods.topics
    election = tagged(nlp, taxonomy, "election")
    assert "elections" in election.topics
    chips = tagged(nlp, taxonomy, "chips")
    assert "technology" in chips.topics
    assert chips.topics == ("technology",)


def test_strip_mention_removes_titles_possessives_and_articles():
    assert strip_mention("President Donald Trump's", "PERSON") == "Donald Trump"
    assert strip_mention("the White House", "ORG") == "White House"
    assert strip_mention("Russia’s", "GPE") == "Russia"


def test_canonical_entities_unify_country_variants_and_drop_non_names(nlp):
    doc = nlp("The U.S. and the United States of America are one country. The US said COVID-19 spread. "
              "Fox News host Sean Hannity spoke.")
    entities = _entities(doc)
    names = {e.name: e.label for e in entities}
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


# --- entities: true-casing, trimmed spans, gazetteer ----------------------------------------

def test_truecasing_keeps_offsets_and_uses_the_articles_own_spelling():
    text = ("CRICKET - LEICESTERSHIRE BEAT SOMERSET IN LONDON\nLONDON 1996-08-30\n"
            "Leicestershire beat Somerset by an innings in London, NATO said.")
    cased = truecase_headlines(text)
    assert len(cased) == len(text)
    assert cased.splitlines()[:2] == ["Cricket - Leicestershire beat Somerset in London", "London 1996-08-30"]
    # Title Case headlines: words the article writes in lower case are lowered, names kept.
    headline = truecase_headlines("FDA Adds Malaria Drugs To Stockpile\n\nThe FDA added two drugs to the stockpile.")
    assert headline.startswith("FDA Adds Malaria drugs to stockpile")
    # An all-caps word in an ordinary line only takes a capitalised spelling ("US" never becomes "us").
    assert truecase_headlines("WASHINGTON - The US said.\nWashington and us.") == "Washington - The US said.\nWashington and us."


def test_shouted_headline_entities_are_found(nlp):
    (article,) = tag_entities(nlp, [Article(title="TRUMP PROMISES PUTIN VENTILATORS FOR RUSSIA",
                                            body="President Donald Trump told Vladimir Putin that Russia would get "
                                                 "ventilators.")], NlpSettings())
    assert {"Donald Trump", "Vladimir Putin"} <= set(article.persons)
    assert "Russia" in article.locations
    # The headline is the first line of the lemmas, true-cased before lemmatising.
    assert article.lemmas.split("\n")[0] == "trump promise putin ventilator for russia"


def test_mentions_are_spans_without_titles_or_possessives(nlp):
    (article,) = tag_entities(nlp, [Article(title="", body="President Donald Trump's call with the U.S. envoy.")],
                              NlpSettings(), with_mentions=True)
    by_name = {m["name"]: m for m in article.mentions}
    trump = by_name["Donald Trump"]
    assert (trump["text"], trump["label"]) == ("Donald Trump", "PERSON")
    assert article.body[trump["start"]:trump["end"]] == "Donald Trump"
    us = by_name["United States"]
    assert article.body[us["start"]:us["end"]] == "U.S."


def test_gazetteer_names_are_tagged_under_their_canonical_name(tmp_path):
    gazetteer = tmp_path / "entities.yaml"
    gazetteer.write_text("entities:\n  - name: Médecins Sans Frontières\n    label: ORG\n"
                         "    aliases: [MSF, Doctors Without Borders]\n")
    nlp = load_model(gazetteer=gazetteer)
    assert nlp.pipe_names.index("gazetteer") < nlp.pipe_names.index("ner")
    entities = _entities(nlp("MSF flew tents to Haiti. Doctors Without Borders said more would follow."))
    msf = next(e for e in entities if e.name == "Médecins Sans Frontières")
    assert (msf.label, msf.count) == ("ORG", 2)


def test_gazetteer_errors_name_the_problem(tmp_path):
    bad = tmp_path / "entities.yaml"
    bad.write_text("entities:\n  - name: Acme\n    label: COMPANY\n")
    with pytest.raises(ConfigError, match=r"entity #1 \(Acme\).*label"):
        load_gazetteer(bad)
    bad.write_text("entities: {}\n")
    with pytest.raises(ConfigError, match="list under 'entities'"):
        load_gazetteer(bad)


def test_gazetteer_setting_is_relative_to_the_settings_file(tmp_path):
    (tmp_path / "pipeline.yaml").write_text("nlp:\n  gazetteer: names.yaml\n")
    assert load_settings(tmp_path / "pipeline.yaml").nlp.gazetteer == str(tmp_path / "names.yaml")
    assert load_settings(REPO / "configs" / "pipeline.yaml").nlp.gazetteer.endswith("entities.yaml")


# --- topics: passages, headline, counter-evidence, numbers ------------------------------------

PASSAGE_TOPIC = """topics:
  - name: aid
    scope: passage
    threshold: 2
    headline_weight: 2
    headline_terms: false
    body_weight: 0.5
    terms: {ventilator: 1, wear: -1}
    near:
      - {window: 5, weight: 1.5, groups: [[send, donate], [ventilator, mask]]}
      - {window: 2, weight: 0.5, groups: [["#number"], [ventilator, mask]]}
"""


def aid_score(tmp_path, title: str, lemmas: str):
    path = tmp_path / "topics.yaml"
    path.write_text(PASSAGE_TOPIC)
    (score,) = score_article(Taxonomy.load(path), Article(title=title, lemmas=lemmas))
    return score


def test_passage_scope_scores_headline_and_best_paragraph(tmp_path):
    # Headline: near rules only (2 x (1.5 + 0.5)); best paragraph x body_weight (0.5 x 3).
    score = aid_score(tmp_path, "US sends ventilators", "us send 200 ventilator\nthe us send 200 ventilator to russia\n"
                                                        "ventilator be scarce")
    assert score.score == 5.5 and score.tagged
    assert score.evidence[:2] == ("near:send ~ ventilator(title)", "near:#number ~ ventilator(title)")
    # The same words spread over paragraphs do not add up; a bare noun in a headline is no evidence.
    scattered = aid_score(tmp_path, "Ventilators", "ventilator\nthey send help\nventilator again")
    assert scattered.score == 0.5 and not scattered.tagged
    # Without a headline (a message) the best paragraph counts in full.
    assert aid_score(tmp_path, "", "donate 5 mask").score == 2.0


def test_counter_evidence_lowers_the_score_and_is_recorded(tmp_path):
    score = aid_score(tmp_path, "", "you must wear a mask donate by a ventilator maker")
    assert "-term:wear" in score.evidence
    assert score.score == 1.5  # ventilator 1 + send/donate rule 1.5 - wear 1


def test_near_rule_terms_must_be_on_different_words(tmp_path):
    path = tmp_path / "topics.yaml"
    path.write_text("topics:\n  - name: aid\n    threshold: 1\n"
                    "    near: [{window: 5, weight: 1, groups: [[aid, send], [medical aid]]}]\n")
    taxonomy = Taxonomy.load(path)

    def evidence(lemmas):
        (score,) = score_article(taxonomy, Article(title="", lemmas=lemmas))
        return score.evidence

    assert evidence("a medical aid team arrive") == ()  # "aid" is part of "medical aid"
    assert evidence("they send medical aid") == ("near:send ~ medical aid",)


def test_taxonomy_rejects_bad_scope_and_flags(tmp_path):
    bad = tmp_path / "topics.yaml"
    bad.write_text("topics:\n  - name: x\n    scope: sentence\n    terms: [a]\n")
    with pytest.raises(ConfigError, match=r"\(x\).*scope"):
        Taxonomy.load(bad)
    bad.write_text("topics:\n  - name: x\n    headline_terms: maybe\n    terms: [a]\n")
    with pytest.raises(ConfigError, match="headline_terms"):
        Taxonomy.load(bad)
    bad.write_text("topics:\n  - name: x\n    terms: {a: heavy}\n")
    with pytest.raises(ConfigError, match="weights must be numbers"):
        Taxonomy.load(bad)


def test_aid_topic_ignores_look_alikes(nlp, taxonomy):
    def topics(title, body):
        (article,) = tag_entities(nlp, [Article(title=title, body=body)], NlpSettings())
        return tag_topics(taxonomy, article).topics

    assert "medical equipment aid" in topics(
        "Chinese Americans in Chicago donate 1 million surgical masks to first responders",
        "Business leaders donated one million surgical masks to Chicago firefighters and police on Monday.")
    assert "medical equipment aid" not in topics(
        "Passengers must wear masks on major airlines",
        "Airlines in the United States will require passengers to wear masks on all flights.")
    assert "medical equipment aid" not in topics(
        "Ford joins effort to make ventilators",
        "Ford Motor Co said it would build 50,000 ventilators in Michigan with General Electric.")


def test_aid_topic_wants_medical_supplies_not_any_relief(nlp, taxonomy):
    def topics(message):
        (article,) = tag_entities(nlp, [Article(title="", body=message)], NlpSettings())
        return tag_topics(taxonomy, article).topics

    # "power" here is a noun, not a look-alike's "power a ventilator".
    assert "medical equipment aid" in topics(
        "Japan will send power generators and medicines to the flooded provinces of Vietnam.")
    assert "medical equipment aid" not in topics(
        "The Kenya Red Cross distributed 3,000 blankets and jerry cans to families displaced by the floods.")
