"""Whether a checkpoint can resume into the run a recipe plans: the same kind (full or adapter) and the same
tensors, their names and shapes read from the checkpoint's safetensors headers before any weight is loaded.

A recipe that resolves to other shapes (a wider or deeper model, another adapter rank, a key left unset that
defaults otherwise) used to fail loading the state dict after the model was built; it is refused in one line
in `recipe check` and `train` alike (clm_runner.train.setup.prepare_run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clm_runner.errors import RecipeError
from clm_runner.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterPlan

FIX = "Resume with the recipe the run was trained with (its recipe.toml), or start over with --no-resume --overwrite."


SHAPING_KEYS = (
    "r",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "rank_pattern",
    "use_dora",
)
"""adapter keys that decide which tensors a checkpoint's adapter holds: they can't change when resuming."""


def check_resume_matches(checkpoint: Path, plan: AdapterPlan | None, config: Any = None) -> None:
    """A checkpoint resumes only into the same kind of run: full into full (the model `config` builds, when
    given, of the checkpoint's shapes), an adapter into the same adapter's shapes."""
    holds_adapter = (checkpoint / ADAPTER_CONFIG).is_file()
    fix = FIX
    if plan is None and holds_adapter:
        raise RecipeError(
            f"{checkpoint} holds a LoRA adapter, but the recipe has no [adapter] section. {fix}"
        )
    if plan is None:
        if config is not None:
            check_model_tensors(checkpoint, config)
        return
    if not holds_adapter:
        raise RecipeError(f"{checkpoint} holds a full model, but the recipe has an [adapter] section. {fix}")
    from clm_runner.config.adapter_keys import lora_defaults

    saved = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
    defaults = lora_defaults()
    differ = []
    for key in SHAPING_KEYS:  # what the recipe resolves to: a key it leaves unset is PEFT's default
        ours, theirs = plan.lora.get(key, defaults.get(key)), saved.get(key)
        if _comparable(ours) != _comparable(theirs):
            differ.append(f"adapter.{key} = {ours!r} (the checkpoint's: {theirs!r})")
    if differ:
        raise RecipeError(
            f"{checkpoint}'s adapter has other shapes than the recipe asks for: {'; '.join(differ)}. {fix}"
        )
    held = _saved_tensor_shapes(checkpoint / ADAPTER_WEIGHTS)
    if held is not None and plan.tensor_shapes and held != plan.tensor_shapes:
        name = sorted(
            set(held) ^ set(plan.tensor_shapes) or {n for n in held if held[n] != plan.tensor_shapes[n]}
        )[0]
        raise _other_tensors(checkpoint, "adapter", name, held.get(name), plan.tensor_shapes.get(name))


def check_model_tensors(checkpoint: Path, config: Any) -> None:
    """The checkpoint's model tensors are those of the model `config` builds (shapes on the meta device).

    Tied weights are saved once (GPT-2's lm_head is wte): a group of tied names needs one of them saved. A
    checkpoint that names its tensors otherwise (no safetensors, a format conversion) is left to loading.
    """
    held = saved_model_shapes(checkpoint)
    if not held:
        return
    from clm_runner.models.loading import build_meta_model

    tied: dict[int, list[str]] = {}
    planned: dict[str, tuple[int, ...]] = {}
    for name, tensor in build_meta_model(config).state_dict(keep_vars=True).items():
        tied.setdefault(id(tensor), []).append(name)
        planned[name] = tuple(tensor.shape)
    if len(set(held) & set(planned)) < len(held) / 2:
        return  # another naming of the same weights: loading will tell
    for name in sorted(held):
        if planned.get(name) != held[name]:
            raise _other_tensors(checkpoint, "model", name, held[name], planned.get(name))
    for names in tied.values():
        if not any(name in held for name in names):
            raise _other_tensors(checkpoint, "model", names[0], None, planned[names[0]])


def _other_tensors(checkpoint: Path, what: str, name: str, there: Any, here: Any) -> RecipeError:
    def shape(value: Any) -> str:
        return f"shape {list(value)}" if value is not None else "none"

    return RecipeError(
        f"{checkpoint}'s {what} holds other tensors than the recipe plans ({name}: {shape(there)} in the "
        f"checkpoint, {shape(here)} planned). {FIX}"
    )


def saved_model_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every tensor of a saved model (model.safetensors, or the shards its index names)."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    else:
        files = ["model.safetensors"]
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        held = _saved_tensor_shapes(checkpoint / file)
        if held is None:
            return None
        shapes.update(held)
    return shapes


def _comparable(value: Any) -> Any:
    """A LoraConfig value as adapter_config.json and the recipe may both write it: lists in any order, empty
    as unset."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(value, key=repr) or None
    if isinstance(value, dict):
        return value or None
    return value


def _saved_tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of each tensor in a safetensors file, from its header (no tensor is read)."""
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
