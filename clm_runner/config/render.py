"""Writing a recipe back: every key with its effective value (recipe.toml, `recipe show`), secrets left out."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from clm_runner.config import secrets
from clm_runner.config.schema import ALL_SECTIONS, Recipe
from clm_runner.config.types import training_defaults


def resolved_dict(
    recipe: Recipe, training_overrides: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Every key with its effective value, defaults filled in; secret keys left out (see unrecorded_secrets)."""
    full = recipe.to_dict()
    for name in ("model", "data", "eval"):
        full[name] = dataclasses.asdict(getattr(recipe, name))
    # A list, as run.json reads it back: a tuple would make every resume see "data.mix: [] -> ()".
    full["data"]["mix"] = list(full["data"]["mix"])
    training = training_defaults()
    training.update(recipe.training)
    if training_overrides:
        training.update(training_overrides)
    full["training"] = training
    if recipe.early_stopping is not None:
        full["early_stopping"] = dataclasses.asdict(recipe.early_stopping)
    if recipe.adapter is not None:
        from clm_runner.config.adapter_keys import lora_defaults

        adapter = {"method": recipe.adapter.method, "load_in_4bit": recipe.adapter.load_in_4bit}
        adapter.update(lora_defaults())
        adapter.update(recipe.adapter.lora)
        full["adapter"] = adapter
    plain, _ = secrets.strip_secrets(full)
    return plain


def unrecorded_secrets(recipe: Recipe) -> list[str]:
    """The dotted names of secret keys this recipe sets (written nowhere; named in a comment)."""
    _, dropped = secrets.strip_secrets(recipe.to_dict())
    return dropped


def render_toml(
    recipe: Recipe | Mapping[str, Any], *, header: str | None = None, unrecorded: Sequence[str] = ()
) -> str:
    """TOML text of a recipe or a resolved dict. Unset (None) keys appear as comments, as do secrets."""
    import tomli_w

    data = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
    if isinstance(recipe, Recipe):
        data, dropped = secrets.strip_secrets(data)
        unrecorded = [*unrecorded, *dropped]
    lines: list[str] = []
    if header:
        lines.extend(f"# {line}" if line else "#" for line in header.splitlines())
        lines.append("")
    for section in ALL_SECTIONS:
        table = data.get(section)
        if table is None:
            continue
        lines.append(f"[{section}]")
        for dotted in unrecorded:
            if dotted.startswith(f"{section}."):
                lines.append(f"# {secrets.not_recorded_comment(dotted)}")
        nested: dict[str, Any] = {}
        arrays: dict[str, list[dict[str, Any]]] = {}
        for key, value in table.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            elif isinstance(value, dict):
                nested[key] = value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
                arrays[key] = list(value)
            elif isinstance(value, (list, tuple)) and not value and key == "mix":
                continue  # no [[data.mix]] tables: the one source of [data]
            else:
                lines.append(tomli_w.dumps({key: value}).rstrip("\n"))
        for key, value in nested.items():
            # Inline tables keep every key of the section under its header.
            lines.append(f"{key} = " + _inline_table(value))
        lines.append("")
        for key, tables in arrays.items():  # [[data.mix]]: arrays of tables come after the section's keys
            for entry in tables:
                lines.append(f"[[{section}.{key}]]")
                lines.extend(tomli_w.dumps({k: v}).rstrip("\n") for k, v in entry.items() if v is not None)
                lines.append("")
    return "\n".join(lines)


def _inline_table(value: Mapping[str, Any]) -> str:
    import tomli_w

    parts = []
    for k, v in value.items():
        if v is None:
            continue
        if isinstance(v, dict):
            parts.append(f"{_toml_key(k)} = {_inline_table(v)}")
        else:
            parts.append(tomli_w.dumps({k: v}).strip())
    return "{ " + ", ".join(parts) + " }" if parts else "{}"


def _toml_key(key: str) -> str:
    import tomli_w

    return tomli_w.dumps({key: 0}).split(" = ")[0]
