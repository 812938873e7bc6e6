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

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clm_runner.errors import DataError, ModelError, RecipeError

METHODS = ("blocks", "strided")

# Fields that add across shards, in the order `as_tensor` lays them out.
_ADDITIVE_FIELDS = ("nll_sum", "tokens", "correct", "n_bytes", "n_words", "samples")

# Decoding a token span on its own can differ from decoding it inside the whole stream only near the
# span's left edge: continuation bytes of a split UTF-8 character (at most 3 byte tokens), a stripped
# leading space (SentencePiece "▁", one token), a dropped "##" (WordPiece, one token). 16 tokens of
# left context is far more than any of these reach.
_DECODE_LEFT_CONTEXT_TOKENS = 16


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
) -> PerplexityResult:
    """Score every token but the first of each block, as run_clm's eval does with labels = input_ids.

    `blocks` is a 2-D numpy array of token ids, a `datasets.Dataset` with an `input_ids` column, or any
    sequence of token-id rows; the result's `context` is the first block's length.
    `shard=(rank, world)` evaluates rows rank, rank + world, ... with no padding and no duplicates, so
    the shards' results add up to the unsharded result. `progress` is called with the number of this
    shard's blocks done so far.
    """
    rank, world = _check_shard(shard)
    _check_batch_size(batch_size)
    rows_source = _block_rows(blocks)
    n_rows = len(rows_source)
    if n_rows == 0:
        raise DataError("the evaluation split has no blocks: check the eval data and block_size")
    # Read from the whole split, not this shard, so every shard's result carries the same setting.
    block_size = len(_fetch_rows(rows_source, range(0, 1))[0])
    max_positions = _max_positions(model)
    text_counter = _TextCounter(tokenizer) if tokenizer is not None else None
    totals = _Totals(with_text=text_counter is not None)
    shard_rows = range(rank, n_rows, world)
    with _evaluation_mode(model, device, autocast_dtype) as forward:
        for batch_start in range(0, len(shard_rows), batch_size):
            batch_rows = _fetch_rows(rows_source, shard_rows[batch_start : batch_start + batch_size])
            for same_length_rows in _group_by_length(batch_rows):
                row_length = same_length_rows.shape[1]
                if max_positions is not None and row_length > max_positions:
                    raise DataError(
                        f"a block has {row_length} tokens but the model takes at most {max_positions} "
                        f"positions: set block_size to {max_positions} or less"
                    )
                if row_length >= 2:
                    # The logits of a block's last token predict nothing, so the model never sees it;
                    # for a causal model the other positions' logits are unchanged by dropping it.
                    logits = forward(same_length_rows[:, :-1], keep_last=row_length - 1)
                    totals.add_logits(logits, same_length_rows[:, 1:])
                if text_counter is not None:
                    totals.add_text(*text_counter.span_counts([(row[1:], None) for row in same_length_rows]))
            totals.samples += len(batch_rows)
            if progress is not None:
                progress(totals.samples)
    return totals.result(method="blocks", context=block_size, stride=None)


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
        raise RecipeError(f"strided eval context must be a positive number of tokens, got {context!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 0 < stride <= context:
        raise RecipeError(
            f"strided eval stride must be between 1 and the context ({context}), got {stride!r}: "
            f"set stride to at most {context} (context / 2 is a common choice)"
        )
    max_positions = _max_positions(model)
    if max_positions is not None and context > max_positions:
        raise RecipeError(
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
    text_counter = _TextCounter(tokenizer) if tokenizer is not None else None
    totals = _Totals(with_text=text_counter is not None)
    with _evaluation_mode(model, device, autocast_dtype) as forward:
        for batch in windows.batches(range(rank, windows.count, world), batch_size):
            inputs = np.stack([tokens[w.input_start : w.input_end] for w in batch])
            targets = np.stack([tokens[w.scored_start : w.scored_end] for w in batch])
            logits = forward(inputs, keep_last=batch[0].n_scored)
            totals.add_logits(logits, targets)
            if text_counter is not None:
                # Stream position 0 is never scored, so the scored text starts at position 1.
                spans = [
                    (
                        tokens[w.scored_start : w.scored_end],
                        tokens[max(1, w.scored_start - _DECODE_LEFT_CONTEXT_TOKENS) : w.scored_start],
                    )
                    for w in batch
                ]
                totals.add_text(*text_counter.span_counts(spans))
            totals.samples += len(batch)
            if progress is not None:
                progress(totals.samples)
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


class _Totals:
    """Running float64 / integer totals; holds no logits between batches."""

    def __init__(self, *, with_text: bool) -> None:
        self.nll_sum = 0.0
        self.tokens = 0
        self.correct = 0
        self.n_bytes: int | None = 0 if with_text else None
        self.n_words: int | None = 0 if with_text else None
        self.samples = 0

    def add_logits(self, logits: torch.Tensor, targets: np.ndarray) -> None:
        """Add the NLL and argmax hits of `logits` [batch, positions, vocab] against `targets` [batch, positions]."""
        vocab_size = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab_size)
        flat_targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1).to(flat_logits.device)
        chunk_rows = max(1, _loss_chunk_elements(flat_logits.device) // vocab_size)
        token_nlls = []
        correct = torch.zeros((), dtype=torch.long, device=flat_logits.device)
        for chunk_logits, chunk_targets in zip(
            flat_logits.split(chunk_rows), flat_targets.split(chunk_rows), strict=True
        ):
            chunk_logits = chunk_logits.float()
            token_nlls.append(F.cross_entropy(chunk_logits, chunk_targets, reduction="none"))
            # max().indices is argmax (first maximum on ties) at half the cost of argmax() on CPU.
            correct += (chunk_logits.max(dim=-1).indices == chunk_targets).sum()
        # Per-token float32 NLL summed in float64 (on the CPU: MPS has no float64), so the total does not
        # depend on batching; one device sync per batch.
        self.nll_sum += torch.cat(token_nlls).to("cpu", torch.float64).sum().item()
        self.correct += int(correct.item())
        self.tokens += flat_targets.numel()

    def add_text(self, n_bytes: int, n_words: int) -> None:
        assert self.n_bytes is not None and self.n_words is not None
        self.n_bytes += n_bytes
        self.n_words += n_words

    def result(self, *, method: str, context: int, stride: int | None) -> PerplexityResult:
        return PerplexityResult(
            nll_sum=self.nll_sum,
            tokens=self.tokens,
            correct=self.correct,
            n_bytes=self.n_bytes,
            n_words=self.n_words,
            method=method,
            context=context,
            stride=stride,
            samples=self.samples,
        )


class _TextCounter:
    """UTF-8 bytes and whitespace words of decoded token spans, exact when spans tile a longer text.

    Decoding a span on its own is not the same as cutting it out of the decoded whole. With byte-level
    BPE a multi-byte character can be split over two tokens; a span edge between them leaves a broken
    sequence at each side that decodes to U+FFFD (3 bytes) instead of the character's real bytes, and
    a word cut in two would be counted once per span. So a span that continues a longer text is
    counted as count(decode(left_context + span)) - count(decode(left_context)): both decodes share
    the same left edge, so whatever that edge breaks cancels, and the span's right edge is cut the
    same way the whole text up to there is. Summed over spans that tile a text the differences
    telescope to count(decode(text)) exactly, for any decoder whose edge effects reach fewer than
    `_DECODE_LEFT_CONTEXT_TOKENS` tokens (byte-level BPE, SentencePiece, WordPiece). A single span
    may get a negative word count (its first token completes a character that turns out to be a
    space); only totals are meaningful. Decoding skips special tokens and does no "clean up" of
    spaces, so the count is of the text itself.
    """

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The Rust decoder of a fast tokenizer decodes a batch in parallel; transformers' batch_decode
            # loops in Python and adds nothing when clean-up is off.
            self._decode_batch = lambda seqs: backend.decode_batch(seqs, skip_special_tokens=True)
        elif hasattr(tokenizer, "decode_batch"):  # a bare `tokenizers.Tokenizer`
            self._decode_batch = lambda seqs: tokenizer.decode_batch(seqs, skip_special_tokens=True)
        elif hasattr(tokenizer, "batch_decode"):
            self._decode_batch = lambda seqs: tokenizer.batch_decode(
                seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        else:
            raise ModelError(
                f"the tokenizer {type(tokenizer).__name__} cannot decode token ids: "
                "pass a Hugging Face tokenizer to count bytes and words"
            )

    def span_counts(self, spans: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> tuple[int, int]:
        """Total (bytes, words) of spans given as (span_ids, left_context_ids or None)."""
        sequences: list[list[int]] = []
        signs: list[int] = []
        for span_ids, left_context in spans:
            prefix = [] if left_context is None else np.asarray(left_context).tolist()
            sequences.append(prefix + np.asarray(span_ids).tolist())
            signs.append(1)
            if prefix:
                sequences.append(prefix)
                signs.append(-1)
        texts = self._decode_batch(sequences)
        n_bytes = sum(sign * len(text.encode("utf-8")) for sign, text in zip(signs, texts, strict=True))
        n_words = sum(sign * len(text.split()) for sign, text in zip(signs, texts, strict=True))
        return n_bytes, n_words


@contextlib.contextmanager
def _evaluation_mode(
    model: torch.nn.Module, device: torch.device | str | None, autocast_dtype: torch.dtype | None
) -> Iterator[Callable[[np.ndarray, int], torch.Tensor]]:
    """Eval mode + inference mode + optional autocast; yields forward(input_ids, keep_last) -> logits.

    The model is not moved: `device` is where input batches go (default: the model's first parameter's).
    """
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration as error:
            raise ModelError("the model has no parameters: load a causal language model") from error
    device = torch.device(device)
    forward_parameters = inspect.signature(model.forward).parameters
    takes_logits_to_keep = "logits_to_keep" in forward_parameters
    takes_use_cache = "use_cache" in forward_parameters
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )

    def forward(input_ids: np.ndarray, keep_last: int) -> torch.Tensor:
        """Logits [batch, keep_last, vocab] of the last `keep_last` positions of each row."""
        kwargs: dict[str, Any] = {}
        if takes_logits_to_keep:
            # The LM head (hidden x vocab, the largest matmul of a small model) runs only on these rows.
            kwargs["logits_to_keep"] = keep_last
        if takes_use_cache:
            kwargs["use_cache"] = False  # a KV cache is never reused here; building it costs memory
        batch = torch.as_tensor(np.ascontiguousarray(input_ids), dtype=torch.long).to(device)
        logits = model(input_ids=batch, **kwargs).logits
        return logits[:, -keep_last:] if logits.shape[1] != keep_last else logits

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            yield forward
    finally:
        model.train(was_training)


def _block_rows(blocks: Any) -> Any:
    """Something with len() and row access; a Dataset keeps only its input_ids column."""
    column_names = getattr(blocks, "column_names", None)
    if column_names is not None:  # a datasets.Dataset
        if "input_ids" not in column_names:
            raise DataError(
                f"the evaluation dataset has no input_ids column (columns: {column_names}): "
                "tokenize and group the split into blocks first"
            )
        return blocks.select_columns(["input_ids"])
    return blocks


def _fetch_rows(rows_source: Any, indices: range) -> list[np.ndarray]:
    if getattr(rows_source, "column_names", None) is not None:
        rows = rows_source[list(indices)]["input_ids"]
    elif isinstance(rows_source, np.ndarray):
        rows = rows_source[indices.start : indices.stop : indices.step]
    else:
        rows = [rows_source[i] for i in indices]
    return [np.asarray(row, dtype=np.int64).reshape(-1) for row in rows]


def _group_by_length(rows: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Rows stacked into 2-D arrays of one length each (grouped blocks all share one length)."""
    lengths = sorted({len(row) for row in rows})
    for length in lengths:
        yield np.stack([row for row in rows if len(row) == length])


def _loss_chunk_elements(device: torch.device) -> int:
    """Logit elements per cross-entropy chunk.

    On a CPU the log-softmax, the gather and the max each sweep the logits; done on ~1 MiB of them at a
    time those sweeps hit the L2 cache instead of memory (3-4x faster on a [2048, 12k] batch). On an
    accelerator, large chunks keep kernel launches few while bounding the float32 copy of bf16 logits.
    """
    return 2**18 if device.type == "cpu" else 2**26


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    return rank, world


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RecipeError(f"eval batch size must be a positive integer, got {batch_size!r}")


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
