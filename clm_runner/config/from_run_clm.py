"""`clm-runner recipe from-args`: run_clm.py's arguments as a commented TOML recipe that trains run_clm's job.

Every ModelArguments and DataTrainingArguments field has the same name in [model] and [data]; every
TrainingArguments field goes to [training] under its own name. transformers 5's renames are done
(`warmup_ratio` -> `warmup_steps` below 1, `evaluation_strategy` -> `eval_strategy`, ...). Where clm-runner's
default differs from run_clm's, the recipe pins run_clm's choice with a comment saying so (PINNED), unless the
caller asks for clm-runner's defaults. A flag with no clm-runner equivalent is refused naming what to use.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clm_runner.config.run_clm_args import RunClmArguments, field_types, parse_run_clm_args
from clm_runner.errors import RecipeError

MODEL_KEYS = (
    "model_name_or_path", "model_type", "config_overrides", "config_name", "tokenizer_name", "cache_dir",
    "use_fast_tokenizer", "model_revision", "trust_remote_code", "dtype",
)  # fmt: skip
"""run_clm's ModelArguments that [model] takes under the same name (token is a secret: never written)."""
DATA_KEYS = (
    "dataset_name", "dataset_config_name", "train_file", "validation_file", "max_train_samples",
    "max_eval_samples", "streaming", "block_size", "overwrite_cache", "validation_split_percentage",
    "preprocessing_num_workers", "keep_linebreaks",
)  # fmt: skip
"""run_clm's DataTrainingArguments, all of them, under the same name in [data]."""

PINNED = {
    "grouping": (
        "run_clm's choice: each 1000-row batch is cut into blocks and its remainder dropped (clm-runner's "
        'default, "concat", cuts each split\'s whole token stream and keeps more blocks).'
    ),
    "run_clm_preprocessing_num_workers": (
        "run_clm's choice: with --preprocessing_num_workers N, datasets cuts the rows into N shards and "
        "restarts the 1000-row batches in each, so run_clm's blocks depend on N."
    ),
    "clamp_block_size": (
        "run_clm's choice: a block_size above the tokenizer's model_max_length is lowered to it (clm-runner "
        "refuses a block_size longer than the model's positions as written)."
    ),
    "do_eval": (
        "run_clm's choice: run_clm evaluates only with --do_eval or an --eval_strategy (clm-runner evaluates "
        "the validation split at the end by default)."
    ),
    "precision": (
        "run_clm's choice: fp32 unless --bf16/--fp16 (on a GPU clm-runner picks bf16 or fp16 and TF32)."
    ),
    "tf32": "run_clm's choice: TF32 left off (on an Ampere or newer GPU clm-runner turns it on).",
    "torch_compile": "run_clm's choice: no torch.compile (on a GPU with Triton clm-runner compiles).",
    "dataloader_num_workers": (
        "run_clm's choice: data loaded in the main process (on a GPU clm-runner starts worker processes)."
    ),
}


@dataclass
class _Line:
    key: str
    value: Any
    flag: str = ""
    """The run_clm flag(s) the value comes from, as a trailing comment."""
    above: str = ""
    """A comment above the key (why a value is pinned)."""


@dataclass
class _Draft:
    sections: dict[str, list[_Line]] = field(
        default_factory=lambda: {"model": [], "data": [], "training": []}
    )
    notes: dict[str, list[str]] = field(default_factory=lambda: {"model": [], "data": [], "training": []})
    run_flags: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)

    def set(self, section: str, key: str, value: Any, flag: str = "", above: str = "") -> None:
        for line in self.sections[section]:
            if line.key == key:
                if line.value != value:
                    raise RecipeError(
                        f"{line.flag} and {flag} both set {section}.{key} ({line.value!r}, {value!r}); keep one."
                    )
                return
        self.sections[section].append(_Line(key, value, flag, above))

    def has(self, section: str, key: str) -> bool:
        return any(line.key == key for line in self.sections[section])

    def value(self, section: str, key: str, default: Any = None) -> Any:
        return next((line.value for line in self.sections[section] if line.key == key), default)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {line.key: line.value for line in lines} for name, lines in self.sections.items()}


