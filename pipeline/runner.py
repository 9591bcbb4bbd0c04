"""Which Beam runner `newsbeam run` gets, why, and the runner profile: the settings that
depend on the runner, resolved here and handed to the stages as plain values.

Without `--runner` (or with `--runner DirectRunner`) newsbeam picks a local runner itself
instead of letting Beam's DirectRunner try Prism and fall back silently:

- Prism, when a binary is at hand: `--prism_location`, else the one `deploy/prism.sh` built
  into newsbeam's cache (`$NEWSBEAM_CACHE`, else /var/cache/newsbeam as root, else
  ~/.cache/newsbeam), else Beam's own download (cached in ~/.apache_beam). An offline machine
  with Go runs on Prism too.
- the FnApiRunner, when no Prism binary can be had (and the log says why), or when asked
  (`--runner FnApiRunner`).

`DEFAULT_LOCAL` says which of the two is preferred when both are available (docs/runners.md
has the figures it was chosen from).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from newsbeam.pipeline.local_es import CACHE
from newsbeam.transforms.settings import AUTO, Settings, StageSizes
from newsbeam.transforms.workers import resolve_processes

_LOG = logging.getLogger(__name__)

PRISM = "PrismRunner"
FNAPI = "FnApiRunner"
DEFAULT_LOCAL = PRISM
_LOCAL_NAMES = {"direct": None, "directrunner": None, "prism": PRISM, "prismrunner": PRISM,
                "fnapi": FNAPI, "fnapirunner": FNAPI}


def beam_version() -> str:
    return metadata.version("apache-beam")


def prism_cache_path() -> Path:
    """Where deploy/prism.sh puts the Prism binary built for the installed Beam version."""
    return CACHE / f"prism-v{beam_version()}" / "prism"


@dataclasses.dataclass(frozen=True)
class RunnerChoice:
    name: str  # PrismRunner, FnApiRunner, or the distributed runner asked for
    reason: str  # for the log: why this runner
    local: bool  # the whole pipeline runs on this machine
    prism_binary: str | None = None


def _cached_prism() -> Path | None:
    path = prism_cache_path()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _download_prism(options: Any) -> tuple[str | None, str]:
    """Beam's own download of its release binary (cached by Beam): (path, "") or (None, why not)."""
    from apache_beam.runners.portability.prism_runner import PrismJobServer

    server = PrismJobServer(options)
    try:
        url = server._construct_download_url(server._version, server._version, platform.system(), platform.machine())
        return PrismJobServer.local_bin(url), ""
    except Exception as err:  # offline, or no release binary for this platform
        return None, f"{type(err).__name__}: {err}"


def choose_runner(options: Any) -> RunnerChoice:
    """Resolves the runner for `options` (Beam PipelineOptions) and writes it into them:
    `runner`, and `prism_location` for Prism."""
    from apache_beam.options.pipeline_options import PrismRunnerOptions, StandardOptions

    standard = options.view_as(StandardOptions)
    asked = standard.runner
    key = (asked or "DirectRunner").lower()
    if key not in _LOCAL_NAMES:
        return RunnerChoice(asked, "asked for with --runner", local=False)
    wanted = _LOCAL_NAMES[key] or DEFAULT_LOCAL
    why = "asked for with --runner" if _LOCAL_NAMES[key] else "newsbeam's default local runner"
    if wanted == FNAPI:
        standard.runner = FNAPI
        return RunnerChoice(FNAPI, why, local=True)
    prism = options.view_as(PrismRunnerOptions)
    if prism.prism_location:
        found, source = prism.prism_location, "given with --prism_location"
    elif (cached := _cached_prism()) is not None:
        found, source = str(cached), "built by deploy/prism.sh"
    else:
        found, failure = _download_prism(options)
        source = "Beam's download"
        if found is None:
            if _LOCAL_NAMES[key]:  # asked for by name: no quiet substitute
                raise RuntimeError(f"--runner {asked}: no Prism binary ({failure}); build one with "
                                   f"deploy/prism.sh (needs Go) or pass --prism_location")
            _LOG.warning("Prism unavailable (not in %s, download failed: %s); running on the FnApiRunner. "
                         "deploy/prism.sh builds Prism when Go is installed", prism_cache_path(), failure)
            standard.runner = FNAPI
            return RunnerChoice(FNAPI, "Prism unavailable", local=True)
    standard.runner = PRISM
    prism.prism_location = found
    return RunnerChoice(PRISM, f"{why}; binary {source}: {found}", local=True, prism_binary=found)


def make_runner(choice: RunnerChoice, options: Any) -> Any:
    """The runner object for `beam.Pipeline(runner=...)`: the FnApiRunner made as Beam's
    DirectRunner makes it (the pipeline options provisioned to its workers); None otherwise
    (Beam makes the runner from `options`)."""
    if choice.name != FNAPI:
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


@dataclasses.dataclass(frozen=True)
class RunnerProfile:
    """What the stages need to know about the runner, as plain values."""
    nlp_processes: int  # spaCy worker processes; 0: in the pipeline's process
    parse_processes: int  # feedparser worker processes; 0: a thread
    # Articles piling up in NLP hold the next tick back on both local runners (the FnApiRunner
    # runs stages one after the other; Prism runs 8 bundles at once, and bundles waiting for
    # NLP take them all): each shard then hands a budget of articles per tick, and none while
    # this process's spaCy pool is behind.
    tick_budget: bool
    # A runner that resumes a deferred SDF at once (not at the time asked) spins on empty
    # bundles: the tick generator then sleeps until the tick is due.
    wait_for_tick: bool
    # Flatten of unbounded inputs holds elements back on the local runners: each
    # dead-letter output gets its own writer instead.
    fan_out_dead_letters: bool
    sizes: StageSizes = StageSizes()  # batch sizes and requests in flight per stage


