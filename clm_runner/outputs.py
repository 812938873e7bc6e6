"""The output directory: what may be written where, which checkpoint to resume, atomic files.

run_clm 4.x refused a non-empty output dir and resumed from its newest checkpoint; transformers 5
removed that, so this module is the one place that decides it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clm_runner.checkpoints import (
    CHECKPOINT_PATTERN,
    TRAINER_STATE,
    checkpoint_problem,
    checkpoint_step,
    scan_checkpoints,
    warn_torn,
)
from clm_runner.errors import OutputDirError
from clm_runner.runlock import LOCK_NAME

logger = logging.getLogger("clm_runner")

# Re-exported: callers found checkpoints here before clm_runner.checkpoints existed.
__all__ = ["CHECKPOINT_PATTERN", "TRAINER_STATE", "checkpoint_step", "latest_checkpoint", "list_checkpoints"]


RECIPE_FILE = "recipe.toml"
"""The resolved recipe a run was trained with; `eval --run` and `report` read it."""


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint-N directories (see clm_runner.checkpoints), oldest step first; torn ones left out."""
    return list(scan_checkpoints(output_dir).complete)


def latest_checkpoint(output_dir: Path, *, warn: bool = True) -> Path | None:
    """The newest complete checkpoint; torn ones newer than it are skipped with a warning naming each."""
    scan = scan_checkpoints(output_dir)
    newest = scan.newest_complete
    if warn:
        warn_torn(scan.torn_after(checkpoint_step(newest) if newest else None))
    return newest


@dataclass(frozen=True)
class OutputPlan:
    """Where a training run writes, and the checkpoint it continues from (None: from the start)."""

    output_dir: Path
    resume_from: Path | None
    note: str


def plan_output_dir(
    output_dir: Path, *, overwrite: bool = False, resume: bool = True, resume_from: str | None = None
) -> OutputPlan:
    """Decide, before any heavy work, whether and how a run may use `output_dir`. Never deletes anything."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(
            f"training.output_dir {output_dir} is a file, not a directory. Choose another path."
        )
    if resume_from is not None:
        checkpoint = _complete_resume_point(Path(resume_from), output_dir)
        return OutputPlan(output_dir, checkpoint, f"Resuming from {checkpoint} (--resume-from).")

    # A lock file alone (left by a killed run) does not make a directory non-empty.
    listing = output_dir.iterdir() if output_dir.is_dir() else []
    entries = sorted(p.name for p in listing if p.name != LOCK_NAME)
    if not entries:
        return OutputPlan(output_dir, None, f"Training into new output dir {output_dir}.")

    newest = latest_checkpoint(output_dir, warn=resume)
    if newest is not None and resume:
        return OutputPlan(
            output_dir,
            newest,
            f"Checkpoint detected: resuming from {newest}. Pass --no-resume --overwrite to start over.",
        )
    if overwrite:
        return OutputPlan(
            output_dir, None, f"Training from the start into non-empty {output_dir} (--overwrite)."
        )
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if newest is not None:
        raise OutputDirError(
            f"Output dir {output_dir} holds checkpoints (newest {newest.name}) and --no-resume was given: "
            "starting over would mix old and new checkpoints. Use another training.output_dir, "
            "or add --overwrite to start over in this one."
        )
    torn = scan_checkpoints(output_dir).torn
    if torn:
        raise OutputDirError(
            f"Output dir {output_dir} holds only torn checkpoints ({', '.join(p.name for p, _ in torn)}: "
            f"{torn[-1][1]}), none complete to resume. Pass --overwrite to train from the start into it, "
            "or use another training.output_dir."
        )
    raise OutputDirError(
        f"Output dir {output_dir} is not empty ({shown}) and has no checkpoint to resume. "
        "Use another training.output_dir (--set training.output_dir=DIR), or pass --overwrite to train into it."
    )


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


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would (0666 less umask).
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=4, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save_metrics(output_dir: Path, split: str, metrics: dict[str, Any]) -> None:
    """`{split}_results.json`, merged into `all_results.json` (run_clm's files), each replaced atomically."""
    write_json_atomic(output_dir / f"{split}_results.json", metrics)
    combined_path = output_dir / "all_results.json"
    combined = read_json(combined_path) if combined_path.exists() else {}
    combined.update(metrics)
    write_json_atomic(combined_path, combined)
