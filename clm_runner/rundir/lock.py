"""One run per output dir: a lock file naming the process that uses it, taken over only when that process is gone.

The lock file `.clm-runner.lock` holds the owner's pid, host, command and start time. It appears
atomically (written in full under a temporary name, then hard-linked into place, which fails if a lock
exists) and its owner holds an flock on it for as long as it lives. An existing lock is live when it is
flocked; where it is not, its owner on this host is gone even if another program now has its pid. Only on a
file system without flock does the pid decide. A lock from another host cannot be checked and counts as live.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from clm_runner.errors import OutputDirError

logger = logging.getLogger("clm_runner")

LOCK_NAME = ".clm-runner.lock"

# Paths this process holds right now; a lock naming this pid but not listed here is a leftover.
_HELD: set[Path] = set()


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    command: str
    started_at: float

    def describe(self) -> str:
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at)) if self.started_at else "?"
        )
        command = f", running `{self.command}`" if self.command else ""
        return f"pid {self.pid} on {self.host} (since {started}{command})"


def lock_path(output_dir: Path) -> Path:
    return output_dir / LOCK_NAME


def read_owner(path: Path) -> LockOwner | None:
    """The owner recorded in a lock file; None if there is none or it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockOwner(
            pid=int(data["pid"]),
            host=str(data.get("host", "")),
            command=str(data.get("command", "")),
            started_at=float(data.get("started_at", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def flock_held(path: Path) -> bool | None:
    """Whether a process holds an flock on `path`: True, False, or None where the file system has no flock
    (or the file cannot be opened), and only the pid can tell."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without flock: fall back to the pid test
        return None
    finally:
        os.close(fd)
    return False


def owner_is_live(owner: LockOwner | None, path: Path) -> bool:
    held = flock_held(path)
    if held:
        return True
    if owner is None:
        return False
    if owner.host != socket.gethostname():
        return True  # cannot look at another machine's processes: assume it is still running
    if held is False:
        # Its owner holds the flock for as long as it lives: free means dead, even where the pid now runs
        # another program (pids are reused).
        return False
    if owner.pid == os.getpid():
        return path.resolve() in _HELD
    return pid_alive(owner.pid)


def _in_use_error(output_dir: Path, owner: LockOwner | None) -> OutputDirError:
    who = owner.describe() if owner else "another process (its lock file is unreadable)"
    return OutputDirError(
        f"Output dir {output_dir} is in use by {who}. Wait for that run to finish or stop it, or use another "
        f"training.output_dir. If that process is really gone, delete {lock_path(output_dir)}."
    )


def ensure_free(output_dir: Path) -> None:
    """Refuse at once (before any work) when a live process holds the output dir. Changes nothing."""
    path = lock_path(output_dir)
    if not path.exists():
        return
    owner = read_owner(path)
    if owner_is_live(owner, path):
        raise _in_use_error(output_dir, owner)


class RunLock:
    """The held lock of one output dir; release() (or the context manager) gives it back."""

    def __init__(self, output_dir: Path, fd: int) -> None:
        self.output_dir = output_dir
        self.path = lock_path(output_dir)
        self._fd: int | None = fd
        _HELD.add(self.path.resolve())
        from clm_runner import faults

        faults.point("startup.lock", self.path)

    @classmethod
    def acquire(cls, output_dir: Path, command: str = "") -> RunLock:
        """Take the output dir's lock (creating the directory), taking over a stale one with a warning."""
        output_dir.mkdir(parents=True, exist_ok=True)
        path = lock_path(output_dir)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started_at": time.time(),
        }
        temp = output_dir / f".{LOCK_NAME}.{os.getpid()}"
        fd = _write_flocked(temp, record)
        try:
            for _ in range(5):
                try:
                    os.link(temp, path)  # fails if any lock exists: never two owners
                    return cls(output_dir, fd)
                except FileExistsError:
                    pass
                owner = read_owner(path)
                if owner_is_live(owner, path):
                    raise _in_use_error(output_dir, owner)
                if _take_over(path, temp, owner):
                    return cls(output_dir, fd)
                time.sleep(0.05)  # the lock changed between our looks: look again
            raise _in_use_error(output_dir, read_owner(path))
        except BaseException:
            os.close(fd)
            raise
        finally:
            temp.unlink(missing_ok=True)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # Remove only our own lock file, never one a successor wrote.
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None
            _HELD.discard(self.path.resolve())

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _write_flocked(temp: Path, record: dict) -> int:
    """Our lock record, complete and flocked, under a temporary name: linking it publishes it whole."""
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    with contextlib.suppress(OSError):  # no flock on this filesystem: the pid test still works
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
    os.fsync(fd)
    return fd


def _take_over(path: Path, temp: Path, owner: LockOwner | None) -> bool:
    """Rename our record over a stale lock; False if it changed meanwhile (another process was first)."""
    try:
        stale_fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            # Holding the stale file's flock keeps a second taker-over from judging it stale too.
            fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            pass
        if not path.exists() or os.stat(path).st_ino != os.fstat(stale_fd).st_ino:
            return False
        os.replace(temp, path)
    finally:
        os.close(stale_fd)
    who = owner.describe() if owner else "an unreadable owner"
    logger.warning("Taking over the stale lock of %s in %s: that process is gone.", who, path.parent)
    return True
