"""The pipeline's least-privilege Elasticsearch role, defined once: `newsbeam es create-api-key`
limits its key to it, `local_es` installs it as the file-realm role `newsbeam_writer` of a node
with security on, and docs/operations.md shows it (tests keep the three equal and run every
command the role is for against a secure node that holds it).

Standard library only, like local_es, which runs before anything else is installed."""
from __future__ import annotations

import json
from typing import Any

ROLE_NAME = "newsbeam_writer"


def pipeline_role(articles_alias: str = "news-articles", deadletter_index: str = "newsbeam-deadletters",
                  feeds_index: str = "newsbeam-feeds", alerts_index: str = "newsbeam-alerts",
                  rules_index: str = "newsbeam-rules") -> dict[str, Any]:
    """What `newsbeam run`, `alerts list|show|test|deliver`, `search` and `status` need once an
    administrator ran `newsbeam es setup`: find the templates (`monitor`), write and read their
    own indices, refresh them (`maintenance`), recreate one deleted mid-run from its template by
    writing to it (`auto_configure`); the alert rules only read. No template, alias or delete
    privilege: cluster `manage_index_templates` cannot be limited to some templates.
    `<alerts>-targets` holds each alert target's back-off (transforms/delivery.py)."""
    own = [articles_alias, f"{articles_alias}-*", deadletter_index, feeds_index, alerts_index, f"{alerts_index}-targets"]
    return {"cluster": ["monitor"],
            "indices": [{"names": own, "privileges": ["index", "auto_configure", "read", "view_index_metadata",
                                                      "maintenance"]},
                        {"names": [rules_index], "privileges": ["read", "view_index_metadata"]}]}


def roles_file(role: dict[str, Any] | None = None) -> str:
    """Elasticsearch's roles.yml with the role (JSON is YAML)."""
    return json.dumps({ROLE_NAME: role or pipeline_role()}, indent=2) + "\n"