@dataclass(frozen=True)
class ConvertedRecipe:
    text: str
    """The commented TOML recipe."""
    recipe: dict[str, dict[str, Any]]
    """Its keys and values, as `clm-runner train` reads them."""
    command: str
    """"train", or "eval" for a run_clm job without --do_train (it only evaluated)."""


def convert_run_clm_args(
    args: Sequence[str], *, clm_runner_defaults: bool = False, recipe_path: str | None = None
) -> ConvertedRecipe:
    """The recipe for run_clm.py's flags (or its JSON file), checked as `train` checks a recipe."""
    parsed = parse_run_clm_args(args)
    if not parsed.given:
        raise RecipeError(
            "No run_clm.py arguments given: clm-runner recipe from-args -- --model_name_or_path ... (or ARGS.json)."
        )
    draft = _Draft()
    given = parsed.given
    _convert_model(given, draft)
    _convert_data(given, draft, pin=not clm_runner_defaults)
    command = _convert_training(given, draft, pin=not clm_runner_defaults)
    recipe = draft.as_dict()
    text = _render(draft, parsed, command, recipe_path or "RECIPE.toml", pinned=not clm_runner_defaults)
    _check(text, command)
    return ConvertedRecipe(text=text, recipe=recipe, command=command)


def _flag(name: str) -> str:
    return f"--{name}"


def _convert_model(given: dict[str, Any], draft: _Draft) -> None:
    if "torch_dtype" in given:
        raise RecipeError(
            f"--torch_dtype is run_clm's flag before transformers 5, which calls it --dtype: use --dtype "
            f"{given['torch_dtype']} (model.dtype in a recipe)."
        )
    for name in MODEL_KEYS:
        if name in given:
            draft.set("model", name, given[name], _flag(name))
    if given.get("token"):
        draft.notes["model"].append(
            "--token was given and is not written into the recipe: set HF_TOKEN, or --set model.token=... ."
        )
    if "low_cpu_mem_usage" in given:
        draft.notes["model"].append(
            "--low_cpu_mem_usage: transformers 5 always loads the weights this way; no key needed."
        )


def _convert_data(given: dict[str, Any], draft: _Draft, *, pin: bool) -> None:
    for name in DATA_KEYS:
        if name in given:
            draft.set("data", name, given[name], _flag(name))
    streaming = bool(given.get("streaming"))
    if streaming and not given.get("validation_file"):
        draft.notes["data"].append(
            "Streaming with no validation split: run_clm's train stream also skips row N of every 100 (N = "
            "validation_split_percentage); clm-runner trains on it, so the train stream differs by that row."
        )
    if not pin:
        return
    draft.set("data", "grouping", "run_clm", above=PINNED["grouping"])
    workers = given.get("preprocessing_num_workers")
    if workers and not streaming:  # run_clm streams without worker processes
        draft.set(
            "data",
            "run_clm_preprocessing_num_workers",
            workers,
            _flag("preprocessing_num_workers"),
            above=PINNED["run_clm_preprocessing_num_workers"],
        )
    if given.get("block_size") is not None:
        draft.set("data", "clamp_block_size", True, _flag("block_size"), above=PINNED["clamp_block_size"])


def _convert_training(given: dict[str, Any], draft: _Draft, *, pin: bool) -> str:
    from clm_runner.config import training_keys
    from clm_runner.config.secrets import SECRET_KEYS

    types = field_types()
    for name, value in given.items():
        if types[name][0] != "training" or name in ("do_train", "do_eval"):
            continue
        if name in training_keys.REFUSED:
            if value != types[name][2]:
                raise RecipeError(f"--{name} has no clm-runner equivalent: {training_keys.REFUSED[name]}")
            continue
        if ("training", name) in SECRET_KEYS:
            if value:
                draft.notes["training"].append(
                    f"--{name} was given and is not written into the recipe: set HF_TOKEN, or --set training.{name}=... ."
                )
            continue
        if name == "max_grad_norm" and isinstance(value, (int, float)) and value < 0:
            # The Trainer clips only above 0: a negative norm is run_clm's way of turning clipping off.
            value = 0.0
        draft.set("training", name, _dict_field(name, value), _flag(name))
    _convert_legacy(given, draft)

    strategy = draft.value("training", "eval_strategy", "no")
    evaluates = bool(given.get("do_eval")) or strategy not in ("no", None)
    trains = bool(given.get("do_train"))
    if not trains and not evaluates:
        raise RecipeError(
            "Without --do_train and --do_eval run_clm.py trains and evaluates nothing: add --do_train (and "
            "--do_eval) to the arguments."
        )
    if "do_eval" in given:  # TrainingArguments turns do_eval on with an eval_strategy, as here
        draft.set("training", "do_eval", evaluates, _flag("do_eval"))
    if trains:
        draft.notes["training"].append("--do_train: `clm-runner train` always trains.")
    if not draft.has("training", "output_dir"):
        draft.set(
            "training", "output_dir", "trainer_output", above="transformers' default without --output_dir."
        )
    if pin and trains:
        _pin_run_clm_training(given, draft, evaluates)
    return "train" if trains else "eval"


