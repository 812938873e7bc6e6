"""A disk that fails a run (full, read-only, permissions gone) as one line that names the path and the way on.

The run's checkpoints are sealed before they count, so whatever write failed, the last sealed checkpoint
is intact and the same command resumes from it once the cause is gone.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from clm_runner.errors import ClmError

FULL = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
# What torch.save and the safetensors writer say when a write fails for lack of space.
FULL_MESSAGES = ("No space left on device", "file write failed", "Disk quota exceeded")


class StorageError(ClmError):
    """Writing into the output dir failed (disk full, read-only, permissions): the attempt ends, resumable."""

    exit_code = 1


def _chain(exc: BaseException):
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _free(path: Path) -> str:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**30:.2f} GiB free" if free >= 2**30 else f"{free / 2**20:.1f} MiB free"


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def storage_error(exc: BaseException, output_dir: Path) -> StorageError | None:
    """The one-line error for a failed write into the run, or None when `exc` is something else."""
    from clm_runner.rundir.policy import latest_checkpoint

    for cause in _chain(exc):
        code = getattr(cause, "errno", None)
        text = str(cause)
        full = code in FULL or (code is None and any(m in text for m in FULL_MESSAGES))
        denied = code in DENIED
        if not (full or denied):
            continue
        path = Path(getattr(cause, "filename", None) or output_dir)
        if denied and not _inside(path, output_dir):
            continue  # not a write into the run (an unreadable data file is another error)
        newest = latest_checkpoint(output_dir, warn=False)
        kept = (
            f"the last sealed checkpoint, {newest.name}, is intact"
            if newest is not None
            else "no checkpoint was sealed yet"
        )
        if full:
            what = f"No space left on the device writing {path} ({_free(path)})"
            fix = "free some space"
        elif code == errno.EROFS:
            what = f"The file system is read-only writing {path}"
            fix = "make it writable"
        else:
            what = f"Permission denied writing {path}"
            fix = f"give this user write access to {output_dir}"
        return StorageError(
            f"{what}: this attempt stopped; {kept}. {fix[0].upper()}{fix[1:]} and run the same command to resume."
        )
    return None
