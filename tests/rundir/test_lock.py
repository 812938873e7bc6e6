"""The run lock trusts its flock: a dead owner whose pid now belongs to another process does not block a run."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clm_runner.errors import OutputDirError
from clm_runner.rundir.leftovers import remove_leftovers
from clm_runner.rundir.lock import LOCK_NAME, RunLock, ensure_free, read_owner


@pytest.fixture
def unrelated_pid() -> Iterator[int]:
    """A live process that is no clm-runner run: what a dead owner's pid can belong to once reused."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def stale_lock(run: Path, pid: int) -> Path:
    """A lock file as a run killed by SIGKILL leaves it: its record, nobody holding its flock."""
    run.mkdir(exist_ok=True)
    record = {
        "pid": pid,
        "host": socket.gethostname(),
        "command": "clm-runner train old",
        "started_at": time.time(),
    }
    (run / LOCK_NAME).write_text(json.dumps(record))
    return run / LOCK_NAME


def test_a_lock_whose_pid_was_reused_by_an_unrelated_process_is_taken_over(
    tmp_path: Path, unrelated_pid: int
) -> None:
    run = tmp_path / "run"
    stale_lock(run, unrelated_pid)
    ensure_free(run)  # the flock is free: its owner is gone, whatever runs under that pid now
    with RunLock.acquire(run, "me") as lock:
        assert read_owner(lock.path).pid == os.getpid()
    assert not (run / LOCK_NAME).exists()


def test_a_lock_whose_flock_is_held_is_live_whatever_its_pid(tmp_path: Path) -> None:
    run = tmp_path / "run"
    path = stale_lock(run, 999_999_999)  # a pid no process has
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as its owner holds it for as long as it lives
        with pytest.raises(OutputDirError, match="is in use by pid 999999999"):
            ensure_free(run)
    finally:
        os.close(fd)
    ensure_free(run)


def test_without_flock_the_pid_decides(
    tmp_path: Path, unrelated_pid: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without flock (some network mounts): a live pid must be taken as the owner."""

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    stale_lock(run, unrelated_pid)
    with pytest.raises(OutputDirError, match=f"is in use by pid {unrelated_pid}"):
        ensure_free(run)
    stale_lock(run, 999_999_999)
    ensure_free(run)


def test_a_leftover_lock_record_whose_pid_was_reused_is_removed(tmp_path: Path, unrelated_pid: int) -> None:
    """RunLock writes its record as ..clm-runner.lock.PID (flocked) before linking it: a kill leaves it."""
    run = tmp_path / "run"
    run.mkdir()
    left = run / f".{LOCK_NAME}.{unrelated_pid}"
    left.write_text("{}")
    taking = run / f".{LOCK_NAME}.{os.getpid()}"  # a process taking the lock right now: flocked, kept
    taking.write_text("{}")
    fd = os.open(taking, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert remove_leftovers(run) == [left]
    finally:
        os.close(fd)
    assert taking.exists()
