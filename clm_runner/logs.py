"""Logging set-up shared by the commands: our messages on stderr, library chatter kept down."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(message)s"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(*, quiet: bool = False) -> None:
    """clm_runner's logger at INFO on stderr; transformers and datasets at WARNING; bars off if quiet."""
    logger = logging.getLogger("clm_runner")
    if not any(getattr(h, "_clm_runner", False) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler._clm_runner = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    if quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
