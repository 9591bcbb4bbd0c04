"""Batching inside DoFns (transforms/batching.py), driven directly with a real thread pool."""
from __future__ import annotations

import concurrent.futures
import threading

from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from newsbeam.transforms.batching import PooledBatchingDoFn


class Tens(PooledBatchingDoFn):
    """Multiplies by ten on a one-thread pool whose first batch waits for `gate`."""

    batch_size = 4
    max_in_flight = 4

    def __init__(self, tail_batch_size: int, open_gate_at: int):
        self.tail_batch_size = tail_batch_size
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.gate = threading.Event()
        self.open_gate_at = open_gate_at
        self.submitted: list[list[int]] = []

    def submit_batch(self, elements):
        self.submitted.append(list(elements))
        if len(self.submitted) == 1:
            return self.pool.submit(lambda: (self.gate.wait(10), [e * 10 for e in elements])[1])
        if len(self.submitted) >= self.open_gate_at:
            self.gate.set()
        return self.pool.submit(lambda: [e * 10 for e in elements])

    def collect(self, elements, future):
        return [[value] for value in future.result()]


def run_bundle(fn: Tens, elements: list[int]) -> list[int]:
    fn.start_bundle()
    outputs = []
    for element in elements:
        outputs += fn.process(element, Timestamp(element), GlobalWindow())
    outputs += fn.finish_bundle()
    fn.pool.shutdown()
    assert all(output.timestamp == Timestamp(output.value // 10) for output in outputs)
    return [output.value for output in outputs]


def test_batches_not_started_at_the_end_of_a_bundle_are_handed_out_again_in_small_ones():
    # 14 elements: [0-3] runs (held by the gate), [4-7] and [8-11] wait in the pool, 12-13 are
    # buffered; at the end the waiting ones are taken back and re-cut with the buffer.
    fn = Tens(tail_batch_size=2, open_gate_at=4)
    values = run_bundle(fn, list(range(14)))
    assert values == [element * 10 for element in range(14)]  # each once, in input order
    assert fn.submitted == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13]]


def test_without_a_tail_batch_size_the_end_of_a_bundle_is_one_more_batch():
    fn = Tens(tail_batch_size=0, open_gate_at=2)
    values = run_bundle(fn, list(range(6)))
    assert values == [element * 10 for element in range(6)]
    assert fn.submitted == [[0, 1, 2, 3], [4, 5]]
