"""Errors a user can cause; the CLI turns each into one message and exit status 2."""

from __future__ import annotations


class ClmError(Exception):
    """A problem the user can fix: bad recipe, bad data, unreachable hub, unsafe output dir."""

    exit_code = 2
    quiet = False
    """True when another process (rank 0) reports this error: this one only leaves with its exit status."""


class RecipeError(ClmError):
    """The recipe file or a --set override is invalid."""


class DataError(ClmError):
    """The training or evaluation data cannot be used."""


class ModelError(ClmError):
    """The model, config or tokenizer cannot be loaded."""


class HubUnreachableError(ClmError):
    """Something must come from the Hugging Face Hub and the Hub cannot be reached."""


class OutputDirError(ClmError):
    """The output directory is unsafe to write to (not empty, in use, not a run)."""


class EvalError(ClmError):
    """An evaluation setting cannot be used (stride, context, batch size, split)."""
