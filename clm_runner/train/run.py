"""`clm-runner train`: run_clm's pipeline (data, model, Trainer, metrics, model card) for one recipe.

Everything that can be checked before any heavy work is checked first, by `prepare_run`
(clm_runner.train.setup), the same code `clm-runner recipe check` runs. Nothing is written into the output dir
until the run starts (data prepared, model built): a start that fails leaves the directory as it was.

Around the run, what keeps it from being lost: one process per output dir (clm_runner.rundir.lock), run.json
(clm_runner.rundir.manifest), a checkpoint and a resume command on SIGINT/SIGTERM (clm_runner.train.interrupts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from clm_runner import faults
from clm_runner.config.render import render_toml, unrecorded_secrets
from clm_runner.config.schema import Recipe
from clm_runner.rundir.changes import restored_on_resume
from clm_runner.rundir.evaluations import record_evaluation
from clm_runner.rundir.policy import (
    LOG_FILE_NAME,
    RECIPE_FILE,
    OutputPlan,
    give_default_modes,
    latest_checkpoint,
    move_aside,
    write_text_atomic,
)
from clm_runner.train.checkpoints import save_final_model
from clm_runner.train.distributed import (
    decide_on_rank0,
    describe_preprocessing,
    gather_to_all,
    global_batch,
    global_batch_change,
    is_distributed,
    is_main_process,
    quiet_replica_logging,
    recipe_for_preprocessing,
)
from clm_runner.train.interrupts import GracefulStop, RunInterrupted, StopNow, signal_name
from clm_runner.train.results import (
    evaluation_of_the_final_model,
    final_evaluation_description,
    model_card_kwargs,
    prepared_record,
    trained_samples,
)
from clm_runner.train.setup import RunSetup, TrainOptions, prepare_run

logger = logging.getLogger("clm_runner")


def run_training(recipe: Recipe, options: TrainOptions) -> dict[str, Any]:
    """Train as the recipe says, evaluate, and leave run_clm's files plus recipe.toml and run.json."""
    from clm_runner.config.secrets import redact_argv, remember_value, secret_values
    from clm_runner.logs import buffer_log, setup_logging
    from clm_runner.rundir.lock import RunLock

    live = setup_logging(quiet=options.quiet)
    options = dataclasses.replace(options, quiet=not live)  # plain lines off a terminal, as --quiet
    quiet_replica_logging()
    if recipe.training.get("hub_token"):
        remember_value(os.environ.get("HF_TOKEN"))  # replaced, yet still a secret to mask
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

    from clm_runner.data.prepare import prepare_splits
    from clm_runner.models.loading import load_model
    from clm_runner.train.device import describe, describe_line
    from clm_runner.train.display import throughput_line
    from clm_runner.train.measure import install_callbacks
    from clm_runner.train.trainer import ClmTrainer

    recipe, args, plan, options = setup.recipe, setup.args, setup.plan, setup.options
    if args.should_log:
        logger.info(plan.note)
        logger.info(describe_line(describe(setup.recorded_kwargs)))
        if plan.resume_from is not None and (restored := restored_on_resume(plan.recipe_changes, args)):
            logger.warning(restored)
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
    adapter = setup.adapter
    model = load_model(
        recipe.model,
        setup.config,
        setup.tokenizer,
        resuming=plan.resume_from is not None,
        quantize_4bit=adapter is not None and adapter.load_in_4bit,
    )
    if adapter is not None:
        from clm_runner.models.adapters import wrap_with_adapter

        model = wrap_with_adapter(model, adapter, gradient_checkpointing=bool(args.gradient_checkpointing))
    if is_distributed():
        from clm_runner.train.unused_parameters import settle_for_model

        setup = session.setup = settle_for_model(setup, model)  # before DDP wraps it
    if plan.resume_from is not None and args.should_log:
        changed = global_batch_change(plan.resume_from, args, setup.block_size)
        if changed:
            logger.warning(changed)

    train_dataset = prepared["train"].blocks
    eval_dataset = None
    if args.do_eval:
        validation = prepared["validation"]
        # [[data.mix]] sources validated each on their own: the trainer scores each and their total.
        eval_dataset = {n: part.blocks for n, part in validation.parts.items()} or validation.blocks
    trainer = ClmTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=setup.tokenizer,
        data_collator=default_data_collator,
    )
    throughput, totals = install_callbacks(
        trainer, config=model.config, block_size=setup.block_size, quiet=options.quiet, adapter=adapter
    )
    trainer.graceful_stop = session.stop
    trainer.run_totals = totals
    early_stopping = None
    if recipe.early_stopping is not None:
        from clm_runner.train.early_stopping import EarlyStopping

        early_stopping = EarlyStopping(recipe.early_stopping.patience, recipe.early_stopping.threshold)
        trainer.add_callback(early_stopping)
        trainer.early_stopping = recipe.early_stopping
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
    metrics["train_samples"] = trained_samples(train_dataset, metrics, setup.block_size)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    results: dict[str, Any] = {"train": metrics}
    if args.do_eval:
        logger.info("*** Evaluate ***")
        eval_metrics = evaluation_of_the_final_model(trainer) or trainer.evaluate()
        eval_metrics["perplexity"] = eval_metrics["eval_perplexity"]  # run_clm's key for it
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        if trainer.is_world_process_zero():
            # How the number was computed, as `clm-runner eval` describes its own (numbers only in the file).
            record_evaluation(
                plan.output_dir,
                plan.output_dir / "eval_results.json",
                final_evaluation_description(trainer, recipe, setup.block_size, prepared["validation"]),
            )
        results["eval"] = eval_metrics

    faults.point("card.write", plan.output_dir / "README.md")
    if args.push_to_hub:
        trainer.push_to_hub(**model_card_kwargs(recipe))  # writes the model card, then uploads
    else:
        trainer.create_model_card(**model_card_kwargs(recipe))
    if adapter is not None and trainer.is_world_process_zero():
        from clm_runner.models.adapters import add_adapter_note

        add_adapter_note(plan.output_dir / "README.md", recipe.model, adapter)
    if trainer.is_world_process_zero():
        give_default_modes(plan.output_dir, since=session.started_at)
    session.record_best(trainer, early_stopping)
    session.finish("completed", trainer.state.global_step)
    return results


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
        self.recorded = False
        """run.json of this attempt is written: it names the checkpoint a --resume-from started the line at."""
        self.started_at = time.time()

    def begin(self, prepared: dict[str, Any]) -> None:
        """The run starts: the output dir is changed for the first time (rank 0 only)."""
        self.started = True
        self.started_at = time.time()
        if not is_main_process():
            return
        from clm_runner.rundir.policy import remove_leftovers

        previous_line = move_aside(self.plan)
        for leftover in remove_leftovers(self.plan.output_dir):
            logger.info("Removed %s, left half written by an attempt that was stopped.", leftover)
        # run.json first: a directory holding it (and its log) is known to be this run's, if the start is
        # cut short here, and the same command starts it over in place.
        self.start_manifest(prepared, previous_line)
        self.recorded = True
        if self.log is not None:
            self.log.start_file(self.plan.output_dir / LOG_FILE_NAME)
        save_resolved_recipe(self.recipe, self.plan, self.setup.resolved)
        faults.point("startup.begun", self.plan.output_dir)

    def start_manifest(self, prepared: dict[str, Any], previous_line: Path | None = None) -> None:
        from clm_runner.data.sources import data_fingerprint
        from clm_runner.rundir.manifest import RunManifest, device_info
        from clm_runner.train.device import describe

        data = data_fingerprint(self.recipe.data)
        data["prepared"] = {name: prepared_record(split) for name, split in prepared.items()}
        self.manifest = RunManifest.start(
            self.plan.output_dir,
            recipe=self.recipe,
            resolved=self.setup.resolved,
            argv=self.options.argv,
            seed=self.setup.args.seed,
            data=data,
            devices=device_info(self.setup.args),
            resumed_from=self.plan.resume_from,
            branched_from=self.plan.branched_from
            and {
                **self.plan.branched_from,
                "previous_line": str(previous_line) if previous_line else None,
            },
        )
        # The precision / compile / data-loading choice made for this device (performance.py).
        self.manifest.update(
            performance=describe(self.setup.recorded_kwargs),
            secrets_not_recorded=unrecorded_secrets(self.recipe),
            recipe_changes=list(self.plan.recipe_changes),
        )
        if self.setup.adapter is not None:
            from clm_runner.models.adapter_runs import base_model_identity

            self.manifest.update(
                adapter=self.setup.adapter.manifest(),
                base_model=base_model_identity(self.recipe.model, self.setup.config),
            )

    def record_best(self, trainer: Any, early_stopping: Any) -> None:
        """run.json names the best checkpoint (load_best_model_at_end, [early_stopping]) and an early stop."""
        if self.manifest is None:
            return
        state, args = trainer.state, trainer.args
        if args.metric_for_best_model and state.best_metric is not None:
            best = state.best_model_checkpoint
            self.manifest.update(
                best_model={
                    "checkpoint": Path(best).name if best else None,
                    "global_step": state.best_global_step,
                    "metric": args.metric_for_best_model,
                    "value": state.best_metric,
                    # Only when the final weights came from it (a best checkpoint that is gone is not loaded).
                    "final_model_is_best": trainer.final_weights_step is not None
                    and trainer.final_weights_step == state.best_global_step,
                }
            )
        if early_stopping is not None:
            self.manifest.update(
                early_stopping={
                    "stopped_early": early_stopping.stopped_at_step is not None
                    or state.global_step < state.max_steps,
                    "at_step": state.global_step,
                    "max_steps": state.max_steps,
                }
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
        from clm_runner.train.interrupts import resume_command

        # Until run.json records where the line starts, the rerun needs --resume-from to find it.
        return resume_command(
            self.options.argv,
            self.plan.output_dir,
            secret_values(self.recipe),
            keep_resume_from=not self.recorded,
        )

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


def save_resolved_recipe(recipe: Recipe, plan: OutputPlan, resolved: dict[str, Any]) -> Path:
    """recipe.toml: every key with its effective value, so the run can be repeated from its dir alone."""
    header = (
        "Resolved recipe of this run, written by clm-runner. Repeat it with:\n"
        f"  clm-runner train --recipe {plan.output_dir / RECIPE_FILE} --set training.output_dir=NEW_DIR"
    )
    path = plan.output_dir / RECIPE_FILE
    write_text_atomic(path, render_toml(resolved, header=header, unrecorded=unrecorded_secrets(recipe)))
    return path
