"""Recipes: the typed, validated configuration of one job, read from TOML plus `--set` overrides.

Precedence is defaults < recipe file < `--set section.key=value`. Every key is checked before any heavy
work starts: an unknown key names the closest valid one, a wrong type names the expected one.
This module imports no heavy library except for `[training]`, whose valid keys are those of the
installed `transformers.TrainingArguments`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clm_runner.config import secrets
from clm_runner.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelConfig:
    """Which model, config and tokenizer to load: run_clm's ModelArguments, same names and defaults."""

    model_name_or_path: str | None = None
    """Hub id or local directory of the weights to start from. Unset: train from scratch."""
    model_type: str | None = None
    """Architecture to build from scratch (for example "gpt2"), when model_name_or_path is unset."""
    config_overrides: str | None = None
    """From scratch only: "n_layer=2,n_embd=128" overrides the model_type's default config."""
    config_name: str | None = None
    """Config hub id or directory, if not the same as model_name_or_path."""
    tokenizer_name: str | None = None
    """Tokenizer hub id or directory, if not the same as model_name_or_path (required from scratch)."""
    cache_dir: str | None = None
    """Where hub downloads are stored (default: the Hugging Face cache)."""
    use_fast_tokenizer: bool = True
    """Use the Rust-backed fast tokenizer."""
    model_revision: str = "main"
    """Branch, tag or commit of the hub model."""
    token: str | None = None
    """Hub token for private models; never written to the output dir (prefer the HF_TOKEN variable)."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model or dataset. Only for repositories whose code you have read."""
    dtype: str | None = None
    """Load the weights in this dtype: auto, bfloat16, float16 or float32 (unset: float32)."""

    def __post_init__(self) -> None:
        if self.config_overrides is not None and (
            self.config_name is not None or self.model_name_or_path is not None
        ):
            raise RecipeError(
                "Can't use model.config_overrides with model.config_name or model.model_name_or_path: "
                "overrides apply only when training from scratch with model.model_type. Choose one."
            )
        if self.model_name_or_path is None and self.model_type is None and self.config_name is None:
            raise RecipeError(
                "No model given: set model.model_name_or_path (a hub id or directory) to fine-tune, "
                'or model.model_type (for example "gpt2") to train from scratch.'
            )
        if self.model_name_or_path is None and self.tokenizer_name is None:
            raise RecipeError(
                "Training from scratch needs a tokenizer: set model.tokenizer_name to a tokenizer "
                "directory or hub id."
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise RecipeError(f"model.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}.")


@dataclass(frozen=True)
class DataConfig:
    """What text to train and evaluate on: run_clm's DataTrainingArguments plus clm-runner's own keys."""

    dataset_name: str | None = None
    """Hub dataset id (for example "wikitext"), or unset to read local files."""
    dataset_config_name: str | None = None
    """Hub dataset configuration (for example "wikitext-2-raw-v1")."""
    dataset_revision: str | None = None
    """Branch, tag or commit of the hub dataset (unset: the newest)."""
    train_file: str | list[str] | None = None
    """Training text: a file, a glob or a list of them (txt, csv, json, jsonl, parquet, arrow) or a save_to_disk dir."""
    validation_file: str | list[str] | None = None
    """Validation text, as train_file. Unset: the first validation_split_percentage% of the train rows."""
    test_file: str | list[str] | None = None
    """Optional test text, as train_file, for `clm-runner eval --split test`."""
    max_train_samples: int | None = None
    """Keep only this many training blocks (for quick runs)."""
    max_eval_samples: int | None = None
    """Keep only this many evaluation blocks (for quick runs)."""
    streaming: bool = False
    """Stream the dataset instead of preparing it on disk (needs training.max_steps)."""
    block_size: int | None = None
    """Tokens per block. Unset: the tokenizer's model_max_length, or min(1024, the model's positions) when that
    is larger than the model's positions (run_clm's rule). Never more than the model's positions."""
    overwrite_cache: bool = False
    """Rebuild the preprocessing cache instead of reusing it."""
    validation_split_percentage: int = 5
    """With no validation split, this percentage of the train rows becomes validation."""
    preprocessing_num_workers: int | None = None
    """Processes for tokenization (unset: the CPU cores available). Blocks never depend on it."""
    keep_linebreaks: bool = True
    """Keep the line breaks of .txt files."""
    text_column: str | None = None
    """Column holding the text (unset: "text", else the first string column)."""
    grouping: Literal["concat", "run_clm"] = "concat"
    """concat: each split's whole token stream cut into blocks. run_clm: run_clm's 1000-row batches, exactly."""
    run_clm_preprocessing_num_workers: int | None = None
    """grouping = "run_clm" only: the --preprocessing_num_workers run_clm was run with (unset: none, one process).
    datasets.map(num_proc=N) cuts each split into N contiguous shards and restarts its 1000-row batches in
    each, so run_clm's blocks depend on N; this reproduces them. It never changes clm-runner's own speed."""
    validation_split_seed: int | None = None
    """Shuffle rows with this seed before carving the validation split (unset: the first rows, as run_clm)."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """Non-UTF-8 text: "strict" stops with an error, "replace" substitutes U+FFFD."""

    def __post_init__(self) -> None:
        has_files = any(f is not None for f in (self.train_file, self.validation_file, self.test_file))
        if self.dataset_name is None and not has_files:
            raise RecipeError(
                "No data given: set data.dataset_name (a hub dataset) or data.train_file / "
                "data.validation_file (local files)."
            )
        if self.dataset_name is not None and has_files:
            raise RecipeError(
                "Can't use data.dataset_name together with data.train_file/validation_file/test_file. Choose one."
            )
        if self.block_size is not None and self.block_size <= 0:
            raise RecipeError(f"data.block_size must be a positive number of tokens; got {self.block_size}.")
        if not 0 < self.validation_split_percentage < 100:
            raise RecipeError(
                "data.validation_split_percentage must be between 1 and 99; "
                f"got {self.validation_split_percentage}."
            )
        for key in (
            "max_train_samples",
            "max_eval_samples",
            "preprocessing_num_workers",
            "run_clm_preprocessing_num_workers",
        ):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"data.{key} must be a positive integer; got {value}.")
        if self.run_clm_preprocessing_num_workers is not None:
            if self.grouping != "run_clm":
                raise RecipeError(
                    "data.run_clm_preprocessing_num_workers reproduces run_clm's blocks and needs "
                    'data.grouping = "run_clm"; set grouping, or remove the key (concat blocks never depend '
                    "on workers)."
                )
            if self.streaming:
                raise RecipeError(
                    "data.run_clm_preprocessing_num_workers has no effect with data.streaming (run_clm "
                    "streams without worker processes); remove the key."
                )


@dataclass(frozen=True)
class EvalConfig:
    """How `clm-runner eval` scores a model (command-line options override these)."""

    split: str = "validation"
    """Split to score: validation, test or train."""
    stride: int | None = None
    """Unset: disjoint blocks. Set: strided sliding windows that advance this many tokens."""
    context: int | None = None
    """Window length of the strided method (unset: the block size)."""

    def __post_init__(self) -> None:
        for key in ("stride", "context"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"eval.{key} must be a positive number of tokens; got {value}.")


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig}
ALL_SECTIONS = ("model", "data", "training", "eval")


@dataclass(frozen=True)
class Recipe:
    """One validated job. `training` holds only the TrainingArguments keys the user set."""

    model: ModelConfig
    data: DataConfig
    training: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str | None = None
    """The recipe file it came from (None for recipes built in code)."""

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The recipe as plain data, None values dropped (TOML has no null)."""
        out: dict[str, dict[str, Any]] = {}
        for name in ("model", "data"):
            out[name] = _drop_none(dataclasses.asdict(getattr(self, name)))
        out["training"] = _drop_none(dict(self.training))
        out["eval"] = _drop_none(dataclasses.asdict(self.eval))
        return out

    def fingerprint(self) -> str:
        """A short hash of the resolved recipe (secrets excluded), recorded beside the results."""
        plain, _ = secrets.strip_secrets(self.to_dict())
        text = render_toml(plain)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# ---------------------------------------------------------------------------------------------------
# Loading


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
    cls = SECTIONS.get(section)
    return typing.get_type_hints(cls).get(key) if cls is not None else None


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
            f"--set {item!r}: unknown section [{section}]{_suggest(section, ALL_SECTIONS)} "
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
    return parsed if _matches(parsed, annotation) else text


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
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"[{section}] in the recipe must be a table, not {type(table).__name__}.")
        if value is UNSET:
            table.pop(key, None)
        else:
            table[key] = value


