"""The output directory: what may be written where, which checkpoint to resume, atomic files.

run_clm 4.x refused a non-empty output dir and resumed from its newest checkpoint; transformers 5
removed that, so this module is the one place that decides it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clm_runner.errors import OutputDirError
from clm_runner.rundir.branch import (
    ARCHIVE_DIR,
    archive,
    began_at,
    later_entries,
    leave_line,
    origin_record,
    restart_point,
    resume_point,
    shown,
)
from clm_runner.rundir.changes import changes_since, changes_what_is_trained, compare_length
from clm_runner.rundir.checkpoints import (
    CHECKPOINT_PATTERN,
    TRAINER_STATE,
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
from clm_runner.rundir.leftovers import FINAL_STAGING, is_leftover, remove_leftovers
from clm_runner.rundir.lock import LOCK_NAME

logger = logging.getLogger("clm_runner")

# Re-exported: callers found checkpoints here before clm_runner.rundir.checkpoints existed.
__all__ = [
    "CHECKPOINT_PATTERN",
    "FINAL_STAGING",
    "TRAINER_STATE",
    "checkpoint_step",
    "default_file_mode",
    "give_default_modes",
    "latest_checkpoint",
    "list_checkpoints",
    "read_json",
    "remove_leftovers",
    "write_json_atomic",
    "run_dir_of",
    "write_text_atomic",
]


RECIPE_FILE = "recipe.toml"
"""The resolved recipe a run was trained with; `eval --run` and `report` read it."""


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
# What a branch continues rather than leaves behind: the run's record, recipe and logs.
LINE_FILES = frozenset({MANIFEST_NAME, RECIPE_FILE, LOG_FILE_NAME, TENSORBOARD_DIR})


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
    set_aside: tuple[str, ...] = ()
    """A branch: what of the line it leaves moves to previous-runs/<time>/ when this run starts."""
    branched_from: Mapping[str, Any] | None = None
    """The checkpoint named to resume from (run.json's branched_from), None for every other start."""


def _entries(output_dir: Path) -> list[str]:
    """The directory's entries that make it non-empty (a lock file left by a killed run does not)."""
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name not in (LOCK_NAME, ARCHIVE_DIR))


def _holds_run(entries: list[str]) -> bool:
    return any(name in entries for name in RUN_MARKERS) or any(
        checkpoint_step(Path(name)) is not None or is_leftover(name) for name in entries
    )


