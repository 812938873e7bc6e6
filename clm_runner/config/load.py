"""Reading a recipe: TOML text, `--set section.key=value` overrides, and the checks that make a Recipe.

Every key is checked before any heavy work starts: an unknown key names the closest valid one, a wrong type
names the expected one, a value TrainingArguments would take but the run could not use is refused. Only
[training] imports a heavy library: its keys are those of the installed transformers.TrainingArguments.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from clm_runner.config import secrets
from clm_runner.config.schema import (
    ALL_SECTIONS,
    OPTIONAL_SECTIONS,
    SECTIONS,
    DataConfig,
    MixSource,
    Recipe,
    tomllib,
)
from clm_runner.config.types import check_type, matches, suggest, training_argument_types, training_defaults
from clm_runner.errors import RecipeError

_NO_DEFAULT = object()


UNSET = object()
"""What an empty `--set section.key=` means: remove the key, so its default applies."""


def load_recipe(
    path: str | Path | None, overrides: Sequence[str] = (), *, require_output_dir: bool = True
) -> Recipe:
    """Read a TOML recipe, apply `--set` overrides and validate everything."""
    raw: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        raw = read_toml(Path(path))
    build = functools.partial(build_recipe, require_output_dir=require_output_dir)
    if not overrides:
        return build(raw, source=source)
    from_file = copy.deepcopy(raw)
    apply_overrides(raw, overrides)
    try:
        recipe = build(raw)
    except RecipeError as exc:
        # Report a problem against the file only when the file alone has it too; else against the --set.
        try:
            build(from_file)
        except RecipeError as file_exc:
            if str(file_exc) == str(exc):
                raise RecipeError(f"{source}: {exc}" if source else str(exc)) from None
        raise RecipeError(f"{exc} (from {_blame(overrides, str(exc))})") from None
    return dataclasses.replace(recipe, source=source)


def _blame(overrides: Sequence[str], message: str) -> str:
    """The --set items a message is about (those whose key it names), else all of them."""
    named = [item for item in overrides if item.partition("=")[0].strip() in message]
    return " ".join(f"--set {item}" for item in (named or overrides))


def read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RecipeError(f"Recipe file not found: {path}. Check the path (recipes live in recipes/).")
    if path.is_dir():
        raise RecipeError(f"Recipe path {path} is a directory; pass a .toml file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"Recipe {path} is not UTF-8 text ({exc.reason}).") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problem = _with_position(exc, text)
        raise RecipeError(f"Recipe {path} is not valid TOML: {problem}. Fix the syntax there.") from None
    except RecursionError:  # tomllib recurses once per nesting level of arrays and inline tables
        raise RecipeError(
            f"Recipe {path} nests arrays or tables too deeply for the TOML reader. Flatten it."
        ) from None


def _with_position(exc: Exception, text: str) -> str:
    """tomllib says "(at end of document)" for an unclosed string or table; give its line and column too."""
    message = str(exc)
    if "(at end of document)" in message:
        lines = text.splitlines() or [""]
        message = message.replace(
            "(at end of document)", f"(at end of document, line {len(lines)}, column {len(lines[-1]) + 1})"
        )
    return message


def key_annotation(section: str, key: str) -> Any | None:
    """The declared type of section.key, or None for a key the section does not have."""
    if section == "training":
        return training_argument_types().get(key)
    if section == "adapter":
        from clm_runner.config.adapter_keys import key_annotation as adapter_key_annotation

        return adapter_key_annotation(key)
    cls = SECTIONS.get(section) or OPTIONAL_SECTIONS.get(section)
    return typing.get_type_hints(cls).get(key) if cls is not None else None


def section_keys(section: str) -> list[str]:
    """The keys a section takes, for shell completion of --set ([training] and [adapter] import their library)."""
    if section == "training":
        return list(training_argument_types())
    if section == "adapter":
        from clm_runner.config.adapter_keys import OWN_KEYS, lora_defaults

        return [*OWN_KEYS, *lora_defaults()]
    cls = SECTIONS.get(section) or OPTIONAL_SECTIONS.get(section)
    if cls is None:
        return []
    return [f.name for f in dataclasses.fields(cls) if f.name != "mix"]  # [[data.mix]] tables are no --set


def parse_override(item: str) -> tuple[str, str, Any]:
    """Split "section.key=value" and read the value for that key.

    The value is TOML (`3`, `true`, `[1, 2]`, `"quoted"`), except for a key that takes a string: there the
    text is the string itself (`model.model_revision=2024-01-01`, an all-digit commit, `inf`), unless it is
    a quoted TOML string or a TOML value of another type the key also takes (`training.fsdp=true`, a list
    for `data.train_file`). Text that is not TOML is a string. An empty value (`data.validation_file=`)
    is UNSET: the key goes back to its default.
    """
    if "=" not in item:
        raise RecipeError(
            f"Malformed --set {item!r}: expected section.key=value, for example --set training.learning_rate=1e-4."
        )
    dotted, _, text = item.partition("=")
    dotted = dotted.strip()
    section, dot, key = dotted.partition(".")
    if not dot or not section or not key:
        raise RecipeError(
            f"Malformed --set {item!r}: the key must be section.key (sections: {', '.join(ALL_SECTIONS)})."
        )
    if section not in ALL_SECTIONS:
        raise RecipeError(
            f"--set {item!r}: unknown section [{section}]{suggest(section, ALL_SECTIONS)} "
            f"Sections: {', '.join(ALL_SECTIONS)}."
        )
    if text.strip() == "":
        return section, key, UNSET
    return section, key, _read_value(text, key_annotation(section, key), dotted)


def _read_value(text: str, annotation: Any, dotted: str) -> Any:
    try:
        parsed = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise RecipeError(
            f"--set {dotted}: the value nests arrays or tables too deeply. Flatten it."
        ) from None
    if annotation is None or not _admits_str(annotation) or isinstance(parsed, str):
        return parsed
    # A key that takes a string: keep the parsed value only where the key takes that type too.
    return parsed if matches(parsed, annotation) else text


def _admits_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    if annotation is Any:
        return False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_admits_str(a) for a in args)
    if typing.get_origin(annotation) is Literal:
        return False
    return False


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    for item in overrides:
        section, key, value = parse_override(item)
        if value is UNSET:
            _check_known(section, key, item)
        # Unsetting a key of a section the recipe lacks leaves it absent: an empty [adapter] or
        # [early_stopping] would turn the feature on.
        table = raw.setdefault(section, {}) if value is not UNSET else raw.get(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"[{section}] in the recipe must be a table, not {type(table).__name__}.")
        if value is UNSET:
            table.pop(key, None)
        else:
            table[key] = value


def _check_known(section: str, key: str, item: str) -> None:
    """An unset key must exist too: with no value to check, a typo would pass silently."""
    if key_annotation(section, key) is not None:
        return
    if section == "training":
        from clm_runner.config.training_keys import renamed

        message = renamed(key)
        if message is not None:
            raise RecipeError(f"{message} (from --set {item})")
        valid = list(training_argument_types())
    elif section == "adapter":
        from clm_runner.config.adapter_keys import ALIASES, OWN_KEYS, lora_argument_types

        if key in ALIASES:
            raise RecipeError(
                f"--set {item}: unknown key adapter.{key}: did you mean adapter.{ALIASES[key]}?"
            )
        valid = [*OWN_KEYS, *lora_argument_types()]
    else:
        valid = list(typing.get_type_hints(SECTIONS.get(section) or OPTIONAL_SECTIONS[section]))
    raise RecipeError(f"--set {item}: unknown key {section}.{key}{suggest(key, valid, prefix=section + '.')}")


def build_recipe(
    raw: Mapping[str, Any], *, source: str | None = None, require_output_dir: bool = True
) -> Recipe:
    where = f"{source}: " if source else ""
    for section, table in raw.items():
        if section not in ALL_SECTIONS:
            raise RecipeError(
                f"{where}unknown section [{section}]{suggest(section, ALL_SECTIONS)} "
                f"Valid sections: {', '.join(ALL_SECTIONS)}."
            )
        if not isinstance(table, dict):
            raise RecipeError(f"{where}[{section}] must be a table of keys, not a {type(table).__name__}.")
    _refuse_placeholders(raw, where)
    secrets.remember(raw)  # before any message about the recipe can quote a value
    try:
        sections = {
            name: _build_section(cls, name, raw.get(name, {}), where) for name, cls in SECTIONS.items()
        }
        sections.update(
            {
                name: _build_section(cls, name, raw[name], where)
                for name, cls in OPTIONAL_SECTIONS.items()
                if name in raw
            }
        )
    except RecipeError as exc:
        if where and not str(exc).startswith(where):
            raise RecipeError(where + str(exc)) from None
        raise
    training = validate_training(raw.get("training", {}), where)
    if require_output_dir and "output_dir" not in training:
        raise RecipeError(f"{where}training.output_dir is not set: say where the run's results go.")
    if sections["data"].streaming and require_output_dir and training.get("max_steps", -1) <= 0:
        raise RecipeError(
            f"{where}data.streaming needs training.max_steps > 0: a stream has no length to count epochs by."
        )
    if "early_stopping" in sections or training.get("load_best_model_at_end"):
        from clm_runner.config.training_keys import check_best_model_fits

        check_best_model_fits(training, early_stopping="early_stopping" in sections, where=where)
    _check_source_metric(training.get("metric_for_best_model"), sections["data"], where)
    adapter = None
    if "adapter" in raw:
        from clm_runner.config.adapter_keys import validate_adapter

        adapter = validate_adapter(raw["adapter"], where)
        _check_adapter_fits(sections["model"], training, where)
    return Recipe(
        model=sections["model"],
        data=sections["data"],
        training=types.MappingProxyType(training),
        eval=sections["eval"],
        adapter=adapter,
        early_stopping=sections.get("early_stopping"),
        source=source,
    )


def _check_source_metric(metric: Any, data: DataConfig, where: str) -> None:
    """metric_for_best_model = "NAME_perplexity" (or _loss, _accuracy) names a source validated on its own."""
    from clm_runner.config.training_keys import metric_kind

    source = metric_kind(metric)[0] if isinstance(metric, str) else None
    if source is None:
        return
    own = [] if data.validation_file is not None else [s.label for s in data.mix]
    if source in own:
        return
    if own:
        fix = f"the sources validated on their own are {', '.join(own)}{suggest(source, own)}"
    else:
        fix = "no [[data.mix]] source is validated on its own here (only the whole validation set is)."
    raise RecipeError(
        f"{where}training.metric_for_best_model = {metric!r} names source {source!r}, but {fix} "
        "Use a source's name, or loss / perplexity / accuracy (over all validation text)."
    )


def _check_adapter_fits(model: Any, training: Mapping[str, Any], where: str) -> None:
    """An adapter adapts pretrained weights, under DDP or on one device."""
    if model.model_name_or_path is None:
        raise RecipeError(
            f"{where}[adapter] trains small adapters on a pretrained model, but model.model_name_or_path is "
            "unset (a model built from scratch has nothing to adapt). Set model.model_name_or_path to the base "
            "model, or remove [adapter] to train every weight."
        )
    for key in ("fsdp", "deepspeed"):
        if training.get(key):
            raise RecipeError(
                f"{where}[adapter] with training.{key} is not supported: adapters train under DDP "
                f"(torchrun / accelerate launch) or on one device. Remove training.{key} (an adapter's "
                "gradients and optimizer state are a small fraction of the model), or remove [adapter]."
            )


def _refuse_placeholders(raw: Mapping[str, Any], where: str) -> None:
    """A secret key holding "<redacted>" (recipe.toml of clm-runner 0.1.0) would be sent to the Hub as a token."""
    for section, key in secrets.SECRET_KEYS:
        table = raw.get(section)
        if isinstance(table, dict) and secrets.is_placeholder(table.get(key)):
            raise RecipeError(
                f"{where}{section}.{key} = {table[key]!r} is a placeholder, not a token. Remove the key and set "
                f"the HF_TOKEN environment variable (or --set {section}.{key}=YOUR_TOKEN)."
            )


def _build_section(cls: type, name: str, table: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    table = dict(table)
    if cls is DataConfig and "mix" in table:
        table["mix"] = _build_mix(table["mix"], where)
    for key, value in table.items():
        if key == "mix" and cls is DataConfig:
            continue
        if key not in hints:
            raise RecipeError(
                f"{where}unknown key {name}.{key}{suggest(key, valid, prefix=name + '.')} "
                f"Valid keys in [{name}]: {', '.join(valid)}."
            )
        check_type(f"{name}.{key}", value, hints[key], where)
    return cls(**table)


def _build_mix(tables: Any, where: str) -> tuple[MixSource, ...]:
    """[[data.mix]]: an array of tables, each with [data]'s source keys and a weight."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RecipeError(
            f"{where}data.mix must be an array of tables: write each source as a [[data.mix]] table "
            "(train_file = ..., weight = ...)."
        )
    if not tables:
        raise RecipeError(f"{where}data.mix is empty: add [[data.mix]] tables, or remove the key.")
    return tuple(_build_section(MixSource, "data.mix", table, where) for table in tables)


def validate_training(table: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Check [training] against the installed TrainingArguments and clm-runner's policy (training_keys)."""
    from clm_runner.config import training_keys

    hints = training_argument_types()
    for key, value in table.items():
        if key not in hints:
            message = training_keys.renamed(key)
            if message is None:
                message = (
                    f"unknown key training.{key}{suggest(key, list(hints), prefix='training.')} "
                    "[training] takes the fields of transformers.TrainingArguments."
                )
            raise RecipeError(where + message)
        refused = training_keys.refusal(key)
        # recipe.toml records every key with its value, the refused ones at their defaults: those are fine.
        if refused is not None and value != training_defaults().get(key, _NO_DEFAULT):
            raise RecipeError(where + refused)
        check_type(f"training.{key}", value, hints[key], where)
    training_keys.check_values(table, where)
    return dict(table)
