"""`clm-runner eval`: exact perplexity of a run, a checkpoint, or any model on a recipe's data."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from clm_runner.errors import OutputDirError, RecipeError
from clm_runner.outputs import RECIPE_FILE, list_checkpoints, save_metrics, write_json_atomic
from clm_runner.recipe import Recipe, load_recipe
from clm_runner.tables import render_table

logger = logging.getLogger("clm_runner")


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


def run_eval(request: EvalRequest) -> dict[str, Any]:
    from clm_runner.logs import setup_logging

    setup_logging(quiet=request.quiet)
    if request.all_checkpoints and request.run_dir is None:
        raise click.UsageError("--all-checkpoints needs --run DIR.")
    if request.all_checkpoints and request.checkpoint:
        raise click.UsageError("--all-checkpoints and --checkpoint contradict each other; choose one.")

    run_dir = Path(request.run_dir) if request.run_dir else None
    if run_dir is not None:
        recipe = load_run_recipe(run_dir, request.overrides)
    else:
        recipe = load_recipe(request.recipe_path, request.overrides, require_output_dir=False)

    if request.all_checkpoints:
        assert run_dir is not None
        return evaluate_all_checkpoints(recipe, run_dir, request)

    model_dir = request.checkpoint or (str(run_dir) if run_dir is not None else None)
    metrics = evaluate_model(recipe, model_dir, request)
    print_table([metrics])
    if request.output:
        write_json_atomic(Path(request.output), metrics)
    if run_dir is not None and request.checkpoint is None:
        save_metrics(run_dir, "eval", metrics)  # where run_clm keeps a run's evaluation
    return metrics


def evaluate_model(recipe: Recipe, model_dir: str | None, request: EvalRequest) -> dict[str, Any]:
    """Load the model (a saved dir, or what the recipe names) and score one split of the recipe's data."""
    import torch

    from clm_runner.blocks import prepare_splits, resolve_block_size
    from clm_runner.modeling import load_config, load_model, load_tokenizer, load_trained
    from clm_runner.perplexity import evaluate_blocks, evaluate_strided

    if model_dir is not None:
        model, tokenizer = load_trained(model_dir, dtype=recipe.model.dtype)
        model_name = model_dir
    else:
        from transformers import set_seed

        tokenizer = load_tokenizer(recipe.model)
        set_seed(int(recipe.training.get("seed", 42)))  # a from-scratch model's random init, reproducibly
        model = load_model(recipe.model, load_config(recipe.model), tokenizer)
        model_name = recipe.model.model_name_or_path or f"{recipe.model.model_type} (random init)"

    split = request.split or recipe.eval.split
    if split not in ("train", "validation", "test"):
        raise RecipeError(f"--split {split!r}: choose validation, test or train.")
    block_size = resolve_block_size(recipe.data.block_size, tokenizer, model.config, warn=logger.warning)
    prepared = prepare_splits(recipe, tokenizer, block_size, [split], progress=not request.quiet)[split]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    batch_size = int(recipe.training.get("per_device_eval_batch_size", 8))
    stride = request.stride if request.stride is not None else recipe.eval.stride
    if stride is not None:
        context = request.context or recipe.eval.context or block_size
        if prepared.stream is None:
            raise RecipeError(
                "Strided evaluation needs the whole token stream; it does not work with data.streaming."
            )
        result = evaluate_strided(
            model,
            prepared.stream,
            context=context,
            stride=stride,
            batch_size=batch_size,
            tokenizer=tokenizer,
            device=device,
        )
    else:
        if request.context is not None:
            raise click.UsageError("--context only applies with --stride; blocks use data.block_size.")
        result = evaluate_blocks(
            model, prepared.blocks, batch_size=batch_size, tokenizer=tokenizer, device=device
        )

    metrics = dict(result.to_metrics())
    metrics.update(
        {
            "split": split,
            "model": model_name,
            "data": describe_data(recipe),
        }
    )
    return metrics


def describe_data(recipe: Recipe) -> str:
    data = recipe.data
    if data.dataset_name:
        return " ".join(x for x in (data.dataset_name, data.dataset_config_name) if x)
    files = [data.train_file, data.validation_file, data.test_file]
    return ", ".join(str(f) for f in files if f)


def evaluate_all_checkpoints(recipe: Recipe, run_dir: Path, request: EvalRequest) -> dict[str, Any]:
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise OutputDirError(f"{run_dir} has no checkpoint-N directories to evaluate.")
    rows = []
    for checkpoint in checkpoints:
        metrics = evaluate_model(recipe, str(checkpoint), request)
        metrics["checkpoint"] = checkpoint.name
        rows.append(metrics)
    print_table(rows, label="checkpoint")
    history = {"checkpoints": rows}
    write_json_atomic(run_dir / "eval_history.json", history)
    if request.output:
        write_json_atomic(Path(request.output), history)
    return history


def print_table(rows: list[dict[str, Any]], *, label: str = "split") -> None:
    headers = [label, "method", "blocks", "tokens", "loss", "perplexity", "accuracy"]
    lines = [
        [
            str(r.get(label, r.get("split"))),
            str(r.get("method", "blocks")),
            f"{r['eval_samples']:,}",
            f"{r['eval_tokens']:,}",
            f"{r['eval_loss']:.4f}",
            f"{r['perplexity']:.3f}",
            f"{r['eval_accuracy']:.4f}",
        ]
        for r in rows
    ]
    click.echo(render_table(headers, lines, left_columns=2))