def stage_sizes(settings: Settings, nlp_processes: int) -> StageSizes:
    """Batch sizes for the local runners, whose bundles hold ~50 articles. A distributed
    runner gets the same: they are not measured there."""
    pooled = nlp_processes > 0
    # Pooled: small NER batches (8 of the default 64), three per worker in flight, so every core
    # stays busy; at a bundle's end the batches no worker has started are split to two articles
    # (~0.2 s of NER), so the workers end it together. In-process: a quarter (16), one tagged
    # while the next fills; one batch per bundle would leave nothing to overlap.
    ner_batch = max(1, settings.nlp.batch_size // (8 if pooled else 4))
    return StageSizes(ner_batch=ner_batch, ner_in_flight=3 * nlp_processes if pooled else 2,
                      ner_tail_batch=min(2, ner_batch) if pooled else 0,
                      dedupe_batch=min(settings.elasticsearch.bulk_actions, 500))


def profile_for(choice: RunnerChoice, settings: Settings) -> RunnerProfile:
    """On a local runner the whole pipeline is one Python process (its SDK worker), so spaCy
    gets a worker process per core and feedparser one of its own; a distributed runner
    already runs a worker process per core, so work stays in it."""
    nlp = settings.nlp.processes
    parse = settings.fetch.parse_processes
    if nlp == AUTO:
        nlp = resolve_processes(0) if choice.local else 0
    if parse == AUTO:
        parse = 1 if choice.local else 0
    return RunnerProfile(nlp_processes=int(nlp), parse_processes=int(parse),
                         tick_budget=choice.local, wait_for_tick=choice.name == FNAPI,
                         fan_out_dead_letters=choice.local, sizes=stage_sizes(settings, int(nlp)))


def apply_profile(settings: Settings, profile: RunnerProfile) -> Settings:
    """Settings with the profile's process counts in place of 'auto', and its stage sizes."""
    return dataclasses.replace(
        settings, nlp=dataclasses.replace(settings.nlp, processes=profile.nlp_processes),
        fetch=dataclasses.replace(settings.fetch, parse_processes=profile.parse_processes), sizes=profile.sizes)


class StopNoise(logging.Filter):
    """Keeps Beam's tracebacks of a run being stopped out of the log; the CLI reports the stop
    in one line. The FnApiRunner logs the KeyboardInterrupt that lands inside a DoFn. Prism's
    loopback worker logs (and its threads raise) the gRPC streams that close when Prism's
    process goes, which a terminal's Ctrl-C stops before Python sees the signal, and the
    bundles it still runs while the interpreter exits. A runner that goes away for another
    reason still ends `wait_until_finish` with an error, which the CLI reports."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = False  # set when SIGINT or SIGTERM arrives

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("newsbeam"):
            return True
        # Once stopping, Beam's errors and those Prism relays (bundles failed by the stop) are
        # expected; some carry the traceback in the message.
        if self.stopping and record.levelno >= logging.ERROR:
            return False
        return not (record.name.startswith("apache_beam") and record.exc_info and self.expected(record.exc_info[1]))

    def expected(self, error: BaseException | None) -> bool:
        import grpc
        closed = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        return self.stopping or isinstance(error, KeyboardInterrupt) or (
            isinstance(error, grpc.RpcError) and isinstance(error, grpc.Call) and error.code() in closed)


def quiet_stop_noise() -> StopNoise:
    """Installs `StopNoise` on the root logger's handlers and in `threading.excepthook`, and
    sets its `stopping` when SIGINT or SIGTERM arrives, before the handlers installed so far."""
    import signal
    import threading

    noise = StopNoise()
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if callable(previous):
            signal.signal(signum, functools.partial(_mark_stopping, noise, previous))
    for handler in logging.getLogger().handlers:
        handler.addFilter(noise)
    default_hook = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if not noise.expected(args.exc_value):
            default_hook(args)

    threading.excepthook = excepthook
    return noise


_silenced: list[Any] = []  # the stand-in for sys.stderr once a stop began


def error_stream() -> Any:
    """Where newsbeam's own one-line errors go: the real stderr even after a stop silenced
    Beam's prints."""
    return sys.__stderr__ if _silenced and sys.stderr is _silenced[0] else sys.stderr


def _mark_stopping(noise: StopNoise, previous: Any, signum: int, frame: Any) -> None:
    noise.stopping = True
    # Beam's SDK worker also prints each failed bundle's traceback; the log handlers keep the
    # stream they were made with, so newsbeam's own lines still reach stderr.
    if not _silenced:
        _silenced.append(open(os.devnull, "w", encoding="utf-8"))
    sys.stderr = _silenced[0]
    previous(signum, frame)


def main() -> None:
    """`python -m newsbeam.pipeline.runner`: prints where deploy/prism.sh puts Prism."""
    print(prism_cache_path())


if __name__ == "__main__":
    main()
