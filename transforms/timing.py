"""Time spent per pipeline stage, for the benchmark (bench/e2e.py).

Beam's metrics would be the natural home, but the FnApiRunner consolidates them recursively
(one level per bundle) and a long streaming run overflows the stack when they are queried.
So each stage adds its seconds and element count to a process-wide table, which is written
as JSON to $NEWSBEAM_STAGE_TIMES every few seconds and at exit when that variable is set,
with the values of a few distributions (`observe`: each poll's lag behind its due time).
Work done in worker processes is timed there and reported back with the results.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator

ENV = "NEWSBEAM_STAGE_TIMES"
_lock = threading.Lock()
_table: dict[str, list[float]] = {}  # stage -> [seconds, elements]
_observed: dict[str, list[float]] = {}  # name -> values (e.g. each poll's lag), capped
_MAX_OBSERVED = 200_000
_writer: threading.Thread | None = None
now = time.perf_counter


def record(stage: str, elements: int, seconds: float) -> None:
    if not stage:
        return
    with _lock:
        entry = _table.setdefault(stage, [0.0, 0])
        entry[0] += seconds
        entry[1] += elements
    _start_writer()


def observe(name: str, value: float) -> None:
    """Keeps one value of a distribution (only while $NEWSBEAM_STAGE_TIMES is set)."""
    if not os.environ.get(ENV):
        return
    with _lock:
        values = _observed.setdefault(name, [])
        if len(values) < _MAX_OBSERVED:
            values.append(round(value, 3))
    _start_writer()


@contextlib.contextmanager
def stage(name: str, elements: int = 1) -> Iterator[None]:
    started = now()
    try:
        yield
    finally:
        record(name, elements, now() - started)


def thread_clock() -> tuple[float, float]:
    """Seconds the calling thread has run on a core and, on Linux, waited in the run queue for
    one. Wall time minus both is time it was blocked: for spaCy on a thread, waiting for the GIL."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as handle:
            running, queued, _ = handle.read().split()
        return int(running) / 1e9, int(queued) / 1e9
    except (OSError, ValueError):
        return time.thread_time(), 0.0


def snapshot() -> dict[str, dict[str, float]]:
    with _lock:
        return {name: {"seconds": round(seconds, 3), "elements": int(count)}
                for name, (seconds, count) in _table.items()}


def _write(path: str) -> None:
    tmp = f"{path}.tmp"
    with _lock:
        observed = {name: list(values) for name, values in _observed.items()}
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"stages": snapshot(), "observed": observed}, handle)
    os.replace(tmp, path)


def _start_writer() -> None:
    global _writer
    path = os.environ.get(ENV)
    if not path or _writer is not None:
        return
    with _lock:
        if _writer is not None:
            return

        def loop() -> None:
            while True:
                time.sleep(2.0)
                _write(path)

        _writer = threading.Thread(target=loop, name="newsbeam-stage-times", daemon=True)
        _writer.start()
    atexit.register(_write, path)
