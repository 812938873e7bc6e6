"""[training]: the TrainingArguments keys clm-runner owns, and the values it refuses before any heavy work.

Every key of `transformers.TrainingArguments` may appear in [training]. Most pass straight through. The
ones below are owned by clm-runner (it sets, overrides or replaces what they control): each is either
honoured (`HONOURED` says how) or refused with a line that names the clm-runner way (`REFUSED`); none is
silently dropped. Values that TrainingArguments accepts but that would fail later, after the model is
built (a zero batch, a beta of 1, an unknown optimizer or reporting integration, a metric the evaluation
does not produce), are refused here too, with the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import typing
from collections.abc import Mapping
from typing import Any

from clm_runner.errors import RecipeError

HONOURED: dict[str, str] = {
    "output_dir": "where the run is written; the output-dir policy (refuse, resume, --overwrite) is clm-runner's",
    "resume_from_checkpoint": "resumes from that checkpoint, as --resume-from does",
    "do_train": "always true: `train` trains (false is refused)",
    "do_eval": "false skips the final evaluation (refused with an eval_strategy other than 'no')",
    "save_total_limit": "applied by clm-runner's rotation, which counts sealed checkpoints of this run only",
    "save_strategy": "checkpoints are written sealed (tmp-checkpoint-N, marker, rename)",
    "hub_token": "handed to the Hub through HF_TOKEN; never written to the output dir",
    "push_to_hub": "pushes checkpoints (hub_strategy) and the final model with its card; needs the Hub at start",
    "hub_model_id": "the Hub repository push_to_hub writes to",
    "hub_strategy": "which checkpoints push_to_hub sends",
    "hub_private_repo": "passed to the Hub repository creation",
    "hub_always_push": "passed to the Trainer's checkpoint push",
    "hub_revision": "the branch push_to_hub writes to",
    "use_cpu": "honoured; a multi-process run on a machine without a GPU trains on the CPU whatever it says",
    "ddp_backend": "honoured; gloo is chosen where a multi-process run trains on the CPU and none is set",
    "ddp_find_unused_parameters": (
        "false in a multi-process run unless set, checked against the model: true where it leaves trainable "
        "parameters without a gradient; false set for such a model is refused"
    ),
    "bf16": "a device default on CUDA; the recipe's value wins",
    "fp16": "a device default on older CUDA; the recipe's value wins",
    "tf32": "a device default on CUDA; the recipe's value wins",
    "torch_compile": "a device default on CUDA; the recipe's value wins",
    "dataloader_num_workers": "a device default on CUDA; the recipe's value wins",
    "dataloader_pin_memory": "a device default on CUDA; the recipe's value wins",
    "dataloader_persistent_workers": "a device default on CUDA; the recipe's value wins",
    "per_device_eval_batch_size": "the batch of clm-runner's exact evaluation",
    "metric_for_best_model": "one of the metrics clm-runner's evaluation logs",
    "disable_tqdm": "true gives plain log lines, as --quiet",
    "eval_on_start": "the untrained baseline, evaluated once: a resumed run has it in its log already",
}

_EXACT_EVAL = "clm-runner's exact evaluation sums NLL per batch and keeps no predictions"
REFUSED: dict[str, str] = {
    "do_predict": "run_clm has no predict step: score the test split with `clm-runner eval --split test`.",
    "local_rank": "it is set by the launcher (torchrun, accelerate launch), not by a recipe.",
    "enable_jit_checkpoint": (
        "clm-runner writes a sealed checkpoint itself on SIGTERM/SIGINT and prints the resume command."
    ),
    "prediction_loss_only": f"{_EXACT_EVAL}; remove the key.",
    "eval_accumulation_steps": f"{_EXACT_EVAL}, so there is nothing to accumulate; remove the key.",
    "eval_do_concat_batches": f"{_EXACT_EVAL}, so there is nothing to concatenate; remove the key.",
    "eval_use_gather_object": f"{_EXACT_EVAL} and all-reduces sums across ranks; remove the key.",
    "batch_eval_metrics": f"{_EXACT_EVAL} and computes its metrics per batch already; remove the key.",
    "include_for_metrics": f"{_EXACT_EVAL}; remove the key.",
    "label_names": "blocks carry `labels` (equal to input_ids, as in run_clm); remove the key.",
    "bf16_full_eval": (
        "evaluation runs under the training precision's autocast with float32 weights; remove the key "
        "(set model.dtype to load the weights in bfloat16 for `clm-runner eval`)."
    ),
    "fp16_full_eval": (
        "evaluation runs under the training precision's autocast with float32 weights; remove the key "
        "(set model.dtype to load the weights in float16 for `clm-runner eval`)."
    ),
    "parallelism_config": "it takes a Python object; use fsdp / fsdp_config or deepspeed instead.",
}

# Keys that older transformers or run_clm had and transformers 5 dropped: the closest valid key is not
# what the user needs, the clm-runner way is.
RENAMED: dict[str, str] = {
    "overwrite_output_dir": "pass --overwrite to `clm-runner train` instead (clm-runner owns the output dir)",
    "warmup_ratio": "use training.warmup_steps with a value below 1 (a ratio of the steps)",
    "evaluation_strategy": "it is called training.eval_strategy now",
    "logging_dir": "set the TENSORBOARD_LOGGING_DIR environment variable (transformers 5 has no logging_dir)",
    "torch_dtype": "use model.dtype",
    "no_cuda": "use training.use_cpu = true",
    "save_safetensors": "clm-runner always saves safetensors; remove the key",
}

# What the exact evaluation logs, the names metric_for_best_model may use (with or without "eval_").
EVAL_METRICS = ("loss", "perplexity", "accuracy")
LOWER_IS_BETTER = ("loss", "perplexity")
"""Metrics where lower is better: TrainingArguments guesses from the name (only "...loss"), so
clm-runner sets greater_is_better = false for perplexity when the recipe does not say."""
# Integer ranges (inclusive) of keys whose out-of-range values would fail only after the model is built.
INT_RANGES: dict[str, tuple[int | None, int | None, str]] = {
    "per_device_train_batch_size": (1, None, "at least 1 block"),
    "per_device_eval_batch_size": (1, None, "at least 1 block"),
    "gradient_accumulation_steps": (1, None, "at least 1"),
    "save_total_limit": (1, None, 'at least 1 (use save_strategy = "no" to keep none)'),
    "seed": (0, 2**32 - 1, "between 0 and 2**32 - 1 (numpy's seed range)"),
    "data_seed": (0, 2**32 - 1, "between 0 and 2**32 - 1 (numpy's seed range)"),
    "dataloader_num_workers": (0, None, "0 or more"),
    "dataloader_prefetch_factor": (1, None, "at least 1"),
    "ddp_timeout": (1, None, "at least 1 second"),
    "ddp_bucket_cap_mb": (1, None, "at least 1"),
    "torch_empty_cache_steps": (1, None, "at least 1"),
}
# Float ranges: (low, low inclusive, high, high inclusive, what to say).
FLOAT_RANGES: dict[str, tuple[float | None, bool, float | None, bool, str]] = {
    "learning_rate": (0.0, True, None, False, "0 or more"),
    "weight_decay": (0.0, True, None, False, "0 or more"),
    "adam_beta1": (0.0, True, 1.0, False, "in [0, 1)"),
    "adam_beta2": (0.0, True, 1.0, False, "in [0, 1)"),
    "adam_epsilon": (0.0, True, None, False, "0 or more"),
    "max_grad_norm": (0.0, True, None, False, "0 or more (0 turns clipping off)"),
    "label_smoothing_factor": (0.0, True, 1.0, False, "in [0, 1)"),
    "num_train_epochs": (0.0, False, None, False, "more than 0"),
    "warmup_steps": (0.0, True, None, False, "0 or more: a ratio below 1, or a number of steps"),
    "logging_steps": (0.0, False, None, False, "more than 0: a ratio below 1, or a number of steps"),
    "save_steps": (0.0, False, None, False, "more than 0: a ratio below 1, or a number of steps"),
    "eval_steps": (0.0, False, None, False, "more than 0: a ratio below 1, or a number of steps"),
    "eval_delay": (0.0, True, None, False, "0 or more"),
    "neftune_noise_alpha": (0.0, False, None, False, "more than 0"),
}
# Float keys where a value of 1 or more counts steps and must therefore be whole.
STEP_COUNTS = ("warmup_steps", "logging_steps", "save_steps", "eval_steps")


def refusal(key: str) -> str | None:
    """Why `training.<key>` cannot be set in a recipe, or None when it may be."""
    if key in REFUSED:
        return f"training.{key} is not used by clm-runner: {REFUSED[key]}"
    return None


def renamed(key: str) -> str | None:
    if key in RENAMED:
        return f"unknown key training.{key}: {RENAMED[key]}."
    return None


def _enum_of(annotation: Any) -> type[enum.Enum] | None:
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return arg
    return None


def _choices(name: str) -> tuple[str, ...] | None:
    """The allowed string values of a TrainingArguments key: its enum's values or its declared choices."""
    from clm_runner.config.types import training_argument_types

    enum_type = _enum_of(training_argument_types().get(name))
    if enum_type is not None:
        return tuple(str(member.value) for member in enum_type)
    from transformers import TrainingArguments

    field = {f.name: f for f in dataclasses.fields(TrainingArguments)}.get(name)
    if field is not None and "choices" in field.metadata:
        return tuple(str(choice) for choice in field.metadata["choices"])
    return None


