"""Every result file of a run, after `train` and after each kind of `eval --run`, read as a run_clm script reads
it: every value a number (float() of each, as mlflow.log_metrics needs), run_clm's keys present; how each was
computed in evaluations.json beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import invoke, train_args
from run_clm_reference import RUN_CLM_EVAL_KEYS, RUN_CLM_TRAIN_KEYS, read_as_run_clm_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("results") / "run"
    result = invoke(*train_args(run, "training.eval_strategy=steps", "training.eval_steps=4", max_steps=8))
    assert result.exit_code == 0, result.output
    return run


def metric_files(run: Path) -> list[Path]:
    return sorted([*run.glob("*_results.json"), *(run / "evals").glob("*.json")])


def check_every_result_file(run: Path) -> dict[str, dict[str, float]]:
    read = {str(path.relative_to(run)): read_as_run_clm_script(path) for path in metric_files(run)}
    assert read["train_results.json"].keys() >= RUN_CLM_TRAIN_KEYS
    assert read["eval_results.json"].keys() >= RUN_CLM_EVAL_KEYS
    assert read["all_results.json"].keys() >= RUN_CLM_TRAIN_KEYS | RUN_CLM_EVAL_KEYS
    for name, metrics in read.items():
        if name.startswith("evals/"):
            assert RUN_CLM_EVAL_KEYS - {"epoch"} <= metrics.keys(), name  # an evaluation like any other
    # Each evaluation's description is beside it, never in it.
    described = json.loads((run / "evaluations.json").read_text())
    assert set(described) == {name for name in read if name.startswith("evals/")} | {"eval_results.json"}
    for name, about in described.items():
        assert {"by", "split", "method", "model", "data"} <= about.keys(), name
    return read


def test_after_train_every_result_file_is_numbers_with_run_clms_keys(run: Path) -> None:
    read = check_every_result_file(run)
    assert read["eval_results.json"]["perplexity"] == read["eval_results.json"]["eval_perplexity"]
    assert read["train_results.json"]["train_samples"] == 32  # the training blocks (max_train_samples)
    about = json.loads((run / "evaluations.json").read_text())["eval_results.json"]
    assert (about["by"], about["split"], about["method"], about["block_size"]) == (
        "clm-runner train",
        "validation",
        "blocks",
        32,
    )


def test_after_eval_run_every_result_file_still_is(run: Path, tmp_path: Path) -> None:
    """`eval --run` rewrote eval_results.json with another key set, descriptions included."""
    trained = read_as_run_clm_script(run / "eval_results.json")
    for args in ([], ["--split", "train"], ["--stride", "16"], ["--checkpoint", "checkpoint-4"]):
        result = invoke("eval", "--run", run, "--quiet", *args)
        assert result.exit_code == 0, result.output
    read = check_every_result_file(run)
    assert {"evals/train_blocks32.json", "evals/validation_strided-context32-stride16.json"} <= read.keys()
    assert "evals/checkpoint-4_validation_blocks32.json" in read
    # The train split is cut by max_train_samples (32 blocks), and its description says so.
    about_train = json.loads((run / "evaluations.json").read_text())["evals/train_blocks32.json"]
    assert read["evals/train_blocks32.json"]["eval_samples"] == 32
    assert about_train["max_train_samples"] == 32 and "max_eval_samples" not in about_train
    # The evaluation train ran at its end, repeated: the same key set and, to float32 precision, numbers.
    again = read["eval_results.json"]
    assert trained.keys() <= again.keys()
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
    assert again["eval_samples"] == trained["eval_samples"] and again["epoch"] == trained["epoch"]

    result = invoke("eval", "--run", run, "--quiet", "--all-checkpoints")
    assert result.exit_code == 0, result.output
    history = json.loads((run / "eval_history.json").read_text())
    assert history["evaluation"]["method"] == "blocks"
    for row in history["checkpoints"]:
        assert all(isinstance(v, (int, float)) for v in row["metrics"].values()), row
    check_every_result_file(run)


def test_eval_output_dash_is_standard_output_and_json_describes(run: Path, tmp_path: Path) -> None:
    """`eval --output -` wrote a file named "-"."""
    result = invoke("eval", "--run", run, "--quiet", "--split", "train", "--output", "-")
    assert result.exit_code == 0, result.output
    assert not Path("-").exists()
    printed = json.loads(result.stdout)
    assert printed == json.loads((run / "evals" / "train_blocks32.json").read_text())
    result = invoke("eval", "--run", run, "--quiet", "--split", "train", "--json")
    document = json.loads(result.stdout)
    (only,) = document["evaluations"]
    assert only["evaluation"]["split"] == "train" and only["metrics"]["eval_samples"] > 0
    assert str(run / "evals" / "train_blocks32.json") in document["written"]
