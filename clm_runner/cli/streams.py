"""Standard output and error that survive being closed: `clm-runner train ... | head -2`, a closed terminal.

Python ignores SIGPIPE, so the first write after the reader has gone raises BrokenPipeError; in the middle
of a run that would end the run (marked failed) for no reason of its own. Here a write or flush that finds
the pipe closed points the descriptor at /dev/null instead (so every later write, through any wrapper,
succeeds) and the run goes on; its log still reaches train.log.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any

logger = logging.getLogger("clm_runner")


class SurvivingStream:
    """A text stream whose writes never fail because the other end of its pipe has gone away."""

    def __init__(self, stream: Any, name: str) -> None:
        self._stream = stream
        self._name = name
        self.diverted = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._divert(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._divert(exc)

    def _divert(self, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.EBADF, errno.EIO) and not isinstance(exc, BrokenPipeError):
            raise exc
        if self.diverted:
            return
        self.diverted = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        logger.warning(
            "Standard %s was closed; clm-runner goes on (the run's log is in train.log).", self._name
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def survive_closed_output() -> None:
    """Wrap sys.stdout and sys.stderr once (the CLI's entry point calls this)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SurvivingStream):
            setattr(sys, name, SurvivingStream(stream, "output" if name == "stdout" else "error"))
