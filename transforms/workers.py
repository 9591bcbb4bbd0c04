"""Worker processes for the CPU-bound steps (feedparser, spaCy) inside DoFns.

The local runner executes every DoFn of the pipeline in one Python process, so the GIL
holds feedparser and spaCy to one core however many the machine has. A `WorkerPool` moves
that work to `processes` child processes (started with "spawn": the parent runs threads, so
forking it is unsafe), each set up once by `initializer` (e.g. loading the spaCy model).
On a distributed runner every worker already is such a process: keep `processes` at 1 and
the work runs in-process, without a pool.

A child that dies (a segfault in a C extension, the OOM killer) breaks the pool: the caller's
future fails with `BrokenProcessPool`, so the caller can retry or dead-letter the input that
killed it instead of losing the rest, and the next `submit` replaces the pool. A child past its
deadline is killed the same way (`replace`).

With 0 processes the pool is one thread of this process (`OneThread`), for work kept in-process:
the tasks of every DoFn instance then run one at a time instead of side by side on as many threads.
"""
from __future__ import annotations

import concurrent.futures
import functools
import importlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from newsbeam.transforms.logs import drop_beam_import_notice

_LOG = logging.getLogger(__name__)


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


class OneThread:
    """An executor of one thread whose queue outlives a task that never ends: `replace` leaves
    the stuck thread to finish alone (a thread cannot be stopped) and starts another on the same
    queue, so the tasks waiting behind it still run. `initializer` runs in each new thread."""

    def __init__(self, name: str, initializer: Callable[..., None] | None = None, initargs: tuple = ()):
        self._name = f"newsbeam-{name.lower()}"
        self._initializer = initializer
        self._initargs = initargs
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._start()

    def _start(self) -> None:
        # Named the queue's thread before it runs: a thread that is not ends after its task.
        self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        broken: BaseException | None = None  # an initializer that failed fails every task
        try:
            if self._initializer is not None:
                self._initializer(*self._initargs)
        except Exception as err:
            broken = err
        me = threading.current_thread()
        while True:
            task = self._tasks.get()
            if task is None:  # shut down: passed on to any other thread still waiting
                self._tasks.put(None)
                return
            future, fn, args = task
            if future.set_running_or_notify_cancel():
                try:
                    if broken is not None:
                        raise broken
                    future.set_result(fn(*args))
                except BaseException as err:  # the caller gets every failure
                    future.set_exception(err)
            if self._thread is not me:  # replaced while on this task: another has the queue
                return

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a shut down thread")
            self._tasks.put((future, fn, args))
        return future

    def replace(self) -> None:
        with self._lock:
            if not self._closed:
                self._start()

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        with self._lock:
            self._closed = True
        while cancel_futures:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        self._tasks.put(None)
        if wait:
            self._thread.join()


class WorkerPool:
    def __init__(self, processes: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = (), name: str = "worker"):
        self.processes = processes
        self._workers = processes or 1  # tasks that run at once
        self._initializer = initializer
        self._initargs = initargs
        self._name = name
        self._lock = threading.Lock()
        # Submitted and unfinished, oldest first, with the units of work each carries (articles).
        self._queued: list[tuple[concurrent.futures.Future, float]] = []
        self._unit_seconds: float | None = None  # what one unit takes a process, as callers report it
        self._executor = self._start()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor | OneThread:
        if not self.processes:
            return OneThread(self._name, self._initializer, self._initargs)
        _LOG.info("starting %d %s process(es)", self.processes, self._name)
        executor = concurrent.futures.ProcessPoolExecutor(
            self.processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_child, initargs=(os.getpid(), _name_of(self._initializer), self._initargs))
        _await_ready(executor, self.processes)
        return executor

    def submit(self, fn: Callable[..., Any], *args: Any, units: float = 1.0) -> concurrent.futures.Future:
        """`units`: how much work the task is (e.g. its articles), for `room`."""
        with self._lock:
            executor = self._executor
        try:
            future = executor.submit(fn, *args)
        except BrokenProcessPool:
            self._restart(executor)
            future = self._executor.submit(fn, *args)
        with self._lock:
            self._queued.append((future, units))
        return future

    def _unfinished(self) -> list[tuple[concurrent.futures.Future, float]]:
        # (called with the lock held)
        self._queued = [entry for entry in self._queued if not entry[0].done()]
        return self._queued

    def started(self, future: concurrent.futures.Future) -> bool:
        """Whether `future` has a process by now: tasks start in the order they were submitted,
        by every user of the pool, `processes` (or the one thread) at a time (so a deadline can
        leave queueing out)."""
        with self._lock:
            return any(queued is future for queued, _ in self._unfinished()[:self._workers])

    def record_cost(self, units: float, seconds: float) -> None:
        """What a finished task of `units` took its process; recent tasks weigh most."""
        if units <= 0:
            return
        with self._lock:
            each = seconds / units
            self._unit_seconds = each if self._unit_seconds is None else 0.8 * self._unit_seconds + 0.2 * each

    def room(self, seconds: float) -> float | None:
        """Units the pool can take on before its unfinished work lasts longer than `seconds`;
        0 while work waits and no cost was recorded yet; None when idle and nothing is known."""
        with self._lock:
            waiting = sum(units for _, units in self._unfinished())
            if self._unit_seconds is None:
                return 0.0 if waiting else None
            return max(0.0, seconds * self._workers / max(self._unit_seconds, 1e-6) - waiting)

    def replace(self, stuck: concurrent.futures.Future) -> None:
        """Kills the workers of the pool that runs `stuck` (past its deadline: a process cannot
        be interrupted otherwise) and starts a new pool; the other futures of that pool fail
        with BrokenProcessPool, as after a crash. The thread of a pool of 0 processes is left to
        finish alone, and another takes the tasks queued behind it."""
        with self._lock:
            executor = self._executor
        if stuck.done():
            return
        if isinstance(executor, OneThread):
            _LOG.warning("a %s task passed its deadline; its thread is left to finish it alone, "
                         "another takes the next tasks", self._name)
            with self._lock:  # it no longer holds up the queue (`started`, `room`)
                self._queued = [entry for entry in self._queued if entry[0] is not stuck]
            executor.replace()
            return
        for process in list(getattr(executor, "_processes", {}).values()):
            process.kill()
        self._restart(executor)

    def _restart(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:  # only the first thread to notice replaces it
                _LOG.warning("a %s process died; starting a new pool", self._name)
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = self._start()

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        """As `Executor.shutdown`, so a pool can stand in for a thread pool."""
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)


