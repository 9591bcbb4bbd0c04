"""The CLI's contract: `newsbeam tag` and clear one-line errors."""
import json

from tests.support.cli import newsbeam
from tests.support.feedserver import fixture_articles


def test_tag_adds_entities_and_topics_to_json_lines(tmp_path):
    fixture = fixture_articles()["ventilators"]
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "a1", "title": fixture["title"], "text": fixture["html"]}) + "\n\n" +
                      json.dumps({"id": "a2", "title": "", "text": "Nothing to see."}) + "\n")
    result = newsbeam("tag", "--input", str(source))
    assert result.returncode == 0, result.stderr
    first, second = [json.loads(line) for line in result.stdout.splitlines()]
    assert first["id"] == "a1" and first["text"] == fixture["html"]
    assert {"Donald Trump", "Vladimir Putin"} <= set(first["persons"])
    assert "medical equipment aid" in first["topics"]
    assert second["id"] == "a2" and second["topics"] == [] and second["entities"] == []


def test_tag_rejects_bad_input_with_the_line_number(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "ok"}\n{not json}\n')
    result = newsbeam("tag", "--input", str(source))
    assert result.returncode == 2
    assert "input line 2: not JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_elasticsearch_is_one_clear_line():
    result = newsbeam("search", "anything", "--es-url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "newsbeam: error: cannot reach Elasticsearch at http://127.0.0.1:9")
    assert "Traceback" not in result.stderr


def test_run_without_feeds_or_with_a_bad_config_explains(tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text("poll_interval: 10\n")
    result = newsbeam("run", "--config", str(config), "--duration", "1")
    assert result.returncode == 2 and "no feeds" in result.stderr
    config.write_text("poll_interval: ten\n")
    result = newsbeam("run", "--config", str(config))
    assert result.returncode == 2 and "poll_interval must be a positive number" in result.stderr


def test_commands_do_not_print_beams_import_time_apitools_notice():
    result = newsbeam("run", "--help")  # building this parser imports apache_beam
    assert result.returncode == 0, result.stderr
    assert "usage: newsbeam run" in result.stdout + result.stderr
    assert "apitools not found" not in result.stderr
