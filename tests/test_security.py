"""Elasticsearch with security on (file-realm users made with the zip's elasticsearch-users):
credentials come only from the environment and are never echoed."""
import dataclasses

import pytest

from newsbeam.pipeline import local_es
from newsbeam.pipeline.config import AlertSettings, ElasticsearchSettings
from newsbeam.transforms.elastic import BulkWriter, ElasticsearchUnavailable, connect, ensure_indices
from tests.support.cli import newsbeam

SECRET_NAMES = ("ELASTICSEARCH_API_KEY", "ELASTICSEARCH_USERNAME", "ELASTICSEARCH_PASSWORD")


@pytest.fixture
def secure_settings(secure_es_node, monkeypatch):
    for name in SECRET_NAMES:
        monkeypatch.delenv(name, raising=False)
    # The shipped index names: the role local_es installs covers exactly those (the node is this session's own).
    return ElasticsearchSettings(url=secure_es_node.url, ca_certs=secure_es_node.ca_certs)


def test_tls_is_verified_against_the_ca(secure_es_node, secure_settings, monkeypatch):
    assert secure_settings.url.startswith("https://")
    monkeypatch.setenv("ELASTICSEARCH_USERNAME", secure_es_node.username)
    monkeypatch.setenv("ELASTICSEARCH_PASSWORD", secure_es_node.password)
    connect(secure_settings)  # verified with the CA
    unverified = dataclasses.replace(secure_settings, ca_certs=None)
    with pytest.raises(ElasticsearchUnavailable, match="cannot reach Elasticsearch at https://.*(TLS|SSL|certificate)"):
        connect(unverified)


def test_without_credentials_the_error_says_what_to_set(secure_settings):
    with pytest.raises(ElasticsearchUnavailable, match="refused the credentials .*401.*ELASTICSEARCH_API_KEY"):
        connect(secure_settings)


def test_least_privilege_user_sets_up_and_writes_but_cannot_touch_other_indices(
        secure_es_node, secure_settings, monkeypatch):
    monkeypatch.setenv("ELASTICSEARCH_USERNAME", local_es.WRITER_USER)
    monkeypatch.setenv("ELASTICSEARCH_PASSWORD", secure_es_node.password)
    client = connect(secure_settings)
    # What `newsbeam run` ensures at start-up, alert indices included: the rules index is only
    # read by the role, so the run goes on without creating it.
    ensure_indices(client, secure_settings, AlertSettings())
    assert "newsbeam-alerts" in secure_es_node.request("GET", "/newsbeam-alerts")
    outcomes = BulkWriter(client, secure_settings.articles_alias, "article_id").write(
        [{"article_id": "k1", "title": "written by the pipeline role"}])
    assert outcomes == [("written", "")]
    (outcome, detail), = BulkWriter(client, "someone-elses-index", "article_id").write(
        [{"article_id": "k2", "title": "not ours"}])
    assert outcome == "failed" and "403" in detail and "security_exception" in detail


def test_an_api_key_is_sent_from_the_environment(secure_settings, monkeypatch):
    # The bare server cannot mint API keys (see docs/operations.md); an invalid key proves the header is
    # sent and that the refusal is reported clearly.
    monkeypatch.setenv("ELASTICSEARCH_API_KEY", "bm90LWEta2V5Om5vcGU=")
    with pytest.raises(ElasticsearchUnavailable, match="refused the credentials"):
        connect(secure_settings)


def test_wrong_password_is_one_line_and_never_echoed(secure_es_node):
    env = {"ELASTICSEARCH_USERNAME": secure_es_node.username, "ELASTICSEARCH_PASSWORD": "wrong-Secret-42",
           "ELASTICSEARCH_CA_CERTS": secure_es_node.ca_certs}
    result = newsbeam("search", "x", "--es-url", secure_es_node.url, env=env, timeout=120)
    assert result.returncode == 2
    assert "refused the credentials (HTTP 401)" in result.stderr
    assert "wrong-Secret-42" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
