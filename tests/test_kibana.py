"""Kibana as code: the compose stack, the saved objects in deploy/kibana/, `newsbeam kibana setup`.

Kibana itself cannot run here, so these tests check what can be checked for real: every field a
saved object uses exists (with the right capabilities) in the mappings newsbeam creates on the real
Elasticsearch; every saved search's KQL, translated to query DSL as Kibana does, returns the
expected fixture articles there; every dashboard Lens panel's aggregation runs there; the NDJSON
has what Kibana's import needs and its references resolve; and `kibana setup` sends the documented
request to a stub Kibana on 127.0.0.1 that records it."""
from __future__ import annotations

import base64
import collections
import dataclasses
import email.parser
import email.policy
import json
import re
import shutil
import subprocess
import threading
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from newsbeam.pipeline import cli
from newsbeam.pipeline.config import ElasticsearchSettings, Feed, load_settings
from newsbeam.pipeline.kibana import DASHBOARD_ID, KIBANA_VERSION, OBJECTS_DIR, load_objects, new_session
from newsbeam.transforms.deadletter import dead_letter
from newsbeam.transforms.elastic import BulkWriter, connect, ensure_indices, index_registry
from newsbeam.transforms.feedstate import FeedState, health_doc
from newsbeam.transforms.rules import Rule
from newsbeam.transforms.settings import AlertSettings
from newsbeam.transforms.volume import Firing, firing_alert
from tests.support import REPO
from tests.support.fixture_corpus import index_fixture_articles

OBJECTS = load_objects()
BY_KEY = {(obj["type"], obj["id"]): obj for obj in OBJECTS}
SEARCHES = [obj for obj in OBJECTS if obj["type"] == "search"]
DATA_VIEWS = {obj["id"]: obj for obj in OBJECTS if obj["type"] == "index-pattern"}
(DASHBOARD,) = [obj for obj in OBJECTS if obj["type"] == "dashboard"]
PANELS = json.loads(DASHBOARD["attributes"]["panelsJSON"])
NEWEST_FIRST = ["election", "floods", "chips", "ventilators", "late"]

# What Kibana 9.x accepts on import, read from its source (elastic/kibana, src/platform/plugins/shared):
# dashboard: attributes schema registered for 8.9.0 (dashboard_saved_object/schema/v1, unknowns
# forbidden); search: legacy model version 5 (saved_search/server/saved_objects/schema_legacy.ts,
# typeMigrationVersion 10.5.0 as an 8.17 export writes it); index-pattern: migrations end at 8.0.0,
# no schema. Import migrates each object from its typeMigrationVersion up to the running version.
TYPE_MIGRATION_VERSION = {"index-pattern": "8.0.0", "search": "10.5.0", "dashboard": "8.9.0"}
ALLOWED_ATTRIBUTES = {
    "index-pattern": {"title", "name", "timeFieldName", "fieldAttrs", "fieldFormatMap", "runtimeFieldMap",
                      "sourceFilters", "fields", "typeMeta", "allowHidden", "allowNoIndex", "type"},
    "search": {"title", "description", "columns", "sort", "grid", "rowHeight", "rowsPerPage", "hideChart",
               "breakdownField", "kibanaSavedObjectMeta", "isTextBasedQuery", "usesAdHocDataView", "timeRestore",
               "timeRange", "refreshInterval", "viewMode", "hideAggregatedPreview", "hits", "version",
               "sampleSize", "headerRowHeight", "visContext", "density"},
    "dashboard": {"title", "description", "kibanaSavedObjectMeta", "timeRestore", "timeFrom", "timeTo",
                  "refreshInterval", "controlGroupInput", "panelsJSON", "optionsJSON", "hits", "version"},
}



def registered_mapping(es_settings: ElasticsearchSettings, alerts: AlertSettings, index: str) -> dict:
    """The mappings the index registry (what ensure_indices creates) gives `index`."""
    (spec,) = [spec for spec in index_registry(es_settings, alerts) if spec.name == index]
    return spec.mappings


# ---------------------------------------------------------------------------- the compose stack