def _suggest(value: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f": did you mean {close[0]!r}?" if close else "."


def check_values(training: Mapping[str, Any], where: str = "") -> None:
    """Refuse, with the key and the fix, values TrainingArguments would take but the run could not use."""
    for key, value in training.items():
        if isinstance(value, bool):
            continue
        choices = _choices(key)
        if choices is not None and isinstance(value, str) and value not in choices:
            raise RecipeError(
                f"{where}training.{key} = {value!r} is not one of {', '.join(map(repr, choices))}"
                f"{_suggest(value, choices)}"
            )
        if key in INT_RANGES and isinstance(value, int):
            low, high, what = INT_RANGES[key]
            if (low is not None and value < low) or (high is not None and value > high):
                raise RecipeError(f"{where}training.{key} must be {what}; got {value}.")
        if key in FLOAT_RANGES and isinstance(value, (int, float)):
            _check_float(key, float(value), where)
    _check_max_steps(training, where)
    _check_report_to(training.get("report_to"), where)
    _check_best_metric(training.get("metric_for_best_model"), where)
    _check_do_flags(training, where)


def _check_float(key: str, value: float, where: str) -> None:
    low, low_inclusive, high, high_inclusive, what = FLOAT_RANGES[key]
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value < low or (value == low and not low_inclusive)
    if high is not None:
        bad |= value > high or (value == high and not high_inclusive)
    if bad:
        raise RecipeError(f"{where}training.{key} must be {what}; got {value}.")
    if key in STEP_COUNTS and value >= 1 and not value.is_integer():
        raise RecipeError(
            f"{where}training.{key} = {value}: a value of 1 or more counts steps and must be whole; "
            "a value below 1 is a ratio of the run's steps."
        )


def _check_max_steps(training: Mapping[str, Any], where: str) -> None:
    value = training.get("max_steps")
    if isinstance(value, int) and not isinstance(value, bool) and value != -1 and value <= 0:
        raise RecipeError(
            f"{where}training.max_steps must be more than 0, or -1 (the default) to train num_train_epochs; "
            f"got {value}."
        )


def _check_report_to(value: Any, where: str) -> None:
    if value is None:
        return
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    known = sorted(INTEGRATION_TO_CALLBACK)
    available = set(get_available_reporting_integrations())
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise RecipeError(
                f"{where}training.report_to names {name!r}, not a reporting integration transformers knows"
                f'{_suggest(name, tuple(known))} Known: {", ".join(known)}, or "none".'
            )
        if name not in available:
            extra = " (`pip install 'clm-runner[tensorboard]'`)" if name == "tensorboard" else ""
            raise RecipeError(
                f"{where}training.report_to names {name!r}, which is not installed: install its package{extra} "
                'or remove it from training.report_to (report_to = "none").'
            )


def metric_kind(metric: str) -> tuple[str | None, str]:
    """(source, kind) of a metric_for_best_model: ("harbour", "perplexity") for "harbour_perplexity", one
    [[data.mix]] source's figure; (None, "loss") for "loss" or "eval_loss". kind is "" when it is none of them."""
    name = metric.removeprefix("eval_")
    if name in EVAL_METRICS:
        return None, name
    source, _, kind = name.rpartition("_")
    return (source, kind) if source and kind in EVAL_METRICS else (None, "")


def _check_best_metric(value: Any, where: str) -> None:
    if not isinstance(value, str):
        return
    name = value.removeprefix("eval_")
    if not metric_kind(value)[1]:
        valid = ", ".join(f"{m!r}" for m in EVAL_METRICS)
        close = difflib.get_close_matches(name, EVAL_METRICS, n=1, cutoff=0.6)
        hint = (
            f"did you mean {close[0]!r}? Valid (or one [[data.mix]] source's, as NAME_perplexity): "
            if close
            else "choose (or one [[data.mix]] source's, as NAME_perplexity) "
        )
        raise RecipeError(
            f"{where}training.metric_for_best_model = {value!r} is not a metric clm-runner's evaluation logs; "
            f"{hint}{valid}."
        )


def _check_do_flags(training: Mapping[str, Any], where: str) -> None:
    if training.get("do_train") is False:
        raise RecipeError(
            f"{where}training.do_train = false: `clm-runner train` always trains. To only evaluate, use "
            "`clm-runner eval`; remove the key."
        )
    strategy = training.get("eval_strategy", "no")
    if training.get("do_eval") is False and strategy not in ("no", None):
        raise RecipeError(
            f"{where}training.do_eval = false contradicts training.eval_strategy = {strategy!r}, which "
            'evaluates during training. Set eval_strategy = "no" to skip every evaluation, or remove do_eval.'
        )


def check_best_model_fits(training: Mapping[str, Any], *, early_stopping: bool, where: str = "") -> None:
    """[early_stopping] and load_best_model_at_end compare evaluations and keep the best one's checkpoint: they
    need evaluations, checkpoints, and a checkpoint written at every evaluation."""
    from clm_runner.config.types import training_defaults

    values = {**training_defaults(), **training}
    what = "[early_stopping]" if early_stopping else "training.load_best_model_at_end"
    eval_strategy, save_strategy = str(values["eval_strategy"]), str(values["save_strategy"])
    if eval_strategy == "no":
        raise RecipeError(
            f'{where}{what} compares evaluations, but training.eval_strategy is "no". Set eval_strategy = '
            '"steps" (with eval_steps) or "epoch".'
        )
    if save_strategy in ("no", "best"):
        raise RecipeError(
            f"{where}{what} keeps the best evaluation's checkpoint, but training.save_strategy is {save_strategy!r}. "
            f"Set save_strategy = {eval_strategy!r} (as eval_strategy), so each evaluation has its checkpoint."
        )
    if eval_strategy != save_strategy:
        raise RecipeError(
            f"{where}{what} needs a checkpoint at every evaluation, but training.eval_strategy is {eval_strategy!r} "
            f"and training.save_strategy is {save_strategy!r}. Set both to {eval_strategy!r}."
        )
    if eval_strategy == "steps":
        eval_steps = values.get("eval_steps") or values["logging_steps"]
        if values["save_steps"] != eval_steps:
            source = (
                "training.eval_steps"
                if values.get("eval_steps")
                else "training.logging_steps (eval_steps unset)"
            )
            raise RecipeError(
                f"{where}{what} needs a checkpoint at every evaluation, but training.save_steps = "
                f"{values['save_steps']} and {source} = {eval_steps}. Set training.save_steps = {eval_steps} "
                f"(or eval_steps = {values['save_steps']})."
            )
