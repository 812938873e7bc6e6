"""The scoring loop shared by every evaluation method: forward passes, exact NLL and hit totals, text counts.

A method (clm_runner.eval.perplexity) turns its data into `ScoringBatch`es: model inputs, the targets of their
last positions, and the text spans those targets stand for. `score` runs them and keeps float64 / integer
totals only, never logits, so memory stays flat and shards add up exactly.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clm_runner.errors import ModelError
from clm_runner.eval.result import PerplexityResult
from clm_runner.eval.text_counts import TextCounter, TextSpan

IGNORED = -100
"""A target that scores nothing (its NLL is 0 and it is not counted): the padding of rows of unequal length."""


@dataclass(frozen=True)
class ScoringBatch:
    """Rows of one shape: the model reads `inputs` [rows, length], its last `targets.shape[1]` positions
    predict `targets` [rows, scored] (IGNORED where a row scores nothing); `spans` (one per row) are what
    bytes and words are counted on."""

    inputs: np.ndarray
    targets: np.ndarray
    spans: list[TextSpan]
    samples: int
    """Blocks or windows this batch counts for (a batch of empty blocks still counts them)."""


class Totals:
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
            token_nlls.append(
                F.cross_entropy(chunk_logits, chunk_targets, reduction="none", ignore_index=IGNORED)
            )
            # max().indices is argmax (first maximum on ties) at half the cost of argmax() on CPU.
            correct += (chunk_logits.max(dim=-1).indices == chunk_targets).sum()
        # Per-token float32 NLL summed in float64 (on the CPU: MPS has no float64), so the total does not
        # depend on batching; one device sync per batch.
        self.nll_sum += torch.cat(token_nlls).to("cpu", torch.float64).sum().item()
        self.correct += int(correct.item())
        self.tokens += int(np.count_nonzero(np.asarray(targets) != IGNORED))

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


def score(
    model: torch.nn.Module,
    batches: Iterable[ScoringBatch],
    *,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> Totals:
    """Run every batch through the model and add up NLL, hits, tokens, bytes, words and samples."""
    counter = TextCounter(tokenizer) if tokenizer is not None else None
    totals = Totals(with_text=counter is not None)
    with evaluation_mode(model, device, autocast_dtype) as forward:
        for batch in batches:
            if batch.targets.shape[1] > 0:
                logits = forward(batch.inputs, keep_last=batch.targets.shape[1])
                totals.add_logits(logits, batch.targets)
            if counter is not None:
                totals.add_text(*counter.counts(batch.spans))
            totals.samples += batch.samples
            if progress is not None:
                progress(totals.samples)
    return totals


def run_forward(model: torch.nn.Module, inputs: np.ndarray, device: Any = None) -> None:
    """One forward pass whose result is thrown away: keeps ranks in lockstep under FSDP / ZeRO-3."""
    with evaluation_mode(model, device, None) as forward:
        forward(inputs, keep_last=1)


@contextlib.contextmanager
def evaluation_mode(
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
    # A PEFT model's forward takes **kwargs and hands them to the base model: ask the base what it takes.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward_parameters = inspect.signature(inner.forward).parameters
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


def _loss_chunk_elements(device: torch.device) -> int:
    """Logit elements per cross-entropy chunk.

    On a CPU the log-softmax, the gather and the max each sweep the logits; done on ~1 MiB of them at a
    time those sweeps hit the L2 cache instead of memory (3-4x faster on a [2048, 12k] batch). On an
    accelerator, large chunks keep kernel launches few while bounding the float32 copy of bf16 logits.
    """
    return 2**18 if device.type == "cpu" else 2**26


def max_positions_of(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
