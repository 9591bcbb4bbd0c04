import pytest

from newsbeam.pipeline.config import ConfigError, load_feeds, load_settings
from tests.support import REPO


def test_shipped_config_loads_with_real_publisher_feeds():
    settings = load_settings(REPO / "configs" / "pipeline.yaml")
    assert len(settings.feeds) >= 5
    assert all(feed.url.startswith("https://") for feed in settings.feeds)
    assert settings.elasticsearch.articles_alias == "news-articles"
    assert settings.topics_file.exists()


def test_environment_overrides_the_elasticsearch_url(monkeypatch):
    monkeypatch.setenv("ELASTICSEARCH_URL", "http://127.0.0.1:19200")
    assert load_settings(REPO / "configs" / "pipeline.yaml").elasticsearch.url == "http://127.0.0.1:19200"


@pytest.mark.parametrize("text, message", [
    ("poll_interval: -5\n", "poll_interval must be a positive number"),
    ("fetch:\n  read_timeout: soon\n", r"fetch.read_timeout must be a positive number"),
    ("fetch:\n  speed: 3\n", r"unknown key\(s\) speed"),
    ("polling: 3\n", r"unknown key\(s\) polling"),
    ("feeds_file: missing.yaml\n", "missing.yaml: file not found"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_settings_are_explained(tmp_path, text, message):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_bad_feed_lists_are_explained(tmp_path):
    path = tmp_path / "feeds.yaml"
    path.write_text("feeds:\n  - url: https://ok.example/rss\n  - url: ftp://bad.example/rss\n")
    with pytest.raises(ConfigError, match=r"feed #2.*http\(s\)"):
        load_feeds(path)
    path.write_text("feeds:\n  - name: no url\n")
    with pytest.raises(ConfigError, match="needs a 'url'"):
        load_feeds(path)
    path.write_text("feeds:\n  - https://plain.example/rss\n")
    assert load_feeds(path)[0].url == "https://plain.example/rss"
