"""`clm-runner eval`: exact perplexity of a run, a checkpoint, or any model on a recipe's data.

Where a result goes: `--output FILE` if given; for `--run`, an evaluation identical to the one training
ran at its end (the final model, the validation split, the blocks method, the run's own [model] and
[data]) updates the run's eval_results.json and all_results.json, as run_clm keeps them; any other one is
written under evals/ in the run dir, with a name that says what it measured, and never replaces them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clm_runner.config.load import load_recipe
from clm_runner.config.schema import Recipe
from clm_runner.errors import EvalError, OutputDirError
from clm_runner.rundir.checkpoints import resolve_checkpoint
from clm_runner.rundir.evaluations import EVALUATIONS_FILE, describe_recipe_data, record_evaluation
from clm_runner.rundir.policy import (
    RECIPE_FILE,
    TRAINER_STATE,
    list_checkpoints,
    save_metrics,
    write_json_atomic,
)

logger = logging.getLogger("clm_runner")

EVALS_DIR = "evals"
"""Evaluations of a run other than training's own (other splits, methods, checkpoints or data)."""
HISTORY_FILE = "eval_history.json"
SPLITS = ("validation", "test", "train")


@dataclass(frozen=True)
class EvalRequest:
    run_dir: str | None = None
    recipe_path: str | None = None
    overrides: Sequence[str] = ()
    checkpoint: str | None = None
    all_checkpoints: bool = False
    split: str | None = None
    stride: int | None = None
    context: int | None = None
    output: str | None = None
    quiet: bool = False
    documents: bool = False
    """Per-document rolling windows (lm-evaluation-harness's loglikelihood_rolling) instead of blocks."""


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of one model: its numbers (what a metrics file holds, run_clm's keys) and how they were
    computed (split, method, block size or context and stride, model, data: evaluations.json's entry)."""

    metrics: dict[str, int | float]
    description: dict[str, Any]

    def document(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "evaluation": self.description}


@dataclass(frozen=True)
class EvalOutcome:
    """What an evaluation measured (one row per model), what --output holds and the files it wrote."""

    rows: list[Evaluation]
    output_document: dict[str, Any]
    """The metrics (one model), or eval_history's document (--all-checkpoints): what --output FILE holds."""
    label: str = "split"
    written: list[Path] = field(default_factory=list)


def load_run_recipe(run_dir: Path, overrides: Sequence[str]) -> Recipe:
    """The recipe a run was trained with (its recipe.toml), with `--set` applied on top."""
    if not run_dir.is_dir():
        raise OutputDirError(
            f"--run {run_dir}: no such directory. Pass the output_dir of a `clm-runner train` run."
        )
    path = run_dir / RECIPE_FILE
    if not path.exists():
        raise OutputDirError(
            f"{run_dir} is not a clm-runner run (no {RECIPE_FILE}). Pass a run's output_dir, or evaluate any "
            "model with --recipe FILE --set model.model_name_or_path=DIR."
        )
    return load_recipe(path, overrides, require_output_dir=False)


def check_request(request: EvalRequest, recipe: Recipe) -> tuple[str, int | None]:
    """The split and stride to use, refused before any model or data is loaded when they cannot work."""
    if request.all_checkpoints and request.run_dir is None:
        raise EvalError("--all-checkpoints needs --run DIR.")
    if request.all_checkpoints and request.checkpoint:
        raise EvalError("--all-checkpoints and --checkpoint contradict each other; choose one.")
    split = request.split or recipe.eval.split
    if split not in SPLITS:
        raise EvalError(f"--split {split!r}: choose validation, test or train.")
    if request.documents:
        if request.stride is not None:
            raise EvalError("--documents and --stride are two methods; choose one.")
        if recipe.data.streaming:
            raise EvalError(
                "--documents needs the whole split; it does not work with data.streaming. "
                "Set data.streaming = false."
            )
        if request.context is not None and request.context < 1:
            raise EvalError(
                f"--context {request.context}: give a positive number of tokens (the window length)."
            )
        return split, None  # [eval] stride is a recipe's default method; --documents replaces it
    stride = request.stride if request.stride is not None else recipe.eval.stride
    if stride is None and request.context is not None:
        raise EvalError("--context only applies with --stride or --documents; blocks use data.block_size.")
    if stride is not None and recipe.data.streaming:
        raise EvalError(
            "Strided evaluation needs the whole token stream; it does not work with data.streaming. "
            "Set data.streaming = false, or evaluate blocks (no --stride)."
        )
    return split, stride


def check_sources(request: EvalRequest) -> None:
    """One thing to evaluate: a run, or a recipe."""
    if request.run_dir is not None and request.recipe_path is not None:
        raise EvalError(
            "--run and --recipe both say what to evaluate (--run uses the run's own recipe.toml); choose one, "
            "and change the run's recipe with --set."
        )


def run_eval(request: EvalRequest) -> EvalOutcome:
    from clm_runner.logs import setup_logging

    check_sources(request)

    live = setup_logging(quiet=request.quiet)
    request = dataclasses.replace(request, quiet=not live)
    run_dir = Path(request.run_dir) if request.run_dir else None
    if run_dir is not None:
        recipe = load_run_recipe(run_dir, request.overrides)
    else:
        recipe = load_recipe(request.recipe_path, request.overrides, require_output_dir=False)
    split, stride = check_request(request, recipe)
    checkpoint = resolve_checkpoint(run_dir, request.checkpoint) if request.checkpoint else None

    if request.all_checkpoints:
        assert run_dir is not None
        return evaluate_all_checkpoints(recipe, run_dir, request, split, stride)

    model_dir = checkpoint or run_dir
    evaluation = evaluate_model(recipe, str(model_dir) if model_dir else None, request, split, stride)
    if checkpoint is not None:
        evaluation.description["checkpoint"] = checkpoint.name
    written: list[Path] = []
    if request.output:
        write_json_atomic(Path(request.output), evaluation.metrics)
        written.append(Path(request.output))
    if run_dir is not None:
        if checkpoint is None and is_trainings_evaluation(run_dir, recipe, evaluation.description):
            path = run_dir / "eval_results.json"
            save_metrics(run_dir, "eval", evaluation.metrics)  # where run_clm keeps a run's evaluation
            written += [path, run_dir / "all_results.json"]
        else:
            path = run_dir / EVALS_DIR / evaluation_name(run_dir, recipe, evaluation.description, checkpoint)
            write_json_atomic(path, evaluation.metrics)
            written.append(path)
        record_evaluation(run_dir, path, evaluation.description)
        written.append(run_dir / EVALUATIONS_FILE)
    return EvalOutcome([evaluation], output_document=evaluation.metrics, written=written)


def _source_sections(recipe: Recipe) -> dict[str, Any]:
    """What decides the measured number besides the split and method: the model and the data."""
    plain = recipe.to_dict()
    return {"model": plain.get("model", {}), "data": plain.get("data", {})}


def _differs_from_run(run_dir: Path, recipe: Recipe) -> str | None:
    """None when the recipe's [model] and [data] are the run's own; else a short hash of what differs."""
    trained = load_run_recipe(run_dir, ())
    ours = _source_sections(recipe)
    if ours == _source_sections(trained):
        return None
    return hashlib.sha256(json.dumps(ours, sort_keys=True, default=str).encode()).hexdigest()[:8]


def is_trainings_evaluation(run_dir: Path, recipe: Recipe, description: dict[str, Any]) -> bool:
    """Whether an evaluation of a run's final model is the one training ran at its end."""
    return (
        description.get("split") == "validation"
        and description.get("method") == "blocks"
        and _differs_from_run(run_dir, recipe) is None
    )


def evaluation_name(
    run_dir: Path, recipe: Recipe, description: dict[str, Any], checkpoint: Path | None
) -> str:
    """evals/ file name that says what was measured: [checkpoint_]split_method[_recipe-HASH].json."""
    parts = [checkpoint.name] if checkpoint is not None else []
    parts.append(str(description["split"]))
    if description["method"] == "strided":
        parts.append(f"strided-context{description['context']}-stride{description['stride']}")
    elif description["method"] == "documents":
        parts.append(f"documents{description['context']}")
    else:
        parts.append(f"blocks{description['block_size']}")
    changed = _differs_from_run(run_dir, recipe)
    if changed is not None:
        parts.append(f"recipe-{changed}")
    return "_".join(parts) + ".json"


def evaluate_model(
    recipe: Recipe, model_dir: str | None, request: EvalRequest, split: str, stride: int | None
) -> Evaluation:
    """Load the model (a saved dir, or what the recipe names) and score one split of the recipe's data."""
    import time

    import torch

    from clm_runner.data.blocks import resolve_block_size
    from clm_runner.data.prepare import prepare_splits
    from clm_runner.eval.perplexity import evaluate_blocks, evaluate_strided
    from clm_runner.eval.result import PerplexityResult, speed_metrics
    from clm_runner.models.loading import check_model_sources, load_config, load_model, load_tokenizer
    from clm_runner.models.trained import load_trained

    if model_dir is not None:
        model, tokenizer = load_trained(model_dir, dtype=recipe.model.dtype, overrides=request.overrides)
        model_name = model_dir
    else:
        from transformers import set_seed

        check_model_sources(recipe.model)
        tokenizer = load_tokenizer(recipe.model)
        set_seed(int(recipe.training.get("seed", 42)))  # a from-scratch model's random init, reproducibly
        model = load_model(recipe.model, load_config(recipe.model), tokenizer)
        model_name = recipe.model.model_name_or_path or f"{recipe.model.model_type} (random init)"

    if request.documents:
        return evaluate_documents_split(recipe, model, tokenizer, request, split, model_dir, model_name)

    block_size = resolve_block_size(
        recipe.data.block_size,
        tokenizer,
        model.config,
        warn=logger.warning,
        clamp=recipe.data.clamp_block_size,
    )
    context = request.context or recipe.eval.context or block_size
    prepared = prepare_splits(recipe, tokenizer, block_size, [split], progress=not request.quiet)[split]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    batch_size = int(recipe.training.get("per_device_eval_batch_size", 8))

    def score(part: Any) -> Any:
        if stride is not None:
            # data.max_eval_samples keeps the first N blocks; the strided windows score the same text.
            return evaluate_strided(
                model,
                part.scored_stream(),
                context=context,
                stride=stride,
                batch_size=batch_size,
                tokenizer=tokenizer,
                device=device,
            )
        return evaluate_blocks(
            model, part.blocks, batch_size=batch_size, tokenizer=tokenizer, device=device, **part.eval_text()
        )

    started = time.perf_counter()
    # [[data.mix]] sources each with their own split: each scored, and their exact token-weighted total.
    results = {name: score(part) for name, part in prepared.parts.items()}
    scored = list(results.values()) or [score(prepared)]
    seconds = time.perf_counter() - started
    total = PerplexityResult.merge(scored)
    metrics: dict[str, int | float] = dict(total.numbers())
    metrics["eval_perplexity"] = metrics["perplexity"]  # as train's evaluations name it, beside run_clm's key
    for name, result in results.items():
        metrics.update(result.prefixed(f"eval_{name}"))
    metrics.update(speed_metrics("eval", seconds, scored, batch_size))
    return _evaluation(metrics, total.settings(), recipe, split, model_dir, model_name, list(results))


def evaluate_documents_split(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    request: EvalRequest,
    split: str,
    model_dir: str | None,
    model_name: str,
) -> Evaluation:
    """Per-document rolling perplexity of one split; a [[data.mix]] split, each source's and their total."""
    import time

    from clm_runner.eval.documents import evaluate_recipe_documents
    from clm_runner.eval.result import speed_metrics

    batch_size = int(recipe.training.get("per_device_eval_batch_size", 8))
    started = time.perf_counter()
    # --context None: lm-eval's max length (eval.context is the strided window's).
    total, results = evaluate_recipe_documents(
        recipe,
        model,
        tokenizer,
        split,
        max_length=request.context,
        batch_size=batch_size,
        quiet=request.quiet,
    )
    seconds = time.perf_counter() - started
    metrics = total.numbers()
    for name, result in results.items():
        metrics.update(result.prefixed(f"eval_{name}"))
    scored = [result.totals for result in results.values()] or [total.totals]
    metrics.update(speed_metrics("eval", seconds, scored, batch_size))
    return _evaluation(metrics, total.description(), recipe, split, model_dir, model_name, list(results))


def _evaluation(
    metrics: dict[str, int | float],
    settings: dict[str, Any],
    recipe: Recipe,
    split: str,
    model_dir: str | None,
    model_name: str,
    sources: list[str],
) -> Evaluation:
    """An evaluation's numbers (with the epoch the model reached) and its description (evaluations.json's)."""
    epoch = trained_epoch(model_dir)
    if epoch is not None:
        metrics["epoch"] = epoch
    # Blocks and windows of the train split are cut by max_train_samples (data.prepare); documents by
    # max_eval_samples on every split (data.documents).
    blocks_of_train = split == "train" and settings.get("method") != "documents"
    limit = "max_train_samples" if blocks_of_train else "max_eval_samples"
    description = {
        "by": "clm-runner eval",
        "split": split,
        **settings,
        "model": model_name,
        **describe_recipe_data(recipe, limit=limit),
        "sources": sources or None,
    }
    return Evaluation(metrics, {key: value for key, value in description.items() if value is not None})


def trained_epoch(model_dir: str | None) -> float | None:
    """The epoch a saved run or checkpoint reached (its trainer_state.json), run_clm's `epoch` key."""
    if model_dir is None:
        return None
    try:
        epoch = json.loads((Path(model_dir) / TRAINER_STATE).read_text()).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return float(epoch) if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else None


def evaluate_all_checkpoints(
    recipe: Recipe, run_dir: Path, request: EvalRequest, split: str, stride: int | None
) -> EvalOutcome:
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise OutputDirError(f"{run_dir} has no checkpoint-N directories to evaluate.")
    rows = []
    for checkpoint in checkpoints:
        evaluation = evaluate_model(recipe, str(checkpoint), request, split, stride)
        evaluation.description["checkpoint"] = checkpoint.name
        rows.append(evaluation)
    # Per checkpoint its name and its numbers; how they were computed once (it is the same for all of them).
    shared = {k: v for k, v in rows[0].description.items() if k not in ("checkpoint", "model")}
    history = {
        "evaluation": shared,
        "checkpoints": [
            {"checkpoint": row.description["checkpoint"], "metrics": row.metrics} for row in rows
        ],
    }
    written = [run_dir / HISTORY_FILE]
    write_json_atomic(run_dir / HISTORY_FILE, history)
    if request.output:
        write_json_atomic(Path(request.output), history)
        written.append(Path(request.output))
    return EvalOutcome(rows, output_document=history, label="checkpoint", written=written)
