"""clm-runner's exact corpus perplexity as a Hugging Face `evaluate` metric: `clm_runner.PerplexityMetric`.

`evaluate.load("perplexity")` scores each text on its own and returns `mean_perplexity`, the mean of the
per-text perplexities: short texts weigh as much as long ones, and the mean of exponentials is not the
exponential of the mean, so it is not the corpus figure papers report. This metric joins the texts into one
token stream as `clm-runner eval` does for a dataset (each text a row: the tokenizer's special tokens per
row, rows concatenated, cut into blocks or scored in strided windows) and returns exp(total NLL / predicted
tokens), with bits per byte and word perplexity. It runs `clm-runner eval`'s own code, so for the rows of a
text file it equals `clm-runner eval` on that file. It loads offline (a local class, no hub script).

    import evaluate
    from clm_runner import PerplexityMetric

    texts = open("recipes/smoke/validation.txt", encoding="utf-8").readlines()   # rows, as `eval` reads a .txt
    PerplexityMetric().compute(predictions=texts, model_id="runs/smoke", block_size=128)

With `documents=True` each text is a document scored on its own, as `clm-runner eval --documents` scores a
row: lm-evaluation-harness's loglikelihood_rolling, and its wikitext task's word_perplexity, byte_perplexity
and bits_per_byte (words and bytes of the texts as given).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import datasets
import evaluate

_DESCRIPTION = """Exact, token-weighted corpus perplexity of a causal LM over the given texts (clm-runner's):
exp(sum of NLL over every predicted token / their number), in disjoint blocks or strided sliding windows, with
bits per byte and word perplexity. Unlike evaluate's "perplexity" (mean of per-text perplexities)."""

_INPUTS = """
Args:
    predictions (list of str): the texts; each is one row, as one line of a .txt file is in `clm-runner eval`.
    model_id (str): a trained run, a checkpoint or model directory, or a hub id.
    block_size (int, optional): tokens per block (default: as `clm-runner eval`, the model's context up to 1024);
        not with documents.
    stride (int, optional): set for strided sliding windows advancing this many tokens.
    context (int, optional): the window length with stride (default: block_size) or documents (default: the
        model's length, as lm-eval's HFLM.max_length).
    documents (bool, optional): score each text on its own in lm-eval's rolling windows (default False).
    batch_size (int, optional): blocks per forward pass (default 8).
    dtype (str, optional): load the weights in this dtype (auto, bfloat16, float16, float32).
Returns:
    perplexity, loss (mean NLL per predicted token, nats), tokens (predicted tokens), accuracy, bits_per_byte,
    word_perplexity, method ("blocks", "strided" or "documents"), block_size or context, stride; with
    documents: byte_perplexity, documents, words, bytes, convention too.
"""


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """A metric's compute() is a library call: no bars for saving texts or loading weights."""
    import transformers

    from clm_runner.data.sources import datasets_progress

    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with datasets_progress(False):
            yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


class PerplexityMetric(evaluate.Metric):
    """clm-runner's corpus perplexity for `evaluate` (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(
        self,
        predictions: list[str],
        model_id: str,
        block_size: int | None = None,
        stride: int | None = None,
        context: int | None = None,
        batch_size: int = 8,
        dtype: str | None = None,
        documents: bool = False,
    ) -> dict[str, Any]:
        from clm_runner.config.schema import DataConfig, EvalConfig, ModelConfig, Recipe
        from clm_runner.errors import EvalError
        from clm_runner.eval.job import EvalRequest, evaluate_model

        if documents and stride is not None:
            raise EvalError("documents and stride are two methods; choose one.")
        if documents and block_size is not None:
            raise EvalError(
                "documents are scored in windows of `context` tokens, not blocks: drop block_size (the default "
                "window is the model's length) or give context."
            )

        local = Path(model_id).is_dir()
        model = ModelConfig(model_name_or_path=model_id, dtype=dtype)
        # The texts' blocks are built in a scratch cache: nothing is left in the user's clm-runner cache.
        with tempfile.TemporaryDirectory(prefix="clm-runner-metric-") as scratch, _no_progress_bars():
            texts = Path(scratch) / "texts"
            datasets.Dataset.from_dict({"text": list(predictions)}).save_to_disk(str(texts))
            recipe = Recipe(
                model=model,
                data=DataConfig(validation_file=str(texts), block_size=block_size),
                training={"per_device_eval_batch_size": batch_size},
                eval=EvalConfig(stride=stride, context=context),
            )
            request = EvalRequest(stride=stride, context=context, quiet=True, documents=documents)
            with mock.patch.dict(os.environ, {"CLM_RUNNER_CACHE": str(Path(scratch) / "cache")}):
                evaluation = evaluate_model(
                    recipe, model_id if local else None, request, "validation", stride
                )
        metrics, settings = evaluation.metrics, evaluation.description
        if documents:
            numbers = (
                "perplexity",
                "eval_loss",
                "tokens",
                "eval_accuracy",
                "word_perplexity",
                "byte_perplexity",
            )
            numbers += ("bits_per_byte", "documents", "words", "bytes")
            renamed = {"eval_loss": "loss", "eval_accuracy": "accuracy"}
            out = {renamed.get(key, key): metrics[key] for key in numbers}
            return {**out, **{key: settings[key] for key in ("method", "context", "convention")}}
        out = {
            "perplexity": metrics["perplexity"],
            "loss": metrics["eval_loss"],
            "tokens": metrics["eval_tokens"],
            "accuracy": metrics["eval_accuracy"],
            "bits_per_byte": metrics.get("bits_per_byte"),
            "word_perplexity": metrics.get("word_perplexity"),
            "method": settings["method"],
            "stride": settings.get("stride"),
        }
        size_key = "block_size" if settings["method"] == "blocks" else "context"
        out[size_key] = settings[size_key]
        return out
