"""What the Trainer builds from [training], built first on stand-ins, so a key that can't work is refused early.

TrainingArguments accepts values that fail only inside the Trainer, after the data is prepared and the model
built: an optimizer whose package is missing or whose optim_args don't parse, scheduler arguments its function
does not take, activation-checkpointing arguments torch.utils.checkpoint does not take, FSDP in one process, a
compile backend torch does not have. `check_trainer_keys` builds the optimizer and the scheduler on a
one-parameter model, runs one checkpointed stand-in function, and checks what the Trainer checks in its
__init__, each refusal one line naming the key and the fix. Tuning for a feature the recipe does not turn on
(fsdp_config without fsdp, checkpointing arguments without checkpointing) is refused, not ignored. `check_packages` runs before TrainingArguments
exists: it imports what a key needs there (DeepSpeed).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from clm_runner.errors import RecipeError


def check_packages(kwargs: Mapping[str, Any]) -> None:
    """Keys TrainingArguments imports a package for while it is built (a missing one is a traceback there)."""
    if kwargs.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(
            "training.deepspeed needs DeepSpeed, which is not installed: pip install deepspeed (on a machine "
            "with CUDA), or remove training.deepspeed."
        )


def check_trainer_keys(args: Any, meta_model: Callable[[], Any]) -> None:
    """Refuse, before any heavy work, what the Trainer would fail on after the model is built.

    `meta_model` builds the model on the meta device, for the optimizers transformers builds from the model
    itself (GaLore, APOLLO, LOMO: they look up layers by name); no other needs it.
    """
    _check_parallelism(args)
    _refuse_unused_tables(args)
    optimizer = _stand_in_optimizer(args, meta_model)
    _stand_in_scheduler(args, optimizer)
    _stand_in_checkpointing(args)
    _check_compile(args)


def _name(value: Any) -> str:
    return str(getattr(value, "value", value))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_parallelism(args: Any) -> None:
    from transformers.training_args import ParallelMode

    if args.fsdp and args.deepspeed:
        raise RecipeError(
            "training.fsdp and training.deepspeed both shard the model: choose one (remove the other key)."
        )
    xla = args.fsdp and isinstance(args.fsdp_config, dict) and bool(args.fsdp_config.get("xla", False))
    if args.fsdp and not xla and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise RecipeError(
            "training.fsdp shards the model across processes, and this run is one process. Launch it with "
            "`torchrun --nproc_per_node N` or `accelerate launch` (recipes/gpt2-wikitext-fsdp.toml), or remove "
            "training.fsdp."
        )
    if args.save_only_model and args.load_best_model_at_end and (args.fsdp or args.deepspeed):
        raise RecipeError(
            "training.save_only_model with training.load_best_model_at_end can't restore the best model under "
            f"{'FSDP' if args.fsdp else 'DeepSpeed'}: remove save_only_model."
        )
    accumulation = getattr(args.accelerator_config, "gradient_accumulation_kwargs", None) or {}
    if "num_steps" in accumulation and args.gradient_accumulation_steps > 1:
        raise RecipeError(
            "training.accelerator_config's gradient_accumulation_kwargs.num_steps and "
            "training.gradient_accumulation_steps both set the accumulation: keep gradient_accumulation_steps."
        )


def _refuse_unused_tables(args: Any) -> None:
    """Tuning for a feature the recipe does not turn on is never read: refused rather than dropped."""
    if not args.fsdp and args.fsdp_config:
        raise RecipeError(
            "training.fsdp_config tunes FSDP, which this recipe does not turn on (training.fsdp is unset), so it "
            'would be ignored. Set training.fsdp (e.g. "full_shard auto_wrap") or remove training.fsdp_config.'
        )
    checkpointing = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    if kwargs and not checkpointing:
        raise RecipeError(
            "training.gradient_checkpointing_kwargs is read only with gradient checkpointing, which this recipe "
            "does not turn on, so it would be ignored. Set training.gradient_checkpointing = true or remove "
            "training.gradient_checkpointing_kwargs."
        )


def _parse_optim_args(text: str | None) -> dict[str, str]:
    """training.optim_args as transformers reads it ("key=value,key=value"), refused where it would not parse."""
    if not text:
        return {}
    pairs = {}
    for item in text.replace(" ", "").split(","):
        key, equals, value = item.partition("=")
        if not equals or not key or "=" in value:
            raise RecipeError(
                f"training.optim_args = {text!r} must be key=value pairs separated by commas (for example "
                f"'weight_lr_power=2.0,r=0.0'); {item!r} is not one."
            )
        pairs[key] = value
    return pairs


MODEL_BUILT = ("galore", "apollo", "lomo")
"""Optimizer names (parts of) that transformers builds from the model's layers, not from a parameter list."""


def _optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, dict[str, Any]]:
    from transformers import Trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer.get_optimizer_cls_and_kwargs(args, model)


def _stand_in_optimizer(args: Any, meta_model: Callable[[], Any]) -> Any:
    """The optimizer the Trainer will build, built on one parameter: its package imported, its arguments read."""
    import torch

    optim = _name(args.optim)
    given = _parse_optim_args(args.optim_args)
    what = f"training.optim = {optim!r}" + (f" with optim_args = {args.optim_args!r}" if given else "")
    try:
        if any(part in optim for part in MODEL_BUILT):
            optimizer_cls, optimizer_kwargs = _optimizer_cls_and_kwargs(args, meta_model())
        else:
            optimizer_cls, optimizer_kwargs = _optimizer_cls_and_kwargs(args)
    except ImportError as exc:
        raise RecipeError(
            f"{what} needs a package that is not installed ({_first_line(exc)}). Install it, or choose another "
            "training.optim (remove the key for the default)."
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError) as exc:
        raise RecipeError(f"{what} can't be built: {_first_line(exc)}.") from None
    _refuse_unread_optim_args(args, given, optimizer_kwargs, optim)
    from_model = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
    if from_model or not (
        isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
    ):
        return (
            None  # built from the model itself (GaLore, LOMO, Muon...): resolved above, built by the Trainer
        )
    parameter = torch.nn.Parameter(torch.zeros(1, device=args.device))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optimizer_cls([parameter], **optimizer_kwargs)
    except Exception as exc:  # the optimizer's own check of its arguments, whatever it raises
        raise RecipeError(f"{what} can't be built: {_first_line(exc)}.") from None