COMPOSE = REPO / "deploy" / "docker-compose.yml"
_VARIABLE = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation for the forms the file uses: ${V}, ${V:-default}, ${V:?error}, $$."""
    def value(match: re.Match) -> str:
        name, kind, arg = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {arg}")
        return arg if kind == "-" else ""
    return _VARIABLE.sub(value, text.replace("$$", "\0")).replace("\0", "$")


def env_example() -> dict[str, str]:
    lines = (REPO / "deploy" / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_compose_stack_is_pinned_secured_persistent_local_and_health_checked():
    raw = COMPOSE.read_text()
    compose = yaml.safe_load(interpolate(raw, env_example()))
    services = compose["services"]
    assert set(services) == {"elasticsearch", "setup", "kibana"}
    local_es_default = re.search(r'NEWSBEAM_ES_VERSION", "([^"]+)"', (REPO / "pipeline" / "local_es.py").read_text())
    assert KIBANA_VERSION == local_es_default.group(1) == env_example()["STACK_VERSION"]
    assert f"${{STACK_VERSION:-{KIBANA_VERSION}}}" in raw
    assert services["elasticsearch"]["image"] == f"docker.elastic.co/elasticsearch/elasticsearch:{KIBANA_VERSION}"
    assert services["kibana"]["image"] == f"docker.elastic.co/kibana/kibana:{KIBANA_VERSION}"
    assert services["setup"]["image"] == services["elasticsearch"]["image"]

    es, kibana, setup = services["elasticsearch"], services["kibana"], services["setup"]
    assert es["environment"]["xpack.security.enabled"] == "true"
    assert es["environment"]["discovery.type"] == "single-node"
    assert kibana["environment"]["ELASTICSEARCH_HOSTS"] == "http://elasticsearch:9200"
    assert kibana["environment"]["ELASTICSEARCH_USERNAME"] == "kibana_system"
    for secret in ("ELASTIC_PASSWORD", "KIBANA_PASSWORD"):
        assert f"${{{secret}:?" in raw  # required, never defaulted
    assert es["ports"] == ["127.0.0.1:9200:9200"] and kibana["ports"] == ["127.0.0.1:5601:5601"]

    assert "esdata:/usr/share/elasticsearch/data" in es["volumes"]
    assert "kibanadata:/usr/share/kibana/data" in kibana["volumes"]
    assert set(compose["volumes"]) == {"esdata", "kibanadata"}

    for service in (es, kibana):
        check = service["healthcheck"]
        assert check["test"][0] == "CMD-SHELL" and "curl -fsS" in check["test"][1]
        assert check["retries"] >= 30 and check["interval"] and check["start_period"]
    assert "elastic:${ELASTIC_PASSWORD}" in es["healthcheck"]["test"][1]  # the container's, via $$
    assert "/_cluster/health?wait_for_status=yellow" in es["healthcheck"]["test"][1]
    assert "/api/status" in kibana["healthcheck"]["test"][1]
    assert setup["depends_on"]["elasticsearch"]["condition"] == "service_healthy"
    assert kibana["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert kibana["depends_on"]["elasticsearch"]["condition"] == "service_healthy"

    with pytest.raises(KeyError, match="ELASTIC_PASSWORD"):
        interpolate(raw, {})


def test_compose_setup_script_parses_and_every_curl_has_its_url():
    compose = yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()))
    command = compose["services"]["setup"]["command"]
    assert command[:2] == ["bash", "-c"]
    script = command[2]
    assert subprocess.run(["bash", "-n", "-c", script], capture_output=True).returncode == 0
    curls = [line for line in script.splitlines() if "curl " in line]
    assert curls and all("http://elasticsearch:9200/" in line for line in curls)
    assert "/_security/user/kibana_system/_password" in script and "exit 1" in script


def test_docker_compose_config_accepts_the_file(tmp_path):
    """`docker compose config` validates without an engine, but only where the compose plugin is
    installed; the YAML-level checks above run everywhere."""
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("`docker compose` is not installed here: the compose file was checked as YAML only")
    env_file = tmp_path / ".env"
    env_file.write_text((REPO / "deploy" / ".env.example").read_text())
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "--env-file", str(env_file), "config",
                             "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- the NDJSON itself

def test_every_file_is_ndjson_of_objects_kibana_can_import():
    files = sorted(OBJECTS_DIR.glob("*.ndjson"))
    assert [f.name for f in files] == ["dashboards.ndjson", "data_views.ndjson", "searches.ndjson"]
    for path in files:
        for line in path.read_text().splitlines():
            assert isinstance(json.loads(line), dict)
    assert len(BY_KEY) == len(OBJECTS) == 13  # (type, id) unique
    for obj in OBJECTS:
        kind = obj["type"]
        assert isinstance(obj["id"], str) and re.fullmatch(r"[a-z0-9-]+", obj["id"])
        assert obj["coreMigrationVersion"] == "8.8.0"
        assert obj["typeMigrationVersion"] == TYPE_MIGRATION_VERSION[kind]
        assert isinstance(obj["attributes"], dict) and obj["attributes"]["title"]
        unknown = set(obj["attributes"]) - ALLOWED_ATTRIBUTES[kind]
        assert not unknown, (obj["id"], unknown)
        assert isinstance(obj["references"], list)
        for ref in obj["references"]:
            assert set(ref) == {"name", "type", "id"}
        if kind == "search":
            source = json.loads(obj["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
            assert source["query"]["language"] == "kuery"
        if kind == "dashboard":
            json.loads(obj["attributes"]["optionsJSON"])
            json.loads(obj["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])


def test_data_views_searches_and_dashboard_panels_cover_articles_alerts_feeds_and_dead_letters():
    assert {(v["attributes"]["title"], v["attributes"].get("timeFieldName")) for v in DATA_VIEWS.values()} == {
        ("news-articles", "published_at"), ("news-articles", "fetched_at"), ("newsbeam-alerts", "matched_at"),
        ("newsbeam-feeds", None), ("newsbeam-deadletters", "failed_at")}
    defaults = load_settings(REPO / "configs" / "pipeline.yaml").elasticsearch
    view_titles = {v["attributes"]["title"] for v in DATA_VIEWS.values()}
    assert {defaults.articles_alias, defaults.deadletter_index, defaults.feeds_index} <= view_titles
    assert {s["attributes"]["title"] for s in SEARCHES} == {
        "Latest articles", "Topic: medical equipment aid", "Articles by entity", "Dead letters in the last day",
        "Latest alerts", "Volume alerts", "Failing feeds"}
    assert DASHBOARD["id"] == DASHBOARD_ID and DASHBOARD["attributes"]["title"] == "News overview"
    assert [p["title"] for p in PANELS] == ["Articles over time by topic", "Top persons", "Top organizations",
                                            "Top locations", "Top sources", "Latest alerts", "Failing feeds"]


def lens_layers(panel):
    """(layer id, layer state, visualization layer) of a by-value Lens panel."""
    attributes = panel["embeddableConfig"]["attributes"]
    layers = attributes["state"]["datasourceStates"]["formBased"]["layers"]
    for vis_layer in attributes["state"]["visualization"]["layers"]:
        yield vis_layer["layerId"], layers[vis_layer["layerId"]], vis_layer


def test_references_resolve_and_panels_tile_the_grid():
    for obj in OBJECTS:
        for ref in obj["references"]:
            assert (ref["type"], ref["id"]) in BY_KEY, (obj["id"], ref)
    for search in SEARCHES:
        source = json.loads(search["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
        (ref,) = search["references"]
        assert ref["name"] == source["indexRefName"] and ref["type"] == "index-pattern"

    dashboard_refs = {ref["name"]: (ref["type"], ref["id"]) for ref in DASHBOARD["references"]}
    cells = set()
    for panel in PANELS:
        index, grid = panel["panelIndex"], panel["gridData"]
        assert grid["i"] == index and grid["x"] + grid["w"] <= 48
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"panel {panel['title']} overlaps another"
        cells |= area
        if panel["type"] == "search":
            assert dashboard_refs[f"{index}:{panel['panelRefName']}"][0] == "search"
            continue
        assert panel["type"] == "lens"
        attributes = panel["embeddableConfig"]["attributes"]
        assert attributes["type"] == "lens" and attributes["visualizationType"] == "lnsXY"
        inline = {ref["name"]: (ref["type"], ref["id"]) for ref in attributes["references"]}
        for layer_id, layer, vis_layer in lens_layers(panel):
            name = f"indexpattern-datasource-layer-{layer_id}"
            assert inline[name] == dashboard_refs[f"{index}:{name}"] == ("index-pattern", "newsbeam-articles")
            assert set(layer["columnOrder"]) == set(layer["columns"])
            used = [vis_layer["xAccessor"], *vis_layer["accessors"], vis_layer.get("splitAccessor")]
            assert set(filter(None, used)) == set(layer["columns"])
    assert len(dashboard_refs) == len(DASHBOARD["references"])


# ---------------------------------------------------------------------------- against Elasticsearch

def referenced_fields() -> list[tuple[str, str, str]]:
    """(data view id, field, how it is used) for every field a saved object names."""
    used = [(view_id, view["attributes"]["timeFieldName"], "time")
            for view_id, view in DATA_VIEWS.items() if view["attributes"].get("timeFieldName")]
    for search in SEARCHES:
        view_id = search["references"][0]["id"]
        used += [(view_id, column, "column") for column in search["attributes"]["columns"]]
        used += [(view_id, field, "sort") for field, _ in search["attributes"]["sort"]]
        query = json.loads(search["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])["query"]["query"]
        used += [(view_id, clause[0], "query") for clause in kql_clauses(query)]
    for panel in PANELS:
        if panel["type"] == "lens":
            for _, layer, _ in lens_layers(panel):
                used += [("newsbeam-articles", column["sourceField"], column["operationType"])
                         for column in layer["columns"].values() if column["sourceField"] != "___records___"]
    return used


_CLAUSE = re.compile(r'^\s*([\w.]+)\s*(:|>=|<=|>|<)\s*("([^"]*)"|\S+)\s*$')


def kql_clauses(query: str) -> list[tuple[str, str, object, bool]]:
    """The KQL the saved searches use: clauses `field : value`, `field : "phrase"`, `field > n`,
    all joined by the same `and` or `or`. Returns (field, operator, value, quoted)."""
    if not query.strip():
        return []
    clauses = []
    for part in re.split(r"\s+(?:and|or)\s+", query):
        field, operator, raw, phrase = _CLAUSE.match(part).groups()
        value: object = phrase if phrase is not None else {"true": True, "false": False}.get(raw, raw)
        if operator != ":":
            value = float(raw)
        clauses.append((field, operator, value, phrase is not None))
    return clauses


def kql_to_dsl(query: str) -> dict:
    """What Kibana sends for that KQL: phrases as match_phrase, bare values as match, comparisons
    as range, `or` as a should with minimum_should_match 1, `and` as a filter."""
    ranges = {">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}
    clauses = []
    for field, operator, value, quoted in kql_clauses(query):
        if operator != ":":
            clauses.append({"range": {field: {ranges[operator]: value}}})
        else:
            clauses.append({"match_phrase" if quoted else "match": {field: value}})
    if not clauses:
        return {"match_all": {}}
    if re.search(r"\s+or\s+", query):
        return {"bool": {"should": clauses, "minimum_should_match": 1}}
    return {"bool": {"filter": clauses}}


def search_request(search: dict) -> dict:
    """The request Discover sends for a saved search: its query, its stored time range on the data
    view's time field (when it restores one), its sort."""
    attributes = search["attributes"]
    view = DATA_VIEWS[search["references"][0]["id"]]["attributes"]
    query = kql_to_dsl(json.loads(attributes["kibanaSavedObjectMeta"]["searchSourceJSON"])["query"]["query"])
    filters = [query]
    if attributes.get("timeRestore"):
        time_range = attributes["timeRange"]
        filters.append({"range": {view["timeFieldName"]: {"gte": time_range["from"], "lte": time_range["to"]}}})
    return {"query": {"bool": {"filter": filters}},
            "sort": [{field: {"order": order}} for field, order in attributes["sort"]]}


