"""`newsbeam eval`: the evaluation harness on small labelled files written here, through the CLI."""
import json

import pytest

from newsbeam.pipeline import cli
from newsbeam.pipeline.evaluate import Counts, load_conll

CONLL = """-DOCSTART- -X- -X- O

RUSSIA NNP B-NP B-LOC
GETS VBZ B-VP O
VENTILATORS NNS B-NP O

President NNP B-NP O
Bill NNP I-NP B-PER
Clinton NNP I-NP I-PER
met VBD B-VP O
Boris NNP B-NP B-PER
Yeltsin NNP I-NP I-PER
in IN B-PP O
Moscow NNP B-NP B-LOC
on IN B-PP O
Tuesday NNP B-NP O
, , O O
the DT B-NP O
Kremlin NNP I-NP B-ORG
said VBD B-VP O
. . O O

-DOCSTART- -X- -X- O

Germany NNP B-NP I-LOC
beat VBD B-VP O
West NNP B-NP I-MISC
Indian NNP I-NP I-MISC
side NN I-NP O
. . O O
"""

CSV_HEADER = "id,split,message,original,genre,medical_products,floods,storm,earthquake,food,military,refugees\n"
MESSAGES = [
    ("1", "The Red Cross distributed 5,000 hygiene kits and medicines to victims of the floods and landslides in Pakistan.", "news", "1", "1"),
    ("2", "Heavy rains caused flooding across Sindh province.", "news", "0", "1"),
    ("3", "We need water in Jacmel, please help.", "direct", "1", "0"),
    ("4", "Parliament debated the budget on Tuesday.", "news", "1", "0"),
]


def run_cli(capsys, *args) -> dict:
    assert cli.main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "entities").mkdir()
    (tmp_path / "entities" / "conll2003-valid.txt").write_text(CONLL)
    (tmp_path / "topics").mkdir()
    rows = [f"{i},validation,\"{m}\",,{g},{med},{fl},0,0,0,0,0\n" for i, m, g, med, fl in MESSAGES]
    (tmp_path / "topics" / "disaster_response_validation.csv").write_text(CSV_HEADER + "".join(rows))
    (tmp_path / "articles").mkdir()
    articles = [
        {"url": "https://example.org/a", "title": "Germany donates 300 ventilators to Italy",
         "body_text": "Germany sent 300 ventilators and masks to hospitals in Lombardy on Monday, the government said."},
        {"url": "https://example.org/b", "title": "Wear a mask on the bus, city says",
         "body_text": "The city of Chicago ordered passengers to wear masks on buses and trains."},
    ]
    (tmp_path / "articles" / "recovery-reliable.jsonl").write_text("".join(json.dumps(a) + "\n" for a in articles))
    (tmp_path / "topics" / "recovery-medical-aid-dev.jsonl").write_text(
        '{"url": "https://example.org/a", "label": 1}\n{"url": "https://example.org/b", "label": 0}\n')
    return tmp_path


def test_conll_reader_accepts_iob1_and_drops_misc(corpus):
    first, second = load_conll(corpus / "entities" / "conll2003-valid.txt")
    assert first.text.splitlines()[0] == "RUSSIA GETS VENTILATORS"
    assert sorted(first.spans) == [(0, 1, "LOC"), (4, 6, "PER"), (7, 9, "PER"), (10, 11, "LOC"), (15, 16, "ORG")]
    assert sorted(second.spans) == [(0, 1, "LOC")]  # IOB1 "I-LOC" starts a span; MISC is not scored


def test_eval_entities_scores_exact_spans_after_titles_are_trimmed_and_headlines_true_cased(capsys, corpus, tmp_path):
    report = run_cli(capsys, "entities", "--corpus", str(corpus), "--seed", str(tmp_path / "no-seed.txt"))
    assert report["documents"] == 2 and report["unaligned_documents"] == 0
    per = report["labels"]["PER"]
    assert (per["gold"], per["tp"]) == (2, 2)  # "President" is trimmed off "President Bill Clinton"
    assert report["labels"]["LOC"]["tp"] >= 3  # the shouted headline's RUSSIA is found after true-casing
    assert report["micro"]["gold"] == 6
    assert "seed" not in report


def test_eval_topics_reports_each_dataset_and_the_worst_misses(capsys, corpus, tmp_path):
    report = run_cli(capsys, "topics", "--corpus", str(corpus), "--seed", str(tmp_path / "no-seed.txt"))
    disaster = report["datasets"]["disaster-response"]
    assert disaster["examples"] == 3  # news rows only
    aid = disaster["topics"]["medical equipment aid"]
    assert (aid["gold"], aid["tp"], aid["fn"]) == (2, 1, 1)
    (miss,) = [m for m in disaster["worst_misses"]["medical equipment aid"] if m["kind"] == "FN"]
    assert miss["text"].startswith("Parliament") and miss["score"] < miss["threshold"]
    assert disaster["topics"]["natural disasters"]["tp"] == 2
    recovery = report["datasets"]["recovery"]
    assert recovery["topics"]["medical equipment aid"]["tp"] == 1
    assert recovery["non_aid_tagged_share"] == 0.0 and recovery["aid_found_share"] == 1.0
    assert report["checks"] == []  # neither the Reuters article nor the seed article is in this corpus


def test_counts_are_precision_recall_f1():
    counts = Counts(tp=3, fp=1, fn=3, tn=10)
    assert (counts.precision, counts.recall, round(counts.f1, 4)) == (0.75, 0.5, 0.6)
    assert Counts().f1 == 0.0
