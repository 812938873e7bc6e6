"""`clm-runner train`: run_clm's pipeline (data, model, Trainer, metrics, model card) for one recipe.

Everything that can be checked before any heavy work is checked first, by `prepare_run`, the same code
`clm-runner recipe check` runs: the TrainingArguments, files and directories the recipe names, the hub,
the tokenizer, config and block size, and what the output dir allows. Nothing is written into the output dir
until the run starts (data prepared, model built): a start that fails leaves the directory as it was.

Around the run, what keeps it from being lost: one process per output dir (clm_runner.rundir.lock), run.json
(clm_runner.rundir.manifest), a checkpoint and a resume command on SIGINT/SIGTERM (clm_runner.train.interrupts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clm_runner import faults
from clm_runner.config.schema import Recipe, render_toml, resolved_dict, unrecorded_secrets
from clm_runner.errors import RecipeError
from clm_runner.rundir.policy import (
    LOG_FILE_NAME,
    RECIPE_FILE,
    OutputPlan,
    RunIdentity,
    archive_previous_run,
    give_default_modes,
    latest_checkpoint,
    plan_output_dir,
    write_text_atomic,
)
from clm_runner.train.distributed import (
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
from clm_runner.train.interrupts import GracefulStop, RunInterrupted, StopNow, signal_name

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
    # clm-runner resumes itself (the output-dir policy); the key is honoured as --resume-from.
    kwargs.pop("resume_from_checkpoint", None)
    from clm_runner.config.training_keys import CLM_RUNNER_DEFAULTS

    for key, value in CLM_RUNNER_DEFAULTS.items():  # do_train, do_eval
        kwargs.setdefault(key, value)
    kwargs.update(distributed_training_defaults(kwargs))
    if with_device_defaults:
        from clm_runner.train.device import device_defaults

        kwargs.update(device_defaults(kwargs))
    return kwargs


def build_training_args(kwargs: dict[str, Any]):
    from transformers import TrainingArguments

    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"[training] is inconsistent: {str(exc).strip()}") from None


@dataclass(frozen=True)
class RunSetup:
    """Everything decided about a run before any heavy work (data preparation, weights)."""

    recipe: Recipe
    options: TrainOptions
    kwargs: dict[str, Any]
    """The TrainingArguments keys the run uses, device defaults included (computed once)."""
    recorded_kwargs: dict[str, Any]
    """The same without device defaults: what recipe.toml and run.json record."""
    args: Any
    tokenizer: Any
    config: Any
    block_size: int
    plan: OutputPlan

    @property
    def resolved(self) -> dict[str, Any]:
        """The resolved recipe as recipe.toml and run.json record it (secret keys left out)."""
        return resolved_recipe(self.recipe, self.recorded_kwargs, self.block_size)


def resume_point(recipe: Recipe, options: TrainOptions) -> str | None:
    """--resume-from, or training.resume_from_checkpoint (as run_clm honours it); both is a contradiction."""
    from_recipe = recipe.training.get("resume_from_checkpoint")
    if options.resume_from and from_recipe and Path(options.resume_from) != Path(from_recipe):
        raise RecipeError(
            f"--resume-from {options.resume_from} and training.resume_from_checkpoint = {from_recipe!r} "
            "name different checkpoints. Choose one."
        )
    chosen = options.resume_from or from_recipe
    if chosen and not options.resume:
        raise RecipeError("--no-resume contradicts a checkpoint to resume from; choose one.")
    return chosen


def prepare_run(recipe: Recipe, options: TrainOptions, *, decide: Any = None) -> RunSetup:
    """Check everything a run needs before any heavy work and decide how it uses its output dir.

    `recipe check` and `train` both call this, so they accept and refuse the same recipes. `decide` runs
    the output-dir decision (in a multi-process run: on rank 0, shared with every rank).
    """
    from clm_runner.data.blocks import resolve_block_size
    from clm_runner.data.sources import check_data_sources
    from clm_runner.models.hub import require_hub_for_push
    from clm_runner.models.loading import check_model_sources, load_config, load_tokenizer
    from clm_runner.rundir.lock import ensure_free

    resume_from = resume_point(recipe, options)
    kwargs = training_kwargs(recipe)
    recorded = training_kwargs(recipe, with_device_defaults=False)
    # Built first: in a multi-process run this creates the process group that the decisions are shared on.
    args = build_training_args(kwargs)
    check_one_job(args)
    if args.push_to_hub:
        require_hub_for_push(args.hub_model_id or recipe.output_dir.name)
    check_model_sources(recipe.model)
    check_data_sources(recipe.data, recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    config = load_config(recipe.model)
    block_size = resolve_block_size(recipe.data.block_size, tokenizer, config, warn=logger.warning)
    identity = RunIdentity(
        resolved=resolved_recipe(recipe, recorded, block_size),
        max_steps=int(args.max_steps),
        num_train_epochs=float(args.num_train_epochs),
    )

    def decide_plan() -> OutputPlan:
        ensure_free(recipe.output_dir)  # before the plan: "in use" says more than "not empty"
        return plan_output_dir(
            recipe.output_dir,
            overwrite=options.overwrite,
            resume=options.resume,
            resume_from=resume_from,
            identity=identity,
        )

    plan = (decide or (lambda fn: fn()))(decide_plan)
    return RunSetup(recipe, options, kwargs, recorded, args, tokenizer, config, block_size, plan)


def run_training(recipe: Recipe, options: TrainOptions) -> dict[str, Any]:
    """Train as the recipe says, evaluate, and leave run_clm's files plus recipe.toml and run.json."""
    from clm_runner.config.secrets import redact_argv, secret_values
    from clm_runner.logs import buffer_log, setup_logging
    from clm_runner.rundir.lock import RunLock

    setup_logging(quiet=options.quiet)
    quiet_replica_logging()
    if recipe.training.get("hub_token"):
        os.environ["HF_TOKEN"] = str(recipe.training["hub_token"])  # read by huggingface_hub
    # Until the run starts, the log is kept in memory: a start that fails writes no train.log.
    log = buffer_log(secrets=secret_values(recipe)) if is_main_process() else None
    try:
        setup = prepare_run(recipe, options, decide=decide_on_rank0)
        plan = setup.plan
        if plan.action == "complete":
            logger.info(plan.note)
            return {}
        # Only rank 0 writes into the output dir, so only rank 0 may clean up after a failed start.
        created_dir = is_main_process() and not plan.output_dir.exists()
        command = " ".join(redact_argv(options.argv, secret_values(recipe)))
        # Rank 0 holds the lock; the other ranks learn that it was taken (or all stop with its error).
        lock = decide_on_rank0(lambda: RunLock.acquire(plan.output_dir, command), share=lambda held: None)
        stop = GracefulStop().install()
        session = _RunSession(setup, stop, log)
        try:
            return _train(setup, session)
        except BaseException as exc:
            session.fail(exc)
            raise  # fail() always raises; this keeps type checkers and readers sure of it
        finally:
            stop.restore()
            if lock is not None:
                lock.release()
            if created_dir and not session.started:
                # Failed before the run started (bad data, unreachable hub): leave no directory behind.
                with contextlib.suppress(OSError):
                    plan.output_dir.rmdir()
    finally:
        if log is not None:
            log.close()


