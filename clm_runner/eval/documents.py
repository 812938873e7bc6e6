"""Per-document rolling perplexity: lm-evaluation-harness's `loglikelihood_rolling` and its `wikitext` metrics.

What lm-eval 0.4.x computes (lm_eval/models/huggingface.py `HFLM`, lm_eval/utils.py), reproduced here:

- Each document is scored on its own. Its tokens are `tokenizer.encode(text)`: the tokenizer's default special
  tokens (none for GPT-2; a BOS, which is then scored too, for a tokenizer that adds one), or none at all when
  the text starts with the prefix token's text (`HFLM.tok_encode`).
- The windows (`get_rolling_token_windows` with context_len=1, then `make_disjoint_window`): with max length L,
  the first window reads [prefix] + t[0 : L-1] and scores t[0 : L] (the first token is predicted from the
  prefix token); each later window scores the next up-to-L tokens t[e-p : e] reading the L tokens t[e-L-1 : e-1]
  before them, so every token is scored once with up to L tokens of context from its own document.
- The prefix token is the tokenizer's BOS, or its EOS when it has no BOS (`HFLM.prefix_token_id`).
- L is `HFLM.max_length`: the config's `n_positions`, else `max_position_embeddings`, else `n_ctx` (of its
  `text_config` when it has one), else the tokenizer's `model_max_length` unless unset, else 2048; lm-eval's
  `max_length=N` model argument is `--context N` here.
- The `wikitext` task sums the log-likelihoods over documents and divides by the words (`len(re.split(r"\\s+",
  doc))`) and UTF-8 bytes of the documents' original text: word_perplexity = exp(NLL / words), byte_perplexity
  = exp(NLL / bytes), bits_per_byte = NLL / bytes / ln 2.

lm-eval runs its windows in document order, a batch at a time, each window right-padded to the longest in its
batch; here all windows are sorted by length first, so a batch holds windows of (nearly) one shape, and the
head runs only on the scored positions. Per-token NLLs are float32 (lm-eval's log-softmax in the logits' dtype:
float32 for float32 weights) summed in float64 (lm-eval sums each window in float32): the figures agree to 1e-5
relative (tested against lm-eval; a few 1e-8 in benchmarks/documents_eval.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clm_runner.data.documents import Documents
from clm_runner.errors import DataError, EvalError, ModelError
from clm_runner.eval.result import PerplexityResult
from clm_runner.eval.scoring import IGNORED, ScoringBatch, max_positions_of, score

if TYPE_CHECKING:
    from clm_runner.config.schema import Recipe

METHOD = "documents"
CONVENTION = (
    "lm-evaluation-harness 0.4 loglikelihood_rolling, the wikitext task's metrics: each document scored alone "
    "in disjoint windows of `context` tokens, its first token predicted from the prefix token; words = "
    "len(re.split(r'\\s+', document)) and bytes = UTF-8 bytes, counted on the original documents"
)
_LENGTH_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx")
_TOKENIZER_UNSET_LENGTH = int(1e30)  # transformers' VERY_LARGE_INTEGER: model_max_length was never set
_DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class RollingWindow:
    """One window of one document: it reads [prefix if `prefixed`] + tokens[input_start:input_end] and its last
    `n_scored` positions predict tokens[input_end + 1 - n_scored : input_end + 1]."""

    document: int
    input_start: int
    input_end: int
    prefixed: bool
    n_scored: int

    @property
    def length(self) -> int:
        return self.input_end - self.input_start + int(self.prefixed)


def rolling_windows(document: int, n_tokens: int, max_length: int) -> list[RollingWindow]:
    """lm-eval's disjoint rolling windows of a document of `n_tokens` tokens (none for an empty one)."""
    if n_tokens == 0:
        return []
    first = min(max_length, n_tokens)
    windows = [RollingWindow(document, 0, first - 1, True, first)]
    predicted = first
    while predicted < n_tokens:
        n_scored = min(n_tokens - predicted, max_length)
        end = predicted + n_scored
        windows.append(RollingWindow(document, end - max_length - 1, end - 1, False, n_scored))
        predicted = end
    return windows


