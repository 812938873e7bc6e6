"""`clm-runner train`: run_clm's pipeline (data, model, Trainer, metrics, model card) for one recipe.

Around it, what keeps a run from being lost: one process per output dir (clm_runner.runlock), run.json
(clm_runner.manifest), a checkpoint and a resume command on SIGINT/SIGTERM (clm_runner.interrupts).
"""

from __future__ import annotations

import contextlib
import logging
import os
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
from clm_runner.interrupts import GracefulStop, RunInterrupted, StopNow, signal_name
from clm_runner.outputs import RECIPE_FILE, OutputPlan, latest_checkpoint, plan_output_dir, write_text_atomic
from clm_runner.recipe import Recipe, render_toml, resolved_dict

logger = logging.getLogger("clm_runner")


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
    # TrainingArguments is pickled into every checkpoint (training_args.bin): a token there would be on
    # disk in clear. run_training hands it to huggingface_hub through the environment instead.
    kwargs.pop("hub_token", None)
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
    """Train as the recipe says, evaluate, and leave run_clm's files plus recipe.toml and run.json."""
    from clm_runner.logs import LOG_FILE_NAME, attach_log_file, detach_log_file, setup_logging
    from clm_runner.manifest import redact_argv, secret_values
    from clm_runner.runlock import RunLock, ensure_free

    setup_logging(quiet=options.quiet)
    quiet_replica_logging()
    if recipe.training.get("hub_token"):
        os.environ["HF_TOKEN"] = str(recipe.training["hub_token"])  # read by huggingface_hub
    kwargs = training_kwargs(recipe)
    # Built first: in a multi-process run this creates the process group that the decisions are shared on.
    args = build_training_args(kwargs)
    check_one_job(args)

    def decide_plan() -> OutputPlan:
        ensure_free(recipe.output_dir)  # before the plan: "in use" says more than "not empty"
        return plan_output_dir(
            recipe.output_dir,
            overwrite=options.overwrite,
            resume=options.resume,
            resume_from=options.resume_from,
        )

    plan = decide_on_rank0(decide_plan)
    # Only rank 0 writes into the output dir, so only rank 0 may clean up after a failed start.
    created_dir = is_main_process() and not plan.output_dir.exists()
    command = " ".join(redact_argv(options.argv, secret_values(recipe)))
    # Rank 0 holds the lock; the other ranks learn that it was taken (or all stop with its error).
    lock = decide_on_rank0(lambda: RunLock.acquire(plan.output_dir, command), share=lambda held: None)
    log_file = None
    if is_main_process():
        log_file = attach_log_file(plan.output_dir / LOG_FILE_NAME, secrets=secret_values(recipe))
    stop = GracefulStop().install()
    session = _RunSession(recipe, options, plan, stop)
    try:
        return _train(recipe, options, plan, kwargs, args, session)
    except BaseException as exc:
        session.fail(exc)
        raise  # fail() always raises; this keeps type checkers and readers sure of it
    finally:
        stop.restore()
        if log_file is not None:
            detach_log_file(log_file)
        if lock is not None:
            lock.release()
        if created_dir and session.manifest is None:
            # Failed before the run started (bad data, unreachable hub): leave no directory behind.
            with contextlib.suppress(OSError):
                (plan.output_dir / LOG_FILE_NAME).unlink(missing_ok=True)
                plan.output_dir.rmdir()


def _train(
    recipe: Recipe,
    options: TrainOptions,
    plan: OutputPlan,
    kwargs: dict[str, Any],
    args: Any,
    session: _RunSession,
) -> dict[str, Any]:
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
    trainer.graceful_stop = session.stop
    if trainer.is_world_process_zero():
        # recipe.toml leaves device defaults out, so a rerun elsewhere gets that machine's own;
        # run.json records what this run actually used.
        save_resolved_recipe(recipe, plan, training_kwargs(recipe, with_device_defaults=False), block_size)
        session.start_manifest(resolved_recipe(recipe, kwargs, block_size), args, prepared)

    resume_from = str(plan.resume_from) if plan.resume_from else None
    with session.stop.during_training():
        train_result = trainer.train(resume_from_checkpoint=resume_from)
    if session.stop.stopped_at_step is not None:
        raise session.interrupted(trainer.state.global_step)
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
        # How the number was computed, as `clm-runner eval` labels it.
        eval_metrics.update(method="blocks", block_size=block_size, split="validation")
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results["eval"] = eval_metrics

    trainer.create_model_card(**model_card_kwargs(recipe))
    session.finish("completed", trainer.state.global_step)
    return results


