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


FEED = "  - url: https://ok.example/rss\n"


@pytest.mark.parametrize("entry, message", [
    ("  - url: https://two.example/rss\n    pol_interval: 60\n", r"feed #2: unknown key\(s\) pol_interval; known: "
                                                                  "url, name, publisher, poll_interval, full_text"),
    ("  - url: https://two.example/rss\n    poll_interval: yes\n", "feed #2: .*poll_interval must be a positive number"),
    ("  - url: https://two.example/rss\n    poll_interval: .nan\n", "feed #2: .*poll_interval must be a positive number"),
    ("  - url: https://two.example/rss\n    poll_interval: .inf\n", "feed #2: .*poll_interval must be a positive number"),
    ("  - url: https://two.example/rss\n    full_text: 1\n", "feed #2: .*full_text must be true or false"),
    ("  - url: https://two.example/rss\n    name: 2024\n", "feed #2: name must be a string"),
    ("  - url: https://two.example/rss\n    name:\n", "feed #2: name must be a string"),
    ("  - url: [https://two.example/rss]\n", "feed #2: url must be a string"),
    ("  - https://two.example/rss: {}\n", r"feed #2 needs a 'url'"),
])
def test_feed_entries_are_strict_about_keys_and_types(tmp_path, entry, message):
    path = tmp_path / "feeds.yaml"
    path.write_text("feeds:\n" + FEED + entry)
    with pytest.raises(ConfigError, match=message) as caught:
        load_feeds(path)
    assert str(caught.value).startswith(f"{path}: feed #2")


@pytest.mark.parametrize("text, message", [
    ("poll_interval: yes\n", "poll_interval must be a positive number"),  # was 1 s
    ("poll_interval: .nan\n", "poll_interval must be a positive number"),
    ("fetch:\n  concurrency: 2.5\n", r"fetch.concurrency must be a whole number"),  # was 2
    ("fetch:\n  max_items_per_feed: 0.5\n", r"fetch.max_items_per_feed must be a whole number"),  # was 0
    ("fetch:\n  total_timeout: .inf\n", r"fetch.total_timeout must be a positive number"),
    ("fetch:\n  parse_processes: 1.5\n", r"fetch.parse_processes must be 'auto' or a whole number"),
    ("elasticsearch:\n  ca_certs: 5\n", r"elasticsearch.ca_certs must be a string"),
    ("feeds_file: 5\n", "feeds_file must be a file name"),
    ("topics_file: [a]\n", "topics_file must be a file name"),
])
def test_settings_refuse_values_of_the_wrong_kind(tmp_path, text, message):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(path)