def _await_ready(executor: concurrent.futures.ProcessPoolExecutor, processes: int, patience: float = 300.0) -> None:
    """Returns once every process has run its initializer (or a crash broke the pool), so a
    caller's deadline on its first task never counts the start-up (a spaCy model loads ~5 s)."""
    seen: set[int] = set()
    give_up = time.monotonic() + patience
    try:
        while len(seen) < processes and time.monotonic() < give_up:
            futures = [executor.submit(_pid_after, 0.05) for _ in range(processes)]
            seen.update(future.result(timeout=max(0.1, give_up - time.monotonic())) for future in futures)
    except BrokenProcessPool:
        pass  # the first real task raises it again, and the caller handles it as a crash
    except TimeoutError:
        _LOG.warning("worker processes not ready after %gs; going on", patience)


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)  # long enough that an idle, ready process takes the next one
    return os.getpid()


NLP_POOL = "spaCy"  # the name of the pool TagEntitiesFn runs spaCy in
_shared: dict[tuple[Any, ...], list[Any]] = {}  # key -> [pool, users]
_shared_lock = threading.Lock()


def shared_pool(processes: int, initializer: Callable[..., None] | None = None, initargs: tuple = (),
                name: str = "worker") -> SharedPool:
    """A handle on this process's one pool for these arguments. A runner may run several
    instances of a DoFn at once in one process, and a pool each would start more worker
    processes (each with its own spaCy model) than there are cores, or, with 0 processes, as many
    threads, whose tasks slow each other down (the GIL, the cores' caches)."""
    key = (name, processes, initializer, repr(initargs))
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            entry = _shared[key] = [WorkerPool(processes, initializer, initargs, name), 0]
        entry[1] += 1
        return SharedPool(key, entry[0])


def room(name: str, seconds: float) -> float | None:
    """Units of work this process's shared pools called `name` can take on before what they
    have unfinished lasts longer than `seconds` (`WorkerPool.room`); None when there is no such
    pool or none knows yet. A pool of 0 processes (a thread of this process) is left out: the
    thread shares the cores with the stages that feed it, and measured with and without the cut
    it kept up better handed the whole budget (docs/runners.md)."""
    with _shared_lock:
        pools = [entry[0] for key, entry in _shared.items() if key[0] == name and entry[0].processes]
    rooms = [space for space in (pool.room(seconds) for pool in pools) if space is not None]
    return sum(rooms) if rooms else None


class SharedPool:
    """Stands in for a `WorkerPool`; the pool shuts down when its last handle does."""

    def __init__(self, key: tuple[Any, ...], pool: WorkerPool):
        self._key = key
        self._pool: WorkerPool | None = pool
        self.processes = pool.processes

    def submit(self, fn: Callable[..., Any], *args: Any, units: float = 1.0) -> concurrent.futures.Future:
        if self._pool is None:
            raise RuntimeError("cannot submit to a shut down pool")
        return self._pool.submit(fn, *args, units=units)

    def record_cost(self, units: float, seconds: float) -> None:
        if self._pool is not None:
            self._pool.record_cost(units, seconds)

    def replace(self, stuck: concurrent.futures.Future) -> None:
        if self._pool is not None:
            self._pool.replace(stuck)

    def started(self, future: concurrent.futures.Future) -> bool:
        return self._pool is not None and self._pool.started(future)

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


def _name_of(initializer: Callable[..., None] | None) -> tuple[str, str] | None:
    # By name: unpickling the function itself would import its module (and Beam with it) before
    # the child could silence Beam's import-time notice.
    return None if initializer is None else (initializer.__module__, initializer.__qualname__)


def _start_child(parent: int, initializer: tuple[str, str] | None, initargs: tuple) -> None:
    # Ctrl-C signals the whole process group. A worker leaves stopping to its parent, which
    # shuts the pool down; interrupted mid-batch it would fail that batch, or leave the pool
    # waiting for a result it was sending when the signal arrived.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    drop_beam_import_notice()
    if initializer is not None:
        module, name = initializer
        functools.reduce(getattr, name.split("."), importlib.import_module(module))(*initargs)


def _exit_with_parent(parent: int) -> None:
    """A worker ends when its parent does: after a `kill -9` of the pipeline nothing closes the
    pool, and an idle worker (holding a spaCy model) would otherwise wait for work forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)