@pytest.fixture(scope="module")
def stack(es_url, nlp):
    """The indices of every data view on the real Elasticsearch, made by ensure_indices, with
    documents made by the pipeline's code: the fixture articles (fixture_corpus), dead letters
    (dead_letter), feed health (health_doc); and alerts, in the mapping the index registry gives
    the alerts index."""
    prefix = f"k{uuid.uuid4().hex[:10]}"
    es_settings = ElasticsearchSettings(url=es_url, articles_alias=f"{prefix}-articles",
                                        deadletter_index=f"{prefix}-deadletters", feeds_index=f"{prefix}-feeds")
    settings = dataclasses.replace(load_settings(REPO / "configs" / "pipeline.yaml"), elasticsearch=es_settings)
    client = connect(es_settings)
    ids = index_fixture_articles(client, settings, nlp)
    now = datetime.now(UTC)

    def ago(delta: timedelta) -> datetime:
        return now - delta

    def iso(delta: timedelta) -> str:
        return ago(delta).strftime("%Y-%m-%dT%H:%M:%SZ")

    dead = [dict(dead_letter("fetch", "http_status", "HTTP 503", feed_url="https://down.example.org/rss"),
                 failed_at=iso(timedelta(hours=2))),
            dict(dead_letter("parse", "unparseable_feed", "not a feed", feed_url="https://html.example.org/"),
                 failed_at=iso(timedelta(minutes=5))),
            dict(dead_letter("clean", "ValueError", "old", url="https://old.example.org/a"),
                 failed_at=iso(timedelta(days=3)))]
    assert all(o == "written" for o, _ in
               BulkWriter(client, es_settings.deadletter_index, "dead_letter_id", op="index").write(dead))

    def feed(url: str, failures: int, dead: bool, status: int, error_class: str | None, success: timedelta):
        state = FeedState(url=url, last_attempt=ago(timedelta(minutes=2)).timestamp(),
                          last_success=ago(success).timestamp(), http_status=status, error_class=error_class,
                          consecutive_failures=failures, dead=dead)
        return health_doc(state, Feed(url=url))

    feeds = [feed("https://ok.example.org/rss", 0, False, 200, None, timedelta(minutes=2)),
             feed("https://down.example.org/rss", 3, False, 503, "http_status", timedelta(hours=1)),
             feed("https://gone.example.org/rss", 12, True, 410, "http_status", timedelta(days=20))]
    assert all(o == "written" for o, _ in
               BulkWriter(client, es_settings.feeds_index, "feed_id", op="index").write(feeds))

    alerts_index = f"{prefix}-alerts"
    alert_settings = AlertSettings(rules_index=f"{prefix}-rules", alerts_index=alerts_index)
    client.indices.create(index=alerts_index, mappings=registered_mapping(es_settings, alert_settings, alerts_index))
    alerts = [
        {"alert_id": "a-old", "rule": "ventilators-russia", "article_id": ids["ventilators"],
         "title": "U.S. to ship ventilators to Russia", "url": "https://news.example.org/world/us-ventilators-russia",
         "source": "news.example.org", "matched_terms": ["ventilator", "Russia"],
         "snippet": "ship <em>ventilators</em>", "matched_at": iso(timedelta(hours=1))},
        {"alert_id": "a-new", "rule": "aid-to-italy", "article_id": ids["late"], "title": "Germany donates masks",
         "url": "https://news.example.org/europe/germany-masks-italy", "source": "wire.example.net",
         "matched_terms": ["mask"], "snippet": "donates <em>masks</em>", "matched_at": iso(timedelta(minutes=1))},
        firing_alert(Rule.from_doc({"name": "ventilator-spike", "query": "ventilator", "spike": {}}), Firing(
            "ventilator-spike", "spike", "up", int(ago(timedelta(hours=2)).timestamp()) // 3600 * 3600,
            int(ago(timedelta(hours=1)).timestamp()) // 3600 * 3600, 24, 4, "spike: 24 articles in 1h against 4.0",
            baseline=4.0, baseline_counts=(4,) * 168, threshold=3.0,
            articles=({"article_id": ids["ventilators"], "title": "U.S. to ship ventilators to Russia"},)),
            ago(timedelta(minutes=30)).timestamp())]
    assert all(o == "written" for o, _ in BulkWriter(client, alerts_index, "alert_id", op="index").write(alerts))

    indices = {"news-articles": es_settings.articles_alias, "newsbeam-deadletters": es_settings.deadletter_index,
               "newsbeam-feeds": es_settings.feeds_index, "newsbeam-alerts": alerts_index}
    client.indices.refresh(index=list(indices.values()))
    yield client, indices, ids
    client.indices.delete(index=f"{prefix}-*")
    client.indices.delete_index_template(name=f"{prefix}-*")
    client.close()


