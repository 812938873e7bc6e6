"""One checkpoint seal in flight at a time: its fsyncs, marker, rename and rotation on a background thread.

The training thread writes a checkpoint's files into tmp-checkpoint-N (what the plain Trainer's save costs
too) and hands the rest to a `Sealer`: fsync every file, write the marker, rename, rotate. Those wait on the
disk, not on the weights, so the next steps train meanwhile (torch.distributed.checkpoint's `async_save`
does the same). A kill while a seal is in flight leaves tmp-checkpoint-N, which resume ignores, as a kill
during a synchronous seal does.

Whoever relies on the checkpoint being sealed (the next save, an evaluation, loading the best model, the
end of training) calls `wait()` first; an error of the seal (a full disk, a lost permission) is raised
there, on the training thread, as the same exception the seal raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Sealer:
    """Runs one job at a time on a background thread; `submit` waits for the previous one first."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], Any], *, name: str) -> None:
        """Start `job` in the background, once the previous job is done (its error is raised here)."""
        self.wait()
        # A daemon: an exit that skips the waits (a second Ctrl-C, an error) never hangs on a slow disk; a
        # seal cut short leaves a temporary directory, never a torn checkpoint.
        thread = threading.Thread(target=self._run, args=(job,), name=f"seal {name}", daemon=True)
        self._thread = thread
        thread.start()

    def _run(self, job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until no job is in flight; raise the error of the one that just finished, if it failed."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def raise_if_failed(self) -> None:
        """Raise a finished job's error now (without waiting for a job still in flight)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
