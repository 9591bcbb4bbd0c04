"""`newsbeam search`: highlighting, paging and --json, on the real Elasticsearch with the fixture
articles indexed by the pipeline's own code."""
import dataclasses
import json
import uuid

import pytest

from newsbeam.pipeline import cli
from newsbeam.pipeline.config import ConfigError, ElasticsearchSettings, load_settings
from newsbeam.transforms.elastic import BulkWriter, connect, ensure_indices
from newsbeam.transforms.search import (
    MAX_RESULT_WINDOW,
    format_hit,
    page_offset,
    page_summary,
    results_json,
    search_articles,
)
from tests.support import REPO
from tests.support.config import write_config
from tests.support.fixture_corpus import index_fixture_articles

NEWEST_FIRST = ["election", "floods", "chips", "ventilators", "late"]


@pytest.fixture(scope="module")
def corpus(es_url, nlp):
    """One index of the five fixture articles for the whole module (tagging is the slow part)."""
    prefix = f"s{uuid.uuid4().hex[:10]}"
    es_settings = ElasticsearchSettings(url=es_url, articles_alias=f"{prefix}-articles",
                                        deadletter_index=f"{prefix}-deadletters")
    settings = dataclasses.replace(load_settings(REPO / "configs" / "pipeline.yaml"), elasticsearch=es_settings)
    client = connect(es_settings)
    ids = index_fixture_articles(client, settings, nlp)
    yield client, es_settings, ids
    client.indices.delete(index=f"{prefix}-*")
    client.indices.delete_index_template(name=f"{prefix}-*")
    client.close()


def keys_of(response, ids):
    by_id = {article_id: key for key, article_id in ids.items()}
    return [by_id[hit["_source"]["article_id"]] for hit in response["hits"]["hits"]]


def test_matches_are_highlighted_in_title_and_text(corpus):
    client, es_settings, ids = corpus
    response = search_articles(client, es_settings.articles_alias, "ventilators")
    assert keys_of(response, ids) == ["ventilators"]
    (hit,) = response["hits"]["hits"]
    assert hit["highlight"]["title"] == ["U.S. to ship <em>ventilators</em> to Russia after Trump-Putin call"]
    fragments = hit["highlight"]["body"]
    assert 1 <= len(fragments) <= 2 and all("<em>ventilators</em>" in f and len(f) < 300 for f in fragments)
    text = format_hit(hit, ("[", "]"))
    assert "U.S. to ship [ventilators] to Russia" in text.splitlines()[0]
    assert "<em>" not in text and "[ventilators]" in text.splitlines()[2]


def test_a_filter_only_search_has_no_highlight_and_still_prints(corpus):
    client, es_settings, ids = corpus
    response = search_articles(client, es_settings.articles_alias, "", topic="Medical Equipment Aid")
    assert keys_of(response, ids) == ["ventilators", "late"]
    assert all(not hit.get("highlight") for hit in response["hits"]["hits"])
    lines = format_hit(response["hits"]["hits"][0]).splitlines()
    assert len(lines) == 3 and lines[1].strip() == "topics: medical equipment aid"


def test_pages_are_disjoint_stable_and_cover_every_match(corpus):
    client, es_settings, ids = corpus
    pages = [keys_of(search_articles(client, es_settings.articles_alias, "", limit=2, page=page), ids)
             for page in (1, 2, 3, 4)]
    assert pages == [NEWEST_FIRST[0:2], NEWEST_FIRST[2:4], NEWEST_FIRST[4:5], []]
    again = keys_of(search_articles(client, es_settings.articles_alias, "", limit=2, page=2), ids)
    assert again == pages[1]


def test_paging_past_elasticsearchs_window_is_refused_before_asking():
    assert page_offset(1, 10) == 0 and page_offset(3, 10) == 20
    assert page_offset(MAX_RESULT_WINDOW // 10, 10) == MAX_RESULT_WINDOW - 10
    with pytest.raises(ConfigError, match="narrow the search"):
        page_offset(MAX_RESULT_WINDOW // 10 + 1, 10)
    with pytest.raises(ConfigError, match="1 or more"):
        page_offset(0, 10)


def test_page_summary_says_where_the_user_is():
    assert page_summary(2, 5, 1, 2) == "1-2 of 5 matching article(s); next: --page 2"
    assert page_summary(1, 5, 3, 2) == "5-5 of 5 matching article(s)"
    assert page_summary(0, 5, 4, 2) == "0 of 5 matching article(s) (page 4 is past the end)"
    assert page_summary(0, 0, 1, 10) == "0 of 0 matching article(s)"


def test_results_json_carries_fields_score_and_highlight(corpus):
    client, es_settings, ids = corpus
    response = search_articles(client, es_settings.articles_alias, "masks", limit=5)
    document = results_json(response, page=1, limit=5)
    assert document["total"] == 1 and document["page"] == 1 and document["page_size"] == 5
    (article,) = document["articles"]
    assert article["article_id"] == ids["late"] and article["source"] == "wire.example.net"
    assert "Angela Merkel" in article["persons"] and article["score"] > 0
    assert "<em>masks</em>" in article["highlight"]["title"][0]


def test_cli_json_and_paging_as_a_user_runs_them(corpus, tmp_path, capsys, monkeypatch):
    for name in ("ELASTICSEARCH_URL", "ELASTICSEARCH_API_KEY", "ELASTICSEARCH_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    _, es_settings, ids = corpus
    config = str(write_config(tmp_path, es_settings, poll_interval=60))
    assert cli.main(["search", "--config", config, "--json", "--limit", "2", "--page", "2"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["total"] == 5 and document["page"] == 2
    assert [a["article_id"] for a in document["articles"]] == [ids[k] for k in NEWEST_FIRST[2:4]]

    assert cli.main(["search", "--config", config, "--limit", "2", "--page", "2"]) == 0
    captured = capsys.readouterr()
    titles = [line for line in captured.out.splitlines() if line[:4].isdigit()]
    assert len(titles) == 2 and "Chipmaker TSMC" in titles[0] and "ventilators" in titles[1]
    assert captured.err.strip().splitlines()[-1] == "3-4 of 5 matching article(s); next: --page 3"

    assert cli.main(["search", "--config", config, "ventilators", "Putin"]) == 0
    out = capsys.readouterr().out
    assert "*ventilators*" in out and "*Putin*" in out  # not a terminal: plain-text emphasis

    assert cli.main(["search", "--config", config, "--page", "2000"]) == 2
    assert "narrow the search" in capsys.readouterr().err


def test_a_body_longer_than_the_highlight_limit_still_searches(es_settings):
    """Elasticsearch refuses to highlight past index.highlight.max_analyzed_offset (1,000,000
    characters) and fails the whole search, unless the request caps the offset itself."""
    client = connect(es_settings)
    ensure_indices(client, es_settings)
    body = "Ventilators shipped to Moscow. " + "filler words " * 100_000
    assert len(body) > 1_000_000
    BulkWriter(client, es_settings.articles_alias, "article_id").write(
        [{"article_id": "long", "title": "A long one", "body": body, "published_at": "2020-05-21T00:00:00Z"}])
    client.indices.refresh(index=es_settings.articles_alias)
    (hit,) = search_articles(client, es_settings.articles_alias, "ventilators")["hits"]["hits"]
    assert hit["highlight"]["body"][0].startswith("<em>Ventilators</em> shipped to Moscow.")
