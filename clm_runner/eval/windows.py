"""The windows of a strided evaluation (see clm_runner.eval.perplexity for the rule)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One strided window: stream positions [input_start, input_end) in, [scored_start, scored_end) scored."""

    input_start: int
    input_end: int
    scored_start: int
    scored_end: int

    @property
    def n_scored(self) -> int:
        return self.scored_end - self.scored_start

    @property
    def shape_key(self) -> tuple[int, int]:
        return (self.input_end - self.input_start, self.n_scored)


@dataclass(frozen=True)
class StridedWindows:
    """The windows of a strided evaluation; computed on demand so memory stays flat in their number."""

    n_tokens: int
    context: int
    stride: int

    @property
    def count(self) -> int:
        # Window k's last target is min(k*stride + context, n_tokens - 1); the last window reaches the end.
        uncovered = self.n_tokens - 1 - self.context
        return 1 + max(0, -(-uncovered // self.stride))

    def window(self, k: int) -> Window:
        input_start = k * self.stride
        input_end = min(input_start + self.context, self.n_tokens - 1)
        # Window k-1 scored targets up to stream position (k-1)*stride + context, inclusive.
        scored_start = 1 if k == 0 else input_start + self.context - self.stride + 1
        return Window(input_start, input_end, scored_start, input_end + 1)

    def batches(self, indices: Iterable[int], batch_size: int) -> Iterator[list[Window]]:
        """Consecutive windows in batches of one shape (only the first and last window differ)."""
        batch: list[Window] = []
        for k in indices:
            window = self.window(k)
            if batch and (len(batch) == batch_size or window.shape_key != batch[0].shape_key):
                yield batch
                batch = []
            batch.append(window)
        if batch:
            yield batch
