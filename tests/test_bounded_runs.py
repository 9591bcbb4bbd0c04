"""`newsbeam run` ends when it should, whatever a hostile feed left in flight: a bounded run
exits within its duration plus `fetch.shutdown_grace`, SIGTERM ends a run whose spaCy worker
is stuck in the tokenizer, and one poisoned item never stops the other feeds' articles."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support import REPO
from tests.support.cli import children_of
from tests.support.config import write_config
from tests.support.feedserver import rss
from tests.support.hostileserver import HostileServer, respond, stall, trickle_body
from tests.test_faults import assert_exited, items

pytestmark = pytest.mark.slow  # `newsbeam run` until its deadline or SIGTERM, per test
GRACE = 5
DURATION = 60


def configure(tmp_path: Path, es_settings, **nlp) -> Path:
    path = write_config(tmp_path, es_settings, poll_interval=4)
    config = yaml.safe_load(path.read_text())
    config["fetch"].update(total_timeout=3, read_timeout=2, connect_timeout=2, shutdown_grace=GRACE)
    config["nlp"].update(nlp)
    path.write_text(yaml.safe_dump(config))
    return path


def poisoned_feed(name: str) -> bytes:
    good = items(0, 3)
    for item in good:
        item["link"] = item["link"].replace("harbour", name)
        item["title"] = f"{item['title']} ({name})"
    return rss([*good, {"title": f"Parentheses ({name})", "link": f"https://wire.example.org/{name}/parens",
                        "html": "(" * 16000}])


def run_process(config: Path, feeds: list[str], *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICSEARCH_")}
    feed_args = [arg for url in feeds for arg in ("--feed", url)]
    return subprocess.Popen([sys.executable, "-m", "newsbeam.pipeline.cli", "run", "--config", str(config),
                             *feed_args, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_poisoned_item_beside_stalled_and_trickling_feeds_a_bounded_run_indexes_the_rest_and_ends_on_time(
        tmp_path, es, es_settings):
    config = configure(tmp_path, es_settings)
    with HostileServer() as server:
        good = [server.route(f"/good{n}.xml", respond(200, poisoned_feed(f"good{n}"))) for n in range(4)]
        stalled = server.route("/stalled.xml", stall(600))
        trickling = server.route("/trickle.xml", trickle_body(every=0.2, total=100_000))
        # --duration counts from start-up, which loads spaCy in 2 processes: on a loaded machine that
        # takes half a minute before the first poll.
        process = run_process(config, [*good, stalled, trickling], "--duration", str(DURATION))
        started = time.monotonic()
        try:
            _, stderr = process.communicate(timeout=DURATION + GRACE + 120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        elapsed = time.monotonic() - started
        assert server.hits("/stalled.xml") and server.hits("/trickle.xml")
    assert process.returncode == 0, stderr[-3000:]
    polling_began = stderr.index("polling 6 feed(s)")
    assert "finished after" in stderr[polling_began:] or "exiting now" in stderr[polling_began:]
    es.indices.refresh(index=es_settings.articles_alias)
    titles = {hit["_source"]["title"] for hit in es.search(index=es_settings.articles_alias, size=100)["hits"]["hits"]}
    expected = {f"Harbour report {i} (good{n})" for i in range(3) for n in range(4)}
    assert expected <= titles, sorted(expected - titles)
    assert {f"Parentheses (good{n})" for n in range(4)} <= titles  # tagged too, runs cut short
    assert elapsed < DURATION + GRACE + 90, elapsed


def test_sigterm_ends_a_run_whose_ner_worker_is_stuck_in_the_tokenizer(tmp_path, es, es_settings):
    # Run cutting off and a deadline far away: the worker really is stuck for minutes.
    config = configure(tmp_path, es_settings, max_char_run=10**9, max_token_chars=10**9, article_timeout=3600)
    with HostileServer() as server:
        feed = server.route("/parens.xml", respond(200, rss([{"title": "Parentheses", "html": "(" * 60000,
                                                              "link": "https://wire.example.org/parens"}])))
        process = run_process(config, [feed])
        try:
            busy, children = None, []
            give_up = time.monotonic() + 180
            while busy is None and time.monotonic() < give_up and process.poll() is None:
                time.sleep(1)
                children = children_of(process.pid)
                busy = next((pid for pid in children if server.hits("/parens.xml") and cpu_seconds(pid) > 20), None)
            assert busy, "a spaCy worker should be stuck on the item"
            os.kill(process.pid, signal.SIGTERM)
            signalled = time.monotonic()
            _, stderr = process.communicate(timeout=GRACE + 30)
            stopped_after = time.monotonic() - signalled
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr
    assert stopped_after < GRACE + 10, stopped_after
    assert_exited(children)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
