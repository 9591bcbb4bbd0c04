"""EXTERNAL SUITE: tagging quality pinned on the labelled development sets in ../shared, measured
by pipeline/evaluate.py (what `newsbeam eval topics|entities` runs) through the pipeline's Tagger.
Each floor is the one-sided 95% confidence bound (tests/support/quality.py) of the counts measured
when it was set (MEASURED; docs/quality.md, "Tagging quality"), so a change that makes tagging worse
by more than the sample's noise fails CI and one example flipping does not. Without ../shared the
module is skipped with one loud reason."""
from __future__ import annotations

import pytest

from tests.support import REPO
from tests.support.quality import f1_lower_bound, lower_bound, upper_bound

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
# Confusion counts measured when the floors were set: (tp, fp, fn) per topic or entity label (the
# non-aid ReCOVery articles, fp + tn, in RECOVERY_NEGATIVES).
MEASURED = {"aid, disaster-response": (31, 21, 46), "natural disasters, disaster-response": (162, 25, 166),
            "aid, ReCOVery": (4, 0, 1), "micro, CoNLL": (3260, 1000, 1760), "PER, CoNLL": (1314, 271, 528),
            "LOC, CoNLL": (1488, 338, 349)}
RECOVERY_NEGATIVES = 263


def check_floors(name: str, counts: dict, *, precision: bool = True, recall: bool = True) -> None:
    """Asserts the figures of `counts` (tp, fp, fn) against the floors derived from MEASURED[name]."""
    tp, fp, fn = MEASURED[name]
    floors = {"f1": f1_lower_bound(tp, fp, fn)}
    if precision:
        floors["precision"] = lower_bound(tp, tp + fp)
    if recall:
        floors["recall"] = lower_bound(tp, tp + fn)
    print(f"{name}: " + ", ".join(f"{figure} {counts[figure]:.3f} (floor {floor:.3f})"
                                  for figure, floor in floors.items()))
    for figure, floor in floors.items():
        assert counts[figure] >= floor, f"{name}: {figure} {counts[figure]} is below its floor {floor:.3f}"


@pytest.fixture(scope="module")
def tagger() -> Tagger:
    return Tagger.load(load_settings(REPO / "configs" / "pipeline.yaml"))


def test_medical_aid_on_disaster_response_news(tagger):
    examples = evaluate.load_disaster_response(CORPUS / "topics" / "disaster_response_validation.csv")
    assert len(examples) == 1290
    result = evaluate.evaluate_topics(tagger, examples, [AID, "natural disasters"])
    aid, disasters = result["topics"][AID], result["topics"]["natural disasters"]
    print(f"\ndisaster-response news: {AID} {aid}; natural disasters {disasters}")
    check_floors("aid, disaster-response", aid)
    check_floors("natural disasters, disaster-response", disasters)


def test_medical_aid_on_recovery_articles(tagger):
    examples = evaluate.load_recovery(CORPUS / "topics" / "recovery-medical-aid-dev.jsonl",
                                      CORPUS / "articles" / "recovery-reliable.jsonl")
    result = evaluate.evaluate_topics(tagger, examples, [AID])
    aid = result["topics"][AID]
    print(f"\nReCOVery dev: {aid}")
    assert aid["fp"] + aid["tn"] == RECOVERY_NEGATIVES and aid["tp"] + aid["fn"] == 5
    # Five aid articles bound recall only loosely; the force of this set is its 263 non-aid ones.
    tp, fp, fn = MEASURED["aid, ReCOVery"]
    assert aid["recall"] >= lower_bound(tp, tp + fn)
    assert aid["fp"] / RECOVERY_NEGATIVES <= upper_bound(fp, RECOVERY_NEGATIVES)


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
    check_floors("micro, CoNLL", result["micro"])
    check_floors("PER, CoNLL", result["labels"]["PER"], precision=False, recall=False)
    check_floors("LOC, CoNLL", result["labels"]["LOC"], precision=False, recall=False)
    seed = evaluate.seed_entities(tagger, SHARED / "seed-article.txt")
    assert set(seed["persons"]) == evaluate.SEED_PERSONS
    assert evaluate.SEED_LOCATIONS <= set(seed["locations"])
