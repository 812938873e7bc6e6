"""`clm-runner export`: a deployable directory out of any run or checkpoint.

A full run's model is copied (its weights, config, generation config, tokenizer and card; no optimizer or
trainer state). An adapter run is copied as PEFT's adapter files, or with `merge` put on its base model and
merged into a standalone model that `AutoModelForCausalLM.from_pretrained` loads with no PEFT installed.

The directory is written under a temporary name beside the output and renamed into place at the end: an
export cut short leaves no half-written model where the output should be, and an existing non-empty
directory is never written into.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clm_runner.config.schema import ModelConfig
from clm_runner.errors import ModelError, OutputDirError, RecipeError
from clm_runner.models.adapter_runs import base_model_config, is_adapter_dir
from clm_runner.models.adapters import ADAPTER_CONFIG

logger = logging.getLogger("clm_runner")

DEPLOYABLE = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    ADAPTER_CONFIG,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
    "README.md",
)
"""The files a model directory needs to be loaded and described; optimizer, RNG and trainer state are not."""


@dataclass(frozen=True)
class Exported:
    output: Path
    kind: str
    """"model" (a full run's model, copied), "adapter" (copied) or "merged" (adapter merged into its base)."""
    files: tuple[str, ...]


def check_output(output: Path) -> None:
    """The output must be new or an empty directory: an export never writes over files."""
    if output.exists() and not output.is_dir():
        raise OutputDirError(f"--output {output} is a file; name a new directory.")
    if output.is_dir() and any(output.iterdir()):
        raise OutputDirError(
            f"--output {output} is not empty; name a new (or empty) directory. Nothing was written."
        )


def model_dir_problem(source: Path) -> str | None:
    """Why `source` holds no model to export (None: it holds one)."""
    if not source.is_dir():
        return f"{source}: no such directory. Pass a run's output_dir or one of its checkpoint-N dirs."
    if is_adapter_dir(source) or (source / "config.json").is_file():
        return None
    from clm_runner.rundir.checkpoints import scan_checkpoints

    known = [p.name for p in scan_checkpoints(source).complete]
    hint = (
        f" Export a checkpoint with --checkpoint {known[-1]} (checkpoints: {', '.join(known)})."
        if known
        else ""
    )
    return (
        f"{source} holds no final model (no config.json or {ADAPTER_CONFIG}): the run did not finish.{hint}"
    )


def export_model(source: Path, output: Path, *, merge: bool, overrides: Sequence[str] = ()) -> Exported:
    """Write `source`'s model (merged into its base with `merge`, for an adapter) to `output`."""
    problem = model_dir_problem(source)
    if problem:
        raise ModelError(problem)
    check_output(output)
    adapter = is_adapter_dir(source)
    if overrides and not (adapter and merge):
        what = (
            "an adapter exported without --merge is copied as it is"
            if adapter
            else f"{source} is a full model"
        )
        raise RecipeError(
            f"--set changes the base model an adapter is merged into, so it applies only with --merge on an adapter "
            f"run; {what}, and nothing would read it. Remove --set."
        )
    base = None
    if adapter and merge:
        base, four_bit = base_model_config(source, overrides)
        if four_bit:
            raise ModelError(
                f"--merge: {source} was trained on a 4-bit base (adapter.load_in_4bit = true), and merging into "
                "4-bit weights would round the adapter away. Merge onto the full-precision base with "
                "--set adapter.load_in_4bit=false, or export the adapter alone (no --merge)."
            )
    elif merge:
        logger.info("%s is a full model, not an adapter: nothing to merge, it is copied as it is.", source)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.export-partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that was cut short
    staging.mkdir()
    try:
        if base is not None:
            _write_merged(source, staging, base)
            kind = "merged"
        else:
            _copy_deployable(source, staging)
            kind = "adapter" if adapter else "model"
            if adapter:
                _pin_base_path(staging / ADAPTER_CONFIG, source)
        files = tuple(sorted(p.name for p in staging.iterdir()))
        _sync_tree(staging)
        if output.is_dir():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(output, kind, files)


def _copy_deployable(source: Path, target: Path) -> None:
    for pattern in DEPLOYABLE:
        for path in sorted(source.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, target / path.name)


def _pin_base_path(adapter_config: Path, source: Path) -> None:
    """An exported adapter names its base by absolute path when the base is a local directory (the run's
    relative path would not resolve from wherever the export is loaded)."""
    base, _ = base_model_config(source)
    name = base.model_name_or_path
    if name and Path(name).expanduser().is_dir():
        saved = json.loads(adapter_config.read_text())
        saved["base_model_name_or_path"] = str(Path(name).expanduser().resolve())
        adapter_config.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _write_merged(source: Path, target: Path, base: ModelConfig) -> None:
    from transformers import AutoTokenizer

    from clm_runner.models.adapter_runs import load_adapter_run

    model = load_adapter_run(source, base, merge=True)
    model.save_pretrained(target)  # safetensors, config, generation config: no PEFT needed to load it
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(target)
    (target / "README.md").write_text(
        f"# Merged model\n\nThe LoRA adapter of `{source}` merged into its base model "
        f"`{base.model_name_or_path}` (written by `clm-runner export --merge`). A standalone model: "
        "`AutoModelForCausalLM.from_pretrained(THIS_DIR)` loads it without PEFT.\n",
        encoding="utf-8",
    )


def _sync_tree(directory: Path) -> None:
    from clm_runner.rundir.files import fsync_path, give_default_modes

    give_default_modes(directory)
    for path in directory.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(directory)
