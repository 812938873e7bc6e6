"""Checkpoints that are whole or absent: staged under a temporary name, sealed with a marker, renamed in place.

Upstream Trainer writes `checkpoint-N` in place, so a kill during a save leaves a torn directory that
`get_last_checkpoint` still picks. Here a checkpoint is written to `tmp-checkpoint-N`, every file is
fsynced, a marker listing each file and its size is written last, and only then is the directory renamed
to `checkpoint-N` (rename is atomic on one filesystem). A directory is complete when its marker is there
and every listed file has its listed size; anything else is torn and never resumed from or counted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clm_runner import faults
from clm_runner.errors import OutputDirError
from clm_runner.rundir.files import default_file_mode, fsync_path

logger = logging.getLogger("clm_runner")

MARKER = "clm_runner_complete.json"
TRAINER_STATE = "trainer_state.json"
"""The Trainer's state and log history, in the run dir and in each checkpoint."""
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = "tmp-checkpoint-"
DELETING_PREFIX = "tmp-deleting-checkpoint-"
MARKER_FORMAT = 1


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def staging_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"{STAGING_PREFIX}{step}"


# ---------------------------------------------------------------------------------------------------
# Completeness


def read_marker(path: Path) -> dict[str, Any]:
    """A complete checkpoint's marker (its files and the facts its run recorded); {} when unreadable."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (None: it is). Reads only the marker and file sizes."""
    if not path.is_dir():
        return "not a directory"
    marker = path / MARKER
    if not marker.is_file():
        return f"no completion marker ({MARKER}): its save was interrupted"
    try:
        listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
        if not isinstance(listed, dict):
            raise TypeError("files is not a table")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable completion marker ({exc})"
    if TRAINER_STATE not in listed:
        return "its marker lists no trainer_state.json"
    for name, size in listed.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} is {actual:,} bytes, expected {size:,} (truncated or changed)"
    return None


@dataclass(frozen=True)
class CheckpointScan:
    """The checkpoint-N directories of a run dir, oldest step first, split into complete and torn."""

    complete: tuple[Path, ...]
    torn: tuple[tuple[Path, str], ...]
    """(directory, why it is torn)"""

    @property
    def newest_complete(self) -> Path | None:
        return self.complete[-1] if self.complete else None

    def torn_after(self, step: int | None) -> list[tuple[Path, str]]:
        """Torn checkpoints newer than `step` (all of them when step is None): the ones a resume skips."""
        return [(p, why) for p, why in self.torn if step is None or (checkpoint_step(p) or 0) > step]


def scan_checkpoints(run_dir: Path) -> CheckpointScan:
    if not run_dir.is_dir():
        return CheckpointScan((), ())
    found = sorted(
        (p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
        key=lambda p: checkpoint_step(p) or 0,
    )
    complete: list[Path] = []
    torn: list[tuple[Path, str]] = []
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append(path)
        else:
            torn.append((path, problem))
    return CheckpointScan(tuple(complete), tuple(torn))


def warn_torn(torn: list[tuple[Path, str]], warn: Callable[[str], Any] = logger.warning) -> None:
    for path, why in torn:
        warn(f"Skipping torn checkpoint {path}: {why}.")


# ---------------------------------------------------------------------------------------------------
# Sealing


def seal_checkpoint(staging: Path, final: Path, *, step: int, facts: dict[str, Any] | None = None) -> Path:
    """Make the fully written `staging` directory the complete checkpoint `final`, atomically.

    Every file is fsynced, the marker (file names and sizes) is written last, then one rename publishes
    it. A `final` already there (the same step saved twice) is moved aside first and removed after.
    """
    files: dict[str, int] = {}
    mode = default_file_mode()
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        if file.name == MARKER:
            continue
        # The safetensors writer makes its files private (0600); the team may read every other file.
        os.chmod(file, mode)
        fsync_path(file)
        files[file.relative_to(staging).as_posix()] = file.stat().st_size
    for directory in sorted({p.parent for p in staging.rglob("*")} | {staging}, key=lambda p: -len(p.parts)):
        fsync_path(directory)
    marker = {
        "format": MARKER_FORMAT,
        "step": step,
        "sealed_at": time.time(),
        "files": files,
        **(facts or {}),
    }
    marker_path = staging / MARKER
    with open(marker_path, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_path(staging)
    faults.point("checkpoint.marker", marker_path)

    run_dir = final.parent
    replaced = None
    if final.exists():
        replaced = run_dir / f"{DELETING_PREFIX}{step}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    fsync_path(run_dir)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    faults.point("checkpoint.renamed", final)
    return final


def remove_stale_temporaries(run_dir: Path, *, keep: Path | None = None) -> list[Path]:
    """Temporary checkpoint dirs left by a killed process (only call while holding the run's lock)."""
    removed = []
    if not run_dir.is_dir():
        return removed
    for path in run_dir.iterdir():
        if path == keep or not path.is_dir():
            continue
        if path.name.startswith((STAGING_PREFIX, DELETING_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def delete_checkpoint(path: Path) -> None:
    """Rename first, so a kill mid-delete leaves a temporary dir, never a half-deleted checkpoint-N."""
    step = checkpoint_step(path)
    doomed = path.parent / f"{DELETING_PREFIX}{step}"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    faults.point("rotation.delete", doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate_checkpoints(run_dir: Path, limit: int | None, *, best: Path | None = None) -> list[Path]:
    """Keep at most `limit` complete checkpoints; never delete the newest complete one or the best one.

    Torn and temporary directories are neither counted nor deleted here: they were never a checkpoint.
    """
    if limit is None or limit <= 0:
        return []
    complete = list(scan_checkpoints(run_dir).complete)
    if len(complete) <= limit:
        return []
    protected = {complete[-1].resolve()}
    if best is not None:
        protected.add(Path(best).resolve())
    keep = max(limit, len(protected & {p.resolve() for p in complete}))
    deleted: list[Path] = []
    remaining = len(complete)
    for path in complete:
        if remaining <= keep:
            break
        if path.resolve() in protected:
            continue
        logger.info("Deleting older checkpoint %s (training.save_total_limit = %d).", path, limit)
        delete_checkpoint(path)
        deleted.append(path)
        remaining -= 1
    return deleted


def resolve_checkpoint(run_dir: Path | None, checkpoint: str) -> Path:
    """--checkpoint as given, else looked up inside the run ("checkpoint-6" means RUN/checkpoint-6)."""
    given = Path(checkpoint)
    if given.is_dir():
        return given
    if run_dir is not None and (run_dir / checkpoint).is_dir():
        return run_dir / checkpoint
    where = f" (nor {run_dir / checkpoint})" if run_dir is not None else ""
    known = [p.name for p in scan_checkpoints(run_dir).complete] if run_dir is not None else []
    listing = f" Checkpoints of {run_dir}: {', '.join(known)}." if known else ""
    raise OutputDirError(f"--checkpoint {checkpoint}: no such directory{where}.{listing}")
