"""DoFn bases that batch elements within a bundle.

GroupIntoBatches is not available on every runner we support (the Python DirectRunner's
streaming fallback cannot run it), so batching happens inside the DoFn: elements are
buffered with their window and timestamp, handled at `batch_size`, and the rest is
handled in `finish_bundle`.

`PooledBatchingDoFn` hands batches to worker processes (or a thread) and keeps several in
flight, so the pipeline thread goes on polling, cleaning and indexing while they compute;
results leave in input order.
"""
from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue

from newsbeam.transforms import timing

_Batch = list[tuple[Any, Any, Any]]  # (element, timestamp, window)


class BatchingDoFn(beam.DoFn):
    batch_size = 64
    max_batch_bytes = 0  # 0: no byte limit
    stage = ""  # set to have the time spent per batch counted under this name (transforms/timing.py)

    def start_bundle(self) -> None:
        self._buffer: _Batch = []
        self._bytes = 0
        self._bundle_elements = 0

    def element_bytes(self, element: Any) -> int:
        return 0

    def process(self, element: Any, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam) -> Iterator:
        self._buffer.append((element, timestamp, window))
        self._bundle_elements += 1
        if self.max_batch_bytes:
            self._bytes += self.element_bytes(element)
        if len(self._buffer) >= self.batch_size or (self.max_batch_bytes and self._bytes >= self.max_batch_bytes):
            yield from self._flush()

    def finish_bundle(self) -> Iterator:
        self._observe_bundle()
        yield from self._flush()

    def _observe_bundle(self) -> None:
        # How the runner cuts the stream into bundles decides how much batching and overlap is possible.
        if self.stage and self._bundle_elements:
            timing.observe(f"{self.stage}_bundle_elements", self._bundle_elements)

    def _take(self) -> _Batch:
        batch, self._buffer, self._bytes = self._buffer, [], 0
        return batch

    def _flush(self) -> Iterator:
        if not self._buffer:
            return
        batch = self._take()
        with timing.stage(self.stage, len(batch)):
            results = list(self.handle_batch([element for element, _, _ in batch]))
        yield from _emit(batch, results)

    def handle_batch(self, elements: list[Any]) -> Iterable[Iterable[Any]]:
        """Returns, for each element in order, the outputs it produces."""
        raise NotImplementedError


class PooledBatchingDoFn(BatchingDoFn):
    """Batches are submitted (`submit_batch` returns a future) and collected later
    (`collect`), at most `max_in_flight` at a time; `finish_bundle` waits for the rest."""

    max_in_flight = 4
    # The runner waits for the slowest worker at the end of a bundle, and every worker idles
    # meanwhile. With a `tail_batch_size`, batches that no worker has started yet are taken back
    # then and handed out again, with the rest of the buffer, in batches of this size, so the
    # workers finish close together. 0: the end of a bundle is flushed like any other batch.
    tail_batch_size = 0

    def start_bundle(self) -> None:
        super().start_bundle()
        self._in_flight: collections.deque[tuple[_Batch, concurrent.futures.Future]] = collections.deque()

    def _flush(self) -> Iterator:
        if self._buffer:
            batch = self._take()
            self._in_flight.append((batch, self.submit_batch([element for element, _, _ in batch])))
        yield from self._drain(keep=self.max_in_flight - 1)

    def finish_bundle(self) -> Iterator:
        self._observe_bundle()
        if self.tail_batch_size:
            self._recut_tail()
        yield from self._flush()
        yield from self._drain(keep=0)

    def _recut_tail(self) -> None:
        rest = self._take()
        while self._in_flight and self._in_flight[-1][1].cancel():  # not started: still queued
            rest = self._in_flight.pop()[0] + rest
        for start in range(0, len(rest), self.tail_batch_size):
            batch = rest[start:start + self.tail_batch_size]
            self._in_flight.append((batch, self.submit_batch([element for element, _, _ in batch])))

    def _drain(self, keep: int) -> Iterator:
        """Emits finished batches from the front; waits while more than `keep` are in flight."""
        while self._in_flight and (len(self._in_flight) > keep or self._in_flight[0][1].done()):
            batch, future = self._in_flight.popleft()
            yield from _emit(batch, list(self.collect([element for element, _, _ in batch], future)))

    def submit_batch(self, elements: list[Any]) -> concurrent.futures.Future:
        raise NotImplementedError

    def collect(self, elements: list[Any], future: concurrent.futures.Future) -> Iterable[Iterable[Any]]:
        """For each element in order, its outputs; `future` is `submit_batch`'s, done or not."""
        raise NotImplementedError


def _emit(batch: _Batch, results: list[Iterable[Any]]) -> Iterator:
    for (_, timestamp, window), outputs in zip(batch, results):
        for output in outputs:
            if isinstance(output, TaggedOutput):
                yield TaggedOutput(output.tag, WindowedValue(output.value, timestamp, [window]))
            else:
                yield WindowedValue(output, timestamp, [window])

