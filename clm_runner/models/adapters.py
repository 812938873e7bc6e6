"""Adapters (LoRA, with PEFT): where they go and wrapping the base model for training.

`plan_adapter` wraps a meta-device copy of the model before any weights are loaded: it proves PEFT can
wrap it, resolves PEFT's per-architecture default target modules (recorded in recipe.toml) and counts the
trainable parameters exactly. Loading a trained adapter again is clm_runner.models.adapter_runs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clm_runner.config.schema import AdapterConfig, ModelConfig
from clm_runner.errors import RecipeError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterPlan:
    """The adapter a run trains, as PEFT resolved it on this model."""

    lora: dict[str, Any]
    """LoraConfig keys: the recipe's, with target_modules and fan_in_fan_out as PEFT resolved them."""
    trainable_parameters: int
    total_parameters: int
    adapted_modules: tuple[str, ...] = field(default=())
    """Module paths (in the base model) that carry an adapter."""
    load_in_4bit: bool = False
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """The tensors the adapter's weights file holds (name -> shape), as PEFT will save them."""

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_parameters / self.total_parameters

    def describe(self) -> str:
        return (
            f"LoRA adapters on {len(self.adapted_modules)} modules ({', '.join(self.target_names)}): "
            f"{self.trainable_parameters:,} trainable of {self.total_parameters:,} parameters "
            f"({self.trainable_percent:.4f}%); the base weights are frozen."
        )

    @property
    def target_names(self) -> list[str]:
        targets = self.lora.get("target_modules")
        return [targets] if isinstance(targets, str) else list(targets or [])

    def manifest(self) -> dict[str, Any]:
        """What run.json records about the adapter."""
        return {
            "method": "lora",
            "load_in_4bit": self.load_in_4bit,
            "settings": self.lora,
            "adapted_modules": list(self.adapted_modules),
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
        }


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT calls transformers' deprecated is_gradient_checkpointing and warns for GPT-2's Conv1D (it sets
    fan_in_fan_out itself, and clm-runner records the resolved value): noise for the user, not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        yield


def lora_config(lora: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **lora)


def inject_adapters(model: Any, lora: dict[str, Any]) -> Any:
    """`model` with LoRA layers put in place (a PeftModel around it); quietly, as `train` does."""
    from peft import get_peft_model

    with quiet_peft():
        return get_peft_model(model, lora_config(lora))


def _adaptable_module_names(model: torch.nn.Module) -> list[str]:
    """Last names of the layers LoRA can adapt (linear, GPT-2's Conv1D, embedding): what target_modules takes."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)}
    )


def plan_adapter(adapter: AdapterConfig, config: Any) -> AdapterPlan:
    """Wrap a meta-device copy of the model as `train` will: every refusal before any weight is loaded."""
    from peft import get_peft_model, get_peft_model_state_dict
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    from clm_runner.models.loading import build_meta_model

    meta = build_meta_model(config)
    lora = dict(adapter.lora)
    choices = ", ".join(_adaptable_module_names(meta))
    model_type = getattr(config, "model_type", None)
    if lora.get("target_modules") is None and model_type not in DEFAULT_TARGETS:
        raise RecipeError(
            f"PEFT has no default adapter placement for model type {model_type!r}: set adapter.target_modules "
            f"to some of this model's layers: {choices}."
        )
    try:
        with quiet_peft():
            wrapped = get_peft_model(meta, lora_config(lora))
    except ValueError as exc:  # includes NoMatchingPeftModuleError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        targets = lora.get("target_modules")
        raise RecipeError(
            f"adapter.target_modules = {targets!r}: PEFT can't adapt this {model_type} model ({first}). "
            f"Layers it can adapt: {choices}."
        ) from None
    resolved = wrapped.peft_config["default"]
    targets = resolved.target_modules
    if isinstance(targets, (set, frozenset, list, tuple)):
        lora["target_modules"] = sorted(targets)
    lora["fan_in_fan_out"] = bool(resolved.fan_in_fan_out)
    trainable, total = wrapped.get_nb_trainable_parameters()
    base = wrapped.get_base_model()
    adapted = tuple(name for name, module in base.named_modules() if hasattr(module, "lora_A"))
    shapes = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(wrapped).items()}
    return AdapterPlan(lora, int(trainable), int(total), adapted, adapter.load_in_4bit, shapes)


def check_quantization(adapter: AdapterConfig, *, use_cpu: bool) -> None:
    """QLoRA needs CUDA and bitsandbytes: refused in one line anywhere else, before any heavy work."""
    if not adapter.load_in_4bit:
        return
    import importlib.util

    import torch

    if use_cpu or not torch.cuda.is_available():
        raise RecipeError(
            "adapter.load_in_4bit = true (QLoRA) needs a CUDA GPU, and this run has none"
            f"{' (training.use_cpu = true)' if use_cpu else ''}. Set adapter.load_in_4bit = false to train "
            "LoRA on the full-precision base."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(
            "adapter.load_in_4bit = true (QLoRA) needs bitsandbytes: pip install 'clm-runner[qlora]', or set "
            "adapter.load_in_4bit = false."
        )


def wrap_with_adapter(model: Any, plan: AdapterPlan, *, gradient_checkpointing: bool = False) -> Any:
    """The base model with trainable LoRA adapters; every base weight frozen."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    with quiet_peft():
        if plan.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        wrapped = get_peft_model(model, lora_config(plan.lora))
    trainable, total = wrapped.get_nb_trainable_parameters()
    logger.info(
        "LoRA adapters on %d modules: %s trainable of %s parameters (%.4f%%); the base weights are frozen.",
        len(plan.adapted_modules),
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / total,
    )
    return wrapped


def add_adapter_note(readme: Path, base: ModelConfig, plan: AdapterPlan) -> None:
    """The model card says the directory holds an adapter, on which base, and how to load or merge it."""
    from clm_runner.rundir.files import write_text_atomic

    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    targets = ", ".join(f"`{name}`" for name in plan.target_names)
    note = (
        "\n## LoRA adapter\n\n"
        "This directory holds a LoRA adapter (PEFT's `adapter_config.json` and `adapter_model.safetensors`), "
        f"not a full model. Base model: `{base.model_name_or_path}` (revision `{base.model_revision}`).\n\n"
        f"Adapters: r = {plan.lora.get('r', 8)}, lora_alpha = {plan.lora.get('lora_alpha', 8)}, on {targets}: "
        f"{plan.trainable_parameters:,} trainable parameters of {plan.total_parameters:,} "
        f"({plan.trainable_percent:.4f}%).\n\n"
        "Load it with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_DIR)`, or "
        "write a standalone merged model with `clm-runner export --run THIS_DIR --merge --output DIR`.\n"
    )
    write_text_atomic(readme, text.rstrip("\n") + "\n" + note)


def can_quantize() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
