"""Which runner `newsbeam run` gets and why (pipeline/runner.py), the runner profile it hands
the stages, and the Beam patches' version guard (pipeline/beam_fixes.py)."""
import dataclasses
import logging
import os
import shutil
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, PrismRunnerOptions, StandardOptions
from apache_beam.runners.portability.prism_runner import PrismJobServer

from newsbeam.pipeline import local_es
from newsbeam.pipeline import runner as runners
from newsbeam.pipeline.build import build_pipeline
from newsbeam.pipeline.config import ConfigError, Feed, load_settings
from newsbeam.transforms.topics import Taxonomy
from newsbeam.transforms.workers import resolve_processes


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No Prism binary anywhere newsbeam or Beam would look, and a Beam version without a
    release binary, so Beam's download fails online as offline."""
    monkeypatch.setattr(runners, "CACHE", tmp_path / "newsbeam-cache")
    monkeypatch.setattr(PrismJobServer, "BIN_CACHE", str(tmp_path / "beam-cache"))
    return ["--prism_beam_version_override", "v0.0.0-no-such-release"]


def test_worker_counts_auto_resolve_by_runner_and_bad_values_are_refused(tmp_path):
    settings = load_settings(None)
    assert (settings.nlp.processes, settings.fetch.parse_processes) == ("auto", "auto")
    local = runners.apply_profile(settings, runners.profile_for(runners.RunnerChoice("FnApiRunner", "", True),
                                                                settings))
    assert local.nlp.processes == resolve_processes(0) >= 1 and local.fetch.parse_processes == 1
    cluster = runners.apply_profile(settings, runners.profile_for(runners.RunnerChoice("FlinkRunner", "", False),
                                                                  settings))
    assert (cluster.nlp.processes, cluster.fetch.parse_processes) == (0, 0)
    config = tmp_path / "pipeline.yaml"
    config.write_text("nlp:\n  processes: 3\n")
    assert runners.profile_for(runners.RunnerChoice("PrismRunner", "", True), load_settings(config)).nlp_processes == 3
    config.write_text("nlp:\n  processes: -1\n")
    with pytest.raises(ConfigError, match="nlp.processes must be 'auto' or a whole number >= 0"):
        load_settings(config)


def test_each_runner_gets_its_own_profile():
    settings = load_settings(None)
    fnapi = runners.profile_for(runners.RunnerChoice("FnApiRunner", "", True), settings)
    prism = runners.profile_for(runners.RunnerChoice("PrismRunner", "", True), settings)
    flink = runners.profile_for(runners.RunnerChoice("FlinkRunner", "", False), settings)
    assert (fnapi.tick_budget, fnapi.wait_for_tick, fnapi.fan_out_dead_letters) == (True, True, True)
    assert (prism.tick_budget, prism.wait_for_tick, prism.fan_out_dead_letters) == (True, False, True)
    assert (flink.tick_budget, flink.wait_for_tick, flink.fan_out_dead_letters) == (False, False, False)


def _dofns(pipeline: beam.Pipeline) -> dict[str, list[beam.DoFn]]:
    found: dict[str, list[beam.DoFn]] = {}

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            if isinstance(node.transform, beam.ParDo):
                found.setdefault(type(node.transform.fn).__name__, []).append(node.transform.fn)

    pipeline.visit(Visitor())
    return found


@pytest.mark.parametrize("nlp_processes, ner", [(2, (8, 6, 2)), (0, (16, 2, 0))])
def test_the_profile_s_batch_sizes_reach_every_stage_of_the_built_pipeline(nlp_processes, ner):
    base = load_settings(None)
    settings = dataclasses.replace(base, feeds=(Feed(url="http://127.0.0.1:9/feed.xml", full_text=True),),
                                   nlp=dataclasses.replace(base.nlp, processes=nlp_processes),
                                   elasticsearch=dataclasses.replace(base.elasticsearch, bulk_actions=40))
    profile = runners.profile_for(runners.RunnerChoice("FnApiRunner", "", True), settings)
    settings = runners.apply_profile(settings, profile)
    assert settings.sizes == profile.sizes
    fns = _dofns(build_pipeline(beam.Pipeline(), settings, Taxonomy.load(settings.topics_file), profile))
    (tag,) = fns["TagEntitiesFn"]
    assert (tag.batch_size, tag.max_in_flight, tag.tail_batch_size) == ner
    assert fns["LinkStoriesFn"][0].batch_size == fns["FetchFullTextFn"][0].batch_size == profile.sizes.lookup_batch
    assert fns["SkipIndexedFn"][0].batch_size == 40  # at most one bulk request's worth of ids
    assert fns["CreateAlertsFn"][0].batch_size == profile.sizes.alert_batch
    assert {fn.max_in_flight for fn in fns["WriteFn"]} == {profile.sizes.bulk_in_flight}
    assert len(fns["WriteFn"]) >= 3  # articles, feed health, dead letters


