"""Perplexity of a causal LM over an evaluation split: disjoint blocks or strided sliding windows.

Both methods are token-weighted: the score is the total negative log-likelihood (nats) of every
predicted token divided by their number, never a mean of per-block or per-window means, so results
from shards, ranks or batches add up exactly (see `PerplexityResult.__add__` and `as_tensor`).

Strided windows, precisely. The stream is x[0..N). Window k feeds the model the up to `context`
tokens x[k*stride : min(k*stride + context, N - 1)]; its logit at input position i predicts the token
right after it, x[k*stride + i + 1]. The window scores only the targets that no earlier window scored,
which are its last `stride` targets (all of them for the first window, and fewer for the last one).
So every token but x[0] is scored exactly once, the first target of a window has
`context - stride + 1` tokens of context, and stride == context is allowed: it is disjoint input
blocks whose first target is conditioned on the previous window's last target. This is the
Hugging Face "Perplexity of fixed-length models" loop with its `max_length` set to `context + 1`:
the guide puts the last target inside `input_ids` and throws that position's logits away, so its
windows use one context token less than the model can hold, and with stride == max_length it would
leave the first token of every window unscored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from clm_runner.data.blocks import BlockContext
from clm_runner.errors import DataError, EvalError
from clm_runner.eval.block_rows import BlockSource, lockstep_padding, shard_batches
from clm_runner.eval.result import PerplexityResult, reduce_across_ranks
from clm_runner.eval.scoring import ScoringBatch, max_positions_of, run_forward, score
from clm_runner.eval.text_counts import LEFT_CONTEXT_TOKENS, RIGHT_CONTEXT_TOKENS, TextSpan
from clm_runner.eval.windows import StridedWindows

__all__ = [
    "METHODS",
    "PerplexityResult",
    "StridedWindows",
    "evaluate_blocks",
    "evaluate_strided",
    "lockstep_padding",
    "reduce_across_ranks",
    "shard_batches",
]

METHODS = ("blocks", "strided")


def evaluate_blocks(
    model: torch.nn.Module,
    blocks: Any,
    *,
    batch_size: int,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[int], None] | None = None,
    context: BlockContext | None = None,
    contiguous: bool = False,
    lockstep: bool = False,
) -> PerplexityResult:
    """Score every token but the first of each block, as run_clm's eval does with labels = input_ids.

    `blocks` is a 2-D numpy array of token ids, a `datasets.Dataset` with an `input_ids` column, a stream
    of them (`datasets.IterableDataset`, any iterable of rows or of {"input_ids": row}), or any sequence of
    rows; the result's `context` is the first block's length.
    `shard=(rank, world)` evaluates rows rank, rank + world, ... with no padding and no duplicates, so
    the shards' results add up to the unsharded result. `progress` is called with the number of this
    shard's blocks done so far.

    Bytes and words (with a tokenizer) are counted on each block's scored tokens in their place in the
    split's token stream: `context` says where each block sits (cached splits); `contiguous` says that a
    stream's consecutive blocks are adjacent in it (concat grouping); otherwise a block is decoded alone.
    `lockstep`: every rank runs as many forward passes as rank 0 (FSDP and ZeRO-3 need it, as each forward
    is a collective there).
    """
    rank, world = _check_shard(shard)
    _check_batch_size(batch_size)
    source = BlockSource(blocks, context=context, contiguous=contiguous)
    max_positions = max_positions_of(model)
    first_row: list[np.ndarray] = []

    def batches() -> Iterator[ScoringBatch]:
        for rows, spans in source.batches(rank, world, batch_size):
            if not first_row:
                first_row.append(rows[0])
            length = rows.shape[1]
            if max_positions is not None and length > max_positions:
                raise DataError(
                    f"a block has {length} tokens but the model takes at most {max_positions} "
                    f"positions: set block_size to {max_positions} or less"
                )
            # The logits of a block's last token predict nothing, so the model never sees it; for a causal
            # model the other positions' logits are unchanged by dropping it.
            yield ScoringBatch(inputs=rows[:, :-1], targets=rows[:, 1:], spans=spans, samples=len(rows))

    totals = score(
        model, batches(), tokenizer=tokenizer, device=device, autocast_dtype=autocast_dtype, progress=progress
    )
    if source.count == 0:
        raise DataError("the evaluation split has no blocks: check the eval data and block_size")
    if lockstep and world > 1:
        row = first_row[0] if first_row else source.first_row
        for _ in range(lockstep_padding(source.count, rank, world, batch_size)):
            run_forward(model, row[None, :-1], device)
    return totals.result(method="blocks", context=source.block_size, stride=None)


def evaluate_strided(
    model: torch.nn.Module,
    stream: Any,
    *,
    context: int,
    stride: int,
    batch_size: int,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Score every token but the first of a 1-D token stream once, with sliding-window context.

    Windows of up to `context` tokens start every `stride` tokens (see the module docstring for the
    exact rule). The model's head runs only on the positions a window scores (`logits_to_keep`).
    `shard=(rank, world)` evaluates windows rank, rank + world, ...; `progress` is called with the
    number of this shard's windows done so far.
    """
    rank, world = _check_shard(shard)
    _check_batch_size(batch_size)
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise EvalError(f"strided eval context must be a positive number of tokens, got {context!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 0 < stride <= context:
        raise EvalError(
            f"strided eval stride must be between 1 and the context ({context}), got {stride!r}: "
            f"set stride to at most {context} (context / 2 is a common choice)"
        )
    max_positions = max_positions_of(model)
    if max_positions is not None and context > max_positions:
        raise EvalError(
            f"strided eval context {context} is longer than the model's {max_positions} positions: "
            f"set context to {max_positions} or less"
        )
    tokens = np.asarray(stream)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(
            f"strided eval needs a 1-D array of integer token ids, got shape {tokens.shape} "
            f"of {tokens.dtype}: concatenate the split's input_ids into one stream"
        )
    if len(tokens) < 2:
        raise DataError(
            f"strided eval needs at least 2 tokens to predict one, the stream has {len(tokens)}: "
            "use a larger evaluation split"
        )
    windows = StridedWindows(n_tokens=len(tokens), context=context, stride=stride)

    def batches() -> Iterator[ScoringBatch]:
        for batch in windows.batches(range(rank, windows.count, world), batch_size):
            # Stream position 0 is never scored, so the scored text starts at position 1.
            spans = [
                TextSpan(
                    left=tokens[max(1, w.scored_start - LEFT_CONTEXT_TOKENS) : w.scored_start],
                    span=tokens[w.scored_start : w.scored_end],
                    right=tokens[w.scored_end : w.scored_end + RIGHT_CONTEXT_TOKENS],
                )
                for w in batch
            ]
            yield ScoringBatch(
                inputs=np.stack([tokens[w.input_start : w.input_end] for w in batch]),
                targets=np.stack([tokens[w.scored_start : w.scored_end] for w in batch]),
                spans=spans,
                samples=len(batch),
            )

    totals = score(
        model, batches(), tokenizer=tokenizer, device=device, autocast_dtype=autocast_dtype, progress=progress
    )
    return totals.result(method="strided", context=context, stride=stride)


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    return rank, world


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"eval batch size must be a positive integer, got {batch_size!r}")
