"""Resuming from an earlier checkpoint is a branch: the line it leaves is moved aside whole, and every later
resume (the printed command, a plain rerun) continues the branch, never the timeline it left (real runs)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
from pathlib import Path

import pytest
from helpers import completed_run, invoke, run_cli, same_weights, snapshot, train_args

from clm_runner.rundir.checkpoints import scan_checkpoints

pytestmark = pytest.mark.slow

STEPS = 16
LIMIT = ("training.save_total_limit=2",)
# Keys that change the steps after the branch point: one read at every step, one the checkpoint's optimizer
# and schedule hold (the recipe's is put back over it, and the run says so).
BRANCH_CHANGE = ("training.max_grad_norm=0.05", "training.learning_rate=1e-4")


def line_args(run: Path, *extra: str, flags: tuple[str, ...] = ()) -> list[str]:
    return train_args(run, *LIMIT, *extra, max_steps=STEPS, flags=flags)


def branch_args(run: Path, source: Path | None = None) -> list[str]:
    """`train --resume-from SOURCE/checkpoint-12` with a changed recipe, training into `run`."""
    point = (source or run) / "checkpoint-12"
    return line_args(run, *BRANCH_CHANGE, flags=("--resume-from", str(point)))


def complete(run: Path) -> list[str]:
    return [p.name for p in scan_checkpoints(run).complete]


@pytest.fixture(scope="module")
def finished(workdir: Path, env: dict[str, str]) -> Path:
    """A finished 16-step run that kept checkpoint-12 and checkpoint-16 (save_total_limit = 2)."""
    run = completed_run(workdir / "finished", line_args(workdir / "finished"), env)
    assert complete(run) == ["checkpoint-12", "checkpoint-16"]
    return run


def copy_of(finished: Path, where: Path) -> Path:
    shutil.copytree(finished, where)
    return where


@pytest.fixture(scope="module")
def branched(workdir: Path, env: dict[str, str], finished: Path) -> Path:
    """The branch run uninterrupted: what every interrupted and resumed branch must end with."""
    run = copy_of(finished, workdir / "branched")
    return completed_run(run, branch_args(run), env)


def moved_line(before: dict, archived: Path) -> None:
    """The archive holds the left line's later checkpoints and final files, each byte as it was."""
    after = snapshot(archived)
    for name in ("checkpoint-16/model.safetensors", "model.safetensors", "train_results.json"):
        assert after[name] == before[name], name
    assert "checkpoint-12" not in {name.split("/")[0] for name in after}  # the branch point stays


def test_branch_interrupted_then_resumed_by_the_printed_command_continues_the_branch(
    workdir: Path, env: dict[str, str], finished: Path, branched: Path
) -> None:
    run = copy_of(finished, workdir / "sigint")
    before = snapshot(run)
    log_path = workdir / "sigint-1.log"
    code, log = run_cli(branch_args(run), {**env, "CLM_RUNNER_FAULT": "train.step@2:sigint"}, log_path)
    assert code == 130, log[-3000:]
    # The old line's later checkpoint and its final model are moved aside, nothing deleted; rotation keeps
    # the branch point beside the branch's own checkpoint-14 (it used to delete 12 and keep the old 16).
    assert complete(run) == ["checkpoint-12", "checkpoint-14"]
    assert not (run / "model.safetensors").exists() and not (run / "train_results.json").exists()
    (archived,) = (run / "previous-runs").iterdir()
    moved_line(before, archived)
    assert "Resuming checkpoint-12 with the recipe's learning_rate 0.0001 (the checkpoint's 0.001)" in log
    learning_rates = [
        {
            e["step"]: e["learning_rate"]
            for e in json.loads((d / "trainer_state.json").read_text())["log_history"]
            if "learning_rate" in e
        }
        for d in (run / "checkpoint-14", finished)
    ]
    # The recipe's rate at the schedule's place: a tenth of the old line's, step for step.
    assert learning_rates[0][13] == pytest.approx(learning_rates[1][13] / 10, rel=1e-12)
    moved = [line for line in log.splitlines() if "WARNING Branching from" in line]
    assert len(moved) == 1 and "(checkpoint-16, " in moved[0], log[-3000:]
    assert str(archived) in moved[0] and "nothing deleted" in moved[0]
    record = json.loads((run / "run.json").read_text())
    assert record["branched_from"]["step"] == 12 and record["status"] == "interrupted"
    assert record["branched_from"]["previous_line"] == str(archived)
    assert "training.learning_rate: 0.001 -> 0.0001" in record["recipe_changes"]

    command = re.search(r"Resume with: (.+)", log).group(1)
    argv = shlex.split(command)
    assert "--resume-from" not in argv
    code, log = run_cli(argv[1:], env, workdir / "sigint-2.log")
    assert code == 0, log[-3000:]
    assert re.search(rf"resuming from {re.escape(str(run / 'checkpoint-14'))}\b", log), log[-3000:]
    assert same_weights(run / "model.safetensors", branched / "model.safetensors")
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["branched_from"]["step"] == 12
    assert record["recipe"]["training"]["max_grad_norm"] == 0.05
    moved_line(before, archived)  # the resumed branch left the old line alone

    # The same command again: this line is complete.
    code, log = run_cli(argv[1:], env, workdir / "sigint-3.log")
    assert code == 0 and "is complete" in log, log[-3000:]


