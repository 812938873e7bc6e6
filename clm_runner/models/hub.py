"""Reaching the Hugging Face Hub: one quick reachability probe, and hub failures as one clear line.

huggingface_hub retries an unreachable host for about 25 s per file. We probe once (a TCP connect
with a short timeout) and, when the Hub cannot be reached, switch this process to offline mode:
anything already in the local cache still loads, anything else fails at once with HubUnreachableError.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from clm_runner.errors import HubUnreachableError, ModelError

TRUE_VALUES = {"1", "true", "yes", "on"}
SMOKE_HINT = "or try the offline recipe: clm-runner train --recipe recipes/smoke.toml"


def is_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in TRUE_VALUES
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def looks_like_hub_id(name: str | None) -> bool:
    """True when `name` would be fetched from the Hub (not an existing local path)."""
    return bool(name) and not Path(name).expanduser().exists()


def is_valid_repo_id(name: str) -> bool:
    """Whether `name` could name a Hub repository ("gpt2", "openai-community/gpt2"); a path like
    "recipes/smoke/tokenizr" or "./model" could not, so a missing one is a missing directory."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.endswith("/"):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def require_hub_for_push(repo: str) -> None:
    """push_to_hub needs the Hub from the first checkpoint on: refuse at once when it cannot be reached."""
    if is_offline() or not hub_reachable():
        raise HubUnreachableError(
            f"training.push_to_hub needs the Hugging Face Hub (to create and fill {repo!r}) and it cannot be "
            f"reached ({offline_reason()}). Set push_to_hub = false and upload the output dir later."
        )


_probed: bool | None = None
_switched_offline = False  # True once this process went offline because the Hub did not answer


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens; probed once per process."""
    global _probed
    if _probed is None:
        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        try:
            with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
                _probed = True
        except OSError:
            _probed = False
    return _probed


def prepare_hub_access(names: list[str | None]) -> None:
    """Before loading anything: go offline at once if some name needs the Hub and it cannot be reached."""
    if is_offline() or not any(looks_like_hub_id(n) for n in names):
        return
    if not hub_reachable():
        set_offline()


def set_offline() -> None:
    global _switched_offline
    _switched_offline = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # The libraries read the variable at import; patch the module constants if they are loaded already.
    import sys

    for module_name, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ):
        module = sys.modules.get(module_name)
        if module is not None:
            setattr(module, attr, True)


def offline_reason() -> str:
    if is_offline() and not _switched_offline:
        return "HF_HUB_OFFLINE=1 is set"
    return "no network"


CONNECTION_ERRORS = {
    "ConnectionError",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "ConnectTimeout",
    "ConnectError",
    "TimeoutException",
    "Timeout",
}
CONNECTION_MESSAGES = ("couldn't connect to", "offline mode", "outgoing traffic has been disabled")


def is_connection_failure(exc: BaseException) -> bool:
    """Whether an exception (or one it was raised from) means the Hub could not be reached."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if {cls.__name__ for cls in type(current).__mro__} & CONNECTION_ERRORS:
            return True
        if any(fragment in str(current) for fragment in CONNECTION_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def hub_errors(kind: str, name: str | None, *, fix: str) -> Iterator[None]:
    """Turn a failed hub/local load of `kind` (model, tokenizer, config, dataset) into one clear error."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if is_connection_failure(exc):
            local = f"; there is no local directory {name!r} either" if name else ""
            raise HubUnreachableError(
                f"Can't reach the Hugging Face Hub to fetch {kind} '{name}' ({offline_reason()}) and it is not "
                f"in the local cache{local}. {fix}, {SMOKE_HINT}."
            ) from None
        # A tokenizer or config whose files do not parse (a ValueError: bad JSON, an unknown class) is the
        # user's to fix, as an unreadable one is.
        unreadable = isinstance(exc, ValueError) and kind in ("tokenizer", "config")
        if unreadable or (
            isinstance(exc, OSError) and type(exc).__name__ not in {"FileNotFoundError", "PermissionError"}
        ):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"Can't load {kind} '{name}': {first.rstrip(' .:')}. {fix}.") from None
        raise
