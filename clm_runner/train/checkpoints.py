"""The Trainer's saves, made atomic: each checkpoint staged and sealed, the final model staged and renamed.

Upstream Trainer writes `checkpoint-N` and the final model in place, so a kill during a save leaves a torn
directory that `get_last_checkpoint` still picks, or a torn model.safetensors. Here every save is written
under a temporary name first (the on-disk format is clm_runner.rundir.checkpoints'). The training thread
writes a checkpoint's files, as upstream does; sealing and rotation run on a background thread
(clm_runner.rundir.sealer), one at a time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from clm_runner import faults
from clm_runner.rundir.checkpoints import (
    TRAINER_STATE,
    remove_stale_temporaries,
    rotate_checkpoints,
    seal_checkpoint,
    staging_dir,
)
from clm_runner.rundir.files import fsync_path, give_default_modes
from clm_runner.rundir.sealer import Sealer


def save_checkpoint_atomically(
    trainer: Any, model: Any, trial: Any, *, limit: int | None, sealer: Sealer | None = None
) -> Path:
    """Trainer._save_checkpoint (transformers 5.x), writing into tmp-checkpoint-N and sealing it.

    Mirrors the upstream order (model, best-checkpoint bookkeeping, optimizer/scheduler/scaler/RNG,
    trainer state, push, rotation) so resuming restores exactly what upstream restores. Every file holds
    this step's state once this returns; with a `sealer`, the seal and rotation are still running on its
    thread (with push_to_hub they are not: the push reads the sealed checkpoint).
    """
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import SaveStrategy

    args = trainer.args
    step = trainer.state.global_step
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    run_dir = Path(trainer._get_output_dir(trial=trial))
    final = run_dir / f"checkpoint-{step}"
    staging = staging_dir(run_dir, step)
    if args.should_save:
        if sealer is not None:
            sealer.wait()  # the previous seal and its rotation are done: nothing else touches the run dir
        remove_stale_temporaries(run_dir)
    # Every rank writes into the staging dir (its RNG state, sharded states): none may start before the
    # stale one is gone, and the rename must wait until all are done.
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        staging.mkdir(parents=True, exist_ok=True)
    faults.point("checkpoint.staging", staging)

    trainer.save_model(str(staging), _internal_call=True)
    faults.point("checkpoint.model", staging)

    if (
        args.save_strategy in [SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST]
        and trainer.state.best_global_step
    ):
        trainer.accelerator.wait_for_everyone()
        best = run_dir / f"checkpoint-{trainer.state.best_global_step}"
        if trainer.state.best_global_step == step or best.exists():
            trainer.state.best_model_checkpoint = str(best)

    if not args.save_only_model:
        trainer._save_optimizer_and_scheduler(str(staging))
        trainer._save_scaler(str(staging))
        trainer._save_rng_state(str(staging))
        faults.point("checkpoint.optimizer", staging)

    if args.should_save:
        exportable = [
            cb
            for cb in trainer.callback_handler.callbacks + [trainer.control]
            if isinstance(cb, ExportableState)
        ]
        for cb in exportable:
            name = cb.__class__.__name__
            if isinstance(trainer.state.stateful_callbacks.get(name), list):
                trainer.state.stateful_callbacks[name].append(cb.state())
            else:
                trainer.state.stateful_callbacks[name] = cb.state()
        trainer.state.save_to_json(str(staging / TRAINER_STATE))
        faults.point("checkpoint.state", staging / TRAINER_STATE)
    # Every file holds this step's state, written and closed: the next optimizer step may change the
    # weights. What is left reads only these files.
    faults.point("checkpoint.taken", staging)

    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        # What a resume must know about the run that wrote it: how many processes shared each step.
        facts = {
            "world_size": int(args.world_size),
            "per_device_train_batch_size": int(args.per_device_train_batch_size),
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        }
        best = Path(trainer.state.best_model_checkpoint) if trainer.state.best_model_checkpoint else None
        seal = partial(_seal_and_rotate, staging, final, step, facts, limit, best)
        if sealer is None or args.push_to_hub:
            seal(rotate=not args.push_to_hub)
        else:
            sealer.submit(seal, name=final.name)
    if args.push_to_hub:
        trainer.accelerator.wait_for_everyone()
        trainer._push_from_checkpoint(str(final))
        if args.should_save:
            rotate_checkpoints(run_dir, limit, best=best)
    return final


def _seal_and_rotate(
    staging: Path,
    final: Path,
    step: int,
    facts: dict[str, Any],
    limit: int | None,
    best: Path | None,
    rotate: bool = True,
) -> None:
    """Seal `staging` as `final`, then rotate: on the sealer's thread, while training goes on."""
    faults.point("checkpoint.sealing", staging)
    seal_checkpoint(staging, final, step=step, facts=facts)
    if rotate:
        rotate_checkpoints(final.parent, limit, best=best)


READ_BY_REPORTERS = ("on_save", "on_train_end")
"""Callback events on which reporting integrations read the run dir: wandb, MLflow, Neptune, ClearML and
Flyte upload checkpoint-N on_save, Comet and DagsHub the whole output dir on_train_end."""


def seal_before_reporters(handler: Any, wait: Callable[[], None]) -> None:
    """Make `handler` (the Trainer's CallbackHandler) call `wait` before each event of READ_BY_REPORTERS
    that a callback handles which neither clm-runner nor the Trainer's own module wrote: a reporter reads
    the checkpoint being sealed only once it is sealed (without one, the seal stays in the background)."""
    for event in READ_BY_REPORTERS:
        dispatch = getattr(handler, event)

        def waiting(*args: Any, _event: str = event, _dispatch: Any = dispatch, **kwargs: Any) -> Any:
            if any(_foreign_handler(callback, _event) for callback in handler.callbacks):
                wait()
            return _dispatch(*args, **kwargs)

        setattr(handler, event, waiting)


def _foreign_handler(callback: Any, event: str) -> bool:
    from transformers import TrainerCallback

    kind = type(callback)
    if kind.__module__.startswith(("clm_runner.", "transformers.trainer_callback")):
        return False
    return getattr(kind, event, None) is not getattr(TrainerCallback, event)


def save_final_model(trainer: Any, output_dir: Path) -> None:
    """The final model, written whole: staged in tmp-final, synced, then each file renamed into place.

    Saved in place, a kill mid-write would leave a torn model.safetensors in the output dir; renamed, each
    file is either the old one or the new one, complete.
    """
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
