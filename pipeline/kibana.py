"""`newsbeam kibana setup`: imports the saved objects in `deploy/kibana/` (data views, saved
searches, the "News overview" dashboard) through Kibana's saved objects import API.

The import overwrites objects with the same ids, so running it again is harmless and restores
objects someone edited. The objects are written for one Kibana version (`KIBANA_VERSION`, the
version of deploy/docker-compose.yml and of the Elasticsearch the tests run against); a Kibana
reporting another version is refused before anything is written.

Credentials come from the environment only: `KIBANA_USERNAME` + `KIBANA_PASSWORD`, else
`ELASTICSEARCH_API_KEY`, else `ELASTICSEARCH_USERNAME` + `ELASTICSEARCH_PASSWORD` (Kibana checks
them against Elasticsearch). `KIBANA_CA_CERTS` names a CA bundle for an https Kibana.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import requests

KIBANA_VERSION = "9.5.4"
DEFAULT_URL = "http://127.0.0.1:5601"
OBJECTS_DIR = Path(str(resources.files("newsbeam.kibana")))  # deploy/kibana, installed as package data
DASHBOARD_ID = "newsbeam-news-overview"
_TIMEOUT = (5.0, 120.0)  # connect, read: an import of many objects can take a while


class KibanaError(RuntimeError):
    """Kibana cannot be reached, refused us, or is not the version the objects are made for.
    The message is one line."""


@dataclasses.dataclass(frozen=True)
class ImportResult:
    kibana_url: str
    version: str
    imported: dict[str, int]  # saved object type -> count

    @property
    def total(self) -> int:
        return sum(self.imported.values())


def load_objects(directory: Path = OBJECTS_DIR) -> list[dict[str, Any]]:
    """Every object of every `*.ndjson` file in `directory`, in file order."""
    files = sorted(directory.glob("*.ndjson"))
    if not files:
        raise KibanaError(f"no saved objects (*.ndjson) in {directory}")
    objects = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                objects.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise KibanaError(f"{path}:{number}: not JSON ({err.msg})") from None
    return objects


def to_ndjson(objects: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
                   for obj in objects).encode("utf-8")


def new_session() -> requests.Session:
    session = requests.Session()
    session.headers["Accept"] = "application/json"
    env = os.environ
    if env.get("KIBANA_USERNAME"):
        session.auth = (env["KIBANA_USERNAME"], env.get("KIBANA_PASSWORD", ""))
    elif env.get("ELASTICSEARCH_API_KEY"):
        session.headers["Authorization"] = f"ApiKey {env['ELASTICSEARCH_API_KEY']}"
    elif env.get("ELASTICSEARCH_USERNAME"):
        session.auth = (env["ELASTICSEARCH_USERNAME"], env.get("ELASTICSEARCH_PASSWORD", ""))
    if env.get("KIBANA_CA_CERTS"):
        session.verify = env["KIBANA_CA_CERTS"]
    return session


def _request(session: requests.Session, method: str, url: str, base: str, **kwargs) -> requests.Response:
    try:
        response = session.request(method, url, timeout=_TIMEOUT, **kwargs)
    except requests.RequestException as err:
        raise KibanaError(f"cannot reach Kibana at {base}: {type(err).__name__}") from None
    if response.status_code == 401:
        raise KibanaError(f"Kibana at {base} refused the credentials (HTTP 401); set KIBANA_USERNAME/"
                          "KIBANA_PASSWORD or ELASTICSEARCH_USERNAME/ELASTICSEARCH_PASSWORD")
    if response.status_code == 403:
        raise KibanaError(f"Kibana at {base} forbids this user {method} {url.removeprefix(base)} (HTTP 403); "
                          "it needs Kibana's Saved Objects Management privilege (the elastic user has it)")
    return response


def _json_body(response: requests.Response, base: str, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise KibanaError(f"{base} does not look like Kibana: {what} answered HTTP {response.status_code} "
                          "without JSON") from None
    if not isinstance(body, dict):
        raise KibanaError(f"{base} does not look like Kibana: {what} answered {type(body).__name__}")
    return body


def kibana_version(session: requests.Session, base: str) -> str:
    """The version GET /api/status reports. A user without the `monitor` privilege gets a
    redacted status without the version, which we cannot check, so that is an error too."""
    response = _request(session, "GET", f"{base}/api/status", base)
    body = _json_body(response, base, "GET /api/status")
    version = (body.get("version") or {}).get("number")
    if not version:
        level = ((body.get("status") or {}).get("overall") or {}).get("level", "unknown")
        raise KibanaError(f"Kibana at {base} did not report its version (HTTP {response.status_code}, status "
                          f"{level}); give the user the monitor cluster privilege")
    return str(version)


def _failures(body: dict[str, Any]) -> str:
    parts = []
    for error in body.get("errors") or []:
        detail = error.get("error") or {}
        reason = detail.get("type", "unknown")
        if reason == "missing_references":
            missing = ", ".join(f"{ref.get('type')}/{ref.get('id')}" for ref in detail.get("references") or [])
            reason = f"missing_references: {missing}"
        elif detail.get("message"):
            reason = f"{reason}: {detail['message']}"
        parts.append(f"{error.get('type')}/{error.get('id')} ({reason})")
    return "; ".join(parts) or json.dumps(body)[:300]


def import_objects(objects: list[dict[str, Any]], kibana_url: str = DEFAULT_URL, space: str | None = None,
                   session: requests.Session | None = None) -> ImportResult:
    """Checks Kibana's version, then imports `objects` in one request with overwrite=true."""
    base = kibana_url.rstrip("/")
    session = session or new_session()
    version = kibana_version(session, base)
    if version != KIBANA_VERSION:
        raise KibanaError(f"Kibana at {base} is version {version}; the saved objects in deploy/kibana/ are made "
                          f"for Kibana {KIBANA_VERSION} (the version of deploy/docker-compose.yml)")
    path = f"/s/{space}/api/saved_objects/_import" if space else "/api/saved_objects/_import"
    response = _request(session, "POST", f"{base}{path}", base, params={"overwrite": "true"},
                        headers={"kbn-xsrf": "newsbeam"},
                        files={"file": ("newsbeam.ndjson", to_ndjson(objects), "application/ndjson")})
    body = _json_body(response, base, f"POST {path}")
    if response.status_code != 200:
        raise KibanaError(f"Kibana at {base} refused the import (HTTP {response.status_code}): "
                          f"{body.get('message') or body.get('error') or json.dumps(body)[:300]}")
    if not body.get("success"):
        raise KibanaError(f"Kibana at {base} imported {body.get('successCount', 0)} of {len(objects)} saved "
                          f"objects; failed: {_failures(body)}")
    imported = collections.Counter(item.get("type", "?") for item in body.get("successResults") or [])
    return ImportResult(base, version, dict(imported))


def setup(kibana_url: str | None = None, space: str | None = None, directory: Path = OBJECTS_DIR) -> ImportResult:
    """`newsbeam kibana setup`: the objects of `directory` into the Kibana at `kibana_url`
    (default `$KIBANA_URL`, else http://127.0.0.1:5601)."""
    url = kibana_url or os.environ.get("KIBANA_URL") or DEFAULT_URL
    return import_objects(load_objects(directory), url, space)
