"""The output-dir policy: refuse, resume or start, and never delete anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clm_runner.errors import OutputDirError
from clm_runner.rundir.checkpoints import seal_checkpoint
from clm_runner.rundir.policy import (
    RunIdentity,
    latest_checkpoint,
    list_checkpoints,
    plan_output_dir,
    remove_leftovers,
    write_json_atomic,
)


def make_checkpoint(run: Path, step: int) -> Path:
    """A complete checkpoint as clm_runner.rundir.checkpoints writes it: staged, sealed with its marker, renamed."""
    staging = run / f"tmp-checkpoint-{step}"
    staging.mkdir(parents=True)
    (staging / "trainer_state.json").write_text("{}")
    return seal_checkpoint(staging, run / f"checkpoint-{step}", step=step)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_new_or_empty_dir_starts_fresh(tmp_path: Path) -> None:
    assert plan_output_dir(tmp_path / "new").resume_from is None
    (tmp_path / "empty").mkdir()
    assert plan_output_dir(tmp_path / "empty").resume_from is None


def test_non_empty_without_checkpoint_is_refused_and_untouched(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    before = snapshot(tmp_path)
    with pytest.raises(OutputDirError, match="not empty.*--overwrite"):
        plan_output_dir(tmp_path)
    assert snapshot(tmp_path) == before
    assert plan_output_dir(tmp_path, overwrite=True).resume_from is None
    assert snapshot(tmp_path) == before


def test_resumes_from_newest_by_step_not_by_name(tmp_path: Path) -> None:
    for step in (9, 10, 100):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-200").mkdir()  # no completion marker: torn, not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    plan = plan_output_dir(tmp_path)
    assert plan.resume_from == tmp_path / "checkpoint-100"
    assert "resuming from" in plan.note
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-100"


def test_no_resume_with_checkpoints_needs_overwrite(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 5)
    with pytest.raises(OutputDirError, match="--no-resume"):
        plan_output_dir(tmp_path, resume=False)
    assert plan_output_dir(tmp_path, resume=False, overwrite=True).resume_from is None


def test_resume_from_must_be_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(OutputDirError, match="not a checkpoint"):
        plan_output_dir(tmp_path / "run", resume_from=str(tmp_path / "missing"))
    ckpt = make_checkpoint(tmp_path / "other", 3)
    assert plan_output_dir(tmp_path / "run", resume_from=str(ckpt)).resume_from == ckpt


def test_output_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        plan_output_dir(tmp_path / "f")


def test_write_json_atomic_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.json"
    write_json_atomic(target, {"b": 1, "a": 2.5})
    assert json.loads(target.read_text()) == {"a": 2.5, "b": 1}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]


def identity(**training: object) -> RunIdentity:
    return RunIdentity(
        resolved={"training": {"learning_rate": 1e-3, **training}}, max_steps=12, num_train_epochs=3
    )


def early_run(run: Path, **training: object) -> None:
    """What an attempt killed before its first checkpoint leaves: run.json, its log, staging leftovers."""
    run.mkdir(parents=True)
    write_json_atomic(run / "run.json", {"status": "running", "recipe": identity(**training).resolved})
    (run / "train.log").write_text("...")
    (run / "recipe.toml").write_text("")
    (run / "tmp-checkpoint-4").mkdir()
    (run / ".run.json.abc123.tmp").write_text("{")


def test_the_start_of_this_run_is_started_over_in_place(tmp_path: Path) -> None:
    run = tmp_path / "run"
    early_run(run)
    plan = plan_output_dir(run, identity=identity())
    assert plan.action == "restart" and plan.resume_from is None and "starting it over in place" in plan.note


def test_the_start_of_another_run_is_refused_naming_the_keys_that_differ(tmp_path: Path) -> None:
    run = tmp_path / "run"
    early_run(run)
    before = snapshot(run)
    with pytest.raises(OutputDirError, match=r"differs in: training.learning_rate: 0.001 -> 0.003"):
        plan_output_dir(run, identity=identity(learning_rate=3e-3))
    assert snapshot(run) == before


def test_files_clm_runner_did_not_write_are_still_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    early_run(run)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty"):
        plan_output_dir(run, identity=identity())


def test_only_leftovers_of_a_killed_start_count_as_empty(tmp_path: Path) -> None:
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that took the lock and was killed before linking its record
    run = tmp_path / "run"
    run.mkdir()
    (run / f"..clm-runner.lock.{gone.pid}").write_text("{}")
    (run / ".run.json.x1y2.tmp").write_text("{")
    assert plan_output_dir(run, identity=identity()).action == "new"
    assert {p.name for p in remove_leftovers(run)} == {f"..clm-runner.lock.{gone.pid}", ".run.json.x1y2.tmp"}
    assert list(run.iterdir()) == []
