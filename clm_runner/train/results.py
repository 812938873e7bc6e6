"""What a finished run reports about itself: its final evaluation, its sample counts, run.json's record of
the prepared data, and the model card's tags (run_clm's)."""

from __future__ import annotations

from typing import Any

from clm_runner.config.schema import Recipe


def evaluation_of_the_final_model(trainer: Any) -> dict[str, Any] | None:
    """The periodic evaluation of the model now in memory, when training ended on one (eval_strategy "epoch",
    or steps that divide the run): reused, not computed a second time. None otherwise: when load_best_model_at_end
    brought back an earlier checkpoint, or when the evaluation ran in an earlier attempt (a resumed run may
    validate on other data)."""
    final_step = trainer.final_weights_step
    if trainer.last_evaluation is None or final_step is None or trainer.last_evaluation[0] != final_step:
        return None
    return dict(trainer.last_evaluation[1])


def trained_samples(train_dataset: Any, metrics: dict[str, Any], block_size: int) -> int:
    """run_clm's train_samples: the training blocks. A stream has no length (run_clm wrote -1, or the requested
    maximum): there it is the blocks the run trained on, every attempt counted (its tokens / block size)."""
    try:
        return len(train_dataset)
    except TypeError:
        return int(metrics["train_tokens"]) // block_size


def final_evaluation_description(
    trainer: Any, recipe: Recipe, block_size: int, validation: Any
) -> dict[str, Any]:
    """How train's final evaluation was computed, for evaluations.json (eval_results.json holds its numbers)."""
    from clm_runner.rundir.evaluations import describe_recipe_data

    state, args = trainer.state, trainer.args
    best = args.load_best_model_at_end and state.best_global_step not in (None, state.global_step)
    return {
        "by": "clm-runner train",
        "split": "validation",
        "method": "blocks",
        "block_size": block_size,
        "model": str(args.output_dir),
        "model_step": state.best_global_step if best else state.global_step,
        **describe_recipe_data(recipe),
        "sources": list(validation.parts) or None,
    }


def prepared_record(split: Any) -> dict[str, Any]:
    """What run.json records of a prepared split: its cache entry and blocks (per source, for a mix)."""
    record: dict[str, Any] = {
        "cache_key": split.cache_path.name if split.cache_path else None,
        "blocks": count_blocks(split.blocks, None),
    }
    if split.parts:
        record["sources"] = {name: prepared_record(part) for name, part in split.parts.items()}
        for name, taken in split.mix_counts.items():
            record["sources"][name]["blocks_in_mix"] = taken
    return record


def count_blocks(dataset: Any, limit: int | None) -> int:
    try:
        return len(dataset)
    except TypeError:  # a stream has no length; run_clm reports the requested maximum
        return limit if limit is not None else -1


def model_card_kwargs(recipe: Recipe) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"finetuned_from": recipe.model.model_name_or_path, "tasks": "text-generation"}
    data = recipe.data
    if data.dataset_name is not None:
        kwargs["dataset_tags"] = data.dataset_name
        if data.dataset_config_name is not None:
            kwargs["dataset_args"] = data.dataset_config_name
            kwargs["dataset"] = f"{data.dataset_name} {data.dataset_config_name}"
        else:
            kwargs["dataset"] = data.dataset_name
    return kwargs
