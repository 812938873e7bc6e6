"""[adapter]: LoRA settings, checked against the installed peft.LoraConfig before any heavy work.

The section takes PEFT's own key names and defaults (r, lora_alpha, lora_dropout, target_modules, bias,
modules_to_save, ...) plus two of clm-runner's: `method` ("lora") and `load_in_4bit` (QLoRA). A LoraConfig
field that a TOML value can't express (it takes a Python object), or that clm-runner sets itself, is refused
with the reason; so are values that would leave an adapter that can't be reloaded on the base it names.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from clm_runner.config.schema import AdapterConfig
from clm_runner.config.types import check_type, suggest
from clm_runner.errors import RecipeError

OWN_KEYS: dict[str, Any] = {"method": Literal["lora"], "load_in_4bit": bool}

_BASE = "the base model is [model] model_name_or_path / model_revision"
REFUSED: dict[str, str] = {
    "task_type": "clm-runner sets it (CAUSAL_LM); remove the key.",
    "peft_type": "adapter.method says which adapter to train; remove the key.",
    "base_model_name_or_path": f"{_BASE}; remove the key.",
    "revision": f"{_BASE}; remove the key.",
    "inference_mode": "`train` trains the adapter and `eval` / `generate` load it for inference; remove the key.",
    "auto_mapping": "PEFT fills it in itself; remove the key.",
    "peft_version": "PEFT records its own version in adapter_config.json; remove the key.",
    "megatron_config": "clm-runner does not train Megatron-LM models; remove the key.",
    "megatron_core": "clm-runner does not train Megatron-LM models; remove the key.",
    "qalora_group_size": "it is used by QALoRA only, which needs a GPTQ-quantized base; remove the key.",
    "use_qalora": "QALoRA needs a GPTQ-quantized base, which clm-runner does not load; use load_in_4bit.",
    "alora_invocation_tokens": (
        "an activated LoRA acts only after its invocation tokens, which clm-runner's perplexity and "
        "generation never insert; remove the key."
    ),
}

ALIASES = {
    "rank": "r",
    "lora_r": "r",  # axolotl's names
    "lora_target_modules": "target_modules",
    "lora_modules_to_save": "modules_to_save",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
}
"""Names other tools use for PEFT's keys: an unknown key that is one of them is pointed at PEFT's name."""

INIT_WEIGHTS = (True, False, "gaussian", "orthogonal")
"""init_lora_weights values that start from the base as it is: PiSSA, OLoRA and CorDA rewrite the base
weights (the adapter would no longer fit the base model [model] names), EVA and LoftQ need a calibration
pass that `train` does not run."""


def _toml_expressible(annotation: Any) -> bool:
    """Whether a TOML value can meet the annotation (no dataclass or other Python object inside)."""
    if annotation in (bool, int, float, str, dict, list, type(None), Any):
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return True
    if origin in (typing.Union, types.UnionType, list, tuple, dict):
        return all(_toml_expressible(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis)
    return False


@functools.cache
def lora_argument_types() -> dict[str, Any]:
    """peft.LoraConfig's fields a recipe can set, with their annotations (the refused ones included)."""
    from peft import LoraConfig

    hints = typing.get_type_hints(LoraConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(LoraConfig) if f.init}


@functools.cache
def _lora_defaults() -> dict[str, Any]:
    from peft import LoraConfig

    from clm_runner.config.types import plain_value

    out: dict[str, Any] = {}
    for f in dataclasses.fields(LoraConfig):
        if f.name in REFUSED or not f.init or not _toml_expressible(lora_argument_types()[f.name]):
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = plain_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = plain_value(f.default_factory())
    return out


def lora_defaults() -> dict[str, Any]:
    """PEFT's defaults of every key [adapter] takes (a copy: callers fill in their own values)."""
    import copy

    return copy.deepcopy(_lora_defaults())


def key_annotation(key: str) -> Any | None:
    """The declared type of adapter.key, or None for a key [adapter] does not have."""
    if key in OWN_KEYS:
        return OWN_KEYS[key]
    return lora_argument_types().get(key)


def validate_adapter(table: Mapping[str, Any], where: str = "") -> AdapterConfig:
    """The [adapter] section as an AdapterConfig: every key known, typed and in range."""
    hints = lora_argument_types()
    valid = [*OWN_KEYS, *(k for k in hints if k not in REFUSED and _toml_expressible(hints[k]))]
    lora: dict[str, Any] = {}
    for key, value in table.items():
        if key in OWN_KEYS:
            check_type(f"adapter.{key}", value, OWN_KEYS[key], where)
            continue
        if key not in hints:
            hint = (
                f": did you mean adapter.{ALIASES[key]}?"
                if key in ALIASES
                else suggest(key, valid, "adapter.")
            )
            raise RecipeError(
                f"{where}unknown key adapter.{key}{hint} "
                "[adapter] takes method, load_in_4bit and the fields of peft.LoraConfig (r, lora_alpha, "
                "lora_dropout, target_modules, bias, modules_to_save, ...)."
            )
        if key in REFUSED:
            raise RecipeError(f"{where}adapter.{key} is not a recipe key: {REFUSED[key]}")
        if not _toml_expressible(hints[key]):
            raise RecipeError(
                f"{where}adapter.{key} takes a Python object ({hints[key]}), which a recipe can't hold; "
                "remove the key."
            )
        check_type(f"adapter.{key}", value, hints[key], where)
        lora[key] = value
    _check_values(lora, where)
    return AdapterConfig(
        method=table.get("method", "lora"),
        load_in_4bit=table.get("load_in_4bit", False),
        lora=types.MappingProxyType(lora),
    )


def _check_values(lora: Mapping[str, Any], where: str) -> None:
    def refuse(key: str, rule: str) -> RecipeError:
        return RecipeError(f"{where}adapter.{key} {rule}; got {lora[key]!r}.")

    if "r" in lora and lora["r"] < 1:
        raise refuse("r", "is the adapters' rank and must be at least 1 (8 and 16 are common)")
    if "lora_alpha" in lora and lora["lora_alpha"] <= 0:
        raise refuse("lora_alpha", "scales the adapters' output (lora_alpha / r) and must be positive")
    if "lora_dropout" in lora and not 0 <= lora["lora_dropout"] < 1:
        raise refuse("lora_dropout", "is a probability: at least 0 and below 1")
    if "init_lora_weights" in lora and lora["init_lora_weights"] not in INIT_WEIGHTS:
        raise refuse(
            "init_lora_weights",
            "must be true, false, 'gaussian' or 'orthogonal' (PiSSA, OLoRA and CorDA rewrite the base "
            "weights, so the adapter would no longer fit the base model; EVA and LoftQ need a calibration "
            "pass `train` does not run)",
        )
    if "target_modules" in lora and lora["target_modules"] in ([], ""):
        raise refuse(
            "target_modules", "names no module: list module names, or remove the key for PEFT's default"
        )
    layers = lora.get("layers_to_transform")
    if layers is not None and any(n < 0 for n in ([layers] if isinstance(layers, int) else layers)):
        raise refuse("layers_to_transform", "holds layer numbers, which start at 0")
