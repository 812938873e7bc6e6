"""A trained adapter run, loaded again: its base model found, checked against run.json, and the adapter on it.

`load_adapter_run` puts a saved adapter back on its base model for eval, generate and export;
`base_model_identity` is what run.json records about that base, so a different base found later is noticed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from clm_runner.config.schema import ModelConfig
from clm_runner.errors import ModelError, RecipeError
from clm_runner.models.adapters import ADAPTER_CONFIG, can_quantize, quiet_peft

logger = logging.getLogger(__name__)


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
        if four_bit and not can_quantize():
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
    with quiet_peft():
        adapted = PeftModel.from_pretrained(model, str(model_dir), is_trainable=False)
    adapted.eval()
    return merge_adapter(adapted) if merge else adapted


def merge_adapter(adapted: Any) -> Any:
    """The adapter merged into its base (W + lora_alpha / r x B A in each adapted layer): a plain model.

    A weight the base shares with another layer (GPT-2's wte and lm_head under tie_word_embeddings) is untied
    first: the adapter run adds its delta in the adapted layer only, so merged into the shared tensor it would
    change the other layer too (perplexity 1,473 became 1e9). The adapted layer gets its own copy and the
    config no longer ties the embeddings, so the saved model keeps both weights and loads them apart.
    """
    import torch

    base = adapted.get_base_model()
    holders: dict[int, int] = {}
    for module in base.modules():
        for parameter in module.parameters(recurse=False):
            holders[id(parameter)] = holders.get(id(parameter), 0) + 1
    untied = False
    for module in base.modules():
        if not hasattr(module, "lora_A"):
            continue
        layer = module.get_base_layer()
        if holders.get(id(layer.weight), 0) > 1:
            layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            untied = True
    if untied:
        base.config.tie_word_embeddings = False
        logger.info("The adapter is on a tied weight: the merged model keeps its own copy of it (untied).")
    return adapted.merge_and_unload()


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