def test_every_article_deadletter_and_feed_field_exists_in_the_mappings_ensure_indices_creates(es, es_settings):
    ensure_indices(connect(es_settings), es_settings)
    indices = {"news-articles": es_settings.articles_alias, "newsbeam-deadletters": es_settings.deadletter_index,
               "newsbeam-feeds": es_settings.feeds_index}
    checked = collections.Counter()
    for view_id, field, usage in referenced_fields():
        title = DATA_VIEWS[view_id]["attributes"]["title"]
        if title in indices:
            assert_field_usable(es, indices[title], field, usage)
            checked[title] += 1
    assert min(checked[title] for title in indices) >= 6, checked


def assert_field_usable(es, index: str, field: str, usage: str) -> None:
    """Kibana reads fields with _field_caps: the field must be there, a time field a date, a
    sort/terms/date_histogram field aggregatable, a queried field searchable."""
    caps = es.field_caps(index=index, fields=field)["fields"].get(field)
    assert caps, f"{field} ({usage}) is not in the mapping of {index}"
    ((kind, cap),) = caps.items()
    if usage in ("time", "date_histogram"):
        assert kind == "date", (field, kind)
    if usage in ("time", "sort", "terms", "date_histogram"):
        assert cap["aggregatable"], f"{field} ({usage}) is not aggregatable in {index}"
    if usage == "query":
        assert cap["searchable"], f"{field} is not searchable in {index}"


