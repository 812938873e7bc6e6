"""Adapters (LoRA, with PEFT): where they go, wrapping the base model, and loading an adapter run again.

`plan_adapter` wraps a meta-device copy of the model before any weights are loaded: it proves PEFT can
wrap it, resolves PEFT's per-architecture default target modules (recorded in recipe.toml) and counts the
trainable parameters exactly. `load_adapter_run` puts a saved adapter back on its base model for eval,
generate and export; `base_model_identity` is what run.json records about that base, so a different base
found later is noticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clm_runner.config.schema import AdapterConfig, ModelConfig
from clm_runner.errors import ModelError, RecipeError

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
def _quiet_peft() -> Iterator[None]:
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

    with _quiet_peft():
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
    from peft import get_peft_model
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
        with _quiet_peft():
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
    return AdapterPlan(lora, int(trainable), int(total), adapted, adapter.load_in_4bit)


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


def check_resume_matches(checkpoint: Path, plan: AdapterPlan | None) -> None:
    """A checkpoint resumes only into the same kind of run: full into full, the same adapter's shapes."""
    holds_adapter = (checkpoint / ADAPTER_CONFIG).is_file()
    fix = "Resume with the recipe the run was trained with (its recipe.toml), or start over with --no-resume --overwrite."
    if plan is None and holds_adapter:
        raise RecipeError(
            f"{checkpoint} holds a LoRA adapter, but the recipe has no [adapter] section. {fix}"
        )
    if plan is None:
        return
    if not holds_adapter:
        raise RecipeError(f"{checkpoint} holds a full model, but the recipe has an [adapter] section. {fix}")
    saved = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
    differ = []
    for key in SHAPING_KEYS:
        ours, theirs = plan.lora.get(key), saved.get(key)
        if isinstance(ours, list) and isinstance(theirs, list):
            ours, theirs = sorted(ours), sorted(theirs)
        if key in plan.lora and ours != theirs:
            differ.append(f"adapter.{key} = {plan.lora.get(key)!r} (the checkpoint's: {saved.get(key)!r})")
    if differ:
        raise RecipeError(
            f"{checkpoint}'s adapter has other shapes than the recipe asks for: {'; '.join(differ)}. {fix}"
        )


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

    with _quiet_peft():
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
        "write a standalone merged model with `clm-runner export THIS_DIR --merge --output DIR`.\n"
    )
    write_text_atomic(readme, text.rstrip("\n") + "\n" + note)


# --- An adapter run, loaded again -------------------------------------------------------------------------


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def recorded_base(model_dir: Path) -> dict[str, Any]:
    """run.json's record of the base model an adapter run trained on ({} when there is none)."""
    from clm_runner.rundir.manifest import MANIFEST_NAME
    from clm_runner.rundir.policy import run_dir_of

    run_dir = run_dir_of(model_dir)
    if run_dir is None:
        return {}
    try:
        manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    base = manifest.get("base_model") if isinstance(manifest, dict) else None
    return base if isinstance(base, dict) else {}


def base_model_config(
    model_dir: Path, overrides: tuple[str, ...] | list[str] = ()
) -> tuple[ModelConfig, bool]:
    """The [model] section that loads an adapter dir's base, and whether the base is loaded in 4-bit.

    From the run's recipe.toml when the dir is a run or one of its checkpoints, else from the adapter's own
    adapter_config.json; `--set model.model_name_or_path=DIR` (in `overrides`) points at a local copy.
    """
    import dataclasses

    from clm_runner.config.load import load_recipe, parse_override
    from clm_runner.rundir.policy import RECIPE_FILE, run_dir_of

    run_dir = run_dir_of(model_dir)
    if run_dir is not None:
        recipe = load_recipe(run_dir / RECIPE_FILE, overrides, require_output_dir=False)
        model, four_bit = recipe.model, bool(recipe.adapter and recipe.adapter.load_in_4bit)
    else:
        saved = json.loads((model_dir / ADAPTER_CONFIG).read_text())
        values: dict[str, Any] = {"model_name_or_path": saved.get("base_model_name_or_path")}
        if saved.get("revision"):
            values["model_revision"] = saved["revision"]
        four_bit = False
        for item in overrides:
            section, key, value = parse_override(item)
            if section != "model":
                raise RecipeError(
                    f"--set {item}: {model_dir} is an adapter outside a run, so only model.* keys apply."
                )
            values[key] = value
        if not values.get("model_name_or_path"):
            raise ModelError(
                f"{model_dir}/{ADAPTER_CONFIG} does not name its base model; pass "
                "--set model.model_name_or_path=DIR (the model the adapter was trained on)."
            )
        try:
            model = ModelConfig(**values)
        except TypeError as exc:
            raise RecipeError(f"--set: {exc}") from None
    chosen_by_user = any(item.split("=", 1)[0].strip() == "model.model_name_or_path" for item in overrides)
    name = model.model_name_or_path
    recorded_path = recorded_base(model_dir).get("path")
    moved = name and not Path(name).expanduser().exists() and recorded_path and Path(recorded_path).is_dir()
    if moved and not chosen_by_user:  # a relative path, from a run started in another directory
        model = dataclasses.replace(model, model_name_or_path=recorded_path)
    return model, four_bit


