"""Types of recipe keys: the installed TrainingArguments' fields and defaults, and strict checks of TOML values
against annotations (through pydantic: no 1 for true, no "3" for 3, no 1.5 for 3)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from clm_runner.errors import RecipeError

CLM_RUNNER_DEFAULTS: dict[str, Any] = {"do_train": True, "do_eval": True}
"""Where clm-runner's default differs from TrainingArguments': `train` trains, and evaluates at the end
(run_clm's documented command passes --do_train --do_eval)."""

_TRAINING_TYPES: dict[str, Any] | None = None


def training_argument_types() -> dict[str, Any]:
    """Field name -> type annotation of the installed TrainingArguments (imported once, lazily)."""
    global _TRAINING_TYPES
    if _TRAINING_TYPES is None:
        from transformers import TrainingArguments

        fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
        try:
            hints = typing.get_type_hints(TrainingArguments)
        except Exception:  # an annotation that cannot be resolved: accept any value for every key
            hints = {}
        _TRAINING_TYPES = {name: hints.get(name, Any) for name in sorted(fields)}
        # Annotated `str | None`, but TrainingArguments documents and accepts `fsdp = true` too.
        if "fsdp" in _TRAINING_TYPES:
            _TRAINING_TYPES["fsdp"] = bool | _TRAINING_TYPES["fsdp"]
    return _TRAINING_TYPES


@functools.lru_cache(maxsize=1)
def _training_defaults() -> dict[str, Any]:
    return _compute_training_defaults()


def training_defaults() -> dict[str, Any]:
    """TrainingArguments' declared defaults, as TOML-friendly plain values (a fresh copy each call)."""
    return copy.deepcopy(_training_defaults())


def _compute_training_defaults() -> dict[str, Any]:
    from transformers import TrainingArguments

    out: dict[str, Any] = {}
    for f in dataclasses.fields(TrainingArguments):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = plain_value(value)
    out.update(CLM_RUNNER_DEFAULTS)
    return out


def plain_value(value: Any) -> Any:
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    return value


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin in (list, tuple, Sequence):
        args = typing.get_args(annotation)
        return f"a list of {type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping) or annotation is dict:
        return "a table"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    import enum

    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _toml_annotation(annotation: Any) -> Any:
    """The annotation as TOML values can meet it: an enum is given by its value (a string)."""
    import enum

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_toml_annotation(a) for a in args)]  # noqa: UP007 - built from a tuple
    if origin in (list, tuple) and args:
        return list[_toml_annotation(args[0])]  # type: ignore[misc]
    return annotation


@functools.cache
def _validator(annotation: Any) -> Any:
    """A strict pydantic validator for the annotation, or None where pydantic cannot build one."""
    from pydantic import ConfigDict, TypeAdapter

    try:
        return TypeAdapter(_toml_annotation(annotation), config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:  # an annotation pydantic cannot judge (a forward reference, a protocol)
        return None


def matches(value: Any, annotation: Any) -> bool:
    """Whether a TOML value is of the declared type: strict (no 1 for true, no "3" for 3, no 1.5 for 3)."""
    from pydantic import ValidationError

    if annotation is Any or annotation is object:
        return True
    try:
        validator = _validator(annotation)
    except TypeError:  # an unhashable annotation object: judge it as before the cache
        validator = None
    if validator is None:
        return True  # let the library check
    try:
        validator.validate_python(value, strict=True)
    except ValidationError:
        return False
    except Exception:  # a validator that breaks on an odd value is a mismatch, not a crash
        return False
    return True


def check_type(key: str, value: Any, annotation: Any, where: str) -> None:
    if not matches(value, annotation):
        raise RecipeError(
            f"{where}{key} must be {type_name(annotation)}; got {value!r} ({type(value).__name__})."
        )


def suggest(word: str, choices: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f": did you mean {prefix}{close[0]}?" if close else "."
