"""Shared fixtures. Elasticsearch is real in every test: the session starts a local node
from the integ-test zip (pipeline.local_es) unless NEWSBEAM_TEST_ES_URL names a running one.
With several pytest-xdist workers (`-n`), the controller starts one node for all of them;
the tests that need the secure node run on one worker (`--dist loadgroup`), which starts it."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.request
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


def _start_node(directory: Path, port: int) -> local_es.Instance:
    instance = local_es.start(directory, port=port)
    # Every test makes its own indices (a prefix each), and none may be deleted by wildcard: more
    # than a node's default of 1,000 shards over the whole suite.
    instance.request("PUT", "/_cluster/settings", {"persistent": {"cluster.max_shards_per_node": 100_000}})
    return instance


def _start_shared_node(directory: Path, port: int, failures: list[BaseException]) -> None:
    try:
        _start_node(directory, port)
    except BaseException as err:  # reported when the session ends; the workers time out waiting
        failures.append(err)


def pytest_configure(config: pytest.Config) -> None:
    """On the xdist controller: one Elasticsearch for every worker, started while they start."""
    workers = getattr(config.option, "numprocesses", None)
    if hasattr(config, "workerinput") or not workers or os.environ.get("NEWSBEAM_TEST_ES_URL"):
        return
    directory = Path(tempfile.mkdtemp(prefix="newsbeam-test-es-"))
    port = local_es.free_port()
    failures: list[BaseException] = []
    thread = threading.Thread(target=_start_shared_node, args=(directory, port, failures), daemon=True)
    thread.start()
    os.environ["NEWSBEAM_TEST_ES_URL"] = f"http://127.0.0.1:{port}"  # the workers inherit it
    config.stash[_SHARED_NODE] = (directory, thread, failures)


_SHARED_NODE = pytest.StashKey[tuple[Path, threading.Thread, list[BaseException]]]()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SHARED_NODE not in config.stash:
        return
    directory, thread, failures = config.stash[_SHARED_NODE]
    thread.join()
    local_es.stop(directory)
    shutil.rmtree(directory, ignore_errors=True)
    for err in failures:
        print(f"the shared Elasticsearch did not start: {type(err).__name__}: {err}")


def _wait_for(url: str, timeout: float = 300.0) -> None:
    """A node named by NEWSBEAM_TEST_ES_URL may still be starting (the xdist controller's is)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_cluster/health?wait_for_status=yellow&timeout=5s", timeout=10):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"NEWSBEAM_TEST_ES_URL={url} did not answer within {timeout:g}s: {err}") from None
            time.sleep(0.5)


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the xdist_group marks set here
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
        if "secure_es_node" in fixtures:  # one worker starts the secure node and runs them all
            item.add_marker(pytest.mark.xdist_group("secure-es"))


@pytest.fixture(scope="session")
def es_node():
    if os.environ.get("NEWSBEAM_TEST_ES_URL"):
        _wait_for(os.environ["NEWSBEAM_TEST_ES_URL"])
        yield local_es.Instance(Path("."), 0), os.environ["NEWSBEAM_TEST_ES_URL"]
        return
    directory = Path(tempfile.mkdtemp(prefix="newsbeam-test-es-"))
    instance = _start_node(directory, local_es.free_port())
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
    """Per-test index names, so tests never see each other's documents (alerts included:
    see `settings`)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    return ElasticsearchSettings(url=es_url, articles_alias=f"{prefix}-articles",
                                 deadletter_index=f"{prefix}-deadletters", feeds_index=f"{prefix}-feeds",
                                 bulk_actions=50)


@pytest.fixture
def settings(es_settings) -> Settings:
    base = load_settings(REPO / "configs" / "pipeline.yaml")
    prefix = es_settings.articles_alias.removesuffix("-articles")
    alerts = dataclasses.replace(base.alerts, rules_index=f"{prefix}-rules", alerts_index=f"{prefix}-alerts")
    return dataclasses.replace(base, elasticsearch=es_settings, alerts=alerts, feeds=())


@pytest.fixture(autouse=True)
def _root_logger():
    """`newsbeam` commands run in-process point the root logger at the stderr pytest captures for
    that test; left in place, later logging (Beam's stop of its Prism job server at exit) writes
    to a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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
    return ["--runner", "PrismRunner", "--prism_location", request.getfixturevalue("prism_location")]


@pytest.fixture
def prism_location() -> str:
    """The Prism binary deploy/prism.sh builds; the test is skipped, saying why, without it."""
    binary = _prism_binary()
    if binary is None:
        from newsbeam.pipeline.runner import prism_cache_path
        pytest.skip(f"PRISM LEG NOT RUN: no Prism binary at {prism_cache_path()}; "
                    f"deploy/prism.sh builds it (needs Go: {'found' if shutil.which('go') else 'not installed'})")
    return binary
