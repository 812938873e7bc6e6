"""Resuming from a named checkpoint: a branch when the run dir holds more of the line it leaves, moved aside whole.

`train --resume-from RUN/checkpoint-K` on a dir that holds checkpoints after K, or a finished run's model and
results, starts a new line at K. When that run starts (not before: a refused or failed start changes nothing)
the old line's later checkpoints and final files move to `previous-runs/TIME/`, as `--no-resume --overwrite`
moves a whole run, so rotation, the printed resume command and a plain rerun see only the new line. Newest
then means the newest of this line, whatever the step numbers of the line it left.

run.json records the named checkpoint as `branched_from`: a line begun from a checkpoint in another run dir
and stopped before its first checkpoint starts from it again, and `training.resume_from_checkpoint` in a
recipe (a line's start, read on every rerun) continues the line that began there instead of branching again.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from clm_runner.errors import OutputDirError
from clm_runner.rundir.checkpoints import (
    checkpoint_problem,
    checkpoint_step,
    read_marker,
    scan_checkpoints,
)

logger = logging.getLogger("clm_runner")

ARCHIVE_DIR = "previous-runs"
"""Where a run started over with --overwrite, or the line a branch leaves, is moved (nothing is deleted)."""


def resume_point(checkpoint: Path, output_dir: Path) -> Path:
    """A named checkpoint if complete; if torn, the newest complete one before it (with a warning)."""
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


def step_of(checkpoint: Path) -> int:
    """The global step a complete checkpoint holds (its name, else its marker)."""
    step = checkpoint_step(checkpoint)
    if step is None:
        step = int(read_marker(checkpoint).get("step") or 0)
    return step


def inside(checkpoint: Path, output_dir: Path) -> bool:
    return checkpoint.absolute().parent.resolve() == output_dir.absolute().resolve()


def origin_record(checkpoint: Path, output_dir: Path) -> dict[str, Any]:
    """What run.json's `branched_from` says of the checkpoint a line was started from by name."""
    return {
        "checkpoint": os.path.abspath(checkpoint),
        "step": step_of(checkpoint),
        "in_run_dir": inside(checkpoint, output_dir),
        "previous_line": None,
    }


def line_origin(manifest: Mapping[str, Any] | None, output_dir: Path) -> Path | None:
    """The checkpoint the run dir's line was started from by name (run.json's branched_from), if any.

    A checkpoint inside the run dir is found by its name there, so a moved run dir still knows it.
    """
    record = (manifest or {}).get("branched_from")
    if not isinstance(record, Mapping) or not record.get("checkpoint"):
        return None
    recorded = Path(str(record["checkpoint"]))
    return output_dir / recorded.name if record.get("in_run_dir") else recorded


def began_at(manifest: Mapping[str, Any] | None, checkpoint: Path, output_dir: Path) -> bool:
    """Whether the run dir's line was started from `checkpoint`."""
    origin = line_origin(manifest, output_dir)
    return origin is not None and origin.absolute().resolve() == checkpoint.absolute().resolve()


def restart_point(manifest: Mapping[str, Any] | None, output_dir: Path) -> Path | None:
    """Where a line begun from a named checkpoint and stopped before its first one starts again (None: from
    scratch, it named none)."""
    origin = line_origin(manifest, output_dir)
    if origin is None:
        return None
    if not origin.is_dir():
        raise OutputDirError(
            f"Output dir {output_dir} holds the start of a run begun from {origin}, which is gone. Name "
            "another checkpoint with --resume-from, or pass --no-resume --overwrite to start over."
        )
    return resume_point(origin, output_dir)


def later_entries(
    entries: Iterable[str], step: int, finished_step: int | None, keep: Callable[[str], bool]
) -> tuple[str, ...]:
    """What of a run dir belongs to its line after `step`: nothing, unless the line went further than it.

    Then: every checkpoint after `step` (complete or torn) and every file of the line's end (final model,
    results, trainer state, model card, evaluations), but not the checkpoints up to `step` and not what
    `keep` names (the run's record, recipe and log, which the branch continues).
    """
    entries = list(entries)
    steps = {name: checkpoint_step(Path(name)) for name in entries}
    later = [name for name, s in steps.items() if s is not None and s > step]
    if not later and not (finished_step is not None and finished_step > step):
        return ()
    later.sort(key=lambda name: steps[name] or 0)
    return (*later, *(name for name in entries if steps[name] is None and not keep(name)))


def archive(output_dir: Path, names: Iterable[str], *, copies: Iterable[str] = ()) -> Path | None:
    """Move `names` of the run dir to previous-runs/<time>/ (`copies` are copied); returns that folder."""
    names = [name for name in names if (output_dir / name).exists() or (output_dir / name).is_symlink()]
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output_dir / ARCHIVE_DIR / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = output_dir / ARCHIVE_DIR / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    for name in copies:
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, target / name)
    for name in names:
        os.replace(output_dir / name, target / name)
    return target


def leave_line(output_dir: Path, names: Iterable[str], point: Path, *, copies: Iterable[str]) -> Path | None:
    """A branch starts: the line it leaves moves aside (`copies`, the run's record and recipe, copied along)."""
    names = list(names)
    target = archive(output_dir, names, copies=copies)
    if target is not None:
        logger.warning(
            "Branching from %s: moved the line it leaves (%s) to %s (nothing deleted).",
            point,
            shown(names),
            target,
        )
    return target


def shown(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