def _train(setup: RunSetup, session: _RunSession) -> dict[str, Any]:
    from transformers import default_data_collator, set_seed

    from clm_runner.data.blocks import prepare_splits
    from clm_runner.models.loading import load_model
    from clm_runner.train.device import describe, describe_line
    from clm_runner.train.measure import install_callbacks, throughput_line
    from clm_runner.train.trainer import ClmTrainer

    recipe, args, plan, options = setup.recipe, setup.args, setup.plan, setup.options
    if args.should_log:
        logger.info(plan.note)
        logger.info(describe_line(describe(setup.recorded_kwargs)))
    # Seeded before the model is built, as run_clm does, so a from-scratch init is reproducible.
    set_seed(args.seed)
    logger.info(global_batch(args, setup.block_size).describe())
    splits = ["train", "validation"] if args.do_eval else ["train"]
    prepared = prepare_splits(
        recipe_for_preprocessing(recipe),
        setup.tokenizer,
        setup.block_size,
        splits,
        main_process_first=lambda desc: args.main_process_first(desc=desc),
        progress=not options.quiet and is_main_process(),
    )
    if is_distributed():
        built = sorted(name for name, split in prepared.items() if split.cache_path and not split.from_cache)
        logger.info(describe_preprocessing(gather_to_all(built)))
    model = load_model(recipe.model, setup.config, setup.tokenizer, resuming=plan.resume_from is not None)
    if plan.resume_from is not None and args.should_log:
        changed = global_batch_change(plan.resume_from, args, setup.block_size)
        if changed:
            logger.warning(changed)

    train_dataset = prepared["train"].blocks
    eval_dataset = prepared["validation"].blocks if args.do_eval else None
    trainer = ClmTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=setup.tokenizer,
        data_collator=default_data_collator,
    )
    throughput, totals = install_callbacks(
        trainer, config=model.config, block_size=setup.block_size, quiet=options.quiet
    )
    trainer.graceful_stop = session.stop
    trainer.run_totals = totals
    session.begin(prepared)

    resume_from = str(plan.resume_from) if plan.resume_from else None
    with session.stop.during_training():
        train_result = trainer.train(resume_from_checkpoint=resume_from)
    if session.stop.stopped_at_step is not None:
        raise session.interrupted(trainer.state.global_step)
    faults.point("train.end")
    save_final_model(trainer, plan.output_dir)  # the tokenizer too, so the output dir loads on its own

    metrics = totals.whole_run_metrics(dict(train_result.metrics), trainer, throughput)
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
        eval_metrics.update(method="blocks", block_size=setup.block_size, split="validation")
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results["eval"] = eval_metrics

    faults.point("card.write", plan.output_dir / "README.md")
    if args.push_to_hub:
        trainer.push_to_hub(**model_card_kwargs(recipe))  # writes the model card, then uploads
    else:
        trainer.create_model_card(**model_card_kwargs(recipe))
    if trainer.is_world_process_zero():
        give_default_modes(plan.output_dir, since=session.started_at)
    session.finish("completed", trainer.state.global_step)
    return results