def test_the_prism_binary_deploy_prism_sh_built_is_found_without_flags(tmp_path, monkeypatch, empty_caches):
    binary = local_es.CACHE / f"prism-v{runners.beam_version()}" / "prism"  # the real cache, not the fixture's
    if not binary.is_file():
        pytest.skip("no Prism binary: deploy/prism.sh builds it (needs Go)")
    cached = tmp_path / "newsbeam-cache" / f"prism-v{runners.beam_version()}" / "prism"
    cached.parent.mkdir(parents=True)
    shutil.copy(binary, cached)
    assert runners.prism_cache_path() == cached
    options = PipelineOptions(["--runner", "PrismRunner", *empty_caches])
    choice = runners.choose_runner(options)
    assert (choice.name, choice.local, choice.prism_binary) == ("PrismRunner", True, str(cached))
    assert "deploy/prism.sh" in choice.reason
    assert options.view_as(PrismRunnerOptions).prism_location == str(cached)
    assert options.view_as(StandardOptions).runner == "PrismRunner"


def test_prism_asked_for_by_name_without_a_binary_is_an_error_not_a_fallback(empty_caches):
    with pytest.raises(RuntimeError, match="no Prism binary .*deploy/prism.sh"):
        runners.choose_runner(PipelineOptions(["--runner", "PrismRunner", *empty_caches]))


def test_the_default_falls_back_to_the_fnapi_runner_only_saying_why(empty_caches, monkeypatch, caplog):
    monkeypatch.setattr(runners, "DEFAULT_LOCAL", runners.PRISM)
    options = PipelineOptions(empty_caches)
    with caplog.at_level(logging.WARNING, logger=runners.__name__):
        choice = runners.choose_runner(options)
    assert (choice.name, choice.reason) == ("FnApiRunner", "Prism unavailable")
    assert options.view_as(StandardOptions).runner == "FnApiRunner"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "Prism unavailable" in warning and "download failed" in warning and "deploy/prism.sh" in warning


def test_a_distributed_runner_is_left_as_asked():
    options = PipelineOptions(["--runner", "FlinkRunner"])
    choice = runners.choose_runner(options)
    assert (choice.name, choice.local) == ("FlinkRunner", False)
    assert runners.make_runner(choice, options) is None
    local = runners.choose_runner(PipelineOptions(["--runner", "fnapi"]))
    assert (local.name, local.reason) == ("FnApiRunner", "asked for with --runner")
    assert type(runners.make_runner(local, PipelineOptions([]))).__name__ == "FnApiRunner"


