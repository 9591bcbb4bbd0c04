"""Patches of Beam's local runtime (the FnApiRunner and the SDK worker, which Prism's loopback
workers are too), written for and checked on one Beam version: `apply()` patches nothing on
another version and says so, since the patched internals may have changed.

Each patch, the Beam behaviour it works around:
- `bound_fnapi_metrics`: the FnApiRunner keeps one nested generator of metrics per bundle forever.
- `cheap_state_weights`: the SDK worker's state cache weighs each value by walking every module's globals.
- `services_die_with_newsbeam`: Beam starts Prism's job server as a plain child, which outlives a killed parent.
- `job_streams_without_deadline`: a portable job's state and message streams end after `--job_server_timeout`.
- `lean_progress_reports`: each progress answer builds every metric of the bundle, and Prism asks ten times a second.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib import metadata
from typing import Any

_LOG = logging.getLogger(__name__)
WRITTEN_FOR = "2.77."  # the Beam release line these patches were written for and checked on


def apply(version: str | None = None) -> bool:
    """Applies every patch when the installed Beam is the one they were written for; else logs
    that the run goes on unpatched and returns False."""
    version = version or metadata.version("apache-beam")
    if not version.startswith(WRITTEN_FOR):
        _LOG.warning("Beam %s: newsbeam's Beam patches were written for Beam %sx and are not applied "
                     "(long local runs may use more memory and CPU)", version, WRITTEN_FOR)
        return False
    bound_fnapi_metrics()
    cheap_state_weights()
    services_die_with_newsbeam()
    job_streams_without_deadline()
    lean_progress_reports()
    return True


def bound_fnapi_metrics() -> None:
    """The FnApiRunner merges each bundle's metrics into the stage's earlier ones with
    `monitoring_infos.consolidate`, which is a generator: every bundle adds one nested
    generator that holds that bundle's metrics for the rest of the run. A streaming run makes
    bundles forever (when there is nothing to do it cycles through empty ones), so memory grows
    without bound and reading the metrics recurses once per bundle (docs/benchmarks.md).
    Materialising each merge keeps one short list per stage. Idempotent."""
    from apache_beam.metrics import monitoring_infos
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    if getattr(fn_runner.consolidate_monitoring_infos, "newsbeam_bounded", False):
        return

    def consolidate(metrics: Iterable[Any]) -> list[Any]:
        return list(monitoring_infos.consolidate(metrics))

    consolidate.newsbeam_bounded = True  # type: ignore[attr-defined]
    fn_runner.consolidate_monitoring_infos = consolidate


def cheap_state_weights() -> None:
    """The SDK worker's state cache weighs every value it loads or stores (`get_deep_size`,
    objsize), and objsize starts each weighing by collecting the globals dict of every loaded
    module (costly with Beam, spaCy and the Elasticsearch client loaded), for every read and
    write of every key: each article's dedupe flag paid it two or three times. Beam's filter
    already skips modules, types and functions, so a state value never reaches a module's globals
    and weighing without collecting them gives the same weights. Idempotent."""
    from apache_beam.runners.worker import statecache
    from objsize.traverse import ObjSizeSettings

    if getattr(statecache.get_deep_size, "newsbeam_cheap", False):
        return
    settings = ObjSizeSettings(get_referents_func=statecache._get_referents_func, filter_func=statecache._filter_func,
                               get_size_func=statecache._size_func, exclude_modules_globals=False)

    def get_deep_size(*objs: Any) -> int:
        return settings.get_deep_size(*objs)

    get_deep_size.newsbeam_cheap = True  # type: ignore[attr-defined]
    statecache.get_deep_size = get_deep_size


def services_die_with_newsbeam() -> None:
    """Beam's `SubprocessServer` starts Prism's job server with a bare `subprocess.Popen`: a
    newsbeam killed with SIGKILL (the OOM killer, `kill -9`) leaves Prism running, holding its
    port and memory. On Linux the servers it starts get SIGKILL when the thread that started
    them (newsbeam's main thread, which lives as long as the run) ends. Idempotent."""
    import ctypes
    import signal
    import subprocess
    import sys
    import types

    from apache_beam.utils import subprocess_server

    if sys.platform != "linux" or getattr(subprocess_server.subprocess, "newsbeam_pdeathsig", False):
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork
    pr_set_pdeathsig = 1

    def die_with_parent() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    class Popen(subprocess.Popen):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs.setdefault("preexec_fn", die_with_parent)
            super().__init__(*args, **kwargs)

    subprocess_server.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": Popen,
                                                            "newsbeam_pdeathsig": True})


