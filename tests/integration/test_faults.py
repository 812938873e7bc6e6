"""Runs never lost, proven: kill a real `train` at every named fault point, resume it with the same command.

Every case ends with the uninterrupted run's global step, eval loss and weights, every JSON file parses,
every safetensors file loads, nothing half written is left, and the results count the whole run. `make
fault-test` runs this file (it is left out of `make test`: about nine minutes on two cores).

Why equality and not a tolerance: the resumed attempt runs on the same machine, with the same thread count
(1), the same data order, weights, optimizer and RNG states (all restored bit for bit): each remaining step
is the same float operations in the same order as in the uninterrupted run. Only the whole-run mean train
loss is a different float sum: the saved partial sum plus the rest, instead of one running sum.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ASSETS, REPO, SMOKE, completed_run, run_cli, same_weights, train_args

from clm_runner.rundir.checkpoints import MARKER, checkpoint_problem, scan_checkpoints
from clm_runner.rundir.policy import is_leftover

pytestmark = [pytest.mark.fault, pytest.mark.slow]

MAX_STEPS = 12
LOSS_SUM_RTOL = 1e-13
"""train_loss is a sum of MAX_STEPS float64 step losses divided by MAX_STEPS; adding them in another
grouping moves the sum by at most MAX_STEPS x 2**-53 of it (1.3e-15): 1e-13 bounds it with room."""

# A run that passes every point: checkpoints at 4, 8 and 12 (3 of them, so rotation with a limit of 2
# deletes one), evaluations at steps 6 and 12, and the final evaluation.
EXTRA = (
    "training.save_steps=4",
    "training.save_total_limit=2",
    "training.eval_strategy=steps",
    "training.eval_steps=6",
)

# (point, hit): where SIGKILL strikes. A hit of 1 at a checkpoint point strikes the first checkpoint (none is
# sealed yet: the same command must start the run over), 2 the second (resume from the first).
NEW, RESTART, RESUME = "Training into new output dir", "starting it over in place", "resuming from"
KILL_POINTS = [
    ("startup.lock", 1, NEW),  # only the lock's leftovers: as good as empty
    ("write.run.json", 1, NEW),
    ("startup.begun", 1, RESTART),  # run.json, train.log, recipe.toml: this run's start
    ("checkpoint.staging", 1, RESTART),
    ("checkpoint.model", 1, RESTART),
    ("checkpoint.optimizer", 2, RESUME),
    ("checkpoint.state", 2, RESUME),
    ("checkpoint.taken", 2, RESUME),  # every file of checkpoint-8 written; its seal not started
    ("checkpoint.sealing", 2, RESUME),  # checkpoint-8's seal started in the background
    ("checkpoint.marker", 2, RESUME),
    ("checkpoint.renamed", 2, RESUME),
    ("rotation.delete", 1, RESUME),
    ("evaluate", 1, RESTART),  # eval_on_start (the smoke recipe's), before any checkpoint
    ("evaluate", 2, RESUME),  # the evaluation at step 6, after checkpoint-4
    ("write.trainer_state.json", 1, RESUME),
    ("train.end", 1, RESUME),
    ("final.save", 1, RESUME),
    ("write.train_results.json", 1, RESUME),
    ("write.eval_results.json", 1, RESUME),
    ("write.all_results.json", 2, RESUME),
    ("write.evaluations.json", 1, RESUME),  # how eval_results.json was computed, written after it
    ("card.write", 1, RESUME),
    ("write.run.json", 3, RESUME),  # the last run.json write: the run's end is about to be recorded
]
# (point, hit, what it says on resume): killed in the middle of writing a file, cut to half its size first.
# A staged file must never be read as a whole one.
TORN_POINTS = [
    ("checkpoint.optimizer", 1, RESTART),  # the optimizer state of the first checkpoint
    ("checkpoint.model", 2, RESUME),  # the weights of a later checkpoint
    ("final.save", 1, RESUME),  # the final model
]
CASES = [(*case, "kill") for case in KILL_POINTS] + [(*case, "torn") for case in TORN_POINTS]


def args_for(run: Path) -> list[str]:
    return train_args(run, *EXTRA, max_steps=MAX_STEPS)


@pytest.fixture(scope="module")
def reference(workdir: Path, env: dict[str, str]) -> Path:
    return completed_run(workdir / "uninterrupted", args_for(workdir / "uninterrupted"), env)


def weights(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def assert_whole_and_equal(run: Path, reference: Path) -> None:
    for path in run.rglob("*.json"):
        json.loads(path.read_text())  # every JSON parses
    for path in run.rglob("*.safetensors"):
        weights(path)  # every weights file loads
    leftovers = [p.name for p in run.iterdir() if is_leftover(p.name)]
    assert leftovers == [], leftovers
    assert not scan_checkpoints(run).torn
    for checkpoint in scan_checkpoints(run).complete:
        assert checkpoint_problem(checkpoint) is None
    state, want = (json.loads((d / "trainer_state.json").read_text()) for d in (run, reference))
    assert state["global_step"] == want["global_step"] == MAX_STEPS
    got_eval, want_eval = (json.loads((d / "eval_results.json").read_text()) for d in (run, reference))
    assert got_eval["eval_loss"] == want_eval["eval_loss"]
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")
    got, ref = (json.loads((d / "train_results.json").read_text()) for d in (run, reference))
    assert got["train_tokens"] == ref["train_tokens"]  # the whole run's, not the last attempt's
    assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=LOSS_SUM_RTOL)
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(
    ("point", "hit", "says", "action"), CASES, ids=[f"{a} {p}@{h}" for p, h, _, a in CASES]
)
def test_killed_at_a_fault_point_the_same_command_finishes_the_run(
    workdir: Path, env: dict[str, str], reference: Path, point: str, hit: int, says: str, action: str
) -> None:
    run = workdir / f"{action}-{point}-{hit}"
    args = args_for(run)
    code, log = run_cli(
        args, {**env, "CLM_RUNNER_FAULT": f"{point}@{hit}:{action}"}, workdir / f"{run.name}-1.log"
    )
    assert code == -signal.SIGKILL, f"the fault point was not reached:\n{log[-2000:]}"
    code, log = run_cli(args, env, workdir / f"{run.name}-2.log")
    assert code == 0, log[-3000:]
    assert "error:" not in log and says in log, log[-3000:]
    assert_whole_and_equal(run, reference)


@pytest.mark.parametrize(
    ("point", "hit", "action", "says"),
    [
        ("checkpoint.model", 2, "enospc", "No space left on the device writing"),
        ("checkpoint.marker", 2, "enospc", "No space left on the device writing"),  # on the seal's thread
        ("write.train_results.json", 1, "enospc", "No space left on the device writing"),
        ("final.save", 1, "enospc", "No space left on the device writing"),
        ("checkpoint.staging", 2, "eacces", "Permission denied writing"),
        ("write.run.json", 2, "erofs", "The file system is read-only writing"),
    ],
)
def test_a_failed_write_ends_the_attempt_in_one_line_and_the_same_command_resumes(
    workdir: Path, env: dict[str, str], reference: Path, point: str, hit: int, action: str, says: str
) -> None:
    run = workdir / f"{action}-{point}-{hit}"
    args = args_for(run)
    code, log = run_cli(
        args, {**env, "CLM_RUNNER_FAULT": f"{point}@{hit}:{action}"}, workdir / f"{run.name}-1.log"
    )
    assert code == 1, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], log[-3000:]
    assert str(run) in errors[0] and "run the same command to resume" in errors[0]
    if action == "enospc":
        assert re.search(r"\(\d+\.\d+ [GM]iB free\)", errors[0]), errors[0]
    assert "Traceback" not in log
    newest = scan_checkpoints(run).newest_complete
    if newest is not None:
        assert f"the last sealed checkpoint, {newest.name}, is intact" in errors[0]
        assert checkpoint_problem(newest) is None
    code, log = run_cli(args, env, workdir / f"{run.name}-2.log")
    assert code == 0, log[-3000:]
    assert_whole_and_equal(run, reference)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_an_output_dir_made_read_only_mid_run_is_one_line_and_resumable(
    workdir: Path, env: dict[str, str], reference: Path
) -> None:
    from helpers import finish, start, wait_for

    run = workdir / "read-only"
    log = workdir / "read-only-1.log"
    process = start(args_for(run), {**env, "CLM_TEST_STEP_DELAY": "0.3"}, log)
    wait_for(
        lambda: (run / "checkpoint-4" / "clm_runner_complete.json").exists(), process, what="checkpoint-4"
    )
    run.chmod(0o555)
    try:
        assert finish(process) == 1
    finally:
        run.chmod(0o755)
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Permission denied writing" in errors[0]
    code, text = run_cli(args_for(run), env, workdir / "read-only-2.log")
    assert code == 0, text[-3000:]
    assert_whole_and_equal(run, reference)


# ---------------------------------------------------------------------------------------------------
# A seal in flight: checkpoints are sealed on a background thread while training goes on


def test_killed_while_a_seal_is_in_flight_the_same_command_resumes_from_the_previous_one(
    workdir: Path, env: dict[str, str], reference: Path
) -> None:
    """checkpoint-8's seal is slowed down; the run trains on and is killed at step 10 with that seal still in
    flight. Its files hold step 8's state although steps 9 and 10 changed the weights meanwhile, it was never
    published as checkpoint-8, and the same command resumes from checkpoint-4 to the uninterrupted result."""
    run = workdir / "in-flight"
    faults = "checkpoint.sealing@2:delay60,train.step@10:kill"
    code, log = run_cli(args_for(run), {**env, "CLM_RUNNER_FAULT": faults}, workdir / "in-flight-1.log")
    assert code == -signal.SIGKILL, log[-2000:]
    staged = run / "tmp-checkpoint-8"
    assert not (run / "checkpoint-8").exists() and not (staged / MARKER).exists()
    assert [p.name for p in scan_checkpoints(run).complete] == ["checkpoint-4"]
    assert json.loads((staged / "trainer_state.json").read_text())["global_step"] == 8
    assert same_weights(staged / "model.safetensors", reference / "checkpoint-8" / "model.safetensors")
    code, log = run_cli(args_for(run), env, workdir / "in-flight-2.log")
    assert code == 0, log[-3000:]
    assert f"{RESUME} {run / 'checkpoint-4'}" in log, log[-3000:]
    assert_whole_and_equal(run, reference)


def test_an_evaluation_starts_once_the_seal_in_flight_is_done(
    workdir: Path, env: dict[str, str], reference: Path
) -> None:
    """checkpoint-4's seal is slowed down and the run killed as the evaluation at step 6 starts: the evaluation
    waited for the seal (it may pick that checkpoint as the best), so checkpoint-4 is there to resume from."""
    run = workdir / "evaluation-waits"
    faults = "checkpoint.sealing@1:delay2,evaluate@2:kill"
    code, log = run_cli(
        args_for(run), {**env, "CLM_RUNNER_FAULT": faults}, workdir / "evaluation-waits-1.log"
    )
    assert code == -signal.SIGKILL, log[-2000:]
    assert [p.name for p in scan_checkpoints(run).complete] == ["checkpoint-4"]
    code, log = run_cli(args_for(run), env, workdir / "evaluation-waits-2.log")
    assert code == 0 and f"{RESUME} {run / 'checkpoint-4'}" in log, log[-3000:]
    assert_whole_and_equal(run, reference)


def test_a_step_failing_while_a_seal_is_in_flight_lets_the_seal_finish_first(
    workdir: Path, env: dict[str, str], reference: Path
) -> None:
    """Step 10 fails (a full disk) while checkpoint-8 is being sealed: the seal finishes before the run
    reports, so the error names checkpoint-8 as intact and the same command resumes from it."""
    run = workdir / "fails-in-flight"
    faults = "checkpoint.sealing@2:delay1,train.step@10:enospc"
    code, log = run_cli(args_for(run), {**env, "CLM_RUNNER_FAULT": faults}, workdir / "fails-in-flight-1.log")
    assert code == 1, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the last sealed checkpoint, checkpoint-8, is intact" in errors[0], log[
        -3000:
    ]
    code, log = run_cli(args_for(run), env, workdir / "fails-in-flight-2.log")
    assert code == 0 and f"{RESUME} {run / 'checkpoint-8'}" in log, log[-3000:]
    assert_whole_and_equal(run, reference)


def test_a_seal_failing_in_the_background_stops_the_run_at_the_next_step(
    workdir: Path, env: dict[str, str], reference: Path
) -> None:
    """checkpoint-4's seal fails on its thread (a full disk as its marker is written) while step 5 trains:
    the run stops after step 5 with the one-line storage error, not at step 6's evaluation or the next save
    (step 6 would be killed here), and the same command starts the run over and finishes it."""
    run = workdir / "seal-fails"
    faults = {
        "CLM_RUNNER_FAULT": "checkpoint.marker@1:enospc,train.step@6:kill",
        "CLM_TEST_STEP_DELAY": "0.3",
    }
    code, log = run_cli(args_for(run), {**env, **faults}, workdir / "seal-fails-1.log")
    assert code == 1, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on the device writing" in errors[0], log[-3000:]
    assert "tmp-checkpoint-4" in errors[0] and "Traceback" not in log, log[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert scan_checkpoints(run).complete == ()
    code, log = run_cli(args_for(run), env, workdir / "seal-fails-2.log")
    assert code == 0 and RESTART in log, log[-3000:]
    assert_whole_and_equal(run, reference)


def test_a_save_waits_for_the_seal_still_in_flight(workdir: Path, env: dict[str, str]) -> None:
    """Every seal is slowed down and a checkpoint saved every other step (milliseconds apart): each save
    waits for the previous seal, whose tmp-checkpoint-N it would otherwise remove as a leftover."""
    run = workdir / "quick-saves"
    args = train_args(run, "training.save_steps=2", "training.save_total_limit=2", max_steps=MAX_STEPS)
    faults = "checkpoint.sealing:delay0.5"
    code, log = run_cli(args, {**env, "CLM_RUNNER_FAULT": faults}, workdir / "quick-saves.log")
    assert code == 0, log[-3000:]
    assert [p.name for p in scan_checkpoints(run).complete] == ["checkpoint-10", f"checkpoint-{MAX_STEPS}"]
    assert [p.name for p in run.iterdir() if is_leftover(p.name)] == []


def test_the_run_ends_once_its_last_seal_is_done_and_loads_the_best_model_from_it(
    workdir: Path, env: dict[str, str]
) -> None:
    """The last checkpoint's seal is slowed down; it is the best one (the loss still falls at step 12), so
    load_best_model_at_end loads it after waiting for it, and the run ends with it sealed."""
    run = workdir / "slow-last-seal"
    args = train_args(
        run,
        "training.save_steps=4",
        "training.save_total_limit=2",
        "training.eval_strategy=steps",
        "training.eval_steps=4",
        "training.load_best_model_at_end=true",
        max_steps=MAX_STEPS,
    )
    faults = "checkpoint.sealing@3:delay2"
    code, log = run_cli(args, {**env, "CLM_RUNNER_FAULT": faults}, workdir / "slow-last-seal.log")
    assert code == 0, log[-3000:]
    assert json.loads((run / "run.json").read_text())["best_model"]["checkpoint"] == f"checkpoint-{MAX_STEPS}"
    # Upstream's warning, and clm-runner's own when the best checkpoint is not (yet) there.
    assert "Could not locate the best model" not in log and "Not loading the best model" not in log, log[
        -3000:
    ]
    assert [p.name for p in scan_checkpoints(run).complete] == ["checkpoint-8", f"checkpoint-{MAX_STEPS}"]
    assert [p.name for p in run.iterdir() if is_leftover(p.name)] == []


# ---------------------------------------------------------------------------------------------------
# Two processes


def torchrun(*clm_args: str) -> list[str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), "--monitor-interval", "1", "-m", "clm_runner", *clm_args,
    ]  # fmt: skip


def two_process_args(run: Path) -> list[str]:
    sets = [
        f"model.tokenizer_name={ASSETS / 'tokenizer'}",
        "model.config_overrides=n_layer=1,n_head=2,n_embd=32,n_positions=64,vocab_size=2048,bos_token_id=0,eos_token_id=0",
        f"data.train_file={ASSETS / 'train.txt'}",
        f"data.validation_file={ASSETS / 'validation.txt'}",
        "data.block_size=32",
        "data.max_train_samples=64",
        "data.max_eval_samples=16",
        f"training.output_dir={run}",
        "training.per_device_train_batch_size=4",
        "training.max_steps=8",
        "training.save_strategy=steps",
        "training.save_steps=2",
        "training.eval_strategy=no",
        "training.logging_steps=1",
    ]
    return ["train", "--recipe", str(SMOKE), "--quiet", *[a for s in sets for a in ("--set", s)]]


def test_two_processes_killed_while_saving_resume_to_the_same_result(
    workdir: Path, env: dict[str, str]
) -> None:
    """Rank 1 is killed after writing its part of checkpoint-4 (torchrun then stops rank 0): no rank sealed
    it, and the same torchrun command resumes from checkpoint-2 to the uninterrupted 2-process result."""
    env = {**env, "HF_HOME": str(workdir / "hf-home")}
    reference, run = workdir / "two-uninterrupted", workdir / "two-killed"

    def launch(target: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            torchrun(*two_process_args(target)), env={**env, **(extra_env or {})}, capture_output=True,
            text=True, timeout=600, cwd=REPO,
        )  # fmt: skip

    done = launch(reference)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = launch(run, {"CLM_RUNNER_FAULT": "checkpoint.optimizer@2:kill:rank1"})
    assert killed.returncode != 0
    assert [p.name for p in scan_checkpoints(run).complete] == ["checkpoint-2"]  # checkpoint-4 never sealed
    resumed = launch(run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / 'checkpoint-2'}" in resumed.stdout + resumed.stderr
    assert_two_process_result(run, reference)


def assert_two_process_result(run: Path, reference: Path) -> None:
    state, want = (json.loads((d / "trainer_state.json").read_text()) for d in (run, reference))
    assert state["global_step"] == want["global_step"] == 8
    got_eval, want_eval = (json.loads((d / "eval_results.json").read_text()) for d in (run, reference))
    assert got_eval["eval_loss"] == want_eval["eval_loss"]
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")
    assert [p.name for p in run.iterdir() if is_leftover(p.name)] == []


def test_two_processes_load_the_best_model_once_rank0_has_sealed_it(
    workdir: Path, env: dict[str, str]
) -> None:
    """Rank 0 seals the last checkpoint, the best one, slowly; load_best_model_at_end reads it on every rank,
    so rank 1 waits for rank 0's seal too (it would otherwise find no checkpoint-8 and keep its weights)."""
    env = {**env, "HF_HOME": str(workdir / "hf-home")}
    run = workdir / "two-best"
    best = ["training.eval_strategy=steps", "training.eval_steps=2", "training.load_best_model_at_end=true"]
    args = two_process_args(run) + [a for s in best for a in ("--set", s)]
    slow = {"CLM_RUNNER_FAULT": "checkpoint.sealing@4:delay2:rank0"}  # the 4th seal: checkpoint-8
    done = subprocess.run(
        torchrun(*args), env={**env, **slow}, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["best_model"]["checkpoint"] == "checkpoint-8"
    printed = done.stdout + done.stderr
    assert "Could not locate the best model" not in printed, done.stderr[-3000:]
    assert "Not loading the best model" not in printed, done.stderr[-3000:]  # rank 1, had it not waited
    assert [p.name for p in run.iterdir() if is_leftover(p.name)] == []
