"""The `newsbeam` command as a user runs it: a subprocess of this interpreter, from the
repository root, without the caller's Elasticsearch credentials unless `env` gives them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support import REPO

COMMAND = (sys.executable, "-m", "newsbeam.pipeline.cli")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without ELASTICSEARCH_* (a test's credentials are explicit), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICSEARCH_")}
    env.update(extra or {})
    return env


def newsbeam(*args: str, timeout: float = 300, env: Mapping[str, str] | None = None,
             clean: bool = True) -> subprocess.CompletedProcess:
    """Runs `newsbeam ARGS` to the end; `clean=False` keeps the caller's whole environment."""
    environment = clean_env(env) if clean else {**os.environ, **(env or {})}
    return subprocess.run([*COMMAND, *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def start_newsbeam(*args: str, env: Mapping[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """Starts `newsbeam ARGS` in the background (a `run` the test stops or waits for)."""
    return subprocess.Popen([*COMMAND, *args], cwd=REPO, env=clean_env(env), **popen)


def stop_newsbeam(process: subprocess.Popen, timeout: float = 120) -> int | None:
    """Stops a background run as a user would (SIGTERM), waiting up to `timeout` seconds for it
    to exit, then kills it if it is still there; its exit code, None if it had to be killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def children_of(pid: int) -> list[int]:
    """The child processes of `pid` (its worker pools), from every thread's children list; a
    thread may end while the list is read."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return children
