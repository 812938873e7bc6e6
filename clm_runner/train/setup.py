"""Everything decided about a run before any heavy work: the shared code of `train` and `recipe check`.

`prepare_run` checks, in order: the TrainingArguments the run builds (once, with and without this device's
defaults), the hub where push_to_hub needs it, the local paths the recipe names, the data sources, the
tokenizer, config and block size, and what the output dir allows (new, resume, restart, refused). Data
preparation and the weights come only after it said yes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clm_runner.config.render import resolved_dict
from clm_runner.config.schema import Recipe
from clm_runner.errors import RecipeError
from clm_runner.rundir.policy import OutputPlan, RunIdentity, plan_output_dir
from clm_runner.train.distributed import check_one_job, distributed_training_defaults

logger = logging.getLogger("clm_runner")


@dataclass(frozen=True)
class TrainOptions:
    overwrite: bool = False
    resume: bool = True
    resume_from: str | None = None
    quiet: bool = False
    argv: Sequence[str] = ()


def training_kwargs(recipe: Recipe, *, with_device_defaults: bool = True) -> dict[str, Any]:
    """The TrainingArguments a run uses: the recipe's [training], what `train` always does, device defaults.

    Device defaults (precision, compile, data loading: `performance.device_defaults`) fill only keys the
    recipe leaves out; without them this is what recipe.toml records, so a rerun elsewhere gets its own.
    """
    kwargs = dict(recipe.training)
    # TrainingArguments is pickled into every checkpoint (training_args.bin): a token there would be on
    # disk in clear. run_training hands it to huggingface_hub through the environment instead.
    kwargs.pop("hub_token", None)
    # clm-runner resumes itself (the output-dir policy); the key is honoured as --resume-from.
    kwargs.pop("resume_from_checkpoint", None)
    from clm_runner.config.types import CLM_RUNNER_DEFAULTS

    for key, value in CLM_RUNNER_DEFAULTS.items():  # do_train, do_eval
        kwargs.setdefault(key, value)
    kwargs.update(best_model_defaults(kwargs, early_stopping=recipe.early_stopping is not None))
    kwargs.update(distributed_training_defaults(kwargs))
    if with_device_defaults:
        from clm_runner.train.device import device_defaults

        kwargs.update(device_defaults(kwargs))
    return kwargs


def best_model_defaults(kwargs: dict[str, Any], *, early_stopping: bool) -> dict[str, Any]:
    """What choosing a best model needs and TrainingArguments would guess wrong or leave unset.

    Early stopping and load_best_model_at_end compare evaluations by metric_for_best_model (default: the eval
    loss); TrainingArguments guesses greater_is_better from the name, true for anything not ending in "loss",
    which is wrong for perplexity.
    """
    from clm_runner.config.training_keys import LOWER_IS_BETTER, metric_kind

    out: dict[str, Any] = {}
    if early_stopping and "load_best_model_at_end" not in kwargs:
        # A stopped run's last checkpoint is `patience` evaluations past its best: end with the best one.
        out["load_best_model_at_end"] = kwargs["load_best_model_at_end"] = True
    metric = kwargs.get("metric_for_best_model")
    if metric is None and (early_stopping or kwargs.get("load_best_model_at_end")):
        metric = out["metric_for_best_model"] = "loss"
    if isinstance(metric, str) and kwargs.get("greater_is_better") is None:
        out["greater_is_better"] = metric_kind(metric)[1] not in LOWER_IS_BETTER
    return out


def build_training_args(kwargs: dict[str, Any]):
    from transformers import TrainingArguments

    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"[training] is inconsistent: {str(exc).strip()}") from None
    except ImportError as exc:  # a package a key needs (preflight.check_packages names the known ones)
        raise RecipeError(f"[training] needs a package that is not installed: {str(exc).strip()}") from None
    except OSError as exc:  # a config file a key names (fsdp_config, accelerator_config, deepspeed)
        raise RecipeError(f"[training] names a file that can't be read: {exc}. Fix the path.") from None


@dataclass(frozen=True)
class RunSetup:
    """Everything decided about a run before any heavy work (data preparation, weights)."""

    recipe: Recipe
    options: TrainOptions
    kwargs: dict[str, Any]
    """The TrainingArguments keys the run uses, device defaults included (computed once)."""
    recorded_kwargs: dict[str, Any]
    """The same without device defaults: what recipe.toml and run.json record."""
    args: Any
    tokenizer: Any
    config: Any
    block_size: int
    plan: OutputPlan
    adapter: Any = None
    """clm_runner.models.adapters.AdapterPlan when the recipe has [adapter]: what PEFT resolved."""

    @property
    def resolved(self) -> dict[str, Any]:
        """The resolved recipe as recipe.toml and run.json record it (secret keys left out)."""
        return resolved_recipe(self.recipe, self.recorded_kwargs, self.block_size, self.adapter)


def resume_point(recipe: Recipe, options: TrainOptions) -> str | None:
    """--resume-from, or training.resume_from_checkpoint (as run_clm honours it); both is a contradiction."""
    from_recipe = recipe.training.get("resume_from_checkpoint")
    if options.resume_from and from_recipe and Path(options.resume_from) != Path(from_recipe):
        raise RecipeError(
            f"--resume-from {options.resume_from} and training.resume_from_checkpoint = {from_recipe!r} "
            "name different checkpoints. Choose one."
        )
    chosen = options.resume_from or from_recipe
    if chosen and not options.resume:
        raise RecipeError("--no-resume contradicts a checkpoint to resume from; choose one.")
    return chosen


def prepare_run(recipe: Recipe, options: TrainOptions, *, decide: Any = None) -> RunSetup:
    """Check everything a run needs before any heavy work and decide how it uses its output dir.

    `recipe check` and `train` both call this, so they accept and refuse the same recipes. `decide` runs
    the output-dir decision (in a multi-process run: on rank 0, shared with every rank).
    """
    from clm_runner.data.blocks import resolve_block_size
    from clm_runner.data.sources import check_data_sources
    from clm_runner.models.hub import require_hub_for_push
    from clm_runner.models.loading import build_meta_model, check_model_sources, load_config, load_tokenizer
    from clm_runner.rundir.lock import ensure_free
    from clm_runner.train.preflight import check_packages, check_trainer_keys

    resume_point(recipe, options)  # --resume-from and the recipe's key agree, and --no-resume neither
    kwargs = training_kwargs(recipe)
    recorded = training_kwargs(recipe, with_device_defaults=False)
    check_packages(kwargs)
    # Built first: in a multi-process run this creates the process group that the decisions are shared on.
    args = build_training_args(kwargs)
    check_one_job(args)
    if args.push_to_hub:
        require_hub_for_push(args.hub_model_id or recipe.output_dir.name)
    check_model_sources(recipe.model)
    check_data_sources(recipe.data, recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    config = load_config(recipe.model)
    check_trainer_keys(args, meta_model=lambda: build_meta_model(config))
    block_size = resolve_block_size(
        recipe.data.block_size, tokenizer, config, warn=logger.warning, clamp=recipe.data.clamp_block_size
    )
    adapter = None
    if recipe.adapter is not None:
        from clm_runner.models.adapters import check_quantization, plan_adapter

        check_quantization(recipe.adapter, use_cpu=bool(args.use_cpu))
        adapter = plan_adapter(recipe.adapter, config)
    identity = RunIdentity(
        resolved=resolved_recipe(recipe, recorded, block_size, adapter),
        max_steps=int(args.max_steps),
        num_train_epochs=float(args.num_train_epochs),
    )

    def decide_plan() -> OutputPlan:
        ensure_free(recipe.output_dir)  # before the plan: "in use" says more than "not empty"
        return plan_output_dir(
            recipe.output_dir,
            overwrite=options.overwrite,
            resume=options.resume,
            resume_from=options.resume_from,
            # The recipe's key names where its line starts: a rerun continues the line begun there.
            recipe_resume_from=None if options.resume_from else recipe.training.get("resume_from_checkpoint"),
            identity=identity,
        )

    plan = (decide or (lambda fn: fn()))(decide_plan)
    if plan.resume_from is not None:
        from clm_runner.models.resume_match import check_resume_matches

        check_resume_matches(Path(plan.resume_from), adapter, config)
    return RunSetup(recipe, options, kwargs, recorded, args, tokenizer, config, block_size, plan, adapter)


def resolved_recipe(
    recipe: Recipe, kwargs: dict[str, Any], block_size: int, adapter: Any = None
) -> dict[str, Any]:
    """Every key with its effective value (secret keys left out), as recipe.toml and run.json record it.

    An adapter's target_modules and fan_in_fan_out are recorded as PEFT resolved them for this model.
    """
    resolved = resolved_dict(recipe, training_overrides=kwargs)
    resolved["data"]["block_size"] = block_size
    if adapter is not None:
        resolved["adapter"].update(adapter.lora)
    return resolved