def rolling_max_length(config: Any, tokenizer: Any) -> int:
    """`HFLM.max_length` for this model and tokenizer (see the module docstring)."""
    inner = getattr(config, "text_config", None) or config
    for name in _LENGTH_ATTRIBUTES:
        value = getattr(inner, name, None)
        if value is not None:
            return int(value)
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if model_max_length is not None and model_max_length != _TOKENIZER_UNSET_LENGTH:
        return int(model_max_length)
    return _DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer: Any) -> int:
    """`HFLM.prefix_token_id`: the token the first token of each document is predicted from."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ModelError(
        "per-document evaluation predicts each document's first token from the tokenizer's BOS (or EOS) token, "
        "and this tokenizer has neither: add one to the tokenizer (bos_token or eos_token)."
    )


def encode_documents(texts: Sequence[str], tokenizer: Any, prefix: int) -> list[np.ndarray]:
    """Each text's token ids as `HFLM.tok_encode` makes them (see the module docstring)."""
    from clm_runner.data.tokenize import Encoder, tokenize_rows

    prefix_text = tokenizer.decode(prefix)
    plain = [i for i, text in enumerate(texts) if not text.startswith(prefix_text)]
    marked = [i for i, text in enumerate(texts) if text.startswith(prefix_text)]
    encoded: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(texts)
    if plain:
        # `tokenizer(text)` semantics (default special tokens), the Rust backend's batch encoder when it agrees.
        encoder = Encoder.from_tokenizer(tokenizer).checked(tokenizer)
        ids, lengths, _ = tokenize_rows([texts[i] for i in plain], encoder)
        for i, part in zip(plain, np.split(ids.astype(np.int64), np.cumsum(lengths)[:-1]), strict=True):
            encoded[i] = part
    if marked:
        rows = tokenizer([texts[i] for i in marked], add_special_tokens=False)["input_ids"]
        for i, row in zip(marked, rows, strict=True):
            encoded[i] = np.asarray(row, dtype=np.int64)
    return encoded


def batch_windows(
    windows: Sequence[RollingWindow], tokens: Sequence[np.ndarray], *, prefix: int, batch_size: int
) -> Iterator[ScoringBatch]:
    """Batches of windows sorted longest first, right-padded to the longest of each batch (a causal model's
    logits at a position never see the padding after it); targets no row scores are IGNORED."""
    order = sorted(windows, key=lambda w: (-w.length, -w.n_scored))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(w.length for w in chunk)
        unscored = min(
            w.length - w.n_scored for w in chunk
        )  # leading positions that no row of the batch scores
        # Filled with the prefix token: the first input of prefixed windows, and any row's right padding.
        inputs = np.full((len(chunk), width), prefix, dtype=np.int64)
        targets = np.full((len(chunk), width - unscored), IGNORED, dtype=np.int64)
        for row, window in enumerate(chunk):
            document = tokens[window.document]
            offset = int(window.prefixed)
            inputs[row, offset : window.length] = document[window.input_start : window.input_end]
            first = window.length - window.n_scored - unscored
            end = window.input_end + 1
            targets[row, first : first + window.n_scored] = document[end - window.n_scored : end]
        yield ScoringBatch(inputs=inputs, targets=targets, spans=[], samples=len(chunk))