def test_beam_patches_refuse_a_beam_version_they_were_not_written_for():
    script = ("import logging, sys\n"
              "logging.basicConfig(level=logging.INFO)\n"
              "from apache_beam.runners.portability.fn_api_runner import fn_runner\n"
              "from newsbeam.pipeline import beam_fixes\n"
              "assert beam_fixes.apply('2.78.0') is False\n"
              "assert not hasattr(fn_runner.consolidate_monitoring_infos, 'newsbeam_bounded')\n"
              "assert beam_fixes.apply() is True\n"
              "assert fn_runner.consolidate_monitoring_infos.newsbeam_bounded\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Beam 2.78.0: newsbeam's Beam patches were written for Beam 2.77.x and are not applied" in done.stderr


@pytest.mark.slow
def test_a_run_outlasts_the_job_server_timeout(tmp_path, es, es_settings, feed_server, runner):
    """Beam opens a portable job's state and message streams with `--job_server_timeout` (300 s
    by default) as their deadline, so every Prism run longer than that died with
    DEADLINE_EXCEEDED (pipeline/beam_fixes.py `job_streams_without_deadline`); here the
    timeout is 4 s and the run lasts 40."""
    import re

    from tests.support.cli import newsbeam
    from tests.support.config import write_config
    from tests.support.feedserver import fixture_articles, rss

    feed = feed_server.serve("/world.xml", rss([fixture_articles()["floods"]]))
    config = write_config(tmp_path, es_settings, poll_interval=3)
    run = newsbeam("run", *runner, "--job_server_timeout", "4", "--config", str(config), "--feed", feed,
                   "--duration", "40")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "DEADLINE_EXCEEDED" not in run.stderr
    progress = [int(seconds) for seconds in re.findall(r"running (\d+)s:", run.stderr)]
    assert progress and max(progress) >= 25, run.stderr[-3000:]  # still running long after the 4 s


class _SlowCount(beam.DoFn):
    """Half a second an element, so Prism asks for progress while the bundle runs."""

    def __init__(self):
        self._seen = beam.metrics.Metrics.counter("test", "seen")

    def process(self, element):
        import time
        time.sleep(0.5)
        self._seen.inc()
        yield element


@pytest.mark.slow
def test_lean_progress_answers_on_prism_leave_no_metric_unknown_and_final_metrics_stay_whole(monkeypatch,
                                                                                           prism_location):
    """Prism asks each running bundle for progress every 100 ms and reads the input's read index
    and the element counts; `lean_progress_reports` (pipeline/beam_fixes.py) answers with those
    alone once Prism has had every metric's short id. Beam's own answer to each request, built
    first, shows what Prism would have learnt: every short id in it must have reached Prism by
    then, or two bundles ending with the same unknown id lose one's payload."""
    from apache_beam.coders import VarIntCoder
    from apache_beam.metrics import monitoring_infos
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.runners.worker import sdk_worker

    from newsbeam.pipeline.beam_fixes import lean_progress_reports

    beams_answer = sdk_worker.SdkWorker.process_bundle_progress
    monkeypatch.setattr(sdk_worker.SdkWorker, "process_bundle_progress", beams_answer)  # restored after
    lean_progress_reports()
    lean_progress_reports()  # idempotent
    lean_answer = sdk_worker.SdkWorker.process_bundle_progress
    assert lean_answer is not beams_answer
    announced: set[str] = set()
    unknown: list[set[str]] = []
    lean_urns: list[set[str]] = []
    left_out: set[str] = set()
    behind: list[tuple[str, int, int]] = []  # (short id, lean figure, Beam's figure built just before)
    moved: list[int] = []
    kept = {monitoring_infos.ELEMENT_COUNT_URN, monitoring_infos.DATA_CHANNEL_READ_INDEX}
    decode = VarIntCoder().decode

    def both_answers(self, request, instruction_id):
        full = beams_answer(self, request, instruction_id).process_bundle_progress
        answer = lean_answer(self, request, instruction_id)
        ours = answer.process_bundle_progress
        announced.update(ours.monitoring_data)
        unknown.append(set(full.monitoring_data) - announced)
        # Prism reads the payloads by short id: what each names is in the SDK's short-id cache.
        urns = {info.urn for info in sdk_worker.SHORT_ID_CACHE.get_infos(ours.monitoring_data).values()}
        if urns and urns <= kept:
            lean_urns.append(urns)
            left_out.update({info.urn for info in full.monitoring_infos} - urns)
            # The same figures as Beam's answer, read a moment later: never behind it (counts and
            # the read index only grow within a bundle).
            behind.extend((short, decode(payload), decode(full.monitoring_data[short]))
                          for short, payload in ours.monitoring_data.items()
                          if decode(payload) < decode(full.monitoring_data[short]))
            moved.extend(decode(payload) for payload in ours.monitoring_data.values())
        return answer

    monkeypatch.setattr(sdk_worker.SdkWorker, "process_bundle_progress", both_answers)
    # A job server of its own: Beam keeps one per process, and a DirectRunner pipeline run earlier
    # in this process leaves behind one whose download failed.
    options = PipelineOptions(["--runner", "PrismRunner", "--prism_location", prism_location,
                               "--environment_type", "LOOPBACK", "--experiments", "disable_prism_server_singleton"])
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | beam.Create(range(8)) | beam.Reshuffle() | beam.ParDo(_SlowCount())
    assert unknown, "Prism asked no running bundle for its progress"
    assert not any(unknown), f"short ids Prism had not been told of: {[ids for ids in unknown if ids]}"
    assert lean_urns, "every progress answer was whole: the patch saved nothing"
    assert all(monitoring_infos.DATA_CHANNEL_READ_INDEX in urns for urns in lean_urns)
    assert not behind, f"lean figures behind Beam's own: {behind}"
    assert any(figure > 0 for figure in moved), "no lean answer saw a bundle move"
    assert monitoring_infos.USER_COUNTER_URN in left_out and monitoring_infos.TOTAL_MSECS_URN in left_out
    seen = pipeline.result.metrics().query(MetricsFilter().with_name("seen"))["counters"]
    assert sum(counter.committed for counter in seen) == 8
