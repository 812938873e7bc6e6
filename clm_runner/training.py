"""`clm-runner train`: run_clm's pipeline (data, model, Trainer, metrics, model card) for one recipe."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clm_runner.distributed import (
    check_one_job,
    decide_on_rank0,
    describe_preprocessing,
    distributed_training_defaults,
    gather_to_all,
    global_batch,
    is_distributed,
    is_main_process,
    quiet_replica_logging,
    recipe_for_preprocessing,
)
from clm_runner.errors import RecipeError
from clm_runner.outputs import OutputPlan, plan_output_dir, write_text_atomic
from clm_runner.recipe import Recipe, render_toml, resolved_dict

logger = logging.getLogger("clm_runner")

RECIPE_FILE = "recipe.toml"


@dataclass(frozen=True)
class TrainOptions:
    overwrite: bool = False
    resume: bool = True
    resume_from: str | None = None
    quiet: bool = False
    argv: Sequence[str] = ()


def training_kwargs(recipe: Recipe, *, with_device_defaults: bool = True) -> dict[str, Any]:
    """The TrainingArguments a run uses: the recipe's [training], what `train` always does, device defaults.

    Device defaults (precision, compile, data loading: `performance.device_defaults`) fill only keys the
    recipe leaves out; without them this is what recipe.toml records, so a rerun elsewhere gets its own.
    """
    kwargs = dict(recipe.training)
    kwargs["do_train"] = True
    # run_clm is always called with --do_eval in its docs; evaluating at the end is the default here.
    kwargs.setdefault("do_eval", True)
    kwargs.update(distributed_training_defaults(kwargs))
    if with_device_defaults:
        from clm_runner.performance import device_defaults

        kwargs.update(device_defaults(kwargs))
    return kwargs


def build_training_args(kwargs: dict[str, Any]):
    from transformers import TrainingArguments

    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"[training] is inconsistent: {exc}") from None


def run_training(recipe: Recipe, options: TrainOptions) -> dict[str, Any]:
    """Train as the recipe says, evaluate, and leave run_clm's files plus recipe.toml in the output dir."""
    from clm_runner.logs import LOG_FILE_NAME, attach_log_file, detach_log_file, setup_logging

    setup_logging(quiet=options.quiet)
    quiet_replica_logging()
    kwargs = training_kwargs(recipe)
    # Built first: in a multi-process run this creates the process group that the decision is shared on.
    args = build_training_args(kwargs)
    check_one_job(args)
    plan = decide_on_rank0(
        lambda: plan_output_dir(
            recipe.output_dir,
            overwrite=options.overwrite,
            resume=options.resume,
            resume_from=options.resume_from,
        )
    )
    log_file = None
    if args.process_index == 0:
        secrets = [str(recipe.training["hub_token"])] if recipe.training.get("hub_token") else []
        log_file = attach_log_file(plan.output_dir / LOG_FILE_NAME, secrets=secrets)
    try:
        return _train(recipe, options, plan, kwargs, args)
    finally:
        if log_file is not None:
            detach_log_file(log_file)


def _train(
    recipe: Recipe, options: TrainOptions, plan: OutputPlan, kwargs: dict[str, Any], args: Any
) -> dict:
    from transformers import default_data_collator, set_seed

    from clm_runner.blocks import prepare_splits, resolve_block_size
    from clm_runner.callbacks import install_callbacks, throughput_line
    from clm_runner.modeling import load_config, load_model, load_tokenizer
    from clm_runner.performance import describe, describe_line
    from clm_runner.trainer import ClmTrainer

    if args.should_log:
        logger.info(plan.note)
        logger.info(describe_line(describe(training_kwargs(recipe, with_device_defaults=False))))
    # Seeded before the model is built, as run_clm does, so a from-scratch init is reproducible.
    set_seed(args.seed)
    tokenizer = load_tokenizer(recipe.model)
    config = load_config(recipe.model)
    block_size = resolve_block_size(recipe.data.block_size, tokenizer, config, warn=logger.warning)
    logger.info(global_batch(args, block_size).describe())
    splits = ["train", "validation"] if args.do_eval else ["train"]
    prepared = prepare_splits(
        recipe_for_preprocessing(recipe),
        tokenizer,
        block_size,
        splits,
        main_process_first=lambda desc: args.main_process_first(desc=desc),
        progress=not options.quiet and is_main_process(),
    )
    if is_distributed():
        built = sorted(name for name, split in prepared.items() if split.cache_path and not split.from_cache)
        logger.info(describe_preprocessing(gather_to_all(built)))
    model = load_model(recipe.model, config, tokenizer)

    train_dataset = prepared["train"].blocks
    eval_dataset = prepared["validation"].blocks if args.do_eval else None
    trainer = ClmTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    throughput = install_callbacks(trainer, config=model.config, block_size=block_size, quiet=options.quiet)
    if trainer.is_world_process_zero():
        save_resolved_recipe(recipe, plan, training_kwargs(recipe, with_device_defaults=False), block_size)

    train_result = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    trainer.save_model()  # the tokenizer too, so the output dir loads on its own

    metrics = dict(train_result.metrics)
    metrics.update(throughput.metrics())
    if args.should_log:
        logger.info(throughput_line(metrics))
    metrics["train_samples"] = _count(train_dataset, recipe.data.max_train_samples)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    results: dict[str, Any] = {"train": metrics}
    if args.do_eval:
        logger.info("*** Evaluate ***")
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = _count(eval_dataset, recipe.data.max_eval_samples)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results["eval"] = eval_metrics

    trainer.create_model_card(**model_card_kwargs(recipe))
    return results


def _count(dataset: Any, limit: int | None) -> int:
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


def save_resolved_recipe(recipe: Recipe, plan: OutputPlan, kwargs: dict[str, Any], block_size: int) -> Path:
    """recipe.toml: every key with its effective value, so the run can be repeated from its dir alone."""
    resolved = resolved_dict(recipe, training_overrides=kwargs)
    resolved["data"]["block_size"] = block_size
    header = (
        "Resolved recipe of this run, written by clm-runner. Repeat it with:\n"
        f"  clm-runner train --recipe {plan.output_dir / RECIPE_FILE} --set training.output_dir=NEW_DIR"
    )
    path = plan.output_dir / RECIPE_FILE
    write_text_atomic(path, render_toml(resolved, header=header))
    return path


def perplexity_of(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
