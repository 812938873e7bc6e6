"""Secrets (hub tokens, WANDB_API_KEY): which recipe keys hold them, where else they come from, keeping them out.

A secret never reaches a file clm-runner writes, nor the console. Recipes written back (recipe.toml,
run.json, `recipe show`) leave the secret keys out and say in a comment that one was set; text (logs on
file and console, commands, errors, tracebacks) has every secret the process knows (the environment's,
every recipe's read so far) and anything shaped like a Hugging Face token replaced. No file ever holds a
placeholder where a secret was: a placeholder read back would be sent to the Hub as if it were the token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SECRET_KEYS: tuple[tuple[str, str], ...] = (("model", "token"), ("training", "hub_token"))
"""(section, key) of every recipe key that holds a secret."""
SECRET_SET_KEYS = tuple(f"{section}.{key}" for section, key in SECRET_KEYS)
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")
OTHER_SECRET_ENV_VARS = ("WANDB_API_KEY",)
REDACTED = "<redacted>"
"""What replaces a secret in text (logs, commands, error messages); never written as a recipe value."""
PLACEHOLDERS = {REDACTED, "***"}
# Hugging Face user access tokens (hf_ + letters and digits), even ones we were not told about.
HF_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
MIN_SECRET_LENGTH = 8
"""Shorter values would mask ordinary words; real tokens are far longer."""


_MET: set[str] = set()
"""Values of secret keys this process has read (recipes, --set): every later scrub masks them too."""


def remember(raw: Mapping[str, Any]) -> None:
    """Note the secret keys' values of a recipe being read, so that no text printed later shows them."""
    for section, key in SECRET_KEYS:
        table = raw.get(section)
        remember_value(table.get(key) if isinstance(table, Mapping) else None)


def remember_value(value: Any) -> None:
    """Note one secret (an environment token about to be replaced, say) for every later scrub."""
    if isinstance(value, str) and value:
        _MET.add(value)


def not_recorded_comment(dotted: str) -> str:
    return f"{dotted} was set and is not recorded: give it again (or set HF_TOKEN) to rerun"


def secret_values(recipe: Any = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every secret this process knows: the recipe's tokens (and every recipe's read so far) and the token
    variables' values, longest first."""
    environ = os.environ if environ is None else environ
    found = [environ.get(name, "") for name in TOKEN_ENV_VARS + OTHER_SECRET_ENV_VARS] + list(_MET)
    if recipe is not None:
        found += [recipe.model.token or "", str(recipe.training.get("hub_token") or "")]
    # Longest first, so a secret that contains another is replaced whole.
    return sorted(
        {s for s in found if len(s) >= MIN_SECRET_LENGTH and s not in PLACEHOLDERS}, key=len, reverse=True
    )


def scrub(text: str, secrets: Iterable[str], replacement: str = REDACTED) -> str:
    """`text` with every given secret and every token-shaped string replaced."""
    for secret in secrets:
        text = text.replace(secret, replacement)
    return HF_TOKEN_SHAPE.sub(replacement, text)


def _secret_set(arg: str) -> str | None:
    """The dotted key when `arg` is a `--set` value that assigns a secret key ("model.token=..."), else None."""
    text = arg.strip().removeprefix("--set=")
    if "=" not in text:
        return None
    dotted = text.partition("=")[0].strip()  # as --set reads it (clm_runner.config.load)
    return dotted if dotted in SECRET_SET_KEYS else None


def redact_argv(argv: Sequence[str], secrets: Iterable[str] = ()) -> list[str]:
    """The command line as a record: the value of every secret `--set` (and any known secret) replaced."""
    secrets = list(secrets)
    out: list[str] = []
    for arg in argv:
        dotted = _secret_set(arg)
        option = "--set=" if arg.strip().startswith("--set=") else ""
        out.append(f"{option}{dotted}={REDACTED}" if dotted else scrub(arg, secrets))
    return out


def drop_secret_sets(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the command line without its secret `--set` pairs, the keys dropped): for a command to be rerun."""
    kept: list[str] = []
    dropped: list[str] = []
    for arg in argv:
        dotted = _secret_set(arg)
        if dotted is not None:
            dropped.append(dotted)
            if kept and kept[-1] == "--set" and not arg.startswith("--set="):
                kept.pop()
            continue
        kept.append(arg)
    return kept, dropped


def strip_secrets(resolved: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """A resolved recipe without its secret keys, and the dotted names of those that were set."""
    out = {section: dict(table) for section, table in resolved.items()}
    dropped = []
    for section, key in SECRET_KEYS:
        table = out.get(section)
        if table is not None and key in table and table.pop(key) is not None:
            dropped.append(f"{section}.{key}")
    return out, dropped


def is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and value.strip() in PLACEHOLDERS
