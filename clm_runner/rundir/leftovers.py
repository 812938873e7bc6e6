"""What killed attempts leave half written in a run dir (staging dirs, temporary files), and removing it."""

from __future__ import annotations

import shutil
from pathlib import Path

from clm_runner.rundir.checkpoints import DELETING_PREFIX, STAGING_PREFIX
from clm_runner.rundir.lock import LOCK_NAME

STAGING_PREFIXES = (STAGING_PREFIX, DELETING_PREFIX)
FINAL_STAGING = "tmp-final"
"""Where the final model is written before its files are renamed into the output dir."""


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
    from clm_runner.rundir.lock import flock_held, pid_alive

    removed = []
    for path in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        if not is_leftover(path.name):
            continue
        if path.name.startswith(f".{LOCK_NAME}."):
            # Another process taking the lock right now holds its record's flock (without flock: its pid).
            pid = path.name.rpartition(".")[2]
            held = flock_held(path)
            if held or (held is None and pid.isdigit() and pid_alive(int(pid))):
                continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
