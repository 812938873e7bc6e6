"""A resume trains with the recipe's learning rate and optimizer settings, not the checkpoint's.

The Trainer loads a checkpoint's optimizer and scheduler states whole: their param groups hold the weight
decay, betas and epsilon the checkpoint was trained with, and the scheduler its base learning rates, so a
resumed (or branched) run whose recipe changed them trained on with the old values while recipe.toml
recorded the new ones. Here the recipe's values, read from the optimizer and scheduler the Trainer built for
this recipe before the load, are put back over the loaded ones: the moments and the place in the schedule
stay the checkpoint's, the values are the recipe's, the rate the new base rate times the schedule's factor
at the checkpoint's step. A schedule that records no base rate (reduce_lr_on_plateau: its reductions live
in the rate itself) keeps the checkpoint's rate, and the run warns, as under DeepSpeed, whose engine loads
its own optimizer (`restored_on_resume` in clm_runner.rundir.changes).
"""

from __future__ import annotations

from typing import Any

GROUP_SETTINGS = {
    "weight_decay": ("weight_decay",),
    "betas": ("adam_beta1", "adam_beta2"),
    "eps": ("adam_epsilon",),
}
"""Param-group keys the recipe sets, and the [training] keys they come from."""


def recipe_settings(optimizer: Any, scheduler: Any) -> list[dict[str, Any]]:
    """What the recipe set in each param group (and its base rate, where the schedule has one), read before a
    checkpoint's states are loaded over them."""
    bases = list(getattr(scheduler, "base_lrs", None) or [])
    settings = []
    for index, group in enumerate(optimizer.param_groups):
        wanted = {key: group[key] for key in GROUP_SETTINGS if key in group}
        if index < len(bases):
            wanted["base_lr"] = bases[index]
        settings.append(wanted)
    return settings


def apply_recipe_settings(
    optimizer: Any, scheduler: Any, settings: list[dict[str, Any]]
) -> dict[str, tuple[Any, Any]]:
    """Put the recipe's settings over the loaded states; returns {recipe key: (checkpoint's, recipe's)} of what
    differed (empty when the recipe is the checkpoint's)."""
    groups = optimizer.param_groups
    if len(groups) != len(settings):
        return {}  # another grouping: the load itself would have failed; nothing to match up
    applied: dict[str, tuple[Any, Any]] = {}
    for index, (group, wanted) in enumerate(zip(groups, settings, strict=True)):
        if "base_lr" in wanted:
            _apply_base_rate(group, scheduler, index, wanted["base_lr"], applied)
        for key, recipe_keys in GROUP_SETTINGS.items():
            if key not in wanted or key not in group or _as_tuple(group[key]) == _as_tuple(wanted[key]):
                continue
            old, new = group[key], wanted[key]
            group[key] = new
            for position, recipe_key in enumerate(recipe_keys):
                was, now = (old[position], new[position]) if key == "betas" else (old, new)
                if was != now:
                    applied.setdefault(recipe_key, (was, now))
    if "learning_rate" in applied and hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in groups]  # what the Trainer logs as the rate
    return applied


def _apply_base_rate(group: dict, scheduler: Any, index: int, new_base: float, applied: dict) -> None:
    bases = scheduler.base_lrs
    loaded_base = bases[index]
    if new_base == loaded_base:
        return
    applied.setdefault("learning_rate", (loaded_base, new_base))
    bases[index] = new_base
    if "initial_lr" in group:
        group["initial_lr"] = new_base
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None:  # transformers' schedules: the factor at the checkpoint's step, as its next step
        group["lr"] = new_base * lambdas[index](scheduler.last_epoch)
    elif loaded_base:  # another schedule with base rates: its factor is the loaded rate's
        group["lr"] = group["lr"] * new_base / loaded_base


def describe(applied: dict[str, tuple[Any, Any]], checkpoint: str) -> str:
    """The line a resume logs when it trains with the recipe's values, not the checkpoint's."""
    changes = ", ".join(f"{key} {new:g} (the checkpoint's {old:g})" for key, (old, new) in applied.items())
    return f"Resuming {checkpoint} with the recipe's {changes}; the optimizer's moments are the checkpoint's."


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value