@dataclass(frozen=True)
class DocumentsResult:
    """A per-document evaluation: its exact totals (`totals.samples` counts windows) and how it was made."""

    totals: PerplexityResult
    documents: int
    prefix_token_id: int
    documents_from: str
    """What a document was (DocumentRule.describe)."""
    null_rows: int = 0

    def __add__(self, other: DocumentsResult) -> DocumentsResult:
        return dataclasses.replace(
            self,
            totals=self.totals + other.totals,
            documents=self.documents + other.documents,
            null_rows=self.null_rows + other.null_rows,
        )

    @property
    def byte_perplexity(self) -> float | None:
        if not self.totals.n_bytes:
            return None
        try:
            return math.exp(self.totals.nll_sum / self.totals.n_bytes)
        except OverflowError:
            return float("inf")

    def numbers(self) -> dict[str, int | float]:
        """What was measured, numbers only (a metrics file's keys): lm-eval's three figures, token perplexity and
        the counts behind them (a figure whose count is 0 is left out)."""
        totals = self.totals
        values: dict[str, Any] = {
            "word_perplexity": totals.word_perplexity,
            "byte_perplexity": self.byte_perplexity,
            "bits_per_byte": totals.bits_per_byte,
            "perplexity": totals.perplexity,
            "eval_perplexity": totals.perplexity,  # as `eval`'s other methods name it, beside run_clm's key
            "eval_loss": totals.eval_loss,
            "eval_accuracy": totals.accuracy,
            "documents": self.documents,
            "words": totals.n_words,
            "bytes": totals.n_bytes,
            "tokens": totals.tokens,
            "eval_tokens": totals.tokens,
            "eval_samples": totals.samples,
            "null_rows": self.null_rows,
        }
        return {key: value for key, value in values.items() if value is not None}

    def description(self) -> dict[str, Any]:
        """How it was measured (evaluations.json's entry): the method, the window length, the prefix token, what
        a document is."""
        return {
            "method": METHOD,
            "context": self.totals.context,
            "stride": None,
            "convention": CONVENTION,
            "documents_from": self.documents_from,
            "prefix_token_id": self.prefix_token_id,
        }

    def prefixed(self, prefix: str) -> dict[str, Any]:
        """One [[data.mix]] source's figures, named PREFIX_KEY."""
        return {f"{prefix}_{key}": value for key, value in self.numbers().items()}


def evaluate_documents(
    model: torch.nn.Module,
    documents: Documents,
    *,
    tokenizer: Any,
    batch_size: int,
    max_length: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> DocumentsResult:
    """Score every document on its own in lm-eval's rolling windows; `max_length` None: HFLM's own."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"eval batch size must be a positive integer, got {batch_size!r}")
    if max_length is None:
        max_length = rolling_max_length(getattr(model, "config", None), tokenizer)
    positions = max_positions_of(model)
    if max_length < 1 or (positions is not None and max_length > positions):
        raise EvalError(
            f"per-document windows of {max_length} tokens do not fit the model's {positions} positions: "
            f"set --context to {positions} or less"
        )
    if len(documents) == 0:
        raise DataError("the evaluation split has no documents: check the eval data")
    prefix = prefix_token_id(tokenizer)
    tokens = encode_documents(documents.scored, tokenizer, prefix)
    windows = [w for i, ids in enumerate(tokens) for w in rolling_windows(i, len(ids), max_length)]
    if not windows:
        raise DataError("the evaluation documents hold no tokens: check the eval data")
    batches = batch_windows(windows, tokens, prefix=prefix, batch_size=batch_size)
    totals = score(model, batches, device=device, autocast_dtype=autocast_dtype, progress=progress)
    result = totals.result(method=METHOD, context=max_length, stride=None)
    result = dataclasses.replace(result, n_bytes=documents.bytes, n_words=documents.words)
    return DocumentsResult(
        totals=result,
        documents=len(documents),
        prefix_token_id=prefix,
        documents_from=documents.rule.describe(),
        null_rows=documents.null_rows,
    )


def evaluate_recipe_documents(
    recipe: Recipe,
    model: torch.nn.Module,
    tokenizer: Any,
    split: str,
    *,
    max_length: int | None,
    batch_size: int,
    quiet: bool = True,
) -> tuple[DocumentsResult, dict[str, DocumentsResult]]:
    """(the total, each [[data.mix]] source's result by name: empty without a mix) for one split of a recipe's
    data, on the GPU when there is one."""
    from clm_runner.data import mix
    from clm_runner.data.documents import load_documents

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    def scored(data: Any) -> DocumentsResult:
        documents = load_documents(data, recipe.model, split, progress=not quiet)
        return evaluate_documents(
            model, documents, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device
        )

    data = recipe.data
    if not data.mix or mix.shared_split(recipe, split):
        return scored(mix.shared_data(data) if data.mix else data), {}
    results = {source.label: scored(mix.source_data(data, source)) for source in data.mix}
    return functools.reduce(operator.add, results.values()), results
