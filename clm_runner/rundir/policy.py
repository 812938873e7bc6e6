"""The output directory: what may be written where, which checkpoint to resume, atomic files.

run_clm 4.x refused a non-empty output dir and resumed from its newest checkpoint; transformers 5
removed that, so this module is the one place that decides it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clm_runner.errors import OutputDirError
from clm_runner.rundir.checkpoints import (
    CHECKPOINT_PATTERN,
    DELETING_PREFIX,
    STAGING_PREFIX,
    TRAINER_STATE,
    checkpoint_problem,
    checkpoint_step,
    scan_checkpoints,
    warn_torn,
)
from clm_runner.rundir.evaluations import numbers_of, require_numbers
from clm_runner.rundir.files import (
    default_file_mode,
    give_default_modes,
    read_json,
    write_json_atomic,
    write_text_atomic,
)
from clm_runner.rundir.lock import LOCK_NAME

logger = logging.getLogger("clm_runner")

# Re-exported: callers found checkpoints here before clm_runner.rundir.checkpoints existed.
__all__ = [
    "CHECKPOINT_PATTERN",
    "TRAINER_STATE",
    "checkpoint_step",
    "default_file_mode",
    "give_default_modes",
    "latest_checkpoint",
    "list_checkpoints",
    "read_json",
    "write_json_atomic",
    "run_dir_of",
    "write_text_atomic",
]


RECIPE_FILE = "recipe.toml"
"""The resolved recipe a run was trained with; `eval --run` and `report` read it."""
STAGING_PREFIXES = (STAGING_PREFIX, DELETING_PREFIX)
FINAL_STAGING = "tmp-final"
"""Where the final model is written before its files are renamed into the output dir."""


def run_dir_of(model_dir: Path) -> Path | None:
    """The run a model dir belongs to: itself (an output dir) or its parent (a checkpoint); None if neither."""
    for candidate in (model_dir, model_dir.parent):
        if (candidate / RECIPE_FILE).is_file():
            return candidate
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint-N directories (see clm_runner.rundir.checkpoints), oldest step first; torn ones left out."""
    return list(scan_checkpoints(output_dir).complete)


def latest_checkpoint(output_dir: Path, *, warn: bool = True) -> Path | None:
    """The newest complete checkpoint; torn ones newer than it are skipped with a warning naming each."""
    scan = scan_checkpoints(output_dir)
    newest = scan.newest_complete
    if warn:
        warn_torn(scan.torn_after(checkpoint_step(newest) if newest else None))
    return newest


ARCHIVE_DIR = "previous-runs"
"""Where a run started over with --overwrite moves the run it replaces (nothing is deleted)."""
MANIFEST_NAME = "run.json"
LOG_FILE_NAME = "train.log"
TENSORBOARD_DIR = "runs"
# What one attempt of a run writes before its first checkpoint is sealed: a directory holding only these
# (and staging leftovers) is that run's, and the same command starts it over in place.
EARLY_RUN_FILES = frozenset(
    {MANIFEST_NAME, RECIPE_FILE, LOG_FILE_NAME, TENSORBOARD_DIR, LOCK_NAME, ARCHIVE_DIR}
)
# Names that show a directory holds a clm-runner run (as opposed to files of the user's own).
RUN_MARKERS = (MANIFEST_NAME, RECIPE_FILE, TRAINER_STATE)


@dataclass(frozen=True)
class RunIdentity:
    """What the run about to start is: its resolved recipe (as recipe.toml records it) and its length."""

    resolved: dict[str, Any]
    max_steps: int
    num_train_epochs: float


@dataclass(frozen=True)
class OutputPlan:
    """Where a training run writes, and the checkpoint it continues from (None: from the start)."""

    output_dir: Path
    resume_from: Path | None
    note: str
    action: str = "new"
    """new | resume | restart (the same run, started over in place) | overwrite | complete (nothing to do)"""
    archive: bool = False
    """Move the run the directory holds to previous-runs/<time>/ when this run starts."""
    recipe_changes: tuple[str, ...] = ()
    """Keys whose value differs from the run in the directory ("training.max_steps: 6 -> 12")."""


def is_leftover(name: str) -> bool:
    """What a killed attempt can leave half written: staging dirs and atomic writes' temporary files."""
    return (
        name.startswith(STAGING_PREFIXES)
        or name == FINAL_STAGING
        or (name.startswith(".") and name.endswith(".tmp"))
        or name.startswith(f".{LOCK_NAME}.")  # RunLock's record, written in full before it is linked
    )


def remove_leftovers(output_dir: Path) -> list[Path]:
    """Remove what killed attempts left half written (only call while holding the run's lock)."""
    from clm_runner.rundir.lock import pid_alive

    removed = []
    for path in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        if not is_leftover(path.name):
            continue
        if path.name.startswith(f".{LOCK_NAME}."):
            pid = path.name.rpartition(".")[2]
            if pid.isdigit() and pid_alive(int(pid)):
                continue  # another process taking the lock right now: its own temporary file
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _entries(output_dir: Path) -> list[str]:
    """The directory's entries that make it non-empty (a lock file left by a killed run does not)."""
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name not in (LOCK_NAME, ARCHIVE_DIR))


