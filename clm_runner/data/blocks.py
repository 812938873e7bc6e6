"""Token blocks: the block size rule, run_clm's and clm-runner's grouping, and a prepared split."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clm_runner.errors import DataError, RecipeError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

RUN_CLM_BATCH_ROWS = 1000
"""run_clm's `datasets.map(batched=True)` batch: its grouping drops each batch's remainder."""


# ---------------------------------------------------------------------------------------------------
# Block size


def resolve_block_size(
    requested: int | None,
    tokenizer: Any,
    config: Any,
    warn: Callable[[str], None] = logger.warning,
    *,
    clamp: bool = False,
) -> int:
    """run_clm's block size rule, and the one place that decides the block size.

    Unset: the tokenizer's model_max_length, or min(1024, max_position_embeddings) when that is larger
    than the model's positions (run_clm assumes 1024 positions for a config without the attribute).
    Set: capped at model_max_length. Either way never longer than the model's positions: run_clm lets such
    a block through and the model fails on it; here it is refused before any heavy work.

    `clamp` (data.clamp_block_size) is run_clm's order: a set size is first lowered to model_max_length, and
    only a size still longer than the model's positions is refused. Without it, a size longer than the
    positions is refused as written, even where model_max_length would have lowered it.
    """
    declared_positions = getattr(config, "max_position_embeddings", None)
    max_positions = declared_positions if declared_positions is not None else 1024
    model_max_length = tokenizer.model_max_length
    if clamp and requested is not None and requested > model_max_length:
        warn(
            f"The block_size passed ({requested}) is larger than the maximum length for the model "
            f"({model_max_length}). Using block_size={model_max_length} (data.clamp_block_size)."
        )
        requested = int(model_max_length)
    if requested is not None and declared_positions is not None and requested > declared_positions:
        raise RecipeError(
            f"data.block_size = {requested} is longer than the model's {declared_positions} positions "
            f"(max_position_embeddings): set data.block_size to {declared_positions} or less."
        )
    if requested is None:
        block_size = model_max_length
        if block_size > max_positions:
            fallback = min(1024, max_positions) if max_positions > 0 else 1024
            warn(
                f"The tokenizer picked seems to have a very large `model_max_length` ({model_max_length}). "
                f"Using block_size={fallback} instead. You can change that default value by setting "
                "data.block_size."
            )
            block_size = fallback
        return int(block_size)
    if requested > model_max_length:
        warn(
            f"The block_size passed ({requested}) is larger than the maximum length for the model "
            f"({model_max_length}). Using block_size={model_max_length}."
        )
    return int(min(requested, model_max_length))


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class SplitStats:
    """What preparing one split produced (for the whole split, before max_*_samples)."""

    rows: int
    tokens: int
    blocks: int
    dropped_tokens: int
    """Tokens in no block: the final remainder (concat), or every batch's remainder (run_clm)."""
    seconds: float
    """Time this call spent on the split (building it, or opening the cache)."""
    null_rows: int = 0
    """Rows whose text is null (a missing value): skipped, as if they were not there."""


