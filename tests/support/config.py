"""Config files for `newsbeam` in tests and benchmarks: the shipped pipeline.yaml (or, with
`shipped=False`, the code's defaults) pointed at per-run indices and at feeds on loopback."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from newsbeam.transforms.settings import AlertSettings, ElasticsearchSettings
from tests.support import REPO


def prefixed(url: str, prefix: str) -> tuple[ElasticsearchSettings, AlertSettings]:
    """Index names of one run (`PREFIX-articles`, `PREFIX-deadletters`, ...) on `url`."""
    return (ElasticsearchSettings(url=url, articles_alias=f"{prefix}-articles", deadletter_index=f"{prefix}-deadletters",
                                  feeds_index=f"{prefix}-feeds"),
            AlertSettings(rules_index=f"{prefix}-rules", alerts_index=f"{prefix}-alerts"))


def write_config(directory: Path, es_settings: ElasticsearchSettings, poll_interval: float, *,
                 alerts: AlertSettings | None = None, overrides: Mapping[str, Any] | None = None,
                 shipped: bool = True) -> Path:
    """Writes DIRECTORY/pipeline.yaml and returns its path. `alerts` names the rules and alerts
    indices (by default the run's own, beside its articles: tests may run side by side on one
    node); `overrides` is merged in last, section by section."""
    config: dict[str, Any] = yaml.safe_load((REPO / "configs" / "pipeline.yaml").read_text()) if shipped else {}
    config["poll_interval"] = poll_interval
    config["topics_file"] = str(REPO / "configs" / "topics.yaml")
    if (config.get("nlp") or {}).get("gazetteer"):  # the copy lives elsewhere: keep paths pointing at configs/
        config["nlp"]["gazetteer"] = str(REPO / "configs" / config["nlp"]["gazetteer"])
    config.pop("feeds_file", None)
    config.setdefault("elasticsearch", {}).update(
        url=es_settings.url, articles_alias=es_settings.articles_alias,
        deadletter_index=es_settings.deadletter_index, feeds_index=es_settings.feeds_index)
    # The test feeds are served on 127.0.0.1; poll on the interval: the tests time new items.
    config.setdefault("fetch", {}).update(allow_private_addresses=True, unchanged_backoff_max=1)
    # A bounded run is ended at --duration + shutdown_grace whatever is in flight; tests that
    # look at everything a run indexed give it time to drain on a loaded machine (the tests of
    # ending on time set their own grace).
    config["fetch"]["shutdown_grace"] = 120
    if alerts is None and es_settings.articles_alias.endswith("-articles"):
        alerts = prefixed(es_settings.url, es_settings.articles_alias.removesuffix("-articles"))[1]
    if alerts is not None:
        config.setdefault("alerts", {}).update(rules_index=alerts.rules_index, alerts_index=alerts.alerts_index)
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
