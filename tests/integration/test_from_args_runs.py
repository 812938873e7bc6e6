"""Three run_clm.py command lines converted by `recipe from-args`, then trained and evaluated end to end, offline:
their blocks equal what run_clm's own datasets calls make of the same data, and their result files read as
run_clm's do. The hub names of the README job are replaced by local copies (a tiny GPT-2 directory, a dataset
laid out as on the Hub), the only change to its flags besides a step limit."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ASSETS, invoke
from run_clm_reference import (
    RUN_CLM_EVAL_KEYS,
    RUN_CLM_TRAIN_KEYS,
    local_files_job,
    model_dir,
    read_as_run_clm_script,
    readme_job,
    run_clm_blocks,
    streaming_job,
)

from clm_runner.config.load import load_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_cache")]

CONFIG = "wikitext-2-raw-v1"


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def wikitext_like(root: Path) -> Path:
    """A local dataset repo laid out as the Hub's wikitext: config wikitext-2-raw-v1, train/validation/test."""
    repo = root / "wikitext"
    (repo / CONFIG).mkdir(parents=True)
    splits = {"train": lines_of(ASSETS / "train.txt"), "validation": lines_of(ASSETS / "validation.txt")}
    splits["test"] = splits["validation"][:50]
    for split, rows in splits.items():
        pq.write_table(pa.table({"text": rows}), repo / CONFIG / f"{split}-00000.parquet")
    entries = "".join(f"  - split: {s}\n    path: {CONFIG}/{s}-*.parquet\n" for s in splits)
    (repo / "README.md").write_text(f"---\nconfigs:\n- config_name: {CONFIG}\n  data_files:\n{entries}---\n")
    return repo


def convert_train_evaluate(root: Path, argv: list[str]) -> tuple[Path, object]:
    recipe = root / "converted.toml"
    result = invoke("recipe", "from-args", "--output", recipe, "--", *argv)
    assert result.exit_code == 0, result.output
    text = recipe.read_text()
    run_line = next(line for line in text.splitlines() if line.startswith("#   clm-runner train"))
    train = run_line.removeprefix("#   clm-runner ").split()
    result = invoke(*train, "--quiet")  # the command the recipe's header says to run
    assert result.exit_code == 0, result.output
    loaded = load_recipe(recipe)
    return loaded.output_dir, loaded


def blocks_of(loaded, split: str, limit: int | None = None) -> list[list[int]]:
    """The blocks clm-runner trained or evaluated on (prepare_splits: the cache `train` built)."""
    from transformers import AutoConfig, AutoTokenizer

    from clm_runner.data.blocks import resolve_block_size
    from clm_runner.data.prepare import prepare_splits

    tokenizer = AutoTokenizer.from_pretrained(loaded.model.model_name_or_path)
    config = AutoConfig.from_pretrained(loaded.model.model_name_or_path)
    size = resolve_block_size(loaded.data.block_size, tokenizer, config, clamp=loaded.data.clamp_block_size)
    prepared = prepare_splits(loaded, tokenizer, size, [split], progress=False)[split]
    rows = prepared.blocks.take(limit) if limit is not None else prepared.blocks
    return [list(map(int, row["input_ids"])) for row in rows]


