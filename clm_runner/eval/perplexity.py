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

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clm_runner.errors import DataError, EvalError
from clm_runner.eval.scoring import ScoringBatch, max_positions_of, run_forward, score
from clm_runner.eval.text_counts import (
    LEFT_CONTEXT_TOKENS,
    RIGHT_CONTEXT_TOKENS,
    BlockContext,
    TextSpan,
    block_span,
)

METHODS = ("blocks", "strided")

# Fields that add across shards, in the order `as_tensor` lays them out.
_ADDITIVE_FIELDS = ("nll_sum", "tokens", "correct", "n_bytes", "n_words", "samples")


@dataclass(frozen=True)
class PerplexityResult:
    """Additive totals of one evaluation (or one shard of it) and the settings that produced them."""

    nll_sum: float  # nats, summed in float64 over every scored token
    tokens: int  # scored (predicted) tokens
    correct: int  # scored tokens whose argmax prediction equals the actual token
    n_bytes: int | None  # UTF-8 bytes of the text the scored tokens decode to; None without a tokenizer
    n_words: int | None  # whitespace-separated words of that text; None without a tokenizer
    method: str  # "blocks" | "strided"
    context: int  # block size (blocks) or window length (strided), in tokens
    stride: int | None  # None for blocks
    samples: int  # blocks or windows evaluated

    def __add__(self, other: PerplexityResult) -> PerplexityResult:
        if not isinstance(other, PerplexityResult):
            return NotImplemented
        settings = (self.method, self.context, self.stride)
        other_settings = (other.method, other.context, other.stride)
        if settings != other_settings:
            raise ValueError(
                f"cannot merge perplexity results of different settings {settings} and {other_settings}"
            )
        return PerplexityResult(
            nll_sum=self.nll_sum + other.nll_sum,
            tokens=self.tokens + other.tokens,
            correct=self.correct + other.correct,
            n_bytes=_add_optional(self.n_bytes, other.n_bytes),
            n_words=_add_optional(self.n_words, other.n_words),
            method=self.method,
            context=self.context,
            stride=self.stride,
            samples=self.samples + other.samples,
        )

    @classmethod
    def merge(cls, results: Iterable[PerplexityResult]) -> PerplexityResult:
        """The exact total of results from several shards of the same evaluation."""
        results = list(results)
        if not results:
            raise ValueError("merge needs at least one PerplexityResult")
        total = results[0]
        for result in results[1:]:
            total = total + result
        return total

    def as_tensor(self) -> torch.Tensor:
        """The additive fields as float64 (NaN for an unknown count), ready for an all-reduce SUM.

        float64 holds integer counts exactly up to 2**53 and NaN stays NaN through a sum, so an
        unknown byte or word count on any rank stays unknown in the total.
        """
        values = [getattr(self, name) for name in _ADDITIVE_FIELDS]
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor, *, like: PerplexityResult) -> PerplexityResult:
        """Rebuild a result from `as_tensor` values (e.g. after an all-reduce), with `like`'s settings."""
        flat = values.detach().to("cpu", torch.float64).reshape(-1).tolist()
        if len(flat) != len(_ADDITIVE_FIELDS):
            raise ValueError(f"expected {len(_ADDITIVE_FIELDS)} values {_ADDITIVE_FIELDS}, got {len(flat)}")
        nll_sum, tokens, correct, n_bytes, n_words, samples = flat
        return cls(
            nll_sum=nll_sum,
            tokens=_exact_count(tokens),
            correct=_exact_count(correct),
            n_bytes=None if math.isnan(n_bytes) else _exact_count(n_bytes),
            n_words=None if math.isnan(n_words) else _exact_count(n_words),
            method=like.method,
            context=like.context,
            stride=like.stride,
            samples=_exact_count(samples),
        )

    @property
    def eval_loss(self) -> float:
        """Mean NLL per scored token, nats."""
        if self.tokens == 0:
            raise DataError("no tokens were scored: the evaluation split is empty or too short to predict")
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return _exp_or_inf(self.eval_loss)

    @property
    def accuracy(self) -> float:
        if self.tokens == 0:
            raise DataError("no tokens were scored: the evaluation split is empty or too short to predict")
        return self.correct / self.tokens

    @property
    def bits_per_byte(self) -> float | None:
        """Total NLL in bits per UTF-8 byte of the scored text; None when the byte count is unknown."""
        if not self.n_bytes:
            return None
        return self.nll_sum / (math.log(2.0) * self.n_bytes)

    @property
    def word_perplexity(self) -> float | None:
        """exp(total NLL / words of the scored text); None when the word count is unknown."""
        if not self.n_words:
            return None
        return _exp_or_inf(self.nll_sum / self.n_words)

    def to_metrics(self) -> dict[str, Any]:
        """Flat metrics for metrics.json / the report, named like Trainer's eval metrics."""
        size_key = "block_size" if self.method == "blocks" else "context"
        return {
            "eval_loss": self.eval_loss,
            "perplexity": self.perplexity,
            "eval_accuracy": self.accuracy,
            "eval_tokens": self.tokens,
            "eval_samples": self.samples,
            "bits_per_byte": self.bits_per_byte,
            "word_perplexity": self.word_perplexity,
            "method": self.method,
            size_key: self.context,
            "stride": self.stride,
        }


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
    source = _BlockSource(blocks, context=context, contiguous=contiguous)
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


