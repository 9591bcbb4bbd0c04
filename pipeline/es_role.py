"""The pipeline's least-privilege Elasticsearch role, defined once: `newsbeam es create-api-key`
limits its key to it, `local_es` installs it as the file-realm role `newsbeam_writer` of a node
with security on, and docs/operations.md shows it (a test keeps the three equal).

Standard library only, like local_es, which runs before anything else is installed."""
from __future__ import annotations

import json
from typing import Any

ROLE_NAME = "newsbeam_writer"


def pipeline_role(articles_alias: str = "news-articles", deadletter_index: str = "newsbeam-deadletters",
                  feeds_index: str = "newsbeam-feeds", alerts_index: str = "newsbeam-alerts",
                  rules_index: str = "newsbeam-rules") -> dict[str, Any]:
    """What `newsbeam run` needs: create its indices (templates, the first index with its alias,
    which takes `manage`), write and read them; the alert rules only read. `<alerts>-targets`
    holds each alert target's back-off (transforms/delivery.py, target_state_index)."""
    own = [f"{articles_alias}*", deadletter_index, feeds_index, alerts_index, f"{alerts_index}-targets"]
    return {"cluster": ["monitor", "manage_index_templates"],
            "indices": [{"names": own, "privileges": ["create_doc", "index", "create_index", "auto_configure",
                                                      "read", "view_index_metadata", "manage"]},
                        {"names": [rules_index], "privileges": ["read", "view_index_metadata"]}]}


def roles_file(role: dict[str, Any] | None = None) -> str:
    """Elasticsearch's roles.yml with the role (JSON is YAML)."""
    return json.dumps({ROLE_NAME: role or pipeline_role()}, indent=2) + "\n"
