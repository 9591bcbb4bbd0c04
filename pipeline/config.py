"""User settings: `configs/*.yaml` loaded into validated dataclasses.

Every error names the file and the key so a user can fix it without reading code.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from importlib import resources
from pathlib import Path
from typing import Any

from newsbeam.transforms.settings import (  # noqa: F401 (re-exported)
    AUTO,
    DEFAULT_MODEL,
    FALLBACK_MODEL,
    AlertSettings,
    ConfigError,
    DedupeSettings,
    ElasticsearchSettings,
    Feed,
    FetchSettings,
    NlpSettings,
    Settings,
    SmtpSettings,
    is_positive_number,
    load_yaml,
)

# The shipped configs are package data (newsbeam.configs), so an installed newsbeam finds them too.
DEFAULT_CONFIG = Path(str(resources.files("newsbeam.configs") / "pipeline.yaml"))


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
            if value != AUTO and not (_is_whole(value) and value >= 0):
                raise ConfigError(f"{where}.{key} must be 'auto' or a whole number >= 0, got {value!r}")
            value = value if value == AUTO else int(value)
        elif isinstance(default, (int, float)):
            if not is_positive_number(value):
                raise ConfigError(f"{where}.{key} must be a positive number, got {value!r}")
            if isinstance(default, int) and not _is_whole(value):  # int(2.5) would quietly be 2
                raise ConfigError(f"{where}.{key} must be a whole number, got {value!r}")
            value = type(default)(value)
        elif isinstance(default, str) or (default is None and value is not None):
            if not isinstance(value, str):
                raise ConfigError(f"{where}.{key} must be a string, got {value!r}")
        values[key] = value
    return cls(**values)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def _file_name(raw: dict[str, Any], key: str, path: Path) -> str | None:
    value = raw.get(key)
    if value is not None and not (isinstance(value, str) and value.strip()):
        raise ConfigError(f"{path}: {key} must be a file name, got {value!r}")
    return value


_FEED_KEYS = tuple(field.name for field in dataclasses.fields(Feed))


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
        unknown = [key for key in item if key not in _FEED_KEYS]
        if unknown:
            raise ConfigError(f"{path}: feed #{number}: unknown key(s) {', '.join(map(str, unknown))}; "
                              f"known: {', '.join(_FEED_KEYS)}")
        try:
            feeds.append(Feed(**item))
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
    if not is_positive_number(poll_interval):
        raise ConfigError(f"{path}: poll_interval must be a positive number of seconds, got {poll_interval!r}")
    feeds_file = _file_name(raw, "feeds_file", path)
    feeds = load_feeds(base / feeds_file) if feeds_file else ()
    topics_file = base / (_file_name(raw, "topics_file", path) or "topics.yaml")
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


def with_connection(settings: Settings, url: str | None, ca_certs: str | None) -> Settings:
    """Command-line connection flags win over the environment and the config file."""
    changes = {key: value for key, value in (("url", url), ("ca_certs", ca_certs)) if value}
    if not changes:
        return settings
    return dataclasses.replace(settings, elasticsearch=dataclasses.replace(settings.elasticsearch, **changes))


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings for a subcommand with --config and optional --es-url / --es-ca-certs flags."""
    return with_connection(load_settings(args.config), getattr(args, "es_url", None),
                            getattr(args, "es_ca_certs", None))