def _refuse_unread_optim_args(args: Any, given: dict[str, str], built: dict[str, Any], optim: str) -> None:
    """An optim_args key the optimizer never reads would be dropped silently: it is refused instead."""
    for key in given:
        without = copy.copy(args)
        without.optim_args = ",".join(f"{k}={v}" for k, v in given.items() if k != key) or None
        try:
            unread = _optimizer_cls_and_kwargs(without)[1] == built
        except Exception:  # noqa: BLE001 - kwargs that can't be compared (parameter groups): no verdict
            return
        if unread:
            raise RecipeError(
                f"training.optim_args: {optim!r} does not read {key!r} (transformers drops it). Remove it, or set "
                "the optimizer's own keys ([training] learning_rate, weight_decay, adam_beta1, ...)."
            )


def _stand_in_scheduler(args: Any, optimizer: Any) -> None:
    """The LR scheduler the Trainer will build, on the stand-in optimizer, stepped through a 10-step run."""
    if optimizer is None:
        return
    from transformers import get_scheduler

    kind = _name(args.lr_scheduler_type)
    given = args.lr_scheduler_kwargs or {}
    what = f"training.lr_scheduler_type = {kind!r}" + (
        f" with lr_scheduler_kwargs = {given!r}" if given else ""
    )
    if given and kind in ("constant", "constant_with_warmup"):
        raise RecipeError(
            f"{what}: the {kind} schedule takes no arguments (transformers drops them). Remove "
            "training.lr_scheduler_kwargs, or choose a schedule that takes them."
        )
    steps = 10
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = get_scheduler(
                args.lr_scheduler_type,
                optimizer=optimizer,
                num_warmup_steps=args.get_warmup_steps(steps),
                num_training_steps=steps,
                scheduler_specific_kwargs=args.lr_scheduler_kwargs,
            )
            for _ in range(steps):
                if kind == "reduce_lr_on_plateau":
                    scheduler.step(1.0)
                elif kind != "greedy":
                    scheduler.step()
    except Exception as exc:  # a schedule function's own check of its arguments, whatever it raises
        raise RecipeError(f"{what} can't be built: {_first_line(exc)}.") from None


CHECKPOINTING_OWN = ("every_n_layers", "offload")
"""activation_checkpointing_kwargs the Trainer takes out itself; the rest go to torch.utils.checkpoint."""


def _stand_in_checkpointing(args: Any) -> None:
    """activation_checkpointing_kwargs (gradient_checkpointing_kwargs) on a checkpointed stand-in function."""
    kwargs = dict(
        getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {}
    )
    if not kwargs:
        return
    what = f"training.gradient_checkpointing_kwargs = {kwargs!r}"
    every = kwargs.pop("every_n_layers", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise RecipeError(
            f"{what}: every_n_layers must be a whole number of layers, 1 or more; got {every!r}."
        )
    if not isinstance(kwargs.pop("offload", False), bool):
        raise RecipeError(f"{what}: offload must be true or false.")
    import torch
    from torch.utils.checkpoint import checkpoint

    def layer(x: Any) -> Any:
        return x * 2

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint(layer, torch.ones(1, requires_grad=True), **kwargs).sum().backward()
    except Exception as exc:  # torch's own check of its arguments, whatever it raises
        raise RecipeError(
            f"{what} is not what torch.utils.checkpoint takes ({_first_line(exc)}). It takes use_reentrant, "
            "preserve_rng_state, determinism_check, debug, context_fn, early_stop (and the Trainer's every_n_layers, "
            "offload)."
        ) from None


COMPILE_BACKEND_PACKAGES = {
    "tvm": "tvm",
    "openxla": "torch_xla",
    "openxla_eval": "torch_xla",
    "onnxrt": "onnxruntime",
    "tensorrt": "torch_tensorrt",
    "torch_tensorrt": "torch_tensorrt",
    "ipex": "intel_extension_for_pytorch",
}
"""torch.compile backends that torch lists whether or not the package they call is installed."""


def _check_compile(args: Any) -> None:
    if not args.torch_compile:
        return
    backend, mode = args.torch_compile_backend, args.torch_compile_mode
    if backend not in (None, "inductor"):  # inductor is torch's own; anything else is looked up (slow import)
        from torch._dynamo import list_backends

        if backend not in list_backends(exclude_tags=()):
            raise RecipeError(
                f"training.torch_compile_backend = {backend!r} is not a torch.compile backend here; "
                f"available: {', '.join(list_backends())}."
            )
        package = COMPILE_BACKEND_PACKAGES.get(backend)
        if package is not None and importlib.util.find_spec(package) is None:
            raise RecipeError(
                f"training.torch_compile_backend = {backend!r} needs {package}, which is not installed: install "
                "it, or choose another backend (remove the key for inductor)."
            )
    if mode is not None:
        from torch._inductor import list_mode_options

        modes = list(list_mode_options())
        if mode not in modes:
            raise RecipeError(f"training.torch_compile_mode = {mode!r} is not one of {', '.join(modes)}.")
