"""run_clm.py's arguments, read as run_clm reads them: its flags through transformers' HfArgumentParser over its
ModelArguments and DataTrainingArguments (mirrored here, names and defaults) and the installed TrainingArguments,
or its JSON file (`python run_clm.py args.json`, HfArgumentParser.parse_json_file's rules).

Only what was given is kept (the name, its value as run_clm would see it, the flag it came from); what the
arguments mean for a recipe is clm_runner.config.from_run_clm's business. Flags of transformers 4.x that version
5 dropped are read too (LegacyArguments), so that each gets its own answer instead of "unknown".
"""

import argparse
import dataclasses
import difflib
import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from clm_runner.errors import RecipeError

# No `from __future__ import annotations` here: HfArgumentParser reads these annotations as types.


@dataclass
class ModelArguments:
    """run_clm.py's ModelArguments (transformers 5: `dtype`, formerly `torch_dtype`)."""

    model_name_or_path: Optional[str] = None  # noqa: UP045 - run_clm's own spelling of every field
    model_type: Optional[str] = None  # noqa: UP045
    config_overrides: Optional[str] = None  # noqa: UP045
    config_name: Optional[str] = None  # noqa: UP045
    tokenizer_name: Optional[str] = None  # noqa: UP045
    cache_dir: Optional[str] = None  # noqa: UP045
    use_fast_tokenizer: bool = True
    model_revision: str = "main"
    token: Optional[str] = None  # noqa: UP045
    trust_remote_code: bool = False
    dtype: Optional[str] = field(  # noqa: UP045
        default=None, metadata={"choices": ["auto", "bfloat16", "float16", "float32"]}
    )


@dataclass
class DataTrainingArguments:
    """run_clm.py's DataTrainingArguments."""

    dataset_name: Optional[str] = None  # noqa: UP045
    dataset_config_name: Optional[str] = None  # noqa: UP045
    train_file: Optional[str] = None  # noqa: UP045
    validation_file: Optional[str] = None  # noqa: UP045
    max_train_samples: Optional[int] = None  # noqa: UP045
    max_eval_samples: Optional[int] = None  # noqa: UP045
    streaming: bool = False
    block_size: Optional[int] = None  # noqa: UP045
    overwrite_cache: bool = False
    validation_split_percentage: Optional[int] = 5  # noqa: UP045
    preprocessing_num_workers: Optional[int] = None  # noqa: UP045
    keep_linebreaks: bool = True


@dataclass
class LegacyArguments:
    """run_clm's and TrainingArguments' flags of transformers 4.x that transformers 5 dropped, with their
    4.x types and defaults: from_run_clm converts each or refuses it naming the replacement."""

    torch_dtype: Optional[str] = None  # noqa: UP045 - ModelArguments before `dtype`
    low_cpu_mem_usage: bool = False  # ModelArguments before transformers 5 always loaded this way
    overwrite_output_dir: bool = False
    warmup_ratio: float = 0.0
    evaluation_strategy: Optional[str] = None  # noqa: UP045
    logging_dir: Optional[str] = None  # noqa: UP045
    no_cuda: bool = False
    save_safetensors: bool = True
    per_gpu_train_batch_size: Optional[int] = None  # noqa: UP045
    per_gpu_eval_batch_size: Optional[int] = None  # noqa: UP045
    use_mps_device: bool = False
    include_tokens_per_second: bool = False
    adafactor: bool = False


# Other flags of transformers 4.x: no value is read, the refusal names what replaced them.
DROPPED: dict[str, str] = {
    "push_to_hub_model_id": "use --hub_model_id (training.hub_model_id)",
    "push_to_hub_organization": "use --hub_model_id ORG/NAME (training.hub_model_id)",
    "push_to_hub_token": "set HF_TOKEN (or training.hub_token)",
    "fp16_backend": "remove it: mixed precision runs through torch.amp (training.fp16)",
    "half_precision_backend": "remove it: mixed precision runs through torch.amp (training.bf16 / fp16)",
    "torchdynamo": "use --torch_compile_backend (training.torch_compile_backend)",
    "group_by_length": "remove it: every block has the same length (data.block_size)",
    "length_column_name": "remove it: every block has the same length (data.block_size)",
    "split_batches": "use --accelerator_config '{\"split_batches\": true}' (training.accelerator_config)",
    "dispatch_batches": "use --accelerator_config (training.accelerator_config)",
    "include_inputs_for_metrics": "remove it: clm-runner's exact evaluation keeps no inputs",
    "use_legacy_prediction_loop": "remove it: clm-runner's exact evaluation has its own loop",
    "fsdp_min_num_params": "use --fsdp_config '{\"min_num_params\": N}' (training.fsdp_config)",
    "fsdp_transformer_layer_cls_to_wrap": "use --fsdp_config (training.fsdp_config)",
    "sharded_ddp": "use --fsdp (training.fsdp)",
    "tpu_num_cores": "remove it: TPUs are not supported",
    "use_ipex": "remove it: transformers 5 dropped IPEX",
    "jit_mode_eval": "remove it: transformers 5 dropped it",
    "past_index": "remove it: transformers 5 dropped it",
    "ray_scope": "remove it: clm-runner does no hyperparameter search",
    "mp_parameters": "remove it: transformers 5 dropped SageMaker model parallelism",
}

GROUPS = ("model", "data", "training", "legacy")


