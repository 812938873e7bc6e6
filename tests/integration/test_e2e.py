"""End to end through the CLI: train the smoke recipe, check the output dir, evaluate, resume, refuse."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ASSETS, REPO, SMOKE, independent_perplexity, invoke, snapshot
from tolerances import FORWARD_RTOL

from clm_runner.cli import cli

pytestmark = pytest.mark.slow


def smoke_overrides(output_dir: Path, *extra: str) -> list[str]:
    """The smoke recipe, shortened for the test suite, with absolute paths so any cwd works."""
    sets = [
        f"model.tokenizer_name={ASSETS / 'tokenizer'}",
        f"data.train_file={ASSETS / 'train.txt'}",
        f"data.validation_file={ASSETS / 'validation.txt'}",
        f"training.output_dir={output_dir}",
        "training.num_train_epochs=2",
        "training.save_strategy=epoch",
        "training.logging_steps=5",
        *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("e2e") / "run"
    result = invoke("train", "--recipe", str(SMOKE), "--quiet", *smoke_overrides(run))
    assert result.exit_code == 0, result.output
    return run


def test_output_dir_has_every_run_clm_file(trained_run: Path) -> None:
    expected = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        "trainer_state.json",
        "README.md",
        "recipe.toml",
    ]
    missing = [name for name in expected if not (trained_run / name).exists()]
    assert not missing
    train = json.loads((trained_run / "train_results.json").read_text())
    evaluation = json.loads((trained_run / "eval_results.json").read_text())
    both = json.loads((trained_run / "all_results.json").read_text())
    assert train["train_samples"] > 0
    for key in ("eval_loss", "perplexity", "eval_accuracy", "eval_samples", "eval_tokens"):
        assert key in evaluation and key in both
    assert evaluation["perplexity"] == math.exp(evaluation["eval_loss"])  # the same float64 expression
    described = json.loads((trained_run / "evaluations.json").read_text())["eval_results.json"]
    assert (described["method"], described["block_size"], described["split"]) == ("blocks", 128, "validation")
    assert evaluation["eval_tokens"] == evaluation["eval_samples"] * 127  # block 128, first token unpredicted
    assert sorted(p.name for p in trained_run.glob("checkpoint-*"))  # save_strategy=epoch kept checkpoints


def test_loss_falls(trained_run: Path) -> None:
    history = json.loads((trained_run / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(losses) >= 3
    assert losses[-1] < losses[0] - 1.0, losses
    assert evals[-1] < math.log(2048) - 1.0, evals  # well below a uniform guess over the vocab


def plain_model_perplexity(model_dir: Path, text_path: Path, block_size: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return independent_perplexity(model, AutoTokenizer.from_pretrained(model_dir), text_path, block_size)


def test_eval_equals_an_independent_forward_pass(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    result = invoke("eval", "--run", str(trained_run), "--quiet", "--output", str(out))
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    expected, tokens = plain_model_perplexity(trained_run, ASSETS / "validation.txt", 128)
    assert metrics["eval_tokens"] == tokens
    assert metrics["perplexity"] == pytest.approx(expected, rel=FORWARD_RTOL)
    # The number train wrote at the end is the same one.
    written = json.loads((trained_run / "eval_results.json").read_text())
    assert written["perplexity"] == pytest.approx(expected, rel=FORWARD_RTOL)
    assert "perplexity" in result.output and "validation" in result.output


def test_rerunning_a_finished_run_leaves_it_untouched(trained_run: Path) -> None:
    before = snapshot(trained_run)
    result = invoke("train", "--recipe", str(SMOKE), "--quiet", *smoke_overrides(trained_run))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "is complete at step" in lines[0] and "all_results.json" in lines[0]
    assert snapshot(trained_run) == before  # no step trained, no checkpoint rotated, no result rewritten


def test_a_longer_recipe_continues_a_finished_run(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "longer"
    shutil.copytree(trained_run, run)
    state = json.loads((run / "trainer_state.json").read_text())
    steps_per_epoch = state["global_step"] // 2
    result = invoke(
        "train", "--recipe", str(SMOKE), "--quiet", *smoke_overrides(run, "training.num_train_epochs=3")
    )
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "training.num_train_epochs: 2 -> 3" in result.output
    after = json.loads((run / "trainer_state.json").read_text())
    assert after["global_step"] == 3 * steps_per_epoch
    results = json.loads((run / "train_results.json").read_text())
    # The results describe the whole run (3 epochs of every training block), not the attempt that added
    # the third; each block is 128 tokens.
    assert results["train_tokens"] == 3 * results["train_samples"] * 128
    assert results["train_attempts"] == 2
    assert results["train_runtime"] > results["train_runtime_this_attempt"]


def test_non_empty_dir_without_checkpoint_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "busy"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["train", "--recipe", str(SMOKE), *smoke_overrides(run)])
    assert result.exit_code == 2
    assert "not empty" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert (run / "notes.txt").read_text() == "keep me"


def test_hub_recipe_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--recipe",
            str(REPO / "recipes" / "gpt2-wikitext.toml"),
            "--set",
            f"training.output_dir={tmp_path / 'o'}",
        ],
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Hugging Face Hub" in errors[0]
    assert "Traceback" not in result.output