@dataclass(frozen=True)
class PreparedSplit:
    """One split ready for training or evaluation."""

    name: str
    blocks: datasets.Dataset | datasets.IterableDataset
    """Columns input_ids and labels (equal), torch format: rows come back as int64 tensors."""
    stream: np.ndarray | None
    """The split's whole 1-D token stream (memory-mapped from the cache); None when streaming."""
    stats: SplitStats | None
    """None when streaming."""
    cache_path: Path | None = None
    """The cache directory the split was read from (None when streaming)."""
    from_cache: bool = False
    """True when the cache already held the split and no text was tokenized."""
    starts: np.ndarray | None = None
    """Where each block (of `blocks`, after max_*_samples) starts in `stream`; None when streaming."""
    block_size: int = 0
    grouping: str = "concat"
    limited: bool = False
    """True when max_*_samples kept fewer blocks than the split has."""
    parts: Mapping[str, PreparedSplit] = field(default_factory=dict)
    """[[data.mix]]: the split of each source, by name (empty for one source). Evaluate each part and merge
    the results: `blocks` is the parts' blocks (validation) or the mix (train), with no stream of its own."""
    mix_counts: Mapping[str, int] = field(default_factory=dict)
    """[[data.mix]] train: blocks taken from each source."""

    def eval_text(self) -> dict[str, Any]:
        """How evaluate_blocks finds each block's place in the token stream (for bytes and words)."""
        if self.stream is not None and self.starts is not None:
            return {"context": BlockContext(self.stream, self.starts, self.block_size)}
        # A stream's consecutive concat blocks are adjacent in the text (tokens carry over between them).
        return {"contiguous": self.grouping == "concat"}

    def scored_stream(self) -> np.ndarray:
        """The token stream the blocks cover (through the end of the last block kept by max_*_samples): the
        text a strided evaluation scores, so both methods score the same text."""
        if self.stream is None:
            raise DataError("a streamed split has no token stream to evaluate with strided windows")
        if not self.limited or self.starts is None or len(self.starts) == 0:
            return self.stream
        return self.stream[: int(self.starts[-1]) + self.block_size]


@dataclass(frozen=True)
class BlockContext:
    """Where each block sits in its split's token stream (for decoding its scored tokens in place)."""

    stream: np.ndarray
    starts: np.ndarray
    block_size: int


# ---------------------------------------------------------------------------------------------------
# Grouping


def run_clm_batch_edges(n_rows: int, workers: int | None = None) -> np.ndarray:
    """Row indices where run_clm's `group_texts` batches begin, plus n_rows at the end.

    datasets.map(batched=True, num_proc=N) cuts the rows into N contiguous shards (Dataset.shard with
    contiguous=True: the first n % N shards one row longer) and starts 1000-row batches at each shard's
    first row; N above the row count is lowered to it, as datasets does.
    """
    shards = max(1, min(workers or 1, n_rows))
    div, mod = divmod(n_rows, shards)
    edges: list[np.ndarray] = []
    for index in range(shards):
        start = div * index + min(index, mod)
        end = start + div + (1 if index < mod else 0)
        edges.append(np.arange(start, end, RUN_CLM_BATCH_ROWS, dtype=np.int64))
    return np.concatenate([*edges, np.array([n_rows], dtype=np.int64)])


def block_starts(
    row_lengths: np.ndarray, block_size: int, grouping: str, run_clm_workers: int | None = None
) -> np.ndarray:
    """Stream offsets at which each block starts, in order.

    concat: every block_size tokens of the whole stream, the final remainder dropped.
    run_clm: run_clm's `group_texts` over 1000-row batches: each batch cut into whole blocks, its remainder
    dropped (with `run_clm_workers`, the batches of run_clm run with --preprocessing_num_workers N). A
    batch shorter than one block gives no block: run_clm's newest version raises there instead, older
    ones skipped such a batch, and skipping keeps a valid split usable.
    """
    total = int(row_lengths.sum(dtype=np.int64))
    if grouping == "concat":
        return np.arange(total // block_size, dtype=np.int64) * block_size
    if grouping != "run_clm":
        raise DataError(f"data.grouping must be 'concat' or 'run_clm'; got {grouping!r}.")
    offsets = np.concatenate([[0], np.cumsum(row_lengths, dtype=np.int64)])
    batch_edges = offsets[run_clm_batch_edges(len(row_lengths), run_clm_workers)]
    batch_starts, batch_tokens = batch_edges[:-1], np.diff(batch_edges)
    per_batch = batch_tokens // block_size
    first = np.repeat(batch_starts, per_batch)
    index_in_batch = np.arange(int(per_batch.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(per_batch) - per_batch, per_batch
    )
    return first + index_in_batch * block_size


def log_text_column(split: str, column: str | None, configured: str | None) -> None:
    # A column named "text" is what anyone expects; any other one picked on its own is worth a line.
    if configured is None and column is not None and column != "text":
        logger.info(
            "The %s split's text is in column %r (data.text_column is unset; set it to choose another).",
            split,
            column,
        )
