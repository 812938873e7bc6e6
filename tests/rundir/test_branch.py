"""Resuming from a named checkpoint: when it is a branch, what moves aside, and which line a rerun continues."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers import snapshot

from clm_runner.errors import OutputDirError
from clm_runner.rundir.branch import leave_line, origin_record
from clm_runner.rundir.checkpoints import seal_checkpoint
from clm_runner.rundir.policy import RunIdentity, plan_output_dir, write_json_atomic

RECIPE = {"training": {"learning_rate": 1e-3}}
FINAL_FILES = ("model.safetensors", "trainer_state.json", "train_results.json", "README.md")


def make_checkpoint(run: Path, step: int) -> Path:
    staging = run / f"tmp-checkpoint-{step}"
    staging.mkdir(parents=True)
    (staging / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return seal_checkpoint(staging, run / f"checkpoint-{step}", step=step)


def a_run(run: Path, steps: tuple[int, ...], *, finished_at: int | None, **record: object) -> Path:
    """A run dir as `train` leaves it: checkpoints, run.json, recipe.toml, train.log, and the final files."""
    for step in steps:
        make_checkpoint(run, step)
    status = "completed" if finished_at is not None else "interrupted"
    write_json_atomic(run / "run.json", {"status": status, "recipe": RECIPE, **record})
    (run / "recipe.toml").write_text("[training]\n")
    (run / "train.log").write_text("...\n")
    if finished_at is not None:
        for name in FINAL_FILES:
            (run / name).write_text("{}")
        write_json_atomic(run / "trainer_state.json", {"global_step": finished_at, "epoch": 2.0})
    return run


def identity(**training: object) -> RunIdentity:
    return RunIdentity(
        resolved={"training": {**RECIPE["training"], **training}}, max_steps=16, num_train_epochs=3
    )


def test_an_earlier_checkpoint_of_a_finished_run_is_a_branch_that_sets_the_rest_of_the_line_aside(
    tmp_path: Path,
) -> None:
    run = a_run(tmp_path / "run", (4, 8, 12, 16), finished_at=16)
    (run / "checkpoint-20").mkdir()  # torn: the old line's all the same
    (run / "tmp-checkpoint-24").mkdir()  # a leftover: removed at the start, never moved
    before = snapshot(run)
    plan = plan_output_dir(run, resume_from=str(run / "checkpoint-8"), identity=identity(learning_rate=1e-4))
    assert snapshot(run) == before  # deciding changes nothing
    assert plan.resume_from == run / "checkpoint-8" and plan.action == "resume"
    assert plan.set_aside == ("checkpoint-12", "checkpoint-16", "checkpoint-20", *sorted(FINAL_FILES))
    assert plan.branched_from == {
        "checkpoint": str(run / "checkpoint-8"),
        "step": 8,
        "in_run_dir": True,
        "previous_line": None,
    }
    assert plan.recipe_changes == ("training.learning_rate: 0.001 -> 0.0001",)
    assert "A branch" in plan.note and "checkpoint-12" in plan.note


def test_a_finished_run_whose_later_checkpoints_are_gone_is_still_left_by_a_branch(tmp_path: Path) -> None:
    """Its final model and results are of step 16: a line resumed at 8 must not end beside them."""
    run = a_run(tmp_path / "run", (4, 8), finished_at=16)
    plan = plan_output_dir(run, resume_from=str(run / "checkpoint-8"), identity=identity())
    assert plan.set_aside == tuple(sorted(FINAL_FILES))


@pytest.mark.parametrize(
    ("steps", "finished_at", "point"),
    [((4, 8), None, 8), ((4, 8), 8, 8)],
    ids=["the newest of an interrupted run", "the last of a finished run"],
)
def test_the_newest_checkpoint_of_the_line_is_no_branch(
    tmp_path: Path, steps: tuple[int, ...], finished_at: int | None, point: int
) -> None:
    run = a_run(tmp_path / "run", steps, finished_at=finished_at)
    plan = plan_output_dir(run, resume_from=str(run / f"checkpoint-{point}"), identity=identity())
    assert plan.resume_from == run / f"checkpoint-{point}" and plan.set_aside == ()


def test_leaving_a_line_moves_exactly_the_set_aside_entries_and_copies_the_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = a_run(tmp_path / "run", (4, 8, 12), finished_at=12)
    plan = plan_output_dir(run, resume_from=str(run / "checkpoint-4"), identity=identity())
    before = snapshot(run)
    with caplog.at_level(logging.WARNING, logger="clm_runner"):
        target = leave_line(run, plan.set_aside, plan.resume_from, copies=("run.json", "recipe.toml"))
    assert target.parent == run / "previous-runs"
    moved = snapshot(target)
    for name, content in before.items():
        top = name.split("/")[0]
        if top in plan.set_aside:
            assert moved[name] == content and not (run / name).exists()
        else:
            assert (run / name).exists()
    assert moved["run.json"] == before["run.json"] and moved["recipe.toml"] == before["recipe.toml"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"Branching from {run / 'checkpoint-4'}: moved the line it leaves (checkpoint-8, ")
    assert str(target) in line and "nothing deleted" in line
    # The plain rerun now resumes the branch point: the newest of this line, whatever the old line's steps;
    # even when the start was cut short before run.json was rewritten (it still says completed).
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert plan_output_dir(run, identity=identity()).resume_from == run / "checkpoint-4"


def test_a_checkpoint_of_another_run_into_a_dir_holding_another_run_is_refused_or_moves_it_whole(
    tmp_path: Path,
) -> None:
    source = a_run(tmp_path / "source", (4, 8), finished_at=8)
    other = a_run(tmp_path / "other", (2,), finished_at=None)
    before = snapshot(other)
    with pytest.raises(OutputDirError, match=r"holds another run: resuming .*checkpoint-4 into it would mix"):
        plan_output_dir(other, resume_from=str(source / "checkpoint-4"), identity=identity())
    assert snapshot(other) == before
    plan = plan_output_dir(
        other, resume_from=str(source / "checkpoint-4"), overwrite=True, identity=identity()
    )
    assert plan.archive and plan.resume_from == source / "checkpoint-4"
    assert plan.branched_from["in_run_dir"] is False

    files = tmp_path / "files"
    files.mkdir()
    (files / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"files that are not a run \(notes.txt\).*--overwrite to train"):
        plan_output_dir(files, resume_from=str(source / "checkpoint-4"))
    plan = plan_output_dir(files, resume_from=str(source / "checkpoint-4"), overwrite=True)
    assert not plan.archive and plan.resume_from == source / "checkpoint-4"


def test_a_line_begun_from_another_runs_checkpoint_and_stopped_early_starts_from_it_again(
    tmp_path: Path,
) -> None:
    source = a_run(tmp_path / "source", (4, 8), finished_at=8)
    run = tmp_path / "run"
    assert plan_output_dir(run, resume_from=str(source / "checkpoint-4")).set_aside == ()
    run.mkdir()  # what the attempt wrote before it was killed: its run.json, log and recipe
    origin = origin_record(source / "checkpoint-4", run)
    write_json_atomic(run / "run.json", {"status": "running", "recipe": RECIPE, "branched_from": origin})
    (run / "train.log").write_text("...")
    plan = plan_output_dir(run, identity=identity())
    assert plan.resume_from == source / "checkpoint-4" and plan.action == "resume"
    assert "begun from" in plan.note
    # The same command with --resume-from again: the same line, nothing to set aside.
    plan = plan_output_dir(run, resume_from=str(source / "checkpoint-4"), identity=identity())
    assert plan.resume_from == source / "checkpoint-4" and plan.set_aside == ()
    # The checkpoint it began from is gone: refused, naming it.
    import shutil

    shutil.rmtree(source / "checkpoint-4")
    with pytest.raises(OutputDirError, match=r"begun from .*checkpoint-4, which is gone"):
        plan_output_dir(run, identity=identity())


def test_the_recipes_resume_from_checkpoint_continues_the_line_that_began_there(tmp_path: Path) -> None:
    """training.resume_from_checkpoint is read on every rerun: it must not go back to the branch point."""
    run = a_run(tmp_path / "run", (4, 8, 12), finished_at=12)
    point = str(run / "checkpoint-4")
    first = plan_output_dir(run, recipe_resume_from=point, identity=identity())
    assert first.resume_from == run / "checkpoint-4" and "checkpoint-8" in first.set_aside
    # The branch started (its line set aside, run.json naming where it began), then was stopped at step 6.
    leave_line(run, first.set_aside, first.resume_from, copies=())
    write_json_atomic(
        run / "run.json", {"status": "interrupted", "recipe": RECIPE, "branched_from": first.branched_from}
    )
    make_checkpoint(run, 6)
    again = plan_output_dir(run, recipe_resume_from=point, identity=identity())
    assert again.resume_from == run / "checkpoint-6" and again.set_aside == ()
    # --resume-from on the command line is an explicit branch, every time.
    explicit = plan_output_dir(run, resume_from=point, identity=identity())
    assert explicit.resume_from == run / "checkpoint-4" and explicit.set_aside == ("checkpoint-6",)


# ---------------------------------------------------------------------------------------------------
# A rerun into a finished run: complete, or refused when its recipe changes what would be trained


def rerun(run: Path, *, max_steps: int = 16, overwrite: bool = False, **training: object):
    resolved = {"training": {**RECIPE["training"], "max_steps": max_steps, **training}}
    return plan_output_dir(
        run,
        overwrite=overwrite,
        identity=RunIdentity(resolved=resolved, max_steps=max_steps, num_train_epochs=3),
    )


def finished_run(run: Path) -> Path:
    a_run(run, (8, 16), finished_at=16)
    record = json.loads((run / "run.json").read_text())
    record["recipe"] = {"training": {**RECIPE["training"], "max_steps": 16, "logging_steps": 1}}
    write_json_atomic(run / "run.json", record)
    return run


@pytest.mark.parametrize(
    "change",
    [{}, {"logging_steps": 5}, {"report_to": ["tensorboard"]}, {"per_device_eval_batch_size": 64}],
    ids=["same recipe", "logging_steps", "report_to", "eval batch"],
)
def test_a_finished_run_rerun_with_what_it_trained_is_complete(tmp_path: Path, change: dict) -> None:
    run = finished_run(tmp_path / "run")
    before = snapshot(run)
    for overwrite in (False, True):
        plan = rerun(run, overwrite=overwrite, **{"logging_steps": 1, **change})
        assert plan.action == "complete" and plan.resume_from is None
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"learning_rate": 3e-3}, "training.learning_rate: 0.001 -> 0.003"),
        ({"max_steps": 12}, "training.max_steps: 16 -> 12"),
    ],
    ids=["learning_rate", "a shorter run"],
)
def test_a_finished_run_rerun_with_another_recipe_is_refused_naming_the_keys_and_the_ways_out(
    tmp_path: Path, change: dict, named: str
) -> None:
    run = finished_run(tmp_path / "run")
    before = snapshot(run)
    for overwrite in (False, True):  # --overwrite without --no-resume does not start over
        with pytest.raises(OutputDirError) as refused:
            rerun(run, overwrite=overwrite, logging_steps=1, **change)
        message = str(refused.value)
        assert "\n" not in message and f"changes what it would train: {named}." in message
        assert "another training.output_dir" in message and "--no-resume --overwrite" in message
    assert snapshot(run) == before


def test_a_longer_recipe_continues_the_finished_run(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run")
    plan = rerun(run, max_steps=24, logging_steps=1)
    assert plan.action == "resume" and plan.resume_from == run / "checkpoint-16"


def test_which_recipe_changes_change_what_is_trained() -> None:
    from clm_runner.rundir.changes import changes_what_is_trained, compare_length, recipe_changes

    old = {
        "model": {"cache_dir": None, "model_revision": "main"},
        "data": {"preprocessing_num_workers": None, "block_size": 32},
        "eval": {"stride": None},
        "training": {"max_steps": 16, "save_steps": 4, "seed": 42, "resume_from_checkpoint": None},
    }
    new = {
        "model": {"cache_dir": "/cache", "model_revision": "v2"},
        "data": {"preprocessing_num_workers": 8, "block_size": 32},
        "eval": {"stride": 16},
        "training": {
            "max_steps": 24,
            "save_steps": 8,
            "seed": 42,
            "resume_from_checkpoint": "x/checkpoint-4",
        },
    }
    changes = recipe_changes(old, new)
    assert len(changes) == 7
    counted = ["model.model_revision: 'main' -> 'v2'", "training.save_steps: 4 -> 8"]
    assert changes_what_is_trained(changes) == counted
    assert changes_what_is_trained(changes, shorter=True) == [
        counted[0],
        "training.max_steps: 16 -> 24",
        counted[1],
    ]
    assert [compare_length(s, 3.0, (16, 2.0)) for s in (24, 16, 12)] == [1, 0, -1]
    assert [compare_length(-1, e, (16, 2.0)) for e in (3.0, 2.0, 1.5)] == [1, 0, -1]
    assert compare_length(24, 3.0, None) == 0


def test_a_path_spelled_another_way_is_the_same_path_and_another_file_is_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data and model paths are compared as the files they name: relative to where each run was started."""
    first, second = tmp_path / "first", tmp_path / "second"
    for where in (first, second):
        (where / "data").mkdir(parents=True)
        (where / "data" / "train.txt").write_text("text\n")
        (where / "tok").mkdir()
    spelled = {"train_file": "data/train.txt", "validation_file": ["./data/../data/train.txt"]}
    old = {
        "model": {"tokenizer_name": "tok", "model_name_or_path": "gpt2"},
        "data": {**spelled, "mix": [{"train_file": "data/train.txt", "weight": 1}]},
        "training": {**RECIPE["training"], "max_steps": 16},
    }
    run = a_run(tmp_path / "run", (8, 16), finished_at=16)
    write_json_atomic(run / "run.json", {"status": "completed", "recipe": old, "cwd": str(first)})

    def rerun_from(cwd: Path, **data: object) -> object:
        monkeypatch.chdir(cwd)
        resolved = json.loads(json.dumps(old))
        resolved["data"].update(data)
        resolved["model"]["tokenizer_name"] = str(first / "tok") if cwd == first else "../first/tok"
        return plan_output_dir(run, identity=RunIdentity(resolved=resolved, max_steps=16, num_train_epochs=3))

    absolute = str(first / "data" / "train.txt")
    same = {
        "train_file": absolute,
        "validation_file": [absolute],
        "mix": [{"train_file": absolute, "weight": 1}],
    }
    assert rerun_from(first, **same).action == "complete"  # absolute, where the run was relative
    from_second = "../first/data/train.txt"
    elsewhere = {
        "train_file": from_second,
        "validation_file": [from_second],
        "mix": [{"train_file": from_second, "weight": 1}],
    }
    assert rerun_from(second, **elsewhere).action == "complete"
    # The hub id "gpt2" is no path anywhere: the same string from another dir is the same model.
    assert rerun_from(second, **same).action == "complete"
    with pytest.raises(
        OutputDirError, match=r"data\.train_file: '.*first/data/train.txt' -> '.*second/data/"
    ):
        rerun_from(second, train_file="data/train.txt")  # the same spelling names another file there
