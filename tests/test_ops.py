"""`newsbeam status` and `newsbeam es create-api-key` against the real Elasticsearch."""
import json

from newsbeam.pipeline import es_role
from newsbeam.pipeline.config import ElasticsearchSettings, Settings
from newsbeam.pipeline.ops_cli import pipeline_role
from newsbeam.transforms.deadletter import dead_letter
from newsbeam.transforms.elastic import BulkWriter, connect, ensure_indices
from tests.support import REPO
from tests.support.cli import newsbeam
from tests.support.config import write_config


def test_status_summarises_articles_feeds_and_dead_letters(tmp_path, es, es_settings):
    client = connect(es_settings)
    ensure_indices(client, es_settings)
    assert BulkWriter(client, es_settings.articles_alias, "article_id").write(
        [{"article_id": f"s{i}", "title": f"t{i}"} for i in range(3)]) == [("written", "")] * 3
    dead = [dead_letter("fetch", "timeout", "read timed out", feed_url="https://slow.example/rss"),
            dead_letter("fetch", "timeout", "read timed out", feed_url="https://slower.example/rss"),
            dead_letter("parse", "unparseable_feed", "not a feed", feed_url="https://bad.example/rss")]
    assert [o for o, _ in BulkWriter(client, es_settings.deadletter_index, "dead_letter_id", "index").write(dead)] \
        == ["written"] * 3
    es.index(index=es_settings.feeds_index, id="f1", document={
        "feed_url": "https://slow.example/rss", "consecutive_failures": 4, "error_class": "timeout", "dead": False})
    es.index(index=es_settings.feeds_index, id="f2", document={
        "feed_url": "https://ok.example/rss", "consecutive_failures": 0, "dead": False})
    es.indices.refresh(index="*")
    config = write_config(tmp_path, es_settings, poll_interval=60)
    result = newsbeam("status", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["dead_letters"]["total"] == 3
    assert status["dead_letters"]["last_24h_by_stage_reason"] == {"fetch/timeout": 2, "parse/unparseable_feed": 1}
    assert status["feeds"]["total"] == 2 and status["feeds"]["failing"] == 1
    assert status["feeds"]["worst"][0]["feed_url"] == "https://slow.example/rss"
    assert status["articles"]["total"] == 3
    text = newsbeam("status", "--config", str(config))
    assert "dead letters  3 in all" in text.stdout and "2  fetch/timeout" in text.stdout


def test_pipeline_role_covers_only_newsbeam_indices():
    role = pipeline_role(Settings())
    names = [name for entry in role["indices"] for name in entry["names"]]
    assert sorted(names) == sorted(["news-articles", "news-articles-*", "newsbeam-deadletters", "newsbeam-feeds",
                                    "newsbeam-alerts", "newsbeam-alerts-targets", "newsbeam-rules"])
    rules = next(e for e in role["indices"] if e["names"] == ["newsbeam-rules"])
    assert set(rules["privileges"]) == {"read", "view_index_metadata"}  # rules are read-only for the pipeline
    assert role["cluster"] == ["monitor"]  # no template privilege: it cannot be limited to newsbeam's templates


def test_local_es_and_the_docs_carry_the_same_role_as_create_api_key():
    role = pipeline_role(Settings())
    assert json.loads(es_role.roles_file()) == {es_role.ROLE_NAME: role}  # what local_es writes to roles.yml
    operations = (REPO / "docs" / "operations.md").read_text()
    documented = operations.split("## The pipeline's role", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    assert json.loads(documented) == role


def test_create_api_key_reports_a_refusing_server_in_one_line(secure_es_node):
    env = {"ELASTICSEARCH_USERNAME": secure_es_node.username, "ELASTICSEARCH_PASSWORD": secure_es_node.password,
           "ELASTICSEARCH_CA_CERTS": secure_es_node.ca_certs}
    result = newsbeam("es", "create-api-key", "--es-url", secure_es_node.url, env=env, timeout=120)
    # The bare server cannot create the .security index that API keys live in.
    assert result.returncode == 2
    assert "refused to create the API key" in result.stderr
    assert "Traceback" not in result.stderr and secure_es_node.password not in result.stderr


def test_secrets_can_come_from_files(tmp_path, secure_es_node, monkeypatch):
    for name in ("ELASTICSEARCH_API_KEY", "ELASTICSEARCH_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    secret_file = tmp_path / "password"
    secret_file.write_text(secure_es_node.password + "\n")
    monkeypatch.setenv("ELASTICSEARCH_USERNAME", secure_es_node.username)
    monkeypatch.setenv("ELASTICSEARCH_PASSWORD_FILE", str(secret_file))
    settings = ElasticsearchSettings(url=secure_es_node.url, ca_certs=secure_es_node.ca_certs)
    assert connect(settings).cluster.health()["status"] in ("green", "yellow")