def test_alert_fields_exist_in_the_mapping_the_alerts_module_creates(stack):
    client, indices, _ = stack
    used = [(field, usage) for view_id, field, usage in referenced_fields()
            if DATA_VIEWS[view_id]["attributes"]["title"] == "newsbeam-alerts"]
    assert len({field for field, _ in used}) >= 6, used
    for field, usage in used:
        assert_field_usable(client, indices["newsbeam-alerts"], field, usage)


EXPECTED_RESULTS = {
    "newsbeam-latest-articles": ("article", NEWEST_FIRST),
    "newsbeam-topic-medical-equipment-aid": ("article", ["ventilators", "late"]),
    "newsbeam-by-entity": ("article", ["ventilators"]),
    "newsbeam-deadletters-last-day": ("reason", ["unparseable_feed", "http_status"]),
    "newsbeam-latest-alerts": ("rule", ["aid-to-italy", "ventilator-spike", "ventilators-russia"]),
    "newsbeam-volume-alerts": ("rule", ["ventilator-spike"]),
    "newsbeam-failing-feeds": ("feed_url", ["https://gone.example.org/rss", "https://down.example.org/rss"]),
}


@pytest.mark.parametrize("search_id", sorted(EXPECTED_RESULTS))
def test_saved_search_returns_the_expected_documents(search_id, stack):
    client, indices, ids = stack
    search = BY_KEY[("search", search_id)]
    title = DATA_VIEWS[search["references"][0]["id"]]["attributes"]["title"]
    response = client.search(index=indices[title], size=20, **search_request(search))
    key, expected = EXPECTED_RESULTS[search_id]
    if key == "article":
        by_id = {article_id: name for name, article_id in ids.items()}
        got = [by_id[hit["_source"]["article_id"]] for hit in response["hits"]["hits"]]
    else:
        got = [hit["_source"][key] for hit in response["hits"]["hits"]]
    assert got == expected
    for hit in response["hits"]["hits"]:  # every column the search shows is in the documents
        assert set(search["attributes"]["columns"]) <= set(hit["_source"]), (search_id, hit["_source"])


