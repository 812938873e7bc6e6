"""Logging set-up shared by the commands: our messages on stderr (and a run's train.log), library chatter kept down."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE_NAME = "train.log"
# Records logged with extra={"console": False} go to files only: the live progress bar shows them instead.
CONSOLE_ATTRIBUTE = "console"
# Hugging Face user access tokens; anything shaped like one is masked in files we write.
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
SECRET_ENVIRONMENT = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "WANDB_API_KEY")
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


def setup_logging(*, quiet: bool = False) -> None:
    """clm_runner's logger at INFO on stderr; transformers and datasets at WARNING; bars off if quiet."""
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
    if quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


class SecretMask(logging.Filter):
    """Replace secrets (given values, token-shaped strings, tokens in the environment) in a record's text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        found = [os.environ.get(name, "") for name in SECRET_ENVIRONMENT]
        # Short values would mask ordinary words; real tokens are long.
        self.secrets = sorted({s for s in [*secrets, *found] if s and len(s) >= 8}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return HF_TOKEN_PATTERN.sub(MASK, text)

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
    for name in ("clm_runner", "transformers", "datasets"):
        logging.getLogger(name).addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    for name in ("clm_runner", "transformers", "datasets"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()
