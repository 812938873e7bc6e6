"""The rows of an evaluation split (an array, a Dataset, a stream), one shard's share, each with its text span."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from clm_runner.data.blocks import BlockContext
from clm_runner.errors import DataError
from clm_runner.eval.text_counts import TextSpan, block_span, context_span


def shard_batches(n_rows: int, rank: int, world: int, batch_size: int) -> int:
    """Forward batches the exact eval runs on `rank`: its rows are rank, rank + world, ... (no padding)."""
    return -(-len(range(rank, n_rows, world)) // batch_size)


def lockstep_padding(n_rows: int, rank: int, world: int, batch_size: int) -> int:
    """Extra forward passes `rank` must run so that every rank runs as many as rank 0 (0 or 1)."""
    return shard_batches(n_rows, 0, world, batch_size) - shard_batches(n_rows, rank, world, batch_size)


class BlockSource:
    """The rows of an evaluation split, this shard's in batches, each row with its text span."""

    def __init__(self, blocks: Any, *, context: BlockContext | None, contiguous: bool) -> None:
        self.rows = _block_rows(blocks)
        self.context = context
        self.contiguous = contiguous
        self.indexable = hasattr(self.rows, "__len__") and hasattr(self.rows, "__getitem__")
        self.count = len(self.rows) if self.indexable else 0
        self.block_size = 0
        self.first_row = np.zeros(2, dtype=np.int64)

    def batches(self, rank: int, world: int, batch_size: int) -> Iterator[tuple[np.ndarray, list[TextSpan]]]:
        """Batches of this shard's rows (one length each), with the span of each row's scored tokens."""
        items = (
            self._indexed_items(rank, world, batch_size)
            if self.indexable
            else self._streamed_items(rank, world)
        )
        pending: list[tuple[np.ndarray, TextSpan]] = []
        for item in items:
            pending.append(item)
            if len(pending) == batch_size:
                yield from _by_length(pending)
                pending = []
        if pending:
            yield from _by_length(pending)

    def _indexed_items(self, rank: int, world: int, batch_size: int) -> Iterator[tuple[np.ndarray, TextSpan]]:
        if self.count:
            self.first_row = _fetch_rows(self.rows, range(0, 1))[0]
            # Read from the whole split, not this shard, so every shard's result carries the same setting.
            self.block_size = len(self.first_row)
        indices = range(rank, self.count, world)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            for index, row in zip(chunk, _fetch_rows(self.rows, chunk), strict=True):
                span = context_span(self.context, index) if self.context is not None else block_span(row)
                yield row, span

    def _streamed_items(self, rank: int, world: int) -> Iterator[tuple[np.ndarray, TextSpan]]:
        # Every rank reads the whole stream and keeps its share; one row of look-ahead gives each block the
        # start of the next one (its right context) when the blocks are adjacent.
        previous: np.ndarray | None = None
        held: tuple[int, np.ndarray] | None = None
        for index, raw in enumerate(self.rows):
            row = _as_row(raw)
            if index == 0:
                self.first_row, self.block_size = row, len(row)
            self.count = index + 1
            if held is not None:
                held_index, held_row = held
                if held_index % world == rank:
                    yield held_row, self._stream_span(held_row, previous, row)
                previous = held_row
            held = (index, row)
        if held is not None and held[0] % world == rank:
            yield held[1], self._stream_span(held[1], previous, None)

    def _stream_span(
        self, row: np.ndarray, previous: np.ndarray | None, following: np.ndarray | None
    ) -> TextSpan:
        if not self.contiguous:
            return block_span(row)
        return block_span(row, previous, following)


def _by_length(items: list[tuple[np.ndarray, TextSpan]]) -> Iterator[tuple[np.ndarray, list[TextSpan]]]:
    """Rows stacked into 2-D arrays of one length each (grouped blocks all share one length)."""
    for length in sorted({len(row) for row, _ in items}):
        same = [(row, span) for row, span in items if len(row) == length]
        yield np.stack([row for row, _ in same]), [span for _, span in same]


def _block_rows(blocks: Any) -> Any:
    """Rows to read: a Dataset keeps only its input_ids column; anything else is read as it is."""
    column_names = getattr(blocks, "column_names", None)
    if column_names is not None:  # a datasets.Dataset or IterableDataset
        if "input_ids" not in column_names:
            raise DataError(
                f"the evaluation dataset has no input_ids column (columns: {column_names}): "
                "tokenize and group the split into blocks first"
            )
        return blocks.select_columns(["input_ids"])
    return blocks


def _as_row(raw: Any) -> np.ndarray:
    if isinstance(raw, dict):
        raw = raw["input_ids"]
    if isinstance(raw, torch.Tensor):
        raw = raw.numpy()
    return np.asarray(raw, dtype=np.int64).reshape(-1)


def _fetch_rows(rows_source: Any, indices: range) -> list[np.ndarray]:
    if getattr(rows_source, "column_names", None) is not None:
        rows = rows_source[list(indices)]["input_ids"]
    elif isinstance(rows_source, np.ndarray):
        rows = rows_source[indices.start : indices.stop : indices.step]
    else:
        rows = [rows_source[i] for i in indices]
    return [_as_row(row) for row in rows]
