"""Shared fixtures. Elasticsearch is real in every test: the session starts a local node
from the integ-test zip (pipeline.local_es) unless NEWSBEAM_TEST_ES_URL names a running one."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from elasticsearch import Elasticsearch

from newsbeam.pipeline import local_es
from newsbeam.pipeline.config import ElasticsearchSettings, Settings, load_settings
from tests.support import REPO
from tests.support.feedserver import FeedServer

# Fixtures that reach a real Elasticsearch: a test using one is marked `integration`.
_ELASTICSEARCH_FIXTURES = frozenset({"es", "es_url", "es_node", "es_settings", "settings", "secure_es_node"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`integration`: the test talks to Elasticsearch. `slow` (besides the tests marked by hand,
    which run the streaming pipeline): it needs the secure node, which the session starts for it,
    or it is part of the external suite."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & _ELASTICSEARCH_FIXTURES:
            item.add_marker(pytest.mark.integration)
        if "secure_es_node" in fixtures or item.get_closest_marker("external"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def es_node():
    if os.environ.get("NEWSBEAM_TEST_ES_URL"):
        yield local_es.Instance(Path("."), 0), os.environ["NEWSBEAM_TEST_ES_URL"]
        return
    directory = Path(tempfile.mkdtemp(prefix="newsbeam-test-es-"))
    instance = local_es.start(directory, port=local_es.free_port())
    # Every test makes its own indices (a prefix each), and none may be deleted by wildcard: more
    # than a node's default of 1,000 shards over the whole suite.
    instance.request("PUT", "/_cluster/settings", {"persistent": {"cluster.max_shards_per_node": 100_000}})
    try:
        yield instance, instance.url
    finally:
        local_es.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def es_url(es_node) -> str:
    return es_node[1]


@pytest.fixture(scope="session")
def es(es_url) -> Elasticsearch:
    client = Elasticsearch(es_url, request_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="session")
def secure_es_node():
    """A second node with security on and HTTPS (CA from elasticsearch-certutil; file-realm
    users made with elasticsearch-users). NEWSBEAM_TEST_SECURE_ES_DIR names the folder of one
    already started with `local_es start --tls` to reuse (its roles.yml is rewritten)."""
    if os.environ.get("NEWSBEAM_TEST_SECURE_ES_DIR"):
        yield local_es.Instance.load(Path(os.environ["NEWSBEAM_TEST_SECURE_ES_DIR"]).resolve())
        return
    directory = Path(tempfile.mkdtemp(prefix="newsbeam-test-secure-es-"))
    instance = local_es.start(directory, port=local_es.free_port(), security=True, tls=True)
    try:
        yield instance
    finally:
        local_es.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def es_settings(es_url) -> ElasticsearchSettings:
    """Per-test index names, so tests never see each other's documents."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    return ElasticsearchSettings(url=es_url, articles_alias=f"{prefix}-articles",
                                 deadletter_index=f"{prefix}-deadletters", feeds_index=f"{prefix}-feeds",
                                 bulk_actions=50)


@pytest.fixture
def settings(es_settings) -> Settings:
    base = load_settings(REPO / "configs" / "pipeline.yaml")
    return dataclasses.replace(base, elasticsearch=es_settings, feeds=())


@pytest.fixture(scope="session")
def nlp():
    from newsbeam.transforms.entities import load_model
    return load_model()


@pytest.fixture
def feed_server():
    with FeedServer() as server:
        yield server


def _prism_binary() -> str | None:
    from newsbeam.pipeline.runner import prism_cache_path
    path = prism_cache_path()
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


@pytest.fixture(params=["FnApiRunner", "PrismRunner"])
def runner(request) -> list[str]:
    """`newsbeam run` arguments for each local runner the end-to-end scenarios run on. The Prism
    leg uses the binary deploy/prism.sh builds (deploy/test.sh runs it when Go is installed)."""
    if request.param == "FnApiRunner":
        return ["--runner", "FnApiRunner"]
    binary = _prism_binary()
    if binary is None:
        from newsbeam.pipeline.runner import prism_cache_path
        pytest.skip(f"PRISM LEG NOT RUN: no Prism binary at {prism_cache_path()}; "
                    f"deploy/prism.sh builds it (needs Go: {'found' if shutil.which('go') else 'not installed'})")
    return ["--runner", "PrismRunner", "--prism_location", binary]
