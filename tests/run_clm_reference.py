"""run_clm.py as the tests' oracle: its grouping in plain Python, its own datasets calls, and the three run_clm
command lines the converter is tested on (with what each flag must become in the recipe, written out by hand)."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------
# run_clm's preprocessing in plain Python lists


def reference_rows(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(tokenizer(text)["input_ids"]) for text in texts]


def reference_concat(rows: list[list[int]], block_size: int) -> list[list[int]]:
    stream = list(chain(*rows))
    usable = len(stream) // block_size * block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]


def reference_run_clm(rows: list[list[int]], block_size: int) -> list[list[int]]:
    out = []
    for first in range(0, len(rows), 1000):
        batch = list(chain(*rows[first : first + 1000]))
        usable = len(batch) // block_size * block_size
        out.extend(batch[i : i + block_size] for i in range(0, usable, block_size))
    return out


# ---------------------------------------------------------------------------------------------------
# run_clm's own calls: load_dataset, datasets.map(tokenize), datasets.map(group_texts)


def run_clm_group_texts(block_size: int):
    """run_clm.py's group_texts, as it is written there."""

    def group_texts(examples):
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated_examples.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    return group_texts


def run_clm_blocks(
    tokenizer,
    raw,
    block_size: int,
    *,
    workers: int | None = None,
    streaming: bool = False,
    limit: int | None = None,
) -> list[list[int]]:
    """The input_ids of the blocks run_clm.py makes of one raw split (a Dataset, or an IterableDataset when
    streaming), with its own datasets calls, cut to `limit` blocks as its max_*_samples does."""
    # A streamed text file has no features until read (run_clm's list(features) fails there): its column.
    columns = list(raw.features) if raw.features is not None else ["text"]

    def tokenize_function(examples):
        return tokenizer(examples["text" if "text" in columns else columns[0]])

    if streaming:
        tokenized = raw.map(tokenize_function, batched=True, remove_columns=columns)
        grouped = tokenized.map(run_clm_group_texts(block_size), batched=True)
        if limit is not None:
            grouped = grouped.take(limit)
        return [list(row["input_ids"]) for row in grouped]
    # In memory, computed afresh: datasets' map cache keys ignore num_proc, and even with
    # load_from_cache_file=False it reads back the shard files another worker count left there.
    fresh = {"num_proc": workers, "keep_in_memory": True}
    tokenized = raw.map(tokenize_function, batched=True, remove_columns=columns, **fresh)
    grouped = tokenized.map(run_clm_group_texts(block_size), batched=True, **fresh)
    if limit is not None:
        grouped = grouped.select(range(min(limit, len(grouped))))
    return [list(ids) for ids in grouped["input_ids"]]


# ---------------------------------------------------------------------------------------------------
# Three run_clm command lines and what each flag must become


@dataclass(frozen=True)
class CommandLine:
    """A run_clm.py command line, the recipe keys its flags must give (by hand, flag by flag), and the keys
    the converter must pin to run_clm's choice."""

    argv: list[str]
    expected: dict[tuple[str, str], Any]
    pinned: dict[tuple[str, str], Any] = field(default_factory=dict)
    run_flags: tuple[str, ...] = ()


DEVICE_PINS = {
    ("training", "bf16"): False,
    ("training", "fp16"): False,
    ("training", "tf32"): False,
    ("training", "torch_compile"): False,
    ("training", "dataloader_num_workers"): 0,
}


def readme_job(
    model: str = "openai-community/gpt2", dataset: str = "wikitext", output: str = "/tmp/test-clm"
):
    """run_clm's README command: GPT-2 fine-tuned on WikiText-2."""
    argv = [
        "--model_name_or_path", model,
        "--dataset_name", dataset,
        "--dataset_config_name", "wikitext-2-raw-v1",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--do_train",
        "--do_eval",
        "--output_dir", output,
    ]  # fmt: skip
    expected = {
        ("model", "model_name_or_path"): model,
        ("data", "dataset_name"): dataset,
        ("data", "dataset_config_name"): "wikitext-2-raw-v1",
        ("training", "per_device_train_batch_size"): 8,
        ("training", "per_device_eval_batch_size"): 8,
        ("training", "do_eval"): True,
        ("training", "output_dir"): output,
    }
    return CommandLine(argv, expected, {("data", "grouping"): "run_clm", **DEVICE_PINS})


