"""data.streaming = true through `train`: periodic and final evaluation of streamed blocks, then `eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import train_args
from tolerances import FORWARD_RTOL

from clm_runner.cli import cli

pytestmark = pytest.mark.slow


def test_streamed_training_evaluates_during_and_after_training(tmp_path: Path, fresh_cache: Path) -> None:
    """The final evaluation and eval_strategy = "steps" called len() on an IterableDataset: a TypeError
    traceback after the whole training."""
    run = tmp_path / "run"
    args = train_args(
        run,
        "data.streaming=true",
        "data.max_eval_samples=8",
        "training.eval_strategy=steps",
        "training.eval_steps=2",
        max_steps=4,
    )
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    periodic = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in periodic] == [0, 2, 4]  # on start (the smoke recipe), at 2 and 4
    final = json.loads((run / "eval_results.json").read_text())
    assert final["eval_samples"] == 8 and final["eval_tokens"] == 8 * 31  # max_eval_samples bounds it
    assert final["perplexity"] == math.exp(final["eval_loss"])
    # A stream has no length: train_samples is the blocks trained on (4 steps x 4), never run_clm's -1.
    assert json.loads((run / "train_results.json").read_text())["train_samples"] == 4 * 4

    # The same blocks, not streamed, score the same (the stream carries tokens over between batches).
    out = tmp_path / "cached.json"
    result = CliRunner().invoke(
        cli, ["eval", "--run", str(run), "--set", "data.streaming=false", "--quiet", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    cached = json.loads(out.read_text())
    assert cached["eval_tokens"] == final["eval_tokens"]
    # Training evaluated 8 blocks in one batch of 16; eval uses the recipe's batch too, from a cache.
    assert cached["eval_loss"] == pytest.approx(final["eval_loss"], rel=FORWARD_RTOL)