def load_adapter_run(
    model_dir: Path, base: ModelConfig, *, dtype: Any = None, four_bit: bool = False, merge: bool = False
) -> Any:
    """The base model named by `base` with the adapter saved in `model_dir` on it (for inference)."""
    from peft import PeftModel

    from clm_runner.models.loading import check_model_sources, load_config, load_model

    name = base.model_name_or_path
    where = f"{model_dir} is a LoRA adapter; its base model {name!r}"
    fix = "Point --set model.model_name_or_path=DIR at a local copy of that base model."
    try:
        check_model_sources(base)
        config = load_config(base)
        if four_bit and not _can_quantize():
            logger.warning(
                "%s was trained in 4-bit; this machine can't load 4-bit weights (no CUDA or bitsandbytes), so "
                "it is loaded unquantized and the numbers will differ slightly from training's.",
                where,
            )
            four_bit = False
        model = load_model(base, config, None, dtype=dtype, quantize_4bit=four_bit)
    except (ModelError, RecipeError) as exc:
        raise ModelError(f"{where} can't be loaded: {exc} {fix}") from None
    _warn_if_other_base(model_dir, base, config)
    with _quiet_peft():
        adapted = PeftModel.from_pretrained(model, str(model_dir), is_trainable=False)
    adapted.eval()
    return adapted.merge_and_unload() if merge else adapted


def _can_quantize() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def _warn_if_other_base(model_dir: Path, base: ModelConfig, config: Any) -> None:
    recorded = recorded_base(model_dir)
    if not recorded:
        return
    differs = base_identity_change(recorded, base_model_identity(base, config))
    if differs:
        logger.warning(
            "The base model loaded for %s is not the one it was trained on (%s): its results will differ "
            "from training's.",
            model_dir,
            differs,
        )


# --- The base model's identity, as run.json records it ------------------------------------------------------

_SAMPLE = 1 << 20  # bytes read from each end of a large weights file


def _file_digest(path: Path) -> dict[str, Any]:
    """sha256 of a small file; of a large one, sha256 of its size, first MiB and last MiB (seconds, not minutes,
    for a 14 GB base: enough to tell a different or retrained file, which always differs there)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= 4 * _SAMPLE:
            digest.update(f.read())
            return {"bytes": size, "sha256": digest.hexdigest()}
        digest.update(str(size).encode())
        digest.update(f.read(_SAMPLE))
        f.seek(size - _SAMPLE)
        digest.update(f.read(_SAMPLE))
    return {"bytes": size, "sha256_size_head_tail": digest.hexdigest()}


def base_model_identity(base: ModelConfig, config: Any) -> dict[str, Any]:
    """Which base model an adapter is trained on: its name, and what pins it (commit, or file digests)."""
    name = base.model_name_or_path
    identity: dict[str, Any] = {"model_name_or_path": name, "model_type": getattr(config, "model_type", None)}
    path = Path(name).expanduser() if name else None
    if path is not None and path.is_dir():
        identity["path"] = str(path.resolve())
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors")
        )
        identity["files"] = {p.name: _file_digest(p) for p in files}
    else:
        identity["revision"] = base.model_revision
        identity["commit"] = getattr(config, "_commit_hash", None)
    return identity


def base_identity_change(recorded: dict[str, Any], now: dict[str, Any]) -> str | None:
    """None when `now` is the recorded base (same files, or same hub commit); else what differs."""
    if recorded.get("files") and now.get("files"):
        changed = sorted(
            name
            for name in set(recorded["files"]) | set(now["files"])
            if recorded["files"].get(name) != now["files"].get(name)
        )
        return f"changed: {', '.join(changed)}" if changed else None
    if recorded.get("commit") and now.get("commit") and recorded["commit"] != now["commit"]:
        return f"hub commit {now['commit']} instead of {recorded['commit']}"
    return None