def _dict_field(name: str, value: Any) -> Any:
    """A TrainingArguments dict field given as JSON text on the command line becomes a TOML table."""
    from transformers import TrainingArguments

    if (
        name in TrainingArguments._VALID_DICT_FIELDS
        and isinstance(value, str)
        and value.lstrip().startswith("{")
    ):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise RecipeError(f"--{name} {value}: not valid JSON ({name} takes a JSON object).") from None
    return value


def _convert_legacy(given: dict[str, Any], draft: _Draft) -> None:
    """transformers 4.x flags: each to what replaced it, or refused naming it."""
    if given.get("overwrite_output_dir"):
        draft.notes["training"].append(
            "--overwrite_output_dir: transformers 5 dropped it; `clm-runner train --overwrite --no-resume` "
            "starts over in a used output dir (the old run is moved to previous-runs/, not mixed in)."
        )
        draft.run_flags += ["--overwrite", "--no-resume"]
    ratio = given.get("warmup_ratio")
    if ratio:
        if draft.has("training", "warmup_steps") and draft.value("training", "warmup_steps"):
            draft.notes["training"].append(
                "--warmup_ratio is overridden by --warmup_steps, as in transformers 4."
            )
        elif not 0 < ratio < 1:
            raise RecipeError(
                f"--warmup_ratio {ratio}: transformers 5 takes a warmup ratio as warmup_steps below 1; give a "
                "ratio below 1, or a number of steps with --warmup_steps."
            )
        else:
            draft.set(
                "training", "warmup_steps", float(ratio), "--warmup_ratio (a ratio: warmup_steps below 1)"
            )
    if given.get("evaluation_strategy") is not None:
        draft.set("training", "eval_strategy", given["evaluation_strategy"], "--evaluation_strategy")
    if given.get("no_cuda"):
        draft.set("training", "use_cpu", True, "--no_cuda")
    if given.get("save_safetensors") is False:
        raise RecipeError(
            "--save_safetensors False has no clm-runner equivalent: clm-runner always saves safetensors; "
            "remove the flag."
        )
    for old, new in (
        ("per_gpu_train_batch_size", "per_device_train_batch_size"),
        ("per_gpu_eval_batch_size", "per_device_eval_batch_size"),
    ):
        if given.get(old) is not None:
            draft.set("training", new, given[old], f"--{old}")
    if given.get("adafactor"):
        draft.set("training", "optim", "adafactor", "--adafactor")
    if given.get("logging_dir"):
        draft.environment.append(f"TENSORBOARD_LOGGING_DIR={shlex.quote(str(given['logging_dir']))}")
        draft.notes["training"].append(
            "--logging_dir: transformers 5 reads TENSORBOARD_LOGGING_DIR instead (set on the command above)."
        )
    for name, why in (
        ("use_mps_device", "Apple MPS is used without it"),
        ("include_tokens_per_second", "train_results.json always has train_tokens_per_second"),
    ):
        if given.get(name):
            draft.notes["training"].append(f"--{name}: {why}; no key needed.")