def build_recipe(
    raw: Mapping[str, Any], *, source: str | None = None, require_output_dir: bool = True
) -> Recipe:
    where = f"{source}: " if source else ""
    for section, table in raw.items():
        if section not in ALL_SECTIONS:
            raise RecipeError(
                f"{where}unknown section [{section}]{_suggest(section, ALL_SECTIONS)} "
                f"Valid sections: {', '.join(ALL_SECTIONS)}."
            )
        if not isinstance(table, dict):
            raise RecipeError(f"{where}[{section}] must be a table of keys, not a {type(table).__name__}.")
    _refuse_placeholders(raw, where)
    try:
        sections = {
            name: _build_section(cls, name, raw.get(name, {}), where) for name, cls in SECTIONS.items()
        }
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
    return Recipe(
        model=sections["model"],
        data=sections["data"],
        training=types.MappingProxyType(training),
        eval=sections["eval"],
        source=source,
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
    for key, value in table.items():
        if key not in hints:
            raise RecipeError(
                f"{where}unknown key {name}.{key}{_suggest(key, valid, prefix=name + '.')} "
                f"Valid keys in [{name}]: {', '.join(valid)}."
            )
        _check_type(f"{name}.{key}", value, hints[key], where)
    return cls(**table)


def validate_training(table: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Check [training] against the installed TrainingArguments and clm-runner's policy (training_keys)."""
    from clm_runner.config import training_keys

    hints = training_argument_types()
    for key, value in table.items():
        if key not in hints:
            message = training_keys.renamed(key)
            if message is None:
                message = (
                    f"unknown key training.{key}{_suggest(key, list(hints), prefix='training.')} "
                    "[training] takes the fields of transformers.TrainingArguments."
                )
            raise RecipeError(where + message)
        refused = training_keys.refusal(key)
        # recipe.toml records every key with its value, the refused ones at their defaults: those are fine.
        if refused is not None and value != training_defaults().get(key, _NO_DEFAULT):
            raise RecipeError(where + refused)
        _check_type(f"training.{key}", value, hints[key], where)
    training_keys.check_values(table, where)
    return dict(table)


_TRAINING_TYPES: dict[str, Any] | None = None
_NO_DEFAULT = object()


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
        out[f.name] = _plain(value)
    from clm_runner.config.training_keys import CLM_RUNNER_DEFAULTS

    out.update(CLM_RUNNER_DEFAULTS)
    return out


def _plain(value: Any) -> Any:
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------
# Type checking against annotations


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin in (list, tuple, Sequence):
        args = typing.get_args(annotation)
        return f"a list of {_type_name(args[0])}" if args else "a list"
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


def _matches(value: Any, annotation: Any) -> bool:
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


def _check_type(key: str, value: Any, annotation: Any, where: str) -> None:
    if not _matches(value, annotation):
        raise RecipeError(
            f"{where}{key} must be {_type_name(annotation)}; got {value!r} ({type(value).__name__})."
        )


def _suggest(word: str, choices: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f": did you mean {prefix}{close[0]}?" if close else "."


# ---------------------------------------------------------------------------------------------------
# Rendering


def resolved_dict(
    recipe: Recipe, training_overrides: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Every key with its effective value, defaults filled in; secret keys left out (see unrecorded_secrets)."""
    full = recipe.to_dict()
    for name in ("model", "data", "eval"):
        full[name] = dataclasses.asdict(getattr(recipe, name))
    training = training_defaults()
    training.update(recipe.training)
    if training_overrides:
        training.update(training_overrides)
    full["training"] = training
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
        for key, value in table.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            elif isinstance(value, dict):
                nested[key] = value
            else:
                lines.append(tomli_w.dumps({key: value}).rstrip("\n"))
        for key, value in nested.items():
            # Inline tables keep every key of the section under its header.
            lines.append(f"{key} = " + _inline_table(value))
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
