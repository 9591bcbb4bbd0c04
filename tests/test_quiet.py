"""Beam's import-time "apitools not found" notice stays out of the output of newsbeam's worker
processes and benchmark scripts (the CLI's own: tests/test_cli.py)."""
from __future__ import annotations

import subprocess
import sys

import apache_beam  # noqa: F401  (a worker process imports this module, and Beam with it, to run beam_imported)

from newsbeam.transforms.workers import WorkerPool
from tests.support import REPO

NOTICE = "apitools not found"


def beam_imported(_: object = None) -> bool:
    return "apache_beam" in sys.modules


def test_worker_processes_do_not_print_beams_import_time_notice(capfd):
    pool = WorkerPool(1, beam_imported, (), name="quiet")  # its initializer's module imports Beam
    try:
        assert pool.submit(beam_imported).result(timeout=300) is True  # the worker did import Beam
    finally:
        pool.shutdown(wait=True)
    assert NOTICE not in capfd.readouterr().err


def test_bench_scripts_do_not_print_beams_import_time_notice():
    # bench.hostile imports Beam at start-up (through the pipeline's modules).
    result = subprocess.run([sys.executable, "-c", "import bench.hostile, apache_beam, sys; "
                                                   "assert 'apache_beam' in sys.modules"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert NOTICE not in result.stderr
