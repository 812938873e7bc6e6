"""Progress and logs of a training run: plain lines when quiet, train.log, measured throughput, TensorBoard."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from helpers import ASSETS, SMOKE, invoke, sets
from transformers import TrainerControl

from clm_runner.cli import cli
from clm_runner.logs import attach_log_file, detach_log_file
from clm_runner.train.display import TrainProgressCallback, format_log_line, progress_logger

STEPS, BATCH, BLOCK = 6, 16, 128  # the smoke recipe's batch and block
SECRET = "hf_" + "Zx9" * 12  # token-shaped; must never reach train.log


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("progress")
    run = root / "run"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("CLM_RUNNER_CACHE", str(root / "cache"))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    try:
        result = CliRunner().invoke(
            cli,
            [
                "train",
                "--recipe",
                str(SMOKE),
                "--quiet",
                *sets(
                    f"model.tokenizer_name={ASSETS / 'tokenizer'}",
                    f"data.train_file={ASSETS / 'train.txt'}",
                    f"data.validation_file={ASSETS / 'validation.txt'}",
                    f"training.output_dir={run}",
                    f"training.max_steps={STEPS}",
                    "training.logging_steps=2",
                    "training.save_strategy=no",
                    "data.max_train_samples=64",
                    'training.report_to=["tensorboard"]',
                    f'training.hub_token="{SECRET}"',
                ),
            ],
            catch_exceptions=False,
        )
    finally:
        monkeypatch.undo()
    assert result.exit_code == 0, result.output
    return run, result.output


def test_train_log_has_one_plain_line_per_logging_step(quiet_run) -> None:
    run, _ = quiet_run
    log = (run / "train.log").read_text(encoding="utf-8")
    step_lines = [line for line in log.splitlines() if "clm_runner.progress" in line and "| lr " in line]
    assert [line.split("step ")[1].split("/")[0] for line in step_lines] == ["2", "4", "6"]
    for line in step_lines:
        assert " lr " in line and " tokens/s " in line
        assert float(line.split(" tokens/s ")[1].split()[0].replace(",", "")) > 0
    assert "Performance: CPU (use_cpu = true) -> fp32" in log  # the device choice, printed at start
    assert "eval | loss" in log and "perplexity" in log
    assert "Trained 12,288 tokens at" in log


def test_quiet_console_has_the_same_plain_lines(quiet_run) -> None:
    run, output = quiet_run
    console = [line for line in output.splitlines() if "| lr " in line]
    assert [line.split("step ")[1].split("/")[0] for line in console] == ["2", "4", "6"]
    assert all(" tokens/s " in line for line in console)


def test_no_secret_reaches_train_log(quiet_run) -> None:
    run, _ = quiet_run
    assert SECRET not in (run / "train.log").read_text(encoding="utf-8")


def test_train_results_carry_measured_throughput(quiet_run) -> None:
    run, _ = quiet_run
    results = json.loads((run / "train_results.json").read_text())
    assert results["train_tokens"] == STEPS * BATCH * BLOCK
    assert results["train_tokens_per_second"] > 0
    # Measured over training steps only, so never slower than over the Trainer's whole runtime.
    assert results["train_tokens_per_second"] >= results["train_tokens"] / results["train_runtime"] * 0.999
    assert "train_mfu" not in results and "train_peak_gpu_memory_gb" not in results  # CPU: no known peak
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert len(logged) == STEPS // 2 and all(entry["tokens_per_second"] > 0 for entry in logged)


def test_tensorboard_writes_events_with_throughput(quiet_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = quiet_run
    # transformers 5.x: TensorBoardCallback writes to <output_dir>/runs/<date>_<host>/ (logging_dir is gone).
    # The final evaluation after training opens a second events file in the same directory.
    event_dirs = {path.parent for path in (run / "runs").glob("*/events.out.tfevents.*")}
    assert len(event_dirs) == 1
    events = EventAccumulator(str(event_dirs.pop()))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second", "eval/loss"} <= tags
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4, 6]


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("quiet", [True, False])
def test_lines_reach_the_console_only_when_quiet(quiet: bool) -> None:
    capture = Capture()
    progress_logger.addHandler(capture)
    level = progress_logger.level
    progress_logger.setLevel(logging.INFO)  # what setup_logging gives the clm_runner tree
    try:
        callback = TrainProgressCallback(quiet=quiet)
        state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0, epoch=0.0)
        callback.on_train_begin(None, state, TrainerControl())
        state.global_step, state.epoch = 5, 0.5
        callback.on_step_end(None, state, TrainerControl())
        logs = {"loss": 2.5, "learning_rate": 1e-3, "tokens_per_second": 1234.0, "epoch": 0.5}
        callback.on_log(None, state, TrainerControl(), logs=logs)
        if not quiet:
            assert callback.bar.n == 5 and "1,234 tok/s" in callback.bar.postfix
        callback.on_train_end(None, state, TrainerControl())
    finally:
        progress_logger.removeHandler(capture)
        progress_logger.setLevel(level)
    [record] = capture.records
    assert record.getMessage() == "step 5/10 epoch 0.50 | loss 2.5000 | lr 1.000e-03 | tokens/s 1,234"
    assert record.console is quiet


def test_format_eval_and_unknown_entries() -> None:
    state = SimpleNamespace(max_steps=10, global_step=10, epoch=1.0)
    line = format_log_line({"eval_loss": 2.0, "perplexity": 7.389, "eval_accuracy": 0.5}, state)
    assert line == "step 10/10 epoch 1.00 | eval | loss 2.0000 | perplexity 7.389 | accuracy 0.5000"
    assert format_log_line({"something": 1}, state) is None
    mixed = {
        "eval_loss": 2.0,
        "eval_wiki_perplexity": 8.0,
        "eval_code_perplexity": 6.5,
        "eval_perplexity": 7.389,
    }
    assert format_log_line(mixed, state) == (
        "step 10/10 epoch 1.00 | eval | loss 2.0000 | perplexity 7.389 (wiki 8.000, code 6.500)"
    )


def test_log_file_masks_secrets(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "env-secret-value-123")
    handler = attach_log_file(tmp_path / "train.log", secrets=["recipe-secret-456"])
    try:
        logger = logging.getLogger("clm_runner")
        logger.setLevel(logging.INFO)
        logger.info("token %s and %s and %s", "env-secret-value-123", "recipe-secret-456", SECRET)
    finally:
        detach_log_file(handler)
    text = (tmp_path / "train.log").read_text()
    assert "token *** and *** and ***" in text
    assert "secret" not in text and SECRET not in text


class RecordingBar:
    made: list[RecordingBar] = []

    def __init__(self, total=None, **kwargs) -> None:
        self.total, self.n, self.kwargs = total, 0, kwargs
        RecordingBar.made.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc) -> None:
        return None


@pytest.mark.parametrize("quiet", [True, False])
def test_evaluation_bar_counts_this_ranks_blocks(quiet: bool, monkeypatch) -> None:
    import tqdm.auto

    from clm_runner.train.display import evaluation_progress

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    RecordingBar.made.clear()
    trainer = SimpleNamespace(
        callback_handler=SimpleNamespace(callbacks=[TrainProgressCallback(quiet=quiet)]),
        is_world_process_zero=lambda: True,
        args=SimpleNamespace(process_index=1, world_size=2),
    )
    with evaluation_progress(trainer, list(range(5))) as advance:
        if quiet:
            assert advance is None
        else:
            advance(1)
            advance(2)  # called with blocks done so far: rank 1 of 2 scores blocks 1 and 3 of 5
    if quiet:
        assert RecordingBar.made == []
    else:
        [bar] = RecordingBar.made
        assert (bar.n, bar.total, bar.kwargs["desc"]) == (2, 2, "Evaluating")


def test_off_a_terminal_progress_is_plain_lines_not_bar_frames(tmp_path: Path) -> None:
    """A Slurm or CI log of `make smoke-test` held hundreds of carriage-return progress frames: off a
    terminal, as with --quiet, each logging step is one plain line and no bar is drawn."""
    result = invoke(
        "train", "--recipe", str(SMOKE),  # no --quiet: CliRunner's stderr is not a terminal
        *sets(
            f"model.tokenizer_name={ASSETS / 'tokenizer'}",
            f"data.train_file={ASSETS / 'train.txt'}",
            f"data.validation_file={ASSETS / 'validation.txt'}",
            f"training.output_dir={tmp_path / 'run'}",
            "training.max_steps=4",
            "training.logging_steps=2",
            "training.save_strategy=no",
            "data.max_train_samples=64",
        ),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    steps = [
        line for line in result.output.splitlines() if re.search(r"step [24]/4 epoch [\d.]+ \| loss ", line)
    ]
    assert len(steps) == 2, result.output


def test_live_display_only_on_a_terminal(monkeypatch) -> None:
    from clm_runner.logs import live_display

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert live_display(quiet=False) is True
    assert live_display(quiet=True) is False
    monkeypatch.setattr(sys, "stderr", object())  # a stream that is no terminal
    assert live_display(quiet=False) is False