def check_results(run: Path, *, train_samples: int, eval_samples: int) -> None:
    train = read_as_run_clm_script(run / "train_results.json")
    evaluation = read_as_run_clm_script(run / "eval_results.json")
    both = read_as_run_clm_script(run / "all_results.json")
    assert train.keys() >= RUN_CLM_TRAIN_KEYS and evaluation.keys() >= RUN_CLM_EVAL_KEYS
    assert both.keys() >= RUN_CLM_TRAIN_KEYS | RUN_CLM_EVAL_KEYS
    assert (train["train_samples"], evaluation["eval_samples"]) == (train_samples, eval_samples)
    result = invoke("eval", "--run", run, "--quiet")
    assert result.exit_code == 0, result.output
    again = read_as_run_clm_script(run / "eval_results.json")
    assert again.keys() >= RUN_CLM_EVAL_KEYS and again["eval_samples"] == eval_samples
    assert again["eval_loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-5)
    read_as_run_clm_script(run / "all_results.json")


def test_the_readme_job(tmp_path: Path) -> None:
    import datasets
    from transformers import AutoTokenizer

    model = str(model_dir(tmp_path / "gpt2", positions=64))
    repo = wikitext_like(tmp_path)
    job = readme_job(model=model, dataset=str(repo), output=str(tmp_path / "run"))
    run, loaded = convert_train_evaluate(tmp_path, [*job.argv, "--max_steps", "6"])
    raw = datasets.load_dataset(str(repo), CONFIG, cache_dir=str(tmp_path / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    # No --block_size: the tokenizer's 1024 tokens is more than the model's 64 positions, so 64 (run_clm's rule).
    expected = {split: run_clm_blocks(tokenizer, raw[split], 64) for split in ("train", "validation")}
    assert blocks_of(loaded, "train") == expected["train"]
    assert blocks_of(loaded, "validation") == expected["validation"]
    check_results(run, train_samples=len(expected["train"]), eval_samples=len(expected["validation"]))
    # run_clm's fp32, eager, main-process loading, on any device (a GPU's defaults would add bf16, compile, ...).
    performance = json.loads((run / "run.json").read_text())["performance"]
    assert set(performance["defaults_applied"]) <= {"dataloader_pin_memory"}
    assert (
        performance["precision"],
        performance["torch_compile"],
        performance["dataloader_num_workers"],
    ) == (
        "fp32",
        False,
        0,
    )


def test_local_files_with_block_size_512_and_transformers_4_flags(tmp_path: Path) -> None:
    import datasets
    from transformers import AutoTokenizer

    model = str(model_dir(tmp_path / "gpt2-512", positions=512))
    train, validation = str(ASSETS / "train.txt"), str(ASSETS / "validation.txt")
    job = local_files_job(model, train, validation, str(tmp_path / "run"))
    run, loaded = convert_train_evaluate(tmp_path, job.argv)
    raw = datasets.load_dataset(
        "text",
        data_files={"train": train, "validation": validation},
        keep_linebreaks=False,
        cache_dir=str(tmp_path / "hf"),
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    # run_clm's calls with --preprocessing_num_workers 2: datasets.map(num_proc=2) for tokens and blocks.
    expected_train = run_clm_blocks(tokenizer, raw["train"], 512, workers=2, limit=64)
    expected_validation = run_clm_blocks(tokenizer, raw["validation"], 512, workers=2)
    assert blocks_of(loaded, "train") == expected_train
    assert blocks_of(loaded, "validation") == expected_validation
    # Two shards of 257 and 256 rows, each with its own remainder: the worker count changes run_clm's blocks.
    assert expected_validation != run_clm_blocks(tokenizer, raw["validation"], 512)
    check_results(run, train_samples=64, eval_samples=len(expected_validation))
    state = json.loads((run / "trainer_state.json").read_text())
    # 64 blocks / (4 per batch x 2 accumulated) = 8 steps; --evaluation_strategy steps --eval_steps 4.
    assert state["global_step"] == 8
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e][:2] == [4, 8]


def test_streaming_with_max_steps(tmp_path: Path) -> None:
    import datasets
    from transformers import AutoTokenizer

    model = str(model_dir(tmp_path / "gpt2", positions=64))
    train, validation = str(ASSETS / "train.txt"), str(ASSETS / "validation.txt")
    job = streaming_job(model, train, validation, str(tmp_path / "run"))
    run, loaded = convert_train_evaluate(tmp_path, job.argv)
    streams = datasets.load_dataset(
        "text", data_files={"train": train, "validation": validation}, keep_linebreaks=True, streaming=True
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    # 6 steps x 4 blocks: the blocks trained on, in order (a stream is not shuffled).
    expected_train = run_clm_blocks(tokenizer, streams["train"], 64, streaming=True, limit=24)
    expected_validation = run_clm_blocks(tokenizer, streams["validation"], 64, streaming=True, limit=8)
    assert blocks_of(loaded, "train", limit=24) == expected_train
    assert blocks_of(loaded, "validation") == expected_validation
    # A stream has no length: train_samples counts the blocks it trained on (run_clm wrote -1 or its maximum).
    check_results(run, train_samples=24, eval_samples=8)