def shard_batches(n_rows: int, rank: int, world: int, batch_size: int) -> int:
    """Forward batches the exact eval runs on `rank`: its rows are rank, rank + world, ... (no padding)."""
    return -(-len(range(rank, n_rows, world)) // batch_size)


def lockstep_padding(n_rows: int, rank: int, world: int, batch_size: int) -> int:
    """Extra forward passes `rank` must run so that every rank runs as many as rank 0 (0 or 1)."""
    return shard_batches(n_rows, 0, world, batch_size) - shard_batches(n_rows, rank, world, batch_size)


class _BlockSource:
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
                span = self.context.span(index) if self.context is not None else block_span(row)
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
    windows = _StridedWindows(n_tokens=len(tokens), context=context, stride=stride)

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


@dataclass(frozen=True)
class _Window:
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
class _StridedWindows:
    """The windows of a strided evaluation; computed on demand so memory stays flat in their number."""

    n_tokens: int
    context: int
    stride: int

    @property
    def count(self) -> int:
        # Window k's last target is min(k*stride + context, n_tokens - 1); the last window reaches the end.
        uncovered = self.n_tokens - 1 - self.context
        return 1 + max(0, -(-uncovered // self.stride))

    def window(self, k: int) -> _Window:
        input_start = k * self.stride
        input_end = min(input_start + self.context, self.n_tokens - 1)
        # Window k-1 scored targets up to stream position (k-1)*stride + context, inclusive.
        scored_start = 1 if k == 0 else input_start + self.context - self.stride + 1
        return _Window(input_start, input_end, scored_start, input_end + 1)

    def batches(self, indices: Iterable[int], batch_size: int) -> Iterator[list[_Window]]:
        """Consecutive windows in batches of one shape (only the first and last window differ)."""
        batch: list[_Window] = []
        for k in indices:
            window = self.window(k)
            if batch and (len(batch) == batch_size or window.shape_key != batch[0].shape_key):
                yield batch
                batch = []
            batch.append(window)
        if batch:
            yield batch


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


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    return rank, world


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"eval batch size must be a positive integer, got {batch_size!r}")


def _add_optional(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _exact_count(value: float) -> int:
    count = round(value)
    if count != value:
        raise ValueError(f"a count must be a whole number, got {value!r}")
    return count


def _exp_or_inf(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")


def reduce_across_ranks(result: PerplexityResult, *, device: Any = None) -> PerplexityResult:
    """The exact total over every rank of a torch.distributed group (each rank passes its shard)."""
    import torch.distributed as dist

    values = result.as_tensor().to(device if device is not None else "cpu")
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return PerplexityResult.from_tensor(values, like=result)