def _read_manifest(output_dir: Path) -> dict[str, Any] | None:
    try:
        record = read_json(output_dir / MANIFEST_NAME)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recipe_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value differs between two resolved recipes, each as "key: old -> new"."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes: list[str] = []
        for key in sorted(set(old) | set(new)):
            dotted = f"{prefix}.{key}" if prefix else str(key)
            changes.extend(recipe_changes(old.get(key), new.get(key), dotted))
        return changes
    if old != new:
        return [f"{prefix}: {old!r} -> {new!r}"]
    return []


def _finished_steps(output_dir: Path) -> tuple[int, float] | None:
    """(global step, epoch) a finished run reached, from its trainer_state.json."""
    try:
        state = read_json(output_dir / TRAINER_STATE)
        return int(state["global_step"]), float(state.get("epoch") or 0.0)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _extends(identity: RunIdentity, reached: tuple[int, float] | None) -> bool:
    """Whether the recipe asks for more training than a finished run did."""
    if reached is None:
        return False
    step, epoch = reached
    if identity.max_steps > 0:
        return identity.max_steps > step
    return identity.num_train_epochs > epoch + 1e-9


def _shown(entries: list[str]) -> str:
    return ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")


def plan_output_dir(
    output_dir: Path,
    *,
    overwrite: bool = False,
    resume: bool = True,
    resume_from: str | None = None,
    identity: RunIdentity | None = None,
) -> OutputPlan:
    """Decide, before any heavy work, whether and how a run may use `output_dir`. Never deletes anything.

    - new or empty dir: train into it.
    - a finished run with the same length: complete, nothing to do (a longer recipe continues it).
    - complete checkpoints: resume from the newest (--no-resume needs --overwrite, which moves the old run
      to previous-runs/ first, so the two can never mix).
    - only this run's early files (its run.json for the same recipe, log, staging leftovers): start over in
      place, as the same command would have done had the first attempt not been cut short.
    - anything else is refused unless --overwrite.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(
            f"training.output_dir {output_dir} is a file, not a directory. Choose another path."
        )
    manifest = _read_manifest(output_dir)
    changes: tuple[str, ...] = ()
    if identity is not None and manifest is not None and isinstance(manifest.get("recipe"), dict):
        changes = tuple(recipe_changes(manifest["recipe"], identity.resolved))
    if resume_from is not None:
        checkpoint = _complete_resume_point(Path(resume_from), output_dir)
        return OutputPlan(
            output_dir, checkpoint, f"Resuming from {checkpoint} (--resume-from).", "resume", False, changes
        )

    entries = _entries(output_dir)
    if all(is_leftover(name) for name in entries):  # nothing but what a killed start left half written
        return OutputPlan(output_dir, None, f"Training into new output dir {output_dir}.")
    holds_run = any(name in entries for name in RUN_MARKERS) or any(
        checkpoint_step(Path(name)) is not None or is_leftover(name) for name in entries
    )
    if overwrite and not resume:
        return _overwrite_plan(output_dir, changes, holds_run=holds_run)

    finished = manifest is not None and manifest.get("status") == "completed"
    # A run that early stopping ended is complete at fewer steps than it was allowed (resumed with the same
    # [early_stopping], it would stop again at once).
    stopped_early = finished and bool((manifest.get("early_stopping") or {}).get("stopped_early"))
    same_rule = not any(change.startswith("early_stopping") for change in changes)
    extends = _extends(identity, _finished_steps(output_dir)) if identity is not None else False
    if finished and resume and identity is not None and not (extends and not (stopped_early and same_rule)):
        return OutputPlan(output_dir, None, _complete_note(output_dir, changes), "complete", False, changes)

    newest = latest_checkpoint(output_dir, warn=resume)
    if newest is not None and resume:
        note = f"Checkpoint detected: resuming from {newest}. Pass --no-resume --overwrite to start over."
        if changes:
            note += " The recipe differs from the run's in: " + "; ".join(changes) + "."
        return OutputPlan(output_dir, newest, note, "resume", False, changes)
    if newest is not None:
        raise OutputDirError(
            f"Output dir {output_dir} holds checkpoints (newest {newest.name}) and --no-resume was given. "
            f"Add --overwrite to start over (the old run is moved to {output_dir / ARCHIVE_DIR}/, nothing is "
            "deleted), or use another training.output_dir."
        )
    if finished and resume and identity is not None:
        raise OutputDirError(
            f"Output dir {output_dir} holds a finished run and the recipe asks for more training, but the run "
            "kept no checkpoint to continue from (save_strategy). Use another training.output_dir, or pass "
            "--no-resume --overwrite to start over (the old run is moved aside, nothing is deleted)."
        )
    torn = scan_checkpoints(output_dir).torn
    early = all(name in EARLY_RUN_FILES or is_leftover(name) for name in entries)
    if manifest is not None and early and not torn and resume and identity is not None:
        if changes:
            raise OutputDirError(
                f"Output dir {output_dir} holds the start of another run (no checkpoint yet) whose recipe "
                f"differs in: {'; '.join(changes)}. Use the same recipe to start it over, or pass --overwrite "
                "(the old attempt is moved aside, nothing is deleted), or use another training.output_dir."
            )
        return OutputPlan(
            output_dir,
            None,
            f"Output dir {output_dir} holds this run's first attempt, stopped before its first checkpoint: "
            "starting it over in place.",
            "restart",
        )
    if overwrite:
        return _overwrite_plan(output_dir, changes, holds_run=holds_run)
    if torn:
        raise OutputDirError(
            f"Output dir {output_dir} holds only torn checkpoints ({', '.join(p.name for p, _ in torn)}: "
            f"{torn[-1][1]}), none complete to resume. Pass --overwrite to start over (the old files are moved "
            f"to {output_dir / ARCHIVE_DIR}/), or use another training.output_dir."
        )
    raise OutputDirError(
        f"Output dir {output_dir} is not empty ({_shown(entries)}) and has no checkpoint to resume. "
        "Use another training.output_dir (--set training.output_dir=DIR), or pass --overwrite to train into it."
    )


def _overwrite_plan(output_dir: Path, changes: tuple[str, ...], *, holds_run: bool) -> OutputPlan:
    """--overwrite: a run the dir holds is moved aside first; files that are no run stay where they are."""
    if not holds_run:
        return OutputPlan(
            output_dir,
            None,
            f"Training from the start into non-empty {output_dir} (--overwrite).",
            "overwrite",
        )
    return OutputPlan(
        output_dir,
        None,
        f"Starting over in {output_dir} (--overwrite): the run it held is moved to "
        f"{output_dir / ARCHIVE_DIR}/ first; nothing is deleted.",
        "overwrite",
        True,
        changes,
    )


def _complete_note(output_dir: Path, changes: tuple[str, ...]) -> str:
    reached = _finished_steps(output_dir)
    step = f" at step {reached[0]}" if reached else ""
    note = (
        f"Run {output_dir} is complete{step}; its results are in {output_dir / 'all_results.json'}. "
        "Nothing to do: raise training.max_steps or num_train_epochs to train further, or pass "
        "--no-resume --overwrite to start over."
    )
    if changes:
        note += " (The recipe differs from the run's in: " + "; ".join(changes) + ".)"
    return note


def archive_previous_run(output_dir: Path) -> Path | None:
    """Move everything the directory holds (but the lock) to previous-runs/<time>/; returns that folder."""
    entries = _entries(output_dir)
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output_dir / ARCHIVE_DIR / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = output_dir / ARCHIVE_DIR / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    for name in entries:
        os.replace(output_dir / name, target / name)
    logger.warning("Moved the previous run in %s to %s (nothing deleted).", output_dir, target)
    return target


def _complete_resume_point(checkpoint: Path, output_dir: Path) -> Path:
    """--resume-from's checkpoint if complete; if torn, the newest complete one before it (with a warning)."""
    if not checkpoint.is_dir():
        raise OutputDirError(
            f"--resume-from {checkpoint}: not a checkpoint (no such directory). "
            f"Pass a checkpoint-N directory, e.g. {output_dir}/checkpoint-500."
        )
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        return checkpoint
    step = checkpoint_step(checkpoint)
    if step is None:
        raise OutputDirError(
            f"--resume-from {checkpoint}: not a complete checkpoint ({problem}). "
            f"Pass a checkpoint-N directory written by clm-runner, e.g. {output_dir}/checkpoint-500."
        )
    earlier = [p for p in scan_checkpoints(checkpoint.parent).complete if (checkpoint_step(p) or 0) < step]
    if not earlier:
        raise OutputDirError(
            f"--resume-from {checkpoint} is torn ({problem}) and no complete checkpoint precedes it. "
            "Pass another checkpoint, or start over with --no-resume."
        )
    logger.warning(
        "Skipping torn checkpoint %s: %s. Resuming from %s instead.", checkpoint, problem, earlier[-1]
    )
    return earlier[-1]


def save_metrics(output_dir: Path, split: str, metrics: dict[str, Any]) -> None:
    """`{split}_results.json`, merged into `all_results.json` (run_clm's files), each replaced atomically.

    Numbers only, as run_clm's readers expect (how they were computed is in evaluations.json)."""
    require_numbers(metrics, f"{split}_results.json")
    write_json_atomic(output_dir / f"{split}_results.json", metrics)
    combined_path = output_dir / "all_results.json"
    # A run written by an older clm-runner may hold descriptions there: only its numbers are kept.
    combined = numbers_of(read_json(combined_path)) if combined_path.exists() else {}
    combined.update(metrics)
    write_json_atomic(combined_path, combined)
