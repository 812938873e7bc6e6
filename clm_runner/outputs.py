"""The output directory: what may be written where, which checkpoint to resume, atomic files.

run_clm 4.x refused a non-empty output dir and resumed from its newest checkpoint; transformers 5
removed that, so this module is the one place that decides it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clm_runner.errors import OutputDirError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N directories that hold a trainer state, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [
        p
        for p in output_dir.iterdir()
        if p.is_dir() and checkpoint_step(p) is not None and (p / "trainer_state.json").exists()
    ]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


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
        checkpoint = Path(resume_from)
        if not (checkpoint / "trainer_state.json").exists():
            raise OutputDirError(
                f"--resume-from {checkpoint}: not a checkpoint (no trainer_state.json). "
                f"Pass a checkpoint-N directory, e.g. {output_dir}/checkpoint-500."
            )
        return OutputPlan(output_dir, checkpoint, f"Resuming from {checkpoint} (--resume-from).")

    entries = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if not entries:
        return OutputPlan(output_dir, None, f"Training into new output dir {output_dir}.")

    newest = latest_checkpoint(output_dir)
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
    raise OutputDirError(
        f"Output dir {output_dir} is not empty ({shown}) and has no checkpoint to resume. "
        "Use another training.output_dir (--set training.output_dir=DIR), or pass --overwrite to train into it."
    )


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
