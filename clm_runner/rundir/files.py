"""Files in a run dir: written whole or not at all (temporary name, fsync, rename), with the usual permissions."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from clm_runner import faults


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


def default_file_mode() -> int:
    """The mode a plain open() gives a new file here (0666 less the umask)."""
    return 0o666 & ~_UMASK


def give_default_modes(directory: Path, *, since: float | None = None) -> None:
    """Give every file under `directory` (modified at or after `since`) the mode a plain open() would.

    The safetensors writer creates its files 0600; on a shared cluster colleagues could then read a run's
    metrics but not load its model. Files older than `since` (not this attempt's) are left alone.
    """
    mode = default_file_mode()
    for path in directory.rglob("*"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if not path.is_file() or path.is_symlink() or (since is not None and info.st_mtime < since - 1):
            continue
        if info.st_mode & 0o777 != mode and info.st_uid == os.getuid():
            with contextlib.suppress(OSError):
                os.chmod(path, mode)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list must reach the disk for a rename to last)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse to open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


ATOMIC_TEMPORARY = ".{name}.*.tmp"
"""What write_text_atomic's temporary files look like (a kill can leave one; the next start removes it)."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file (nor, after a crash, none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would (0666 less umask).
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        faults.point(f"write.{path.name}", path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=4, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
