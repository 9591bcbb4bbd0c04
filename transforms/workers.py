"""Worker processes for the CPU-bound steps (feedparser, spaCy) inside DoFns.

The local runner executes every DoFn of the pipeline in one Python process, so the GIL
holds feedparser and spaCy to one core however many the machine has. A `WorkerPool` moves
that work to `processes` child processes (started with "spawn": the parent runs threads, so
forking it is unsafe), each set up once by `initializer` (e.g. loading the spaCy model).
On a distributed runner every worker already is such a process: keep `processes` at 1 and
the work runs in-process, without a pool.

A child that dies (a segfault in a C extension, the OOM killer) breaks the pool; `run`
replaces the pool and raises `WorkerCrash`, so the caller can retry or dead-letter the input
that killed it instead of losing the rest.
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

_LOG = logging.getLogger(__name__)


class WorkerCrash(RuntimeError):
    """A worker process died while handling the input."""


def resolve_processes(processes: int) -> int:
    """0 means one per CPU this process may use."""
    if processes < 0:
        raise ValueError(f"processes must be >= 0, got {processes}")
    if processes:
        return processes
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class WorkerPool:
    def __init__(self, processes: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = (), name: str = "worker"):
        self.processes = processes
        self._initializer = initializer
        self._initargs = initargs
        self._name = name
        self._lock = threading.Lock()
        self._executor = self._start()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        _LOG.info("starting %d %s process(es)", self.processes, self._name)
        return concurrent.futures.ProcessPoolExecutor(
            self.processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_child, initargs=(os.getpid(), self._initializer, self._initargs))

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        with self._lock:
            executor = self._executor
        try:
            return executor.submit(fn, *args)
        except BrokenProcessPool:
            self._restart(executor)
            return self._executor.submit(fn, *args)

    def map(self, fn: Callable[[Any], Any], chunks: Sequence[Any]) -> list[Any]:
        """fn(chunk) for every chunk, in parallel, results in order. Raises `WorkerCrash` when
        a worker died (the pool is replaced first) and fn's own exception otherwise."""
        with self._lock:
            executor = self._executor
        futures = [executor.submit(fn, chunk) for chunk in chunks]
        try:
            return [future.result() for future in futures]
        except BrokenProcessPool as err:
            self._restart(executor)
            raise WorkerCrash(f"a {self._name} process died: {err}") from None

    def _restart(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:  # only the first thread to notice replaces it
                _LOG.warning("a %s process died; starting a new pool", self._name)
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = self._start()

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        """As `Executor.shutdown`, so a pool can stand in for a thread pool."""
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)


_shared: dict[tuple[Any, ...], list[Any]] = {}  # key -> [pool, users]
_shared_lock = threading.Lock()


def shared_pool(processes: int, initializer: Callable[..., None] | None = None, initargs: tuple = (),
                name: str = "worker") -> SharedPool:
    """A handle on this process's one pool for these arguments. A runner may run several
    instances of a DoFn at once in one process, and a pool each would start more worker
    processes (each with its own spaCy model) than there are cores."""
    key = (name, processes, initializer, repr(initargs))
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            entry = _shared[key] = [WorkerPool(processes, initializer, initargs, name), 0]
        entry[1] += 1
        return SharedPool(key, entry[0])


class SharedPool:
    """Stands in for a `WorkerPool`; the pool shuts down when its last handle does."""

    def __init__(self, key: tuple[Any, ...], pool: WorkerPool):
        self._key = key
        self._pool: WorkerPool | None = pool
        self.processes = pool.processes

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if self._pool is None:
            raise RuntimeError("cannot submit to a shut down pool")
        return self._pool.submit(fn, *args)

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        with _shared_lock:
            pool, self._pool = self._pool, None
            if pool is None:
                return
            entry = _shared[self._key]
            entry[1] -= 1
            last = not entry[1]
            if last:
                del _shared[self._key]
        if last:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def _start_child(parent: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    # Ctrl-C signals the whole process group. A worker leaves stopping to its parent, which
    # shuts the pool down; interrupted mid-batch it would fail that batch, or leave the pool
    # waiting for a result it was sending when the signal arrived.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(parent: int) -> None:
    """A worker ends when its parent does: after a `kill -9` of the pipeline nothing closes the
    pool, and an idle worker (a spaCy model, ~300 MB) would otherwise wait for work forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def split(items: Sequence[Any], parts: int) -> list[Sequence[Any]]:
    """`items` in at most `parts` contiguous chunks of near-equal size, none empty."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for number in range(parts):
        end = start + size + (1 if number < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks
