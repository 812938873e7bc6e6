"""The output-dir policy: refuse, resume or start, and never delete anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clm_runner.checkpoints import seal_checkpoint
from clm_runner.errors import OutputDirError
from clm_runner.outputs import latest_checkpoint, list_checkpoints, plan_output_dir, write_json_atomic


def make_checkpoint(run: Path, step: int) -> Path:
    """A complete checkpoint as clm_runner.checkpoints writes it: staged, sealed with its marker, renamed."""
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
