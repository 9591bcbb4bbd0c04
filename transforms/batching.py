"""A DoFn base that batches elements within a bundle.

GroupIntoBatches is not available on every runner we support (the Python DirectRunner's
streaming fallback cannot run it), so batching happens inside the DoFn: elements are
buffered with their window and timestamp, handled at `batch_size`, and the rest is
handled in `finish_bundle`.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue


class BatchingDoFn(beam.DoFn):
    batch_size = 64
    max_batch_bytes = 0  # 0: no byte limit

    def start_bundle(self) -> None:
        self._buffer: list[tuple[Any, Any, Any]] = []
        self._bytes = 0

    def element_bytes(self, element: Any) -> int:
        return 0

    def process(self, element: Any, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam) -> Iterator:
        self._buffer.append((element, timestamp, window))
        if self.max_batch_bytes:
            self._bytes += self.element_bytes(element)
        if len(self._buffer) >= self.batch_size or (self.max_batch_bytes and self._bytes >= self.max_batch_bytes):
            yield from self._flush()

    def finish_bundle(self) -> Iterator:
        yield from self._flush()

    def _flush(self) -> Iterator:
        if not self._buffer:
            return
        batch, self._buffer, self._bytes = self._buffer, [], 0
        results = self.handle_batch([element for element, _, _ in batch])
        for (_, timestamp, window), outputs in zip(batch, results):
            for output in outputs:
                if isinstance(output, TaggedOutput):
                    yield TaggedOutput(output.tag, WindowedValue(output.value, timestamp, [window]))
                else:
                    yield WindowedValue(output, timestamp, [window])

    def handle_batch(self, elements: list[Any]) -> Iterable[Iterable[Any]]:
        """Returns, for each element in order, the outputs it produces."""
        raise NotImplementedError
