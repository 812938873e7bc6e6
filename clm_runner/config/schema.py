"""Recipes: the typed, frozen configuration of one job ([model], [data], [eval]; [training] is checked
against the installed TrainingArguments by clm_runner.config.load, [adapter] against peft's LoraConfig by
clm_runner.config.adapter_keys).

Each field says what it is; `__post_init__` checks the rules between fields, naming both keys and the fix.
Precedence is defaults < recipe file < `--set section.key=value` (clm_runner.config.load).
"""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clm_runner.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ALL_SECTIONS",
    "AdapterConfig",
    "DTYPES",
    "SECTIONS",
    "DataConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "MixSource",
    "ModelConfig",
    "OPTIONAL_SECTIONS",
    "Recipe",
    "tomllib",
]


DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelConfig:
    """Which model, config and tokenizer to load: run_clm's ModelArguments, same names and defaults."""

    model_name_or_path: str | None = None
    """Hub id or local directory of the weights to start from. Unset: train from scratch."""
    model_type: str | None = None
    """Architecture to build from scratch (for example "gpt2"), when model_name_or_path is unset."""
    config_overrides: str | None = None
    """From scratch only: "n_layer=2,n_embd=128" overrides the model_type's default config."""
    config_name: str | None = None
    """Config hub id or directory, if not the same as model_name_or_path."""
    tokenizer_name: str | None = None
    """Tokenizer hub id or directory, if not the same as model_name_or_path (required from scratch)."""
    cache_dir: str | None = None
    """Where hub downloads are stored (default: the Hugging Face cache)."""
    use_fast_tokenizer: bool = True
    """Use the Rust-backed fast tokenizer."""
    model_revision: str = "main"
    """Branch, tag or commit of the hub model."""
    token: str | None = None
    """Hub token for private models; never written to the output dir (prefer the HF_TOKEN variable)."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model or dataset. Only for repositories whose code you have read."""
    dtype: str | None = None
    """Load the weights in this dtype: auto, bfloat16, float16 or float32 (unset: float32)."""

    def __post_init__(self) -> None:
        if self.config_overrides is not None and (
            self.config_name is not None or self.model_name_or_path is not None
        ):
            raise RecipeError(
                "Can't use model.config_overrides with model.config_name or model.model_name_or_path: "
                "overrides apply only when training from scratch with model.model_type. Choose one."
            )
        if self.model_name_or_path is None and self.model_type is None and self.config_name is None:
            raise RecipeError(
                "No model given: set model.model_name_or_path (a hub id or directory) to fine-tune, "
                'or model.model_type (for example "gpt2") to train from scratch.'
            )
        if self.model_name_or_path is None and self.tokenizer_name is None:
            raise RecipeError(
                "Training from scratch needs a tokenizer: set model.tokenizer_name to a tokenizer "
                "directory or hub id."
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise RecipeError(f"model.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}.")


@dataclass(frozen=True)
class MixSource:
    """One corpus of a weighted mix: a [[data.mix]] table, with [data]'s source keys and a weight."""

    name: str | None = None
    """Its name in logs and metrics (eval_NAME_perplexity); unset: the dataset name or the train file's stem."""
    weight: float | None = None
    """Its share of the training blocks, relative to the others' weights (unset on every source: all blocks)."""
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_revision: str | None = None
    train_file: str | list[str] | None = None
    validation_file: str | list[str] | None = None
    """Its own validation text (unset: carved from its train rows, or [data]'s shared validation_file)."""
    text_column: str | None = None

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        if self.dataset_name is not None:
            return "_".join(x for x in (self.dataset_name.rsplit("/", 1)[-1], self.dataset_config_name) if x)
        first = self.train_file[0] if isinstance(self.train_file, list) else self.train_file
        if not first:
            return "source"
        path = Path(str(first))
        stem = path.name.split(".")[0]
        # corpus/train.txt is named after its folder: "train" would name every source the same.
        generic = stem.lower() in {"train", "training", "data", "text", "corpus", "all"} or "*" in stem
        return path.parent.name if generic and path.parent.name not in ("", ".") else stem

    def __post_init__(self) -> None:
        if self.weight is not None and not 0 < self.weight < float("inf"):
            raise RecipeError(f"data.mix weight must be a positive number; got {self.weight} ({self.label}).")
        if self.dataset_name is None and self.train_file is None:
            raise RecipeError(
                f"A [[data.mix]] table ({self.name or 'unnamed'}) has no training text: set its train_file, or "
                "its dataset_name (with dataset_config_name)."
            )
        if self.dataset_name is not None and (
            self.train_file is not None or self.validation_file is not None
        ):
            raise RecipeError(
                f"[[data.mix]] {self.label}: dataset_name and train_file/validation_file in one table. Choose one."
            )
        if self.name is not None and not self.name.replace("_", "").replace("-", "").isalnum():
            raise RecipeError(
                f"data.mix name {self.name!r}: use letters, digits, - and _ (it becomes a metric name)."
            )


@dataclass(frozen=True)
class DataConfig:
    """What text to train and evaluate on: run_clm's DataTrainingArguments plus clm-runner's own keys."""

    dataset_name: str | None = None
    """Hub dataset id (for example "wikitext"), or unset to read local files."""
    dataset_config_name: str | None = None
    """Hub dataset configuration (for example "wikitext-2-raw-v1")."""
    dataset_revision: str | None = None
    """Branch, tag or commit of the hub dataset (unset: the newest)."""
    train_file: str | list[str] | None = None
    """Training text: a file, a glob or a list of them (txt, csv, json, jsonl, parquet, arrow) or a save_to_disk dir."""
    validation_file: str | list[str] | None = None
    """Validation text, as train_file. Unset: the first validation_split_percentage% of the train rows."""
    test_file: str | list[str] | None = None
    """Optional test text, as train_file, for `clm-runner eval --split test`."""
    max_train_samples: int | None = None
    """Keep only this many training blocks (for quick runs)."""
    max_eval_samples: int | None = None
    """Keep only this many evaluation blocks (for quick runs)."""
    streaming: bool = False
    """Stream the dataset instead of preparing it on disk (needs training.max_steps)."""
    block_size: int | None = None
    """Tokens per block. Unset: the tokenizer's model_max_length, or min(1024, the model's positions) when that
    is larger than the model's positions (run_clm's rule). Never more than the model's positions."""
    clamp_block_size: bool = False
    """true: a block_size above the tokenizer's model_max_length is lowered to it first, as run_clm does (one
    still longer than the model's positions is refused). false: a block_size longer than the model's positions
    is refused as written (a size only above model_max_length is lowered to it either way)."""
    overwrite_cache: bool = False
    """Rebuild the preprocessing cache instead of reusing it."""
    validation_split_percentage: int = 5
    """With no validation split, this percentage of the train rows becomes validation."""
    preprocessing_num_workers: int | None = None
    """Processes for tokenization (unset: the CPU cores available). Blocks never depend on it."""
    keep_linebreaks: bool = True
    """Keep the line breaks of .txt files."""
    text_column: str | None = None
    """Column holding the text (unset: "text", else the first string column)."""
    grouping: Literal["concat", "run_clm"] = "concat"
    """concat: each split's whole token stream cut into blocks. run_clm: run_clm's 1000-row batches, exactly."""
    run_clm_preprocessing_num_workers: int | None = None
    """grouping = "run_clm" only: the --preprocessing_num_workers run_clm was run with (unset: none, one process).
    datasets.map(num_proc=N) cuts each split into N contiguous shards and restarts its 1000-row batches in
    each, so run_clm's blocks depend on N; this reproduces them. It never changes clm-runner's own speed."""
    validation_split_seed: int | None = None
    """Shuffle rows with this seed before carving the validation split (unset: the first rows, as run_clm)."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """Non-UTF-8 text: "strict" stops with an error, "replace" substitutes U+FFFD."""
    mix: tuple[MixSource, ...] = ()
    """[[data.mix]] tables: several corpora, each with its weight (empty: the one source of [data])."""
    mix_seed: int = 42
    """With [[data.mix]] weights: the seed that picks which blocks of each source make up the mix."""
    mix_sampling: Literal["undersample", "oversample"] = "undersample"
    """With weights: "undersample" uses no block twice (the mix ends where a source, scaled by its weight,
    runs out); "oversample" repeats blocks of the smaller sources until every block of the largest is used."""

    def __post_init__(self) -> None:
        has_files = any(f is not None for f in (self.train_file, self.validation_file, self.test_file))
        for key in ("mix_seed", "validation_split_seed"):
            seed = getattr(self, key)
            if seed is not None and seed < 0:  # numpy's generators take none below 0: refused here, not later
                raise RecipeError(f"data.{key} must be 0 or more; got {seed}.")
        if self.mix:
            self._check_mix()
        elif self.dataset_name is None and not has_files:
            raise RecipeError(
                "No data given: set data.dataset_name (a hub dataset) or data.train_file / "
                "data.validation_file (local files)."
            )
        if self.dataset_name is not None and has_files:
            raise RecipeError(
                "Can't use data.dataset_name together with data.train_file/validation_file/test_file. Choose one."
            )
        if self.block_size is not None and self.block_size <= 0:
            raise RecipeError(f"data.block_size must be a positive number of tokens; got {self.block_size}.")
        if not 0 < self.validation_split_percentage < 100:
            raise RecipeError(
                "data.validation_split_percentage must be between 1 and 99; "
                f"got {self.validation_split_percentage}."
            )
        for key in (
            "max_train_samples",
            "max_eval_samples",
            "preprocessing_num_workers",
            "run_clm_preprocessing_num_workers",
        ):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"data.{key} must be a positive integer; got {value}.")
        if self.run_clm_preprocessing_num_workers is not None:
            if self.grouping != "run_clm":
                raise RecipeError(
                    "data.run_clm_preprocessing_num_workers reproduces run_clm's blocks and needs "
                    'data.grouping = "run_clm"; set grouping, or remove the key (concat blocks never depend '
                    "on workers)."
                )
            if self.streaming:
                raise RecipeError(
                    "data.run_clm_preprocessing_num_workers has no effect with data.streaming (run_clm "
                    "streams without worker processes); remove the key."
                )

    def _check_mix(self) -> None:
        own = ("dataset_name", "dataset_config_name", "dataset_revision", "train_file", "text_column")
        clash = [key for key in own if getattr(self, key) is not None]
        if clash:
            raise RecipeError(
                f"data.{clash[0]} is set beside [[data.mix]] tables: with a mix, each source names its own "
                f"text. Move data.{clash[0]} into the [[data.mix]] tables (data.validation_file may stay, as "
                "the validation set shared by every source)."
            )
        own_validation = [source.label for source in self.mix if source.validation_file is not None]
        if self.validation_file is not None and own_validation:
            raise RecipeError(
                f"data.validation_file is the validation set every [[data.mix]] source shares, and "
                f"[[data.mix]] {own_validation[0]} has a validation_file of its own. Keep one: remove "
                "data.validation_file (each source validated on its own) or the sources' validation_file."
            )
        if self.streaming:
            raise RecipeError(
                "[[data.mix]] with data.streaming is not supported: a mix picks blocks from each prepared "
                "source. Set data.streaming = false."
            )
        labels = [source.label for source in self.mix]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise RecipeError(
                f"Two [[data.mix]] sources are both named {repeated[0]!r}: give each a distinct name = ... ."
            )
        weighted = [source.weight is not None for source in self.mix]
        if any(weighted) and not all(weighted):
            missing = [source.label for source in self.mix if source.weight is None]
            raise RecipeError(
                f"[[data.mix]] {', '.join(missing)} has no weight while others do: give every source a weight "
                "(or none, to train on all their blocks)."
            )

    @property
    def weights(self) -> tuple[float, ...] | None:
        """The sources' weights, normalized to sum to 1; None without weights (every block of every source)."""
        if not self.mix or self.mix[0].weight is None:
            return None
        total = sum(float(s.weight or 0) for s in self.mix)
        return tuple(float(s.weight or 0) / total for s in self.mix)


@dataclass(frozen=True)
class EvalConfig:
    """How `clm-runner eval` scores a model (command-line options override these)."""

    split: str = "validation"
    """Split to score: validation, test or train."""
    stride: int | None = None
    """Unset: disjoint blocks. Set: strided sliding windows that advance this many tokens."""
    context: int | None = None
    """Window length of the strided method (unset: the block size)."""

    def __post_init__(self) -> None:
        for key in ("stride", "context"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"eval.{key} must be a positive number of tokens; got {value}.")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """[early_stopping]: stop when evaluations stop improving training.metric_for_best_model (default: eval loss)."""

    patience: int | None = None
    """Stop after this many evaluations in a row without improvement (required)."""
    threshold: float = 0.0
    """An evaluation improves only when it beats the best so far by more than this (in the metric's units)."""

    def __post_init__(self) -> None:
        if self.patience is None:
            raise RecipeError(
                "early_stopping.patience is not set: say after how many evaluations without improvement to stop "
                "(for example patience = 3)."
            )
        if self.patience < 1:
            raise RecipeError(f"early_stopping.patience must be at least 1 evaluation; got {self.patience}.")
        if not 0 <= self.threshold < float("inf"):
            raise RecipeError(
                f"early_stopping.threshold must be a finite number, 0 or more (the metric's units); got {self.threshold}."
            )


@dataclass(frozen=True)
class AdapterConfig:
    """[adapter]: train small adapter matrices on a frozen base model instead of every weight (PEFT)."""

    method: Literal["lora"] = "lora"
    """The adapter method; LoRA is the one clm-runner trains."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, CUDA only)."""
    lora: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    """peft.LoraConfig's keys, with PEFT's names and defaults (r, lora_alpha, target_modules, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "load_in_4bit": self.load_in_4bit, **self.lora}


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig}
OPTIONAL_SECTIONS: dict[str, type] = {"early_stopping": EarlyStoppingConfig}
"""Sections whose absence means the feature is off (None in the Recipe), built like SECTIONS when present."""
ALL_SECTIONS = ("model", "data", "training", "eval", "early_stopping", "adapter")


@dataclass(frozen=True)
class Recipe:
    """One validated job. `training` holds only the TrainingArguments keys the user set."""

    model: ModelConfig
    data: DataConfig
    training: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapter: AdapterConfig | None = None
    """None: every weight is trained (no [adapter] section)."""
    early_stopping: EarlyStoppingConfig | None = None
    """None: train for the steps or epochs [training] says (no [early_stopping] section)."""
    source: str | None = None
    """The recipe file it came from (None for recipes built in code)."""

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The recipe as plain data, None values dropped (TOML has no null)."""
        out: dict[str, dict[str, Any]] = {}
        for name in ("model", "data"):
            out[name] = _drop_none(dataclasses.asdict(getattr(self, name)))
        out["data"]["mix"] = [_drop_none(source) for source in out["data"].get("mix", ())]
        if not out["data"]["mix"]:
            del out["data"]["mix"]
        out["training"] = _drop_none(dict(self.training))
        out["eval"] = _drop_none(dataclasses.asdict(self.eval))
        if self.early_stopping is not None:
            out["early_stopping"] = _drop_none(dataclasses.asdict(self.early_stopping))
        if self.adapter is not None:
            out["adapter"] = _drop_none(self.adapter.to_dict())
        return out


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