def local_files_job(model: str, train: str, validation: str, output: str):
    """Local text files, block_size 512, two preprocessing workers, transformers 4.x flags (warmup_ratio,
    evaluation_strategy, overwrite_output_dir) and every kind of flag syntax."""
    argv = [
        "--model_name_or_path", model,
        "--train_file", train,
        "--validation_file", validation,
        "--block_size", "512",
        "--preprocessing_num_workers", "2",
        "--max_train_samples", "64",
        "--keep_linebreaks", "False",
        "--per_device_train_batch_size=4",
        "--per-device-eval-batch-size", "16",
        "--gradient_accumulation_steps", "2",
        "--learning_rate", "3e-4",
        "--num_train_epochs", "1",
        "--warmup_ratio", "0.1",
        "--evaluation_strategy", "steps",
        "--eval_steps", "4",
        "--save_steps", "4",
        "--save_total_limit", "1",
        "--logging_steps", "2",
        "--seed", "7",
        "--do_train",
        "--do_eval",
        "--overwrite_output_dir",
        "--output_dir", output,
    ]  # fmt: skip
    expected = {
        ("model", "model_name_or_path"): model,
        ("data", "train_file"): train,
        ("data", "validation_file"): validation,
        ("data", "block_size"): 512,
        ("data", "preprocessing_num_workers"): 2,
        ("data", "max_train_samples"): 64,
        ("data", "keep_linebreaks"): False,
        ("training", "per_device_train_batch_size"): 4,
        ("training", "per_device_eval_batch_size"): 16,
        ("training", "gradient_accumulation_steps"): 2,
        ("training", "learning_rate"): 3e-4,
        ("training", "num_train_epochs"): 1.0,
        ("training", "warmup_steps"): 0.1,  # --warmup_ratio: a ratio below 1 on transformers 5
        ("training", "eval_strategy"): "steps",  # --evaluation_strategy
        ("training", "eval_steps"): 4.0,
        ("training", "save_steps"): 4.0,
        ("training", "save_total_limit"): 1,
        ("training", "logging_steps"): 2.0,
        ("training", "seed"): 7,
        ("training", "do_eval"): True,
        ("training", "output_dir"): output,
    }
    pinned = {
        ("data", "grouping"): "run_clm",
        ("data", "run_clm_preprocessing_num_workers"): 2,
        ("data", "clamp_block_size"): True,
        **DEVICE_PINS,
    }
    return CommandLine(argv, expected, pinned, run_flags=("--overwrite", "--no-resume"))


def streaming_job(model: str, train: str, validation: str, output: str):
    """A streamed local file with max_steps (a stream has no length to count epochs by)."""
    argv = [
        "--model_name_or_path", model,
        "--train_file", train,
        "--validation_file", validation,
        "--streaming",
        "--block_size", "64",
        "--max_eval_samples", "8",
        "--max_steps", "6",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--logging_steps", "1",
        "--report_to", "none",
        "--do_train",
        "--do_eval",
        "--output_dir", output,
    ]  # fmt: skip
    expected = {
        ("model", "model_name_or_path"): model,
        ("data", "train_file"): train,
        ("data", "validation_file"): validation,
        ("data", "streaming"): True,
        ("data", "block_size"): 64,
        ("data", "max_eval_samples"): 8,
        ("training", "max_steps"): 6,
        ("training", "per_device_train_batch_size"): 4,
        ("training", "per_device_eval_batch_size"): 8,
        ("training", "logging_steps"): 1.0,
        ("training", "report_to"): "none",
        ("training", "do_eval"): True,
        ("training", "output_dir"): output,
    }
    pinned = {("data", "grouping"): "run_clm", ("data", "clamp_block_size"): True, **DEVICE_PINS}
    return CommandLine(argv, expected, pinned)


def as_json_arguments(argv: list[str]) -> dict[str, Any]:
    """The same arguments as run_clm's JSON file would hold them (JSON types, not strings)."""
    import json

    out: dict[str, Any] = {}
    index = 0
    while index < len(argv):
        flag = argv[index]
        name, _, inline = flag[2:].partition("=")
        name = name.replace("-", "_")
        following = argv[index + 1] if index + 1 < len(argv) else None
        if inline:
            text, index = inline, index + 1
        elif following is None or following.startswith("--"):
            text, index = "true", index + 1
        else:
            text, index = following, index + 2
        try:
            value = json.loads(text.lower() if text in ("True", "False") else text)
        except json.JSONDecodeError:
            value = text
        out[name] = value
    return out


def non_default_keys(recipe) -> dict[tuple[str, str], Any]:
    """Every key a recipe sets to something other than its default ([training]: every key it sets)."""
    import dataclasses

    out: dict[tuple[str, str], Any] = {}
    for section in ("model", "data"):
        config = getattr(recipe, section)
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value != default:
                out[(section, f.name)] = value
    out.update({("training", key): value for key, value in recipe.training.items()})
    return out


def model_dir(directory: Path, *, positions: int, seed: int = 0) -> Path:
    """A tiny pretrained GPT-2 (random weights, seeded) with the smoke tokenizer: --model_name_or_path."""
    import shutil

    import torch
    from helpers import ASSETS, tiny_gpt2_config
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(tiny_gpt2_config(n_positions=positions)).save_pretrained(directory)
    for file in (ASSETS / "tokenizer").iterdir():
        shutil.copy(file, directory / file.name)
    return directory


# ---------------------------------------------------------------------------------------------------
# Reading result files as a run_clm script does

RUN_CLM_TRAIN_KEYS = frozenset(
    {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}
    | {"epoch", "train_samples"}
)
"""What run_clm.py's train_results.json holds: Trainer.train's metrics and train_samples."""
RUN_CLM_EVAL_KEYS = frozenset(
    {"eval_loss", "eval_accuracy", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
    | {"epoch", "eval_samples", "perplexity"}
)
"""What run_clm.py's eval_results.json holds: Trainer.evaluate's metrics (accuracy from its compute_metrics),
eval_samples and perplexity."""


def read_as_run_clm_script(path: Path) -> dict[str, float]:
    """A results file the way scripts around run_clm read one: `float()` of every value, as
    `mlflow.log_metrics` and a W&B or spreadsheet import need; a description in it fails here."""
    import json

    metrics = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(metrics, dict), path
    wrong = {k: v for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    assert not wrong, f"{path.name} holds values that are not numbers: {wrong}"
    return {key: float(value) for key, value in metrics.items()}