def save_final_model(trainer: Any, output_dir: Path) -> None:
    """The final model, written whole: staged in tmp-final, synced, then each file renamed into place.

    Saved in place, a kill mid-write would leave a torn model.safetensors in the output dir; renamed, each
    file is either the old one or the new one, complete.
    """
    from clm_runner.rundir.files import fsync_path
    from clm_runner.rundir.policy import FINAL_STAGING

    staging = output_dir / FINAL_STAGING
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    give_default_modes(staging)
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    for file in files:
        fsync_path(file)
    faults.point("final.save", staging)
    for file in files:
        target = output_dir / file.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
    fsync_path(output_dir)
    shutil.rmtree(staging, ignore_errors=True)


class _RunSession:
    """One attempt: its start (the first write into the output dir), run.json and its ending."""

    def __init__(self, setup: RunSetup, stop: GracefulStop, log: Any) -> None:
        self.setup = setup
        self.recipe = setup.recipe
        self.options = setup.options
        self.plan = setup.plan
        self.stop = stop
        self.log = log
        self.manifest: Any = None
        self.started = False
        self.started_at = time.time()

    def begin(self, prepared: dict[str, Any]) -> None:
        """The run starts: the output dir is changed for the first time (rank 0 only)."""
        self.started = True
        self.started_at = time.time()
        if not is_main_process():
            return
        from clm_runner.rundir.policy import remove_leftovers

        if self.plan.archive:
            archive_previous_run(self.plan.output_dir)
        for leftover in remove_leftovers(self.plan.output_dir):
            logger.info("Removed %s, left half written by an attempt that was stopped.", leftover)
        # run.json first: a directory holding it (and its log) is known to be this run's, if the start is
        # cut short here, and the same command starts it over in place.
        self.start_manifest(prepared)
        if self.log is not None:
            self.log.start_file(self.plan.output_dir / LOG_FILE_NAME)
        save_resolved_recipe(self.recipe, self.plan, self.setup.resolved)
        faults.point("startup.begun", self.plan.output_dir)

    def start_manifest(self, prepared: dict[str, Any]) -> None:
        from clm_runner.data.sources import data_fingerprint
        from clm_runner.rundir.manifest import RunManifest, device_info
        from clm_runner.train.device import describe

        data = data_fingerprint(self.recipe.data)
        data["prepared"] = {
            name: {
                "cache_key": split.cache_path.name if split.cache_path else None,
                "blocks": _count(split.blocks, None),
            }
            for name, split in prepared.items()
        }
        self.manifest = RunManifest.start(
            self.plan.output_dir,
            recipe=self.recipe,
            resolved=self.setup.resolved,
            argv=self.options.argv,
            seed=self.setup.args.seed,
            data=data,
            devices=device_info(self.setup.args),
            resumed_from=self.plan.resume_from,
        )
        # The precision / compile / data-loading choice made for this device (performance.py).
        self.manifest.update(
            performance=describe(self.setup.recorded_kwargs),
            secrets_not_recorded=unrecorded_secrets(self.recipe),
            recipe_changes=list(self.plan.recipe_changes),
        )

    def finish(self, status: str, global_step: int | None = None, error: str | None = None) -> None:
        if self.manifest is None:
            return
        try:
            self.manifest.finish(status, global_step=global_step, error=error)
        except OSError as exc:  # the disk that failed the run may fail this too; say so, keep the first error
            logger.warning("Could not record the run's end in run.json (%s).", exc)

    def resume_command(self) -> str:
        from clm_runner.config.secrets import secret_values
        from clm_runner.rundir.manifest import resume_command

        return resume_command(self.options.argv, self.plan.output_dir, secret_values(self.recipe))

    def interrupted(self, global_step: int) -> RunInterrupted:
        signum = self.stop.signum or 2
        checkpoint = self.plan.output_dir / f"checkpoint-{global_step}"
        message = (
            f"Stopped by {signal_name(signum)} after step {global_step}; checkpoint written to {checkpoint}. "
            f"Resume with: {self.resume_command()}"
        )
        if is_main_process():
            logger.warning(message)
        self.finish("interrupted", global_step, f"stopped by {signal_name(signum)}")
        return RunInterrupted(message, signum=signum, quiet=True)

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
            if is_main_process():
                logger.warning(message)
            self.finish("interrupted", None, f"stopped at once by {signal_name(signum)}")
            raise RunInterrupted(message, signum=signum, quiet=True) from None
        from clm_runner.config.secrets import scrub, secret_values
        from clm_runner.rundir.storage import storage_error

        stored = storage_error(exc, self.plan.output_dir)
        self.finish("failed", None, scrub(f"{type(exc).__name__}: {exc}", secret_values(self.recipe)))
        if stored is not None:
            raise stored from None
        raise exc