def lens_aggregation(panel) -> tuple[list[str], dict]:
    """The aggregation a Lens layer asks for: its bucket columns nested in column order, counts."""
    (_, layer, _), = lens_layers(panel)
    buckets = [layer["columns"][c] for c in layer["columnOrder"] if layer["columns"][c]["isBucketed"]]
    aggs: dict = {}
    for depth, column in reversed(list(enumerate(buckets))):
        if column["operationType"] == "terms":
            agg = {"terms": {"field": column["sourceField"], "size": column["params"]["size"]}}
        else:
            agg = {"date_histogram": {"field": column["sourceField"], "calendar_interval": "month"}}
        if aggs:
            agg["aggs"] = aggs
        aggs = {f"b{depth}": agg}
    return [c["sourceField"] for c in buckets], aggs


def test_every_lens_panel_aggregates_the_fixture_articles(stack):
    client, indices, _ = stack
    results = {}
    for panel in PANELS:
        if panel["type"] != "lens":
            continue
        fields, aggs = lens_aggregation(panel)
        response = client.search(index=indices["news-articles"], size=0, aggs=aggs)
        results[panel["title"]] = (fields, response["aggregations"]["b0"]["buckets"])
    fields, topics = results["Articles over time by topic"]
    assert fields == ["topics", "published_at"]
    by_topic = {b["key"]: sum(d["doc_count"] for d in b["b1"]["buckets"]) for b in topics}
    docs = client.search(index=indices["news-articles"], size=100, source_includes=["topics"])["hits"]["hits"]
    assert by_topic == collections.Counter(topic for doc in docs for topic in doc["_source"].get("topics", []))
    assert by_topic["medical equipment aid"] == 2 and by_topic["natural disasters"] == 1
    assert [(b["key"], b["doc_count"]) for b in results["Top sources"][1]] == [("news.example.org", 3),
                                                                             ("wire.example.net", 2)]
    persons = {b["key"] for b in results["Top persons"][1]}
    assert {"Donald Trump", "Vladimir Putin", "Angela Merkel"} <= persons
    assert {"White House", "Kremlin"} <= {b["key"] for b in results["Top organizations"][1]}
    assert {"Russia", "Germany", "Pakistan"} <= {b["key"] for b in results["Top locations"][1]}


