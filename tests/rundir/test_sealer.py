"""The background sealer: one job in flight at a time, in order, its errors raised on the thread that waits."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from clm_runner.rundir.sealer import Sealer
from clm_runner.rundir.storage import storage_error


def test_at_most_one_job_is_in_flight_and_jobs_run_in_order() -> None:
    sealer = Sealer()
    active, most, order = [0], [0], []
    lock = threading.Lock()

    def job(n: int) -> None:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)  # long enough that a second job started meanwhile would overlap this one
        order.append(n)
        with lock:
            active[0] -= 1

    for n in range(4):
        sealer.submit(lambda n=n: job(n), name=f"job {n}")
    sealer.wait()
    assert most[0] == 1 and order == [0, 1, 2, 3]
    assert not sealer.in_flight


def test_submit_returns_while_the_job_runs_and_wait_blocks_until_it_is_done() -> None:
    sealer = Sealer()
    release, done = threading.Event(), threading.Event()
    sealer.submit(lambda: (release.wait(10), done.set()), name="slow")
    assert sealer.in_flight and not done.is_set()  # the caller goes on while the job waits
    threading.Timer(0.05, release.set).start()
    sealer.wait()
    assert done.is_set() and not sealer.in_flight


def test_an_error_in_the_background_is_raised_where_the_run_waits_as_the_storage_error(
    tmp_path: Path,
) -> None:
    sealer = Sealer()
    marker = tmp_path / "tmp-checkpoint-8" / "clm_runner_complete.json"

    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(marker))

    sealer.submit(full_disk, name="checkpoint-8")
    with pytest.raises(OSError) as raised:
        sealer.wait()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(marker)
    message = str(storage_error(raised.value, tmp_path))
    assert message.startswith(f"No space left on the device writing {marker}")
    sealer.wait()  # raised once: the sealer is ready for the next checkpoint
    sealer.submit(lambda: None, name="next")
    sealer.wait()


def test_the_next_submit_raises_the_previous_jobs_error_and_does_not_start_the_next() -> None:
    sealer = Sealer()
    ran = []

    def denied() -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "checkpoint-4")

    sealer.submit(denied, name="checkpoint-4")
    with pytest.raises(PermissionError):
        sealer.submit(lambda: ran.append("checkpoint-8"), name="checkpoint-8")
    sealer.wait()
    assert ran == []


def test_raise_if_failed_does_not_wait_for_a_job_in_flight() -> None:
    sealer = Sealer()
    release = threading.Event()

    def fails_when_released() -> None:
        release.wait(10)
        raise OSError(errno.EROFS, "Read-only file system")

    sealer.submit(fails_when_released, name="slow")
    start = time.perf_counter()
    sealer.raise_if_failed()  # still in flight: returns at once
    assert time.perf_counter() - start < 1 and sealer.in_flight
    release.set()
    while sealer.in_flight:
        time.sleep(0.01)
    with pytest.raises(OSError):
        sealer.raise_if_failed()