@dataclass(frozen=True)
class RunClmArguments:
    """The arguments given to run_clm.py (and only those), as its parser reads them."""

    given: dict[str, Any]
    """Field name -> value, in the order of the fields (model, data, training, legacy)."""
    group: dict[str, str]
    """Field name -> "model", "data", "training" or "legacy"."""
    command: tuple[str, ...]
    """What was converted: run_clm.py's command line, or `run_clm.py ARGS.json`."""
    launcher: tuple[str, ...] = ()
    """What ran run_clm.py, when it was not plain python (torchrun ..., accelerate launch ...)."""


def _dataclasses() -> tuple[type, ...]:
    from transformers import TrainingArguments

    return (ModelArguments, DataTrainingArguments, TrainingArguments, LegacyArguments)


def field_types() -> dict[str, tuple[str, Any, Any]]:
    """Field name -> (group, annotation, default) of every argument run_clm.py reads."""
    out: dict[str, tuple[str, Any, Any]] = {}
    for group, cls in zip(GROUPS, _dataclasses(), strict=True):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in out:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            out[f.name] = (group, hints.get(f.name, Any), default)
    return out


def parse_run_clm_args(args: Sequence[str]) -> RunClmArguments:
    """run_clm.py's flags, or its one JSON file; a command line may start with `python run_clm.py` (and a
    launcher before it)."""
    args = list(args)
    launcher: list[str] = []
    script = next((i for i, arg in enumerate(args) if arg.endswith("run_clm.py")), None)
    if script is not None:
        launcher = [a for a in args[:script] if not Path(a).name.startswith("python")]
        args = args[script + 1 :]
    if len(args) == 1 and args[0].endswith(".json"):
        given = _read_json_file(Path(args[0]))
        return _arguments(given, ("run_clm.py", args[0]), launcher)
    return _arguments(_read_flags(args), ("run_clm.py", *args), launcher)


def _arguments(given: dict[str, Any], command: tuple[str, ...], launcher: list[str]) -> RunClmArguments:
    types = field_types()
    ordered = {name: given[name] for name in types if name in given}
    return RunClmArguments(
        given=ordered,
        group={name: types[name][0] for name in ordered},
        command=command,
        launcher=tuple(launcher),
    )


def _parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):  # argparse prints its usage and exits: one line instead
            raise RecipeError(f"run_clm.py arguments: {message}.")

    # run_clm's parser (argparse's defaults: abbreviations allowed), without --help: it is not run_clm.
    parser = Parser(_dataclasses(), add_help=False, prog="run_clm.py")
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # only what is given reaches the namespace
    return parser


def _read_flags(args: list[str]) -> dict[str, Any]:
    from clm_runner.config.types import plain_value

    parser = _parser()
    namespace, remaining = parser.parse_known_args(args)
    if remaining:
        message = _unknown(remaining[0], parser)
        flags = [a for a in args[: args.index(remaining[0])] if a.startswith("--")]
        before = flags[-1] if flags else ""
        if not remaining[0].startswith("-") and before:
            message = message.removesuffix(".") + f" ({before.split('=')[0]} takes one value here)."
        raise RecipeError(message)
    return {name: plain_value(value) for name, value in vars(namespace).items()}


def _flag_names(parser: argparse.ArgumentParser) -> list[str]:
    return [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]


def _unknown(token: str, parser: argparse.ArgumentParser | None = None) -> str:
    if not token.startswith("-"):
        return (
            f"run_clm.py takes no argument {token!r} on its own: give flags (--name value), or the path of "
            "its JSON file alone."
        )
    name = token.lstrip("-").split("=", 1)[0].replace("-", "_")
    if name in ("o", "output", "clm_runner_defaults"):
        return (
            f"{token.split('=', 1)[0]} is clm-runner's option, not run_clm.py's: put clm-runner's options "
            "(-o/--output, --clm-runner-defaults) before `--` and run_clm's flags."
        )
    if name in DROPPED:
        return f"--{name} is a run_clm flag of transformers 4.x that transformers 5 dropped: {DROPPED[name]}."
    choices = _flag_names(parser) if parser is not None else [f"--{n}" for n in field_types()]
    close = difflib.get_close_matches(f"--{name}", choices, n=1, cutoff=0.6)
    hint = f": did you mean {close[0]}?" if close else "."
    return (
        f"--{name} is not an argument of run_clm.py (its ModelArguments, DataTrainingArguments or the installed "
        f"TrainingArguments){hint}"
    )


def _read_json_file(path: Path) -> dict[str, Any]:
    """HfArgumentParser.parse_json_file: every key a field of the dataclasses, values taken as they are."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such file (run_clm's JSON arguments file).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"{path} is not a JSON file run_clm.py can read ({exc}).") from None
    if not isinstance(loaded, dict):
        raise RecipeError(f"{path}: run_clm's JSON arguments are one object of name: value pairs.")
    types = field_types()
    for name in loaded:
        if name not in types:
            raise RecipeError(f"{path}: {_unknown('--' + name)}")
    for name, value in loaded.items():
        if value is None and types[name][2] is not None:
            raise RecipeError(
                f"{path}: {name} is null, but run_clm.py needs a value there (its default: "
                f"{types[name][2]!r}). Give a value or drop the key."
            )
    # A null where the field's default is None is that default: as if the key were absent.
    return {name: _as_parsed(value, types[name][1]) for name, value in loaded.items() if value is not None}


def _as_parsed(value: Any, annotation: Any) -> Any:
    """A JSON value as the flag's parser would have typed it: 3 for a float field is 3.0."""
    args = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
    if float in args and int not in args and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
