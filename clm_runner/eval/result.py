"""The totals of one evaluation: exact, additive across shards and ranks, and the metrics they give."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from clm_runner.errors import DataError

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

    def prefixed(self, prefix: str) -> dict[str, Any]:
        """PREFIX_loss, _perplexity, _accuracy, _samples, _tokens: a Trainer evaluation's keys ("eval"), or one
        [[data.mix]] source's ("eval_NAME"), named the same in train's log and in `eval`'s results."""
        return {
            f"{prefix}_loss": self.eval_loss,
            f"{prefix}_perplexity": self.perplexity,
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_samples": self.samples,
            f"{prefix}_tokens": self.tokens,
        }

    def settings(self) -> dict[str, Any]:
        """How the numbers were computed: method, block_size (blocks) or context (strided), stride. A description,
        kept out of the metric files (clm_runner.rundir.evaluations records it beside them)."""
        size_key = "block_size" if self.method == "blocks" else "context"
        return {"method": self.method, size_key: self.context, "stride": self.stride}

    def numbers(self) -> dict[str, int | float]:
        """The metrics, numbers only (run_clm's readers float() every value): bits_per_byte and word_perplexity
        are left out when the text's bytes and words are unknown."""
        values: dict[str, Any] = {
            "eval_loss": self.eval_loss,
            "perplexity": self.perplexity,
            "eval_accuracy": self.accuracy,
            "eval_tokens": self.tokens,
            "eval_samples": self.samples,
            "bits_per_byte": self.bits_per_byte,
            "word_perplexity": self.word_perplexity,
        }
        return {key: value for key, value in values.items() if value is not None}

    def to_metrics(self) -> dict[str, Any]:
        """Flat metrics and settings together, named like Trainer's eval metrics (unknown counts as None)."""
        return {
            "bits_per_byte": None,
            "word_perplexity": None,
            **self.numbers(),
            **self.settings(),
        }


def speed_metrics(
    prefix: str, seconds: float, results: Iterable[PerplexityResult], global_batch: int
) -> dict[str, float]:
    """PREFIX_runtime, _samples_per_second, _steps_per_second: the keys and arithmetic of the Trainer's
    evaluate() (transformers.trainer_utils.speed_metrics), which run_clm's eval_results.json holds. A step is
    one batch of `global_batch` blocks (per-device batch x processes) of one result (one [[data.mix]] source)."""
    results = list(results)
    samples = sum(result.samples for result in results)
    steps = sum(math.ceil(result.samples / max(1, global_batch)) for result in results)
    elapsed = max(seconds, 1e-9)  # a clock that did not tick still gives numbers, never a division by 0
    return {
        f"{prefix}_runtime": round(seconds, 4),
        f"{prefix}_samples_per_second": round(samples / elapsed, 3),
        f"{prefix}_steps_per_second": round(steps / elapsed, 3),
    }


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
