"""EXTERNAL SUITE: tagging quality pinned on the labelled development sets in ../shared, measured
by pipeline/evaluate.py (what `newsbeam eval topics|entities` runs) through the pipeline's Tagger.
Floors sit slightly below the figures measured when they were set (docs/quality.md, "Tagging quality"), so
a change that degrades tagging fails CI. Without ../shared the module is skipped with one loud
reason."""
from __future__ import annotations

import pytest

from tests.support import REPO

SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpus"
if not (CORPUS / "topics").is_dir() or not (CORPUS / "entities").is_dir():
    pytest.skip(f"EXTERNAL SUITE SKIPPED: {SHARED} is missing (it holds the labelled topic and entity "
                "development sets); CI always provides it", allow_module_level=True)

from newsbeam.pipeline import evaluate  # noqa: E402
from newsbeam.pipeline.config import load_settings  # noqa: E402
from newsbeam.transforms.tagging import Tagger  # noqa: E402

pytestmark = pytest.mark.external
AID = evaluate.AID


@pytest.fixture(scope="module")
def tagger() -> Tagger:
    return Tagger.load(load_settings(REPO / "configs" / "pipeline.yaml"))


def test_medical_aid_on_disaster_response_news(tagger):
    examples = evaluate.load_disaster_response(CORPUS / "topics" / "disaster_response_validation.csv")
    assert len(examples) == 1290
    result = evaluate.evaluate_topics(tagger, examples, [AID, "natural disasters"])
    aid, disasters = result["topics"][AID], result["topics"]["natural disasters"]
    print(f"\ndisaster-response news: {AID} {aid}; natural disasters {disasters}")
    assert aid["f1"] >= 0.47 and aid["precision"] >= 0.57
    assert disasters["f1"] >= 0.60


def test_medical_aid_on_recovery_articles(tagger):
    examples = evaluate.load_recovery(CORPUS / "topics" / "recovery-medical-aid-dev.jsonl",
                                      CORPUS / "articles" / "recovery-reliable.jsonl")
    result = evaluate.evaluate_topics(tagger, examples, [AID])
    aid = result["topics"][AID]
    print(f"\nReCOVery dev: {aid}")
    assert aid["fp"] / (aid["fp"] + aid["tn"]) <= 0.02  # at most 2% of non-aid articles tagged
    assert aid["recall"] >= 0.8  # at least 80% of aid articles found


def test_reuters_and_seed_articles_are_tagged_with_evidence(tagger):
    checks = evaluate.topic_checks(tagger, [evaluate.reuters_example(CORPUS / "articles" / "recovery-reliable.jsonl"),
                                            evaluate.seed_example(SHARED / "seed-article.txt")])
    for check in checks:
        assert check["ok"], check
        (evidence,) = [e for e in check["evidence"] if e["topic"] == AID]
        assert any(reason.startswith("near:") for reason in evidence["evidence"])


def test_entities_on_conll_and_canonical_names_on_the_seed_article(tagger):
    docs = evaluate.load_conll(CORPUS / "entities" / "conll2003-valid.txt")
    assert len(docs) == 216
    result = evaluate.evaluate_entities(tagger, docs)
    print(f"\nCoNLL-2003 valid: micro {result['micro']}; " +
          ", ".join(f"{label} F1 {c['f1']}" for label, c in result["labels"].items()))
    assert result["unaligned_documents"] == 0
    assert result["micro"]["f1"] >= 0.69
    assert result["labels"]["PER"]["f1"] >= 0.75 and result["labels"]["LOC"]["f1"] >= 0.79
    seed = evaluate.seed_entities(tagger, SHARED / "seed-article.txt")
    assert set(seed["persons"]) == evaluate.SEED_PERSONS
    assert evaluate.SEED_LOCATIONS <= set(seed["locations"])