class _RunSession:
    """One attempt's run.json and its ending: completed, failed, or interrupted with a resume command."""

    def __init__(self, recipe: Recipe, options: TrainOptions, plan: OutputPlan, stop: GracefulStop) -> None:
        self.recipe = recipe
        self.options = options
        self.plan = plan
        self.stop = stop
        self.manifest: Any = None
        self.global_step: int | None = None

    def start_manifest(self, resolved: dict[str, Any], args: Any, prepared: dict[str, Any]) -> None:
        from clm_runner.data import data_fingerprint
        from clm_runner.manifest import RunManifest, device_info

        data = data_fingerprint(self.recipe.data)
        data["prepared"] = {
            name: {
                "cache_key": split.cache_path.name if split.cache_path else None,
                "blocks": _count(split.blocks, None),
            }
            for name, split in prepared.items()
        }
        from clm_runner.performance import describe

        self.manifest = RunManifest.start(
            self.plan.output_dir,
            recipe=self.recipe,
            resolved=resolved,
            argv=self.options.argv,
            seed=args.seed,
            data=data,
            devices=device_info(args),
            resumed_from=self.plan.resume_from,
        )
        # The precision / compile / data-loading choice made for this device (performance.py).
        self.manifest.update(performance=describe(training_kwargs(self.recipe, with_device_defaults=False)))

    def finish(self, status: str, global_step: int | None = None, error: str | None = None) -> None:
        if self.manifest is not None:
            self.manifest.finish(status, global_step=global_step, error=error)

    def resume_command(self) -> str:
        from clm_runner.manifest import resume_command, secret_values

        return resume_command(self.options.argv, self.plan.output_dir, secret_values(self.recipe))

    def interrupted(self, global_step: int) -> RunInterrupted:
        signum = self.stop.signum or 2
        checkpoint = self.plan.output_dir / f"checkpoint-{global_step}"
        message = (
            f"Stopped by {signal_name(signum)} after step {global_step}; checkpoint written to {checkpoint}. "
            f"Resume with: {self.resume_command()}"
        )
        logger.warning(message)
        self.finish("interrupted", global_step, f"stopped by {signal_name(signum)}")
        return RunInterrupted(message, signum=signum)

    def fail(self, exc: BaseException) -> None:
        """Record how the attempt ended and raise what the CLI should report."""
        if isinstance(exc, RunInterrupted):
            raise exc
        if isinstance(exc, (StopNow, KeyboardInterrupt)):
            signum = exc.signum if isinstance(exc, StopNow) else 2
            newest = latest_checkpoint(self.plan.output_dir, warn=False)
            where = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written yet"
            message = (
                f"Stopped at once by {signal_name(signum)} ({where}). Resume with: {self.resume_command()}"
            )
            logger.warning(message)
            self.finish("interrupted", None, f"stopped at once by {signal_name(signum)}")
            raise RunInterrupted(message, signum=signum) from None
        from clm_runner.manifest import scrub, secret_values

        self.finish("failed", None, scrub(f"{type(exc).__name__}: {exc}", secret_values(self.recipe)))
        raise exc


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


def resolved_recipe(recipe: Recipe, kwargs: dict[str, Any], block_size: int) -> dict[str, Any]:
    """Every key with its effective value (secrets redacted), as recipe.toml and run.json record it."""
    resolved = resolved_dict(recipe, training_overrides=kwargs)
    resolved["data"]["block_size"] = block_size
    return resolved


def save_resolved_recipe(recipe: Recipe, plan: OutputPlan, kwargs: dict[str, Any], block_size: int) -> Path:
    """recipe.toml: every key with its effective value, so the run can be repeated from its dir alone."""
    resolved = resolved_recipe(recipe, kwargs, block_size)
    header = (
        "Resolved recipe of this run, written by clm-runner. Repeat it with:\n"
        f"  clm-runner train --recipe {plan.output_dir / RECIPE_FILE} --set training.output_dir=NEW_DIR"
    )
    path = plan.output_dir / RECIPE_FILE
    write_text_atomic(path, render_toml(resolved, header=header))
    return path
