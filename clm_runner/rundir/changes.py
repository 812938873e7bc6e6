"""Which differences between a run dir's recipe and a rerun's change what would be trained: the one place that says.

A finished run rerun with the same recipe is complete (exit 0); a rerun whose recipe changes what would be
trained is refused, naming the keys (clm_runner.rundir.policy). Keys that only change what a run writes,
logs or reports, or how fast it loads data, do not count (`OUTPUT_ONLY`). The length (`max_steps`,
`num_train_epochs`) is judged by its own rule: a longer run continues the finished one, a length the run
already covers changes nothing, a shorter one is a change. Where a line starts (`resume_from_checkpoint`)
is the branch rule's (clm_runner.rundir.branch). Paths are compared as the files they name (`changes_since`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

OUTPUT_ONLY: frozenset[str] = frozenset(
    {
        # Where the run is written: the same dir, perhaps spelled another way (relative, absolute).
        "training.output_dir",
        # What is logged and where it is reported.
        "training.logging_strategy",
        "training.logging_steps",
        "training.logging_first_step",
        "training.logging_nan_inf_filter",
        "training.log_level",
        "training.log_level_replica",
        "training.log_on_each_node",
        "training.disable_tqdm",
        "training.include_num_input_tokens_seen",
        "training.skip_memory_metrics",
        "training.debug",
        "training.report_to",
        "training.project",
        "training.run_name",
        "training.trackio_space_id",
        "training.trackio_bucket_id",
        "training.trackio_static_space_id",
        # Which checkpoints are kept and where copies go (not when they are written: the best model is
        # chosen among the checkpoints written, so save_strategy and save_steps count).
        "training.save_total_limit",
        "training.save_on_each_node",
        "training.save_only_model",
        "training.push_to_hub",
        "training.hub_model_id",
        "training.hub_strategy",
        "training.hub_private_repo",
        "training.hub_always_push",
        "training.hub_revision",
        # How fast data is loaded and memory handled: the same batches, the same numbers.
        "training.dataloader_num_workers",
        "training.dataloader_pin_memory",
        "training.dataloader_persistent_workers",
        "training.dataloader_prefetch_factor",
        "training.dataloader_multiprocessing_context",
        "training.torch_empty_cache_steps",
        "training.ddp_timeout",
        # Whether DDP searches for parameters without a gradient: the same gradients either way.
        "training.ddp_find_unused_parameters",
        # The exact evaluation sums NLL over every token: its batch changes no number beyond float rounding.
        "training.per_device_eval_batch_size",
        "data.preprocessing_num_workers",  # blocks never depend on it
        "data.overwrite_cache",  # the same blocks, rebuilt
        "model.cache_dir",  # where downloads are kept
    }
)
OUTPUT_ONLY_SECTIONS = ("eval",)
"""[eval] says how `clm-runner eval` scores a model; `train` never reads it."""
RESTORED_FROM_CHECKPOINT = (
    "training.learning_rate",
    "training.weight_decay",
    "training.adam_beta1",
    "training.adam_beta2",
    "training.adam_epsilon",
)
"""The optimizer's settings (its state holds them per parameter group) and the schedule's base learning rate
(the scheduler's state holds it): a resume puts the recipe's back over the checkpoint's
(clm_runner.train.resume_settings), except where it can't (`restored_on_resume`)."""
SETTLED_WITH_THE_MODEL = frozenset({"training.ddp_find_unused_parameters"})
"""Keys a run settles once its model is built, where the recipe leaves them unset (None in the recipe being
planned; clm_runner.train.unused_parameters): what an earlier attempt recorded is that settlement, not a
change of the recipe."""
LENGTH_KEYS = ("training.max_steps", "training.num_train_epochs")
JUDGED_ELSEWHERE = (*LENGTH_KEYS, "training.resume_from_checkpoint")


DATA_PATH_KEYS = ("train_file", "validation_file", "test_file")
"""Keys of [data] and of each [[data.mix]] table that always name local files (or globs)."""
PATH_OR_NAME_KEYS = {
    "model": ("model_name_or_path", "config_name", "tokenizer_name"),
    "data": ("dataset_name",),
    "training": ("deepspeed", "fsdp_config"),
}
"""Keys that name a local path or something else (a hub id, an inline table): a path only where one exists."""


def changes_since(manifest: Mapping[str, Any] | None, resolved: Mapping[str, Any] | None) -> tuple[str, ...]:
    """recipe_changes between the run dir's recipe (run.json) and a rerun's, each path compared as the file it
    names: relative to the dir its run was started from (run.json's cwd), so a spelling is no change."""
    if resolved is None or manifest is None or not isinstance(manifest.get("recipe"), dict):
        return ()
    started_in = manifest.get("cwd") if isinstance(manifest.get("cwd"), str) else None
    return tuple(
        recipe_changes(with_paths_resolved(manifest["recipe"], started_in), with_paths_resolved(resolved))
    )


def with_paths_resolved(resolved: Mapping[str, Any], started_in: str | None = None) -> dict[str, Any]:
    """A resolved recipe whose local paths are absolute, taken from `started_in` (default: here)."""
    base = started_in or os.getcwd()
    out = {
        section: dict(table) if isinstance(table, Mapping) else table for section, table in resolved.items()
    }
    data = out.get("data")
    if isinstance(data, dict):
        _resolve_tables(data, base)
        if isinstance(data.get("mix"), list):
            data["mix"] = [dict(s) if isinstance(s, Mapping) else s for s in data["mix"]]
            for source in data["mix"]:
                if isinstance(source, dict):
                    _resolve_tables(source, base)
    for section, keys in PATH_OR_NAME_KEYS.items():
        table = out.get(section)
        for key in keys if isinstance(table, dict) else ():
            if isinstance(table.get(key), str):
                table[key] = _path(table[key], base, only_if_there=True)
    return out


def _resolve_tables(table: dict[str, Any], base: str) -> None:
    for key in DATA_PATH_KEYS:
        value = table.get(key)
        if isinstance(value, str):
            table[key] = _path(value, base)
        elif isinstance(value, list):
            table[key] = [_path(v, base) if isinstance(v, str) else v for v in value]
    if isinstance(table.get("dataset_name"), str):
        table["dataset_name"] = _path(table["dataset_name"], base, only_if_there=True)


def _path(value: str, base: str, *, only_if_there: bool = False) -> str:
    """`value` as an absolute path from `base` (symlinks followed where it exists); with `only_if_there`,
    unchanged unless it names something that exists (a hub id is no path)."""
    path = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    if os.path.exists(path):
        return os.path.realpath(path)
    return value if only_if_there else path


def recipe_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value differs between two resolved recipes, each as "key: old -> new"."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes: list[str] = []
        for key in sorted(set(old) | set(new)):
            dotted = f"{prefix}.{key}" if prefix else str(key)
            changes.extend(recipe_changes(old.get(key), new.get(key), dotted))
        return changes
    if old != new and not (new is None and prefix in SETTLED_WITH_THE_MODEL):
        return [f"{prefix}: {old!r} -> {new!r}"]
    return []


def changed_key(change: str) -> str:
    """The dotted key of one of recipe_changes' lines."""
    return change.partition(": ")[0]


def output_only(key: str) -> bool:
    return key in OUTPUT_ONLY or key.partition(".")[0] in OUTPUT_ONLY_SECTIONS


def changes_what_is_trained(changes: Iterable[str], *, shorter: bool = False) -> list[str]:
    """The changes that change what would be trained; the length's count only when `shorter`."""
    counted = set(LENGTH_KEYS) if shorter else set()
    return [
        change
        for change in changes
        if not output_only(key := changed_key(change)) and (key not in JUDGED_ELSEWHERE or key in counted)
    ]


def compare_length(max_steps: int, num_train_epochs: float, reached: tuple[int, float] | None) -> int:
    """1 when a recipe asks for more training than a run reached (global step, epoch), -1 for less, else 0."""
    if reached is None:
        return 0
    step, epoch = reached
    if max_steps > 0:
        return (max_steps > step) - (max_steps < step)
    return (num_train_epochs > epoch + 1e-9) - (num_train_epochs < epoch - 1e-9)


def restored_on_resume(changes: Iterable[str], args: Any) -> str | None:
    """The warning a resume owes when the recipe changes RESTORED_FROM_CHECKPOINT keys it can't apply: all of
    them under DeepSpeed (its engine loads the optimizer), the learning rate under reduce_lr_on_plateau (its
    reductions live in the rate, no base rate is recorded). `args`: the run's TrainingArguments."""
    deepspeed = bool(args.deepspeed)
    plateau = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "reduce_lr_on_plateau"
    keys = [key for change in changes if (key := changed_key(change)) in RESTORED_FROM_CHECKPOINT]
    if not deepspeed:
        keys = [key for key in keys if plateau and key == "training.learning_rate"]
    if not keys:
        return None
    why = (
        "DeepSpeed restores the checkpoint's optimizer"
        if deepspeed
        else "reduce_lr_on_plateau keeps its rate"
    )
    return (
        f"The recipe changes {', '.join(keys)}, but {why}, so the checkpoint's value applies. To train with the "
        "new value, start over (--no-resume --overwrite, or another training.output_dir)."
    )