# ---------------------------------------------------------------------------- `newsbeam kibana setup`

class StubKibana:
    """A stand-in for Kibana's HTTP API on 127.0.0.1: answers GET /api/status with a version and
    POST .../api/saved_objects/_import like Kibana (conflict without overwrite=true), keeps what
    was imported, and records every request (method, path, headers, body)."""

    def __init__(self, version: str = KIBANA_VERSION):
        self.version = version
        self.status_body: dict | None = None
        self.fail_import_with: dict | None = None
        self.require_auth = False
        self.requests: list[dict] = []
        self.saved: dict[tuple[str, str], dict] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                request = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                           "body": self.rfile.read(length)}
                stub.requests.append(request)
                return request

            def do_GET(self):
                self._record()
                if stub.require_auth and "Authorization" not in self.headers:
                    return self._reply(401, {"statusCode": 401, "error": "Unauthorized"})
                self._reply(200, stub.status_body or {
                    "name": "stub", "version": {"number": stub.version, "build_flavor": "traditional"},
                    "status": {"overall": {"level": "available"}}})

            def do_POST(self):
                request = self._record()
                if not request["headers"].get("kbn-xsrf"):
                    return self._reply(400, {"statusCode": 400, "message": "Request must contain a kbn-xsrf header."})
                if stub.fail_import_with:
                    return self._reply(200, stub.fail_import_with)
                objects = [json.loads(line) for line in multipart_file(request)[2].decode().splitlines() if line]
                overwrite = "overwrite=true" in request["path"]
                conflicts = [o for o in objects if (o["type"], o["id"]) in stub.saved and not overwrite]
                if conflicts:
                    return self._reply(200, {"success": False, "successCount": len(objects) - len(conflicts),
                                             "errors": [{"type": o["type"], "id": o["id"],
                                                         "error": {"type": "conflict"}} for o in conflicts]})
                stub.saved.update({(o["type"], o["id"]): o for o in objects})
                self._reply(200, {"success": True, "successCount": len(objects),
                                  "successResults": [{"type": o["type"], "id": o["id"]} for o in objects]})

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def multipart_file(request: dict) -> tuple[str, str, bytes]:
    """(form field name, file name, content) of the one part of a multipart/form-data body."""
    head = f"Content-Type: {request['headers']['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request["body"])
    assert message.is_multipart()
    (part,) = list(message.iter_parts())
    return (part.get_param("name", header="content-disposition"), part.get_filename(),
            part.get_payload(decode=True))