def test_branch_killed_before_its_first_checkpoint_resumes_from_the_branch_point(
    workdir: Path, env: dict[str, str], finished: Path, branched: Path
) -> None:
    run = copy_of(finished, workdir / "early-kill")
    args = branch_args(run)
    code, log = run_cli(args, {**env, "CLM_RUNNER_FAULT": "train.step@1:kill"}, workdir / "early-kill-1.log")
    assert code == -signal.SIGKILL, log[-3000:]
    assert complete(run) == ["checkpoint-12"]  # the old line's checkpoint-16 is no longer beside it
    plain = args[: args.index("--resume-from")] + args[args.index("--resume-from") + 2 :]
    code, log = run_cli(plain, env, workdir / "early-kill-2.log")
    assert code == 0, log[-3000:]
    assert re.search(rf"resuming from {re.escape(str(run / 'checkpoint-12'))}\b", log), log[-3000:]
    assert same_weights(run / "model.safetensors", branched / "model.safetensors")


def test_a_branch_from_another_run_dir_killed_early_resumes_from_that_checkpoint(
    workdir: Path, env: dict[str, str], finished: Path, branched: Path
) -> None:
    source = copy_of(finished, workdir / "source")
    run = workdir / "elsewhere"
    args = branch_args(run, source)
    code, log = run_cli(args, {**env, "CLM_RUNNER_FAULT": "train.step@1:kill"}, workdir / "elsewhere-1.log")
    assert code == -signal.SIGKILL, log[-3000:]
    assert complete(run) == []
    plain = args[: args.index("--resume-from")] + args[args.index("--resume-from") + 2 :]
    code, log = run_cli(plain, env, workdir / "elsewhere-2.log")
    assert code == 0, log[-3000:]
    assert re.search(rf"[Rr]esuming from {re.escape(str(source / 'checkpoint-12'))}\b", log), log[-3000:]
    assert same_weights(run / "model.safetensors", branched / "model.safetensors")
    assert json.loads((run / "run.json").read_text())["branched_from"]["checkpoint"] == str(
        source / "checkpoint-12"
    )
    assert complete(source) == ["checkpoint-12", "checkpoint-16"]  # the source run is only read


def test_a_branch_stopped_before_it_starts_leaves_the_dir_as_it_was_and_keeps_resume_from(
    tmp_path: Path, finished: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C while the data is prepared: nothing moved, and the printed command still branches."""
    import os

    from clm_runner.train import run as train_run

    run = copy_of(finished, tmp_path / "run")
    before = snapshot(run)
    original = train_run._RunSession.begin

    def interrupted_begin(self, prepared):
        os.kill(os.getpid(), signal.SIGINT)  # not yet training: stops at once
        return original(self, prepared)

    monkeypatch.setattr(train_run._RunSession, "begin", interrupted_begin)
    monkeypatch.setattr("sys.argv", ["clm-runner", *branch_args(run)])
    result = invoke(*branch_args(run))
    assert result.exit_code == 130, result.output
    assert snapshot(run) == before
    command = re.search(r"Resume with: (.+)", result.output).group(1)
    argv = shlex.split(command)
    assert argv[argv.index("--resume-from") + 1] == str(run / "checkpoint-12")


def test_a_finished_run_rerun_with_a_changed_recipe_is_refused_and_with_a_logging_change_is_complete(
    tmp_path: Path, finished: Path, fresh_cache: Path
) -> None:
    run = copy_of(finished, tmp_path / "run")
    before = snapshot(run)
    for flags in ((), ("--overwrite",)):
        result = invoke(*line_args(run, "training.learning_rate=3e-3", flags=flags))
        assert result.exit_code == 2, result.output
        (error,) = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert "changes what it would train: training.learning_rate: 0.001 -> 0.003." in error
        assert "another training.output_dir" in error and "--no-resume --overwrite" in error
        assert snapshot(run) == before
    result = invoke(*line_args(run, "training.logging_steps=2", "training.report_to=tensorboard"))
    assert result.exit_code == 0 and "is complete at step 16" in result.output, result.output
    assert snapshot(run) == before