def job_streams_without_deadline() -> None:
    """`JobServiceHandle.run` opens a portable job's state and message streams with
    `--job_server_timeout` (300 s by default) as their deadline, meant for the job service's
    short calls: every Prism run longer than that ended with DEADLINE_EXCEEDED (apache/beam#35867).
    The streams last as long as the job; the short calls keep their timeout. Idempotent."""
    from apache_beam.runners.portability import portable_runner

    handle = portable_runner.JobServiceHandle
    if getattr(handle.run, "newsbeam_no_deadline", False):
        return
    run_job = handle.run

    def run(self: Any, preparation_id: str) -> Any:
        timeout, self.timeout = self.timeout, None  # read by run() for the two streams only
        try:
            return run_job(self, preparation_id)
        finally:
            self.timeout = timeout

    run.newsbeam_no_deadline = True  # type: ignore[attr-defined]
    handle.run = run


def lean_progress_reports() -> None:
    """Prism asks every running bundle for its progress each 100 ms (its `minimumProgTick`), and
    reads two figures from the answer: the input's read index and the sum of the element counts
    (has the bundle moved since the last tick? if not, split it). The SDK worker answers with
    every metric of every operation in the bundle, built afresh each time: four timings per
    transform, every user counter, element counts and sampled sizes. With NER bundles that wait
    seconds for spaCy, that was a large share of the pipeline process's CPU on Prism
    (docs/runners.md). A progress answer now carries the read index and the element counts;
    the bundle's final answer still carries every metric. The FnApiRunner asks for no progress.

    The answer stays whole whenever the bundle has a metric Prism may not know yet: at a
    processor's first progress request, and whenever a new metric cell appeared since. Prism
    learns a metric's name from the first answer that carries its short id, keeping one waiting
    payload per unknown id meanwhile; two bundles finishing with the same unknown id overwrite
    each other's payload, and the job's final metrics come out short. Idempotent."""
    from apache_beam.metrics import monitoring_infos
    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.worker import bundle_processor, sdk_worker

    worker = sdk_worker.SdkWorker
    if getattr(worker.process_bundle_progress, "newsbeam_lean", False):
        return
    full_answer = worker.process_bundle_progress

    def outputs_of(processor: Any) -> dict[str, dict[str, str]]:
        # A processor serves one descriptor for its whole life: its output maps are read once.
        outputs = getattr(processor, "newsbeam_outputs", None)
        if outputs is None:
            transforms = processor.process_bundle_descriptor.transforms
            outputs = processor.newsbeam_outputs = {name: dict(transforms[name].outputs) for name in processor.ops}
        return outputs

    def metric_cells(processor: Any) -> int:
        # A reset zeroes a container's cells and removes none, so a new count means a new metric.
        return sum(len(op.metrics_container.metrics) for op in processor.ops.values())

    def progress_infos(processor: Any) -> list[Any]:
        infos, outputs = [], outputs_of(processor)
        for name, op in processor.ops.items():
            infos += [info for info in op.pcollection_count_monitoring_infos(outputs[name]).values()
                      if info.urn == monitoring_infos.ELEMENT_COUNT_URN]
            if isinstance(op, bundle_processor.DataInputOperation):
                infos.append(monitoring_infos.int64_counter(monitoring_infos.DATA_CHANNEL_READ_INDEX, op.index,
                                                            ptransform=name))
        return infos

    def process_bundle_progress(self: Any, request: Any, instruction_id: str) -> Any:
        try:
            processor = self.bundle_processor_cache.lookup(request.instruction_id)
        except RuntimeError:  # a failed or unknown bundle: Beam's own error answer
            processor = None
        if not processor:
            return full_answer(self, request, instruction_id)
        cells = metric_cells(processor)
        if getattr(processor, "newsbeam_cells", None) != cells:
            processor.newsbeam_cells = cells
            return full_answer(self, request, instruction_id)
        infos = progress_infos(processor)
        return beam_fn_api_pb2.InstructionResponse(
            instruction_id=instruction_id,
            process_bundle_progress=beam_fn_api_pb2.ProcessBundleProgressResponse(
                monitoring_infos=infos,
                monitoring_data={sdk_worker.SHORT_ID_CACHE.get_short_id(info): info.payload for info in infos},
                consuming_received_data=processor.consuming_received_data))

    process_bundle_progress.newsbeam_lean = True  # type: ignore[attr-defined]
    worker.process_bundle_progress = process_bundle_progress
