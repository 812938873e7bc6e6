"""A run killed or stopped mid-way resumes to the same result as one that never stopped (real subprocesses)."""

from __future__ import annotations

import json
import re
import shlex
import signal
from pathlib import Path

import pytest
from helpers import (
    MAX_STEPS,
    completed_run,
    copy_checkpoints,
    finish,
    losses_by_step,
    run_cli,
    same_weights,
    start,
    train_args,
    wait_for,
)

from clm_runner.rundir.checkpoints import MARKER, checkpoint_problem

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(workdir: Path, env: dict[str, str]) -> Path:
    return completed_run(workdir / "uninterrupted", train_args(workdir / "uninterrupted"), env)


def final_eval_loss(run: Path) -> float:
    return json.loads((run / "eval_results.json").read_text())["eval_loss"]


def assert_same_result(resumed: Path, reference: Path, after_step: int) -> None:
    """Every loss logged after `after_step`, the final eval loss and the final weights are the same bits.

    Nothing differs between the two: the same machine and thread count (1, subprocess_env), the same data
    order (the sampler's RNG is restored), the same weights and optimizer state (safetensors and torch.save
    round-trip float32 exactly), the same RNG states. So each step runs the same float operations in the
    same order as in the uninterrupted run: equality, not a tolerance.
    """
    got, want = losses_by_step(resumed), losses_by_step(reference)
    later = [s for s in want if s > after_step]
    assert later == list(range(after_step + 1, MAX_STEPS + 1))
    for step in later:
        assert got[step] == want[step], (step, got[step], want[step])
    assert final_eval_loss(resumed) == final_eval_loss(reference)
    assert same_weights(resumed / "model.safetensors", reference / "model.safetensors")


def test_sigkill_after_a_checkpoint_then_resume_matches_uninterrupted(
    workdir: Path, env: dict[str, str], uninterrupted: Path
) -> None:
    run = workdir / "killed"
    args = train_args(run)
    process = start(args, {**env, "CLM_TEST_STEP_DELAY": "0.3"}, workdir / "killed-1.log")
    wait_for(lambda: (run / "checkpoint-4" / MARKER).exists(), process, what="checkpoint-4 sealed")
    process.send_signal(signal.SIGKILL)
    assert finish(process) == -signal.SIGKILL
    assert not (run / "eval_results.json").exists()  # it really died before the end
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # nobody wrote an end

    code, log = run_cli(args, env, workdir / "killed-2.log")
    assert code == 0, log
    assert "Taking over the stale lock" in log
    assert re.search(r"resuming from \S*checkpoint-(4|8)\b", log), log
    resumed_from = int(re.search(r"resuming from \S*checkpoint-(\d+)", log).group(1))
    assert_same_result(run, uninterrupted, after_step=resumed_from)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["global_step"] == MAX_STEPS
    assert manifest["resumed_from"].endswith(f"checkpoint-{resumed_from}")
    (first,) = manifest["previous_attempts"]
    assert first["status"] == "failed" and "without recording an end" in first["error"]


def truncate_weights(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)


@pytest.mark.parametrize(
    ("damage", "why", "explicit"),
    [
        (truncate_weights, "model.safetensors", False),
        (lambda c: (c / MARKER).unlink(), "no completion marker", True),
    ],
    ids=["truncated weights, automatic resume", "no marker, --resume-from"],
)
def test_a_torn_newest_checkpoint_is_skipped_with_a_warning_naming_it(
    workdir: Path, env: dict[str, str], uninterrupted: Path, damage, why: str, explicit: bool
) -> None:
    source = workdir / f"source-{why[:5]}"
    copy_checkpoints(uninterrupted, source, (4, 8))
    damage(source / "checkpoint-8")
    assert checkpoint_problem(source / "checkpoint-8") is not None
    run = workdir / f"torn-{why[:5]}" if explicit else source
    flags = ("--resume-from", str(source / "checkpoint-8")) if explicit else ()
    code, log = run_cli(train_args(run, flags=flags), env, workdir / f"{run.name}.log")
    assert code == 0, log
    warning = next(line for line in log.splitlines() if "Skipping torn checkpoint" in line)
    assert str(source / "checkpoint-8") in warning and why in warning
    assert re.search(rf"[Rr]esuming from {re.escape(str(source / 'checkpoint-4'))}\b", log), log
    assert_same_result(run, uninterrupted, after_step=4)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_checkpoints_and_prints_the_resume_command(
    workdir: Path, env: dict[str, str], uninterrupted: Path, signum: int, exit_code: int
) -> None:
    run = workdir / f"signal-{signum}"
    # Slow steps, to signal mid-run; slow seals, so the stop's checkpoint is still being sealed in the
    # background when training stops: the run must wait for it before it says it was written.
    slow = {"CLM_TEST_STEP_DELAY": "0.3", "CLM_RUNNER_FAULT": "checkpoint.sealing:delay1"}
    process = start(train_args(run), {**env, **slow}, workdir / f"signal-{signum}.log")

    def running_past_step_4() -> bool:
        manifest = run / "run.json"
        return (run / "checkpoint-4" / MARKER).exists() and json.loads(manifest.read_text())[
            "status"
        ] == "running"

    wait_for(running_past_step_4, process, what="training past checkpoint-4")
    process.send_signal(signum)
    code = finish(process)
    log = (workdir / f"signal-{signum}.log").read_text()
    assert code == exit_code, log
    assert "Traceback" not in log

    stopped = re.search(
        r"Stopped by (\w+) after step (\d+); checkpoint written to (\S+)\. Resume with: (.+)", log
    )
    assert stopped, log
    name, step, checkpoint, command = stopped.groups()
    assert name == signal.Signals(signum).name
    step = int(step)
    assert 4 <= step < MAX_STEPS
    assert Path(checkpoint) == run / f"checkpoint-{step}"
    assert checkpoint_problem(Path(checkpoint)) is None  # complete
    assert not (run / "model.safetensors").exists()  # no final model: the run did not pretend to finish
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["global_step"] == step

    # The printed command, run as printed, finishes the run with the uninterrupted run's numbers.
    argv = shlex.split(command)
    assert argv[:2] == ["clm-runner", "train"]
    code, log = run_cli(argv[1:], env, workdir / f"signal-{signum}-resume.log")
    assert code == 0, log
    assert_same_result(run, uninterrupted, after_step=step)
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_whole_run_totals_count_the_step_a_signal_stops_on(workdir: Path, env: dict[str, str]) -> None:
    """Stopped by SIGINT at step 7 (neither a logging nor a saving step) and resumed: train_tokens used to lose
    the tokens trained since the last logging step (the checkpoint stored the last measured stretch)."""
    tokens_per_step = 4 * 32  # per_device_train_batch_size x block_size, one process, no accumulation
    run = workdir / "totals"
    args = train_args(run, "training.logging_steps=5")
    code, log = run_cli(args, {**env, "CLM_RUNNER_FAULT": "train.step@7:sigint"}, workdir / "totals-1.log")
    assert code == 130, log[-3000:]
    state = json.loads((run / "checkpoint-7" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["RunTotals"]["attributes"]["tokens"] == 7 * tokens_per_step
    code, log = run_cli(args, env, workdir / "totals-2.log")
    assert code == 0, log[-3000:]
    results = json.loads((run / "train_results.json").read_text())
    assert results["train_tokens"] == MAX_STEPS * tokens_per_step
    assert results["train_attempts"] == 2