def _read_manifest(output_dir: Path) -> dict[str, Any] | None:
    try:
        record = read_json(output_dir / MANIFEST_NAME)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _finished_steps(output_dir: Path) -> tuple[int, float] | None:
    """(global step, epoch) a finished run reached, from its trainer_state.json."""
    try:
        state = read_json(output_dir / TRAINER_STATE)
        return int(state["global_step"]), float(state.get("epoch") or 0.0)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan_output_dir(
    output_dir: Path,
    *,
    overwrite: bool = False,
    resume: bool = True,
    resume_from: str | None = None,
    recipe_resume_from: str | None = None,
    identity: RunIdentity | None = None,
) -> OutputPlan:
    """Decide, before any heavy work, whether and how a run may use `output_dir`. Never deletes anything.

    - new or empty dir: train into it.
    - a finished run with the same length: complete, nothing to do (a longer recipe continues it).
    - complete checkpoints: resume from the newest (--no-resume needs --overwrite, which moves the old run
      to previous-runs/ first, so the two can never mix).
    - `resume_from` (--resume-from) names a checkpoint: resume from it, a branch when the dir holds more of
      the line it leaves (see clm_runner.rundir.branch). `recipe_resume_from` (the recipe's
      resume_from_checkpoint) does the same, unless the dir's line began there: then the line continues.
    - only this run's early files (its run.json for the same recipe, log, staging leftovers): start over in
      place, as the same command would have done had the first attempt not been cut short.
    - anything else is refused unless --overwrite.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(
            f"training.output_dir {output_dir} is a file, not a directory. Choose another path."
        )
    manifest = _read_manifest(output_dir)
    changes = changes_since(manifest, identity.resolved if identity is not None else None)
    if (
        resume_from is None
        and recipe_resume_from
        and not began_at(manifest, Path(recipe_resume_from), output_dir)
    ):
        resume_from = recipe_resume_from
    if resume_from is not None:
        return _named_checkpoint_plan(output_dir, Path(resume_from), manifest, changes, overwrite=overwrite)

    entries = _entries(output_dir)
    if all(is_leftover(name) for name in entries):  # nothing but what a killed start left half written
        return OutputPlan(output_dir, None, f"Training into new output dir {output_dir}.")
    holds_run = _holds_run(entries)
    if overwrite and not resume:
        return _overwrite_plan(output_dir, changes, holds_run=holds_run)

    # Completed, and its end is still there (a branch that moved it aside and was cut short is not).
    reached = _finished_steps(output_dir)
    finished = manifest is not None and manifest.get("status") == "completed" and reached is not None
    # A run that early stopping ended is complete at fewer steps than it was allowed (resumed with the same
    # [early_stopping], it would stop again at once).
    stopped_early = finished and bool((manifest.get("early_stopping") or {}).get("stopped_early"))
    same_rule = not any(change.startswith("early_stopping") for change in changes)
    length = 0
    if identity is not None:
        length = compare_length(identity.max_steps, identity.num_train_epochs, reached)
    if (
        finished
        and resume
        and identity is not None
        and not (length > 0 and not (stopped_early and same_rule))
    ):
        # Nothing to train: unless the recipe asks for another run than the one the dir holds.
        different = changes_what_is_trained(changes, shorter=length < 0)
        if different:
            raise OutputDirError(
                f"Output dir {output_dir} holds a finished run and the recipe changes what it would train: "
                f"{'; '.join(different)}. Use another training.output_dir, or pass --no-resume --overwrite to "
                "start over there (the finished run is moved to previous-runs/, nothing is deleted)."
            )
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
        origin = restart_point(manifest, output_dir)
        if origin is not None:  # begun from a named checkpoint (run.json's branched_from): from it again
            return OutputPlan(
                output_dir,
                origin,
                f"Output dir {output_dir} holds this run's first attempt, begun from {origin} and stopped "
                f"before its first checkpoint: resuming from {origin} again.",
                "resume",
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
        f"Output dir {output_dir} is not empty ({shown(entries)}) and has no checkpoint to resume. "
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
    target = archive(output_dir, _entries(output_dir))
    if target is not None:
        logger.warning("Moved the previous run in %s to %s (nothing deleted).", output_dir, target)
    return target


def move_aside(plan: OutputPlan) -> Path | None:
    """When a run starts: the run it replaces (--overwrite) or the line it leaves (a branch) moves to
    previous-runs/<time>/, so nothing of it is resumed or rotated; returns that folder."""
    if plan.archive:
        return archive_previous_run(plan.output_dir)
    if plan.set_aside:
        copies = (MANIFEST_NAME, RECIPE_FILE)
        return leave_line(plan.output_dir, plan.set_aside, plan.resume_from, copies=copies)
    return None


def _kept_by_a_branch(name: str) -> bool:
    return name in LINE_FILES or is_leftover(name)


def _named_checkpoint_plan(
    output_dir: Path,
    named: Path,
    manifest: dict[str, Any] | None,
    changes: tuple[str, ...],
    *,
    overwrite: bool,
) -> OutputPlan:
    """Resume from a named checkpoint: of this dir's line (a branch when the dir holds more of it), or of
    another run dir into an empty one (or one whose line began there); any other dir would mix two runs."""
    checkpoint = resume_point(named, output_dir)
    origin = origin_record(checkpoint, output_dir)
    entries = _entries(output_dir)
    note = f"Resuming from {checkpoint} (--resume-from)."
    same_line = origin["in_run_dir"] or began_at(manifest, checkpoint, output_dir)
    if same_line or all(is_leftover(name) for name in entries):
        reached = _finished_steps(output_dir)
        aside = later_entries(entries, origin["step"], reached[0] if reached else None, _kept_by_a_branch)
        if aside:
            note += (
                f" A branch: the line it leaves ({shown(aside)}) is moved to {output_dir / ARCHIVE_DIR}/ when "
                "training starts; nothing is deleted."
            )
        return OutputPlan(output_dir, checkpoint, note, "resume", False, changes, aside, origin)
    holds_run = _holds_run(entries)
    if not overwrite:
        what, fix = ("another run", "to move that run to previous-runs/ first (nothing is deleted)")
        if not holds_run:
            what, fix = f"files that are not a run ({shown(entries)})", "to train into it"
        raise OutputDirError(
            f"Output dir {output_dir} holds {what}: resuming {checkpoint} into it would mix the two. Use "
            f"another training.output_dir, or pass --overwrite {fix}."
        )
    plan = _overwrite_plan(output_dir, changes, holds_run=holds_run)
    return dataclasses.replace(plan, resume_from=checkpoint, note=f"{note} {plan.note}", branched_from=origin)


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