def _pin_run_clm_training(given: dict[str, Any], draft: _Draft, evaluates: bool) -> None:
    if not evaluates and not draft.has("training", "do_eval"):
        draft.set("training", "do_eval", False, above=PINNED["do_eval"])
    if not (draft.has("training", "bf16") or draft.has("training", "fp16")):
        draft.set("training", "bf16", False, above=PINNED["precision"])
        draft.set("training", "fp16", False)
    if not draft.has("training", "torch_compile"):
        draft.set("training", "torch_compile", False, above=PINNED["torch_compile"])
    # TrainingArguments itself turns TF32 on for --torch_compile unless fp16 alone is asked for: run_clm's
    # choice then is TF32, which clm-runner's default also makes where the GPU has it.
    compiled = draft.value("training", "torch_compile") is True
    half = draft.value("training", "fp16") is True and draft.value("training", "bf16") is not True
    if not draft.has("training", "tf32") and not (compiled and not half):
        draft.set("training", "tf32", False, above=PINNED["tf32"])
    if not draft.has("training", "dataloader_num_workers"):
        draft.set("training", "dataloader_num_workers", 0, above=PINNED["dataloader_num_workers"])


def _render(draft: _Draft, parsed: RunClmArguments, command: str, recipe_path: str, *, pinned: bool) -> str:

    from clm_runner.config.secrets import scrub

    secrets = [str(v) for k, v in parsed.given.items() if k in ("token", "hub_token") and v]
    original = scrub(shlex.join([*parsed.launcher, *parsed.command]), secrets)
    run = " ".join([*draft.environment, *_launch(parsed.launcher, command), "--recipe", recipe_path])
    run = " ".join([run, *draft.run_flags])
    if command == "eval" and parsed.given.get("output_dir"):
        # run_clm wrote its evaluation into output_dir's eval_results.json: so does the converted command.
        run += " -o " + shlex.quote(str(Path(str(parsed.given["output_dir"])) / "eval_results.json"))
    lines = ["# Converted from run_clm.py by `clm-runner recipe from-args`:"]
    lines += [f"#   {part}" for part in _wrap(original)]
    if command == "eval":
        lines.append("# run_clm ran without --do_train: it only evaluated. Evaluate as it did with:")
    else:
        lines.append("# Train it as run_clm would have:")
    lines.append(f"#   {run}")
    lines.append(
        "# Each key names the run_clm flag it comes from. Relative paths are relative to the directory"
    )
    lines.append("# you run from, as with run_clm.")
    if pinned:
        lines.append(
            "# Keys marked \"run_clm's choice\" pin run_clm's behaviour where clm-runner's default differs;"
        )
        lines.append(
            "# `clm-runner recipe from-args --clm-runner-defaults ...` leaves clm-runner's defaults there."
        )
    for section, entries in draft.sections.items():
        lines += ["", f"[{section}]"]
        lines += [f"# {part}" for note in draft.notes[section] for part in _wrap(note, width=106)]
        for entry in entries:
            if entry.above:
                lines += [f"# {part}" for part in _wrap(entry.above, width=106)]
            text = _toml_line(entry.key, entry.value)
            lines.append(f"{text}  # {entry.flag}" if entry.flag else text)
    return "\n".join(lines) + "\n"


def _launch(launcher: tuple[str, ...], command: str) -> list[str]:
    """clm-runner under the launcher run_clm ran under (torchrun, accelerate launch), or on its own."""
    if launcher and launcher[0] in ("torchrun", "accelerate"):
        return [*launcher, "-m", "clm_runner", command]
    return ["clm-runner", command]


def _toml_line(key: str, value: Any) -> str:
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: Any) -> str:
    """A value on one line: tables and arrays inline (a trailing comment then stays on the key's line)."""
    import tomli_w

    from clm_runner.config.render import _toml_key

    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")


def _wrap(text: str, width: int = 104) -> list[str]:
    words, lines, current = text.split(" "), [], ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*lines, current] if current else lines


def _check(text: str, command: str) -> None:
    """The text itself, read back as `train` (or `eval`) reads a recipe: every key and value valid."""
    from clm_runner.config.load import build_recipe
    from clm_runner.config.schema import tomllib

    try:
        build_recipe(tomllib.loads(text), require_output_dir=command == "train")
    except RecipeError as exc:
        raise RecipeError(f"run_clm.py's arguments give a recipe clm-runner refuses: {exc}") from None