@pytest.fixture
def kibana(monkeypatch):
    for name in ("KIBANA_URL", "KIBANA_USERNAME", "KIBANA_PASSWORD", "KIBANA_CA_CERTS", "ELASTICSEARCH_API_KEY",
                 "ELASTICSEARCH_USERNAME", "ELASTICSEARCH_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    stub = StubKibana()
    yield stub
    stub.close()


def run_setup(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["kibana", "setup", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_setup_imports_every_object_in_one_overwriting_multipart_request(kibana, capsys, monkeypatch):
    monkeypatch.setenv("KIBANA_USERNAME", "newsbeam-admin")
    monkeypatch.setenv("KIBANA_PASSWORD", "s3cret-pw")
    code, out, err = run_setup(capsys, "--kibana-url", kibana.url + "/")
    assert code == 0, err
    status, post = kibana.requests
    assert (status["method"], status["path"]) == ("GET", "/api/status")
    assert (post["method"], post["path"]) == ("POST", "/api/saved_objects/_import?overwrite=true")
    assert post["headers"]["kbn-xsrf"]
    assert post["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    expected_auth = "Basic " + base64.b64encode(b"newsbeam-admin:s3cret-pw").decode()
    assert status["headers"]["Authorization"] == post["headers"]["Authorization"] == expected_auth
    field, filename, content = multipart_file(post)
    assert field == "file" and filename.endswith(".ndjson")
    assert [json.loads(line) for line in content.decode().splitlines()] == OBJECTS
    assert set(kibana.saved) == set(BY_KEY)
    assert out.strip() == (f"imported 13 saved objects (1 dashboard, 5 index-pattern, 7 search) into Kibana "
                           f"{KIBANA_VERSION} at {kibana.url}; open {kibana.url}/app/dashboards#/view/{DASHBOARD_ID}")
    assert "s3cret-pw" not in out + err


def test_setup_is_idempotent(kibana, capsys, monkeypatch):
    monkeypatch.setenv("KIBANA_URL", kibana.url)
    assert run_setup(capsys)[0] == 0
    assert run_setup(capsys)[0] == 0  # a stub Kibana answers "conflict" to a second import without overwrite
    first, second = [r for r in kibana.requests if r["method"] == "POST"]
    assert multipart_file(first)[2] == multipart_file(second)[2]
    assert len(kibana.saved) == 13


@pytest.mark.parametrize("env, expected", [
    ({"ELASTICSEARCH_USERNAME": "elastic", "ELASTICSEARCH_PASSWORD": "pw"},
     "Basic " + base64.b64encode(b"elastic:pw").decode()),
    ({"ELASTICSEARCH_API_KEY": "a2V5OnNlY3JldA=="}, "ApiKey a2V5OnNlY3JldA=="),
    ({"KIBANA_USERNAME": "kb", "KIBANA_PASSWORD": "x", "ELASTICSEARCH_API_KEY": "ignored"},
     "Basic " + base64.b64encode(b"kb:x").decode()),
])
def test_credentials_come_from_the_environment(kibana, env, expected, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    new_session().get(f"{kibana.url}/api/status", timeout=5)
    assert kibana.requests[-1]["headers"]["Authorization"] == expected


def test_setup_into_a_space(kibana, capsys):
    code, out, _ = run_setup(capsys, "--kibana-url", kibana.url, "--space", "news")
    assert code == 0 and f"{kibana.url}/s/news/app/dashboards#/view/{DASHBOARD_ID}" in out
    assert kibana.requests[-1]["path"] == "/s/news/api/saved_objects/_import?overwrite=true"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("newsbeam: error: "), err
    return lines[0]


def test_a_different_kibana_version_is_refused_before_anything_is_written(kibana, capsys):
    kibana.version = "9.4.2"
    code, _, err = run_setup(capsys, "--kibana-url", kibana.url)
    assert code == 2
    line = one_error_line(err)
    assert "is version 9.4.2" in line and f"made for Kibana {KIBANA_VERSION}" in line
    assert [r["method"] for r in kibana.requests] == ["GET"] and not kibana.saved


def test_unreachable_kibana_is_one_clear_line(kibana, capsys):
    code, _, err = run_setup(capsys, "--kibana-url", "http://127.0.0.1:9")
    assert code == 2
    assert one_error_line(err).startswith("newsbeam: error: cannot reach Kibana at http://127.0.0.1:9: ")


def test_refused_credentials_redacted_status_and_partial_imports_are_explained(kibana, capsys):
    kibana.require_auth = True
    code, _, err = run_setup(capsys, "--kibana-url", kibana.url)
    assert code == 2 and "refused the credentials (HTTP 401)" in one_error_line(err)

    kibana.require_auth = False
    kibana.status_body = {"status": {"overall": {"level": "available"}}}  # a user without `monitor`
    code, _, err = run_setup(capsys, "--kibana-url", kibana.url)
    assert code == 2 and "did not report its version" in one_error_line(err)

    kibana.status_body = None
    kibana.fail_import_with = {"success": False, "successCount": 12, "errors": [
        {"type": "search", "id": "newsbeam-latest-alerts", "title": "Latest alerts",
         "error": {"type": "missing_references", "references": [{"type": "index-pattern", "id": "newsbeam-alerts"}]}}]}
    code, _, err = run_setup(capsys, "--kibana-url", kibana.url)
    assert code == 2
    assert ("imported 12 of 13 saved objects; failed: search/newsbeam-latest-alerts "
            "(missing_references: index-pattern/newsbeam-alerts)") in one_error_line(err)


def test_readme_documents_the_flow_and_says_the_import_was_not_run_against_kibana():
    readme = (REPO / "docs" / "operations.md").read_text()  # the README links it
    for step in ("docker compose -f deploy/docker-compose.yml --env-file deploy/.env up -d --wait",
                 "newsbeam kibana setup", "News overview", 'topics : "medical equipment aid"',
                 "down -v", "STACK_VERSION"):
        assert step in readme, step
    assert "has not been run against a live Kibana" in readme
