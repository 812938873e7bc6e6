"""Logging set-up shared by the commands: our messages on stderr (and a run's train.log), library chatter kept down."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOGGED = ("clm_runner", "transformers", "datasets")
"""The loggers a run's train.log collects."""
# Records logged with extra={"console": False} go to files only: the live progress bar shows them instead.
CONSOLE_ATTRIBUTE = "console"
MASK = "***"


def _console_only(record: logging.LogRecord) -> bool:
    return getattr(record, CONSOLE_ATTRIBUTE, True)


class CurrentStderr(logging.StreamHandler):
    """A stderr handler that writes to whatever sys.stderr is at emit time (click's CliRunner swaps it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def live_display(quiet: bool) -> bool:
    """Live progress bars: only when not quiet and stderr is a terminal that shows them in place.

    Anywhere else (a Slurm or CI log, a pipe) a bar's carriage-return frames pile up; plain log lines, one
    per logging step, say the same.
    """
    if quiet:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def setup_logging(*, quiet: bool = False) -> bool:
    """clm_runner's logger at INFO on stderr; transformers and datasets at WARNING; their bars off unless
    progress is shown live (see live_display). Returns whether it is: the one place that decides."""
    logger = logging.getLogger("clm_runner")
    if not any(getattr(h, "_clm_runner", False) for h in logger.handlers):
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_console_only)
        handler._clm_runner = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    # The console is masked as train.log is: a library warning or one of ours may quote a secret.
    for name in LOGGED:
        for console in logging.getLogger(name).handlers:
            stream = isinstance(console, logging.StreamHandler) and not isinstance(
                console, logging.FileHandler
            )
            if stream and not any(isinstance(f, SecretMask) for f in console.filters):
                console.addFilter(SecretMask())
    live = live_display(quiet)
    if not live:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    return live


class SecretMask(logging.Filter):
    """Replace secrets (given values, token-shaped strings, every secret the process knows when the record is
    emitted: the environment's tokens, recipes' secret keys) in a record's text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        from clm_runner.config.secrets import MIN_SECRET_LENGTH

        self.given = [s for s in secrets if len(s) >= MIN_SECRET_LENGTH]

    @property
    def secrets(self) -> list[str]:
        from clm_runner.config.secrets import secret_values

        return sorted({*self.given, *secret_values()}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        from clm_runner.config.secrets import scrub

        return scrub(text, self.secrets, MASK)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def attach_log_file(path: Path, *, secrets: Iterable[str] = ()) -> logging.Handler:
    """Append clm_runner's log (every line, progress lines included) and library warnings to `path`.

    Returns the handler; pass it to `detach_log_file` when the run ends. Secrets are masked.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    handler.addFilter(SecretMask(secrets))
    for name in LOGGED:
        logging.getLogger(name).addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    for name in LOGGED:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


class RunLog:
    """A run's train.log: held in memory until the run starts, then written to the file and appended to.

    A start that fails (bad data, unreachable hub) thus writes no train.log into the output dir; a run
    that starts gets every line, the ones from before its start included, with their own times.
    """

    MAX_BUFFERED = 100_000

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        import logging.handlers

        self.secrets = list(secrets)
        self.buffer: logging.handlers.MemoryHandler | None = logging.handlers.MemoryHandler(
            capacity=self.MAX_BUFFERED, flushLevel=logging.CRITICAL + 1, target=None, flushOnClose=False
        )
        self.buffer.setLevel(logging.INFO)
        self.file: logging.Handler | None = None
        for name in LOGGED:
            logging.getLogger(name).addHandler(self.buffer)

    def start_file(self, path: Path) -> None:
        """Write the lines held so far to `path` and append every later one."""
        self.file = attach_log_file(path, secrets=self.secrets)
        if self.buffer is not None:
            for name in LOGGED:
                logging.getLogger(name).removeHandler(self.buffer)
            for record in self.buffer.buffer[-self.MAX_BUFFERED :]:
                if record.levelno >= self.file.level:
                    self.file.handle(record)
            self.buffer.buffer.clear()
            self.buffer = None

    def close(self) -> None:
        if self.buffer is not None:
            for name in LOGGED:
                logging.getLogger(name).removeHandler(self.buffer)
            self.buffer.buffer.clear()
            self.buffer = None
        if self.file is not None:
            detach_log_file(self.file)
            self.file = None


def buffer_log(*, secrets: Iterable[str] = ()) -> RunLog:
    return RunLog(secrets)