def global_batch_change(checkpoint: Path, args: Any, block_size: int) -> str | None:
    """A warning when a run resumes with another global batch than the checkpoint was trained with."""
    from clm_runner.rundir.checkpoints import read_marker

    marker = read_marker(checkpoint)
    keys = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
    if not all(isinstance(marker.get(key), int) for key in keys):
        return None
    before = (
        marker["world_size"] * marker["per_device_train_batch_size"] * marker["gradient_accumulation_steps"]
    )
    now = global_batch(args, block_size)
    if before == now.blocks:
        return None
    processes = f"{marker['world_size']} process{'es' if marker['world_size'] != 1 else ''}"
    return (
        f"Resuming {checkpoint.name}, trained with {processes} and {before} blocks per optimizer step, with "
        f"{now.world_size} and {now.blocks} ({before * block_size:,} -> {now.tokens:,} tokens per step): the "
        "global batch changed, and so do the steps per epoch and the losses. To keep it, launch as many "
        "processes as before, or set training.gradient_accumulation_steps to make up the difference."
    )


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
    """Every key with its effective value (secret keys left out), as recipe.toml and run.json record it."""
    resolved = resolved_dict(recipe, training_overrides=kwargs)
    resolved["data"]["block_size"] = block_size
    return resolved


def save_resolved_recipe(recipe: Recipe, plan: OutputPlan, resolved: dict[str, Any]) -> Path:
    """recipe.toml: every key with its effective value, so the run can be repeated from its dir alone."""
    header = (
        "Resolved recipe of this run, written by clm-runner. Repeat it with:\n"
        f"  clm-runner train --recipe {plan.output_dir / RECIPE_FILE} --set training.output_dir=NEW_DIR"
    )
    path = plan.output_dir / RECIPE_FILE
    write_text_atomic(path, render_toml(resolved, header=header, unrecorded=unrecorded_secrets(recipe)))
    return path
