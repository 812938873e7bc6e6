"""Sealed checkpoints: what counts as complete, what a resume picks, what rotation may delete."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from clm_runner.errors import OutputDirError
from clm_runner.rundir.checkpoints import (
    MARKER,
    checkpoint_problem,
    remove_stale_temporaries,
    rotate_checkpoints,
    scan_checkpoints,
    seal_checkpoint,
)
from clm_runner.rundir.policy import latest_checkpoint, list_checkpoints, plan_output_dir

WEIGHTS = b"\x00" * 1000


def sealed(run: Path, step: int) -> Path:
    staging = run / f"tmp-checkpoint-{step}"
    (staging / "sub").mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(WEIGHTS)
    (staging / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (staging / "sub" / "extra.bin").write_bytes(b"abc")
    return seal_checkpoint(staging, run / f"checkpoint-{step}", step=step)


def test_seal_renames_into_place_with_a_marker_listing_every_file(tmp_path: Path) -> None:
    final = sealed(tmp_path, 7)
    assert final == tmp_path / "checkpoint-7"
    assert not (tmp_path / "tmp-checkpoint-7").exists()
    marker = json.loads((final / MARKER).read_text())
    assert marker["step"] == 7
    assert marker["files"] == {
        "model.safetensors": len(WEIGHTS),
        "sub/extra.bin": 3,
        "trainer_state.json": len(json.dumps({"global_step": 7})),
    }
    assert checkpoint_problem(final) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: (c / MARKER).unlink(), "no completion marker"),
        (lambda c: (c / MARKER).write_text("{not json"), "unreadable completion marker"),
        (lambda c: (c / "model.safetensors").unlink(), "missing file model.safetensors"),
        (
            lambda c: (c / "model.safetensors").write_bytes(WEIGHTS[:10]),
            "model.safetensors is 10 bytes, expected 1,000",
        ),
        (lambda c: (c / "sub" / "extra.bin").write_bytes(b"abcd"), "sub/extra.bin is 4 bytes"),
    ],
)
def test_each_kind_of_tear_is_detected_and_named(tmp_path: Path, damage, reason: str) -> None:
    checkpoint = sealed(tmp_path, 3)
    damage(checkpoint)
    assert reason in checkpoint_problem(checkpoint)
    assert list_checkpoints(tmp_path) == []


def test_resume_skips_torn_newer_checkpoints_and_names_them(tmp_path: Path, caplog) -> None:
    for step in (2, 4, 6):
        sealed(tmp_path, step)
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"")  # torn by a kill mid-write
    (tmp_path / "checkpoint-8").mkdir()  # upstream-style dir that never got its marker
    (tmp_path / "tmp-checkpoint-10").mkdir()  # a staging dir a killed process left
    with caplog.at_level(logging.WARNING, logger="clm_runner"):
        plan = plan_output_dir(tmp_path)
    assert plan.resume_from == tmp_path / "checkpoint-4"
    warned = [r.getMessage() for r in caplog.records if "Skipping torn checkpoint" in r.getMessage()]
    assert len(warned) == 2
    assert str(tmp_path / "checkpoint-6") in warned[0] and "model.safetensors is 0 bytes" in warned[0]
    assert str(tmp_path / "checkpoint-8") in warned[1] and "no completion marker" in warned[1]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def test_only_torn_checkpoints_is_refused_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    with pytest.raises(
        OutputDirError, match=r"only torn checkpoints \(checkpoint-5: no completion marker.*--overwrite"
    ):
        plan_output_dir(tmp_path)
    assert plan_output_dir(tmp_path, overwrite=True).resume_from is None


def test_resume_from_a_torn_checkpoint_falls_back_or_fails_clearly(tmp_path: Path, caplog) -> None:
    sealed(tmp_path, 2)
    sealed(tmp_path, 4)
    (tmp_path / "checkpoint-4" / MARKER).unlink()
    with caplog.at_level(logging.WARNING, logger="clm_runner"):
        plan = plan_output_dir(tmp_path / "new", resume_from=str(tmp_path / "checkpoint-4"))
    assert plan.resume_from == tmp_path / "checkpoint-2"
    assert any("checkpoint-4" in r.getMessage() and "Resuming from" in r.getMessage() for r in caplog.records)
    (tmp_path / "checkpoint-2" / MARKER).unlink()
    with pytest.raises(OutputDirError, match="is torn .* no complete checkpoint precedes it"):
        plan_output_dir(tmp_path / "new", resume_from=str(tmp_path / "checkpoint-4"))


def test_sealing_the_same_step_again_replaces_it_whole(tmp_path: Path) -> None:
    sealed(tmp_path, 3)
    staging = tmp_path / "tmp-checkpoint-3"
    staging.mkdir()
    (staging / "trainer_state.json").write_text("{}")
    seal_checkpoint(staging, tmp_path / "checkpoint-3", step=3)
    assert sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir()) == [MARKER, "trainer_state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def test_rotation_keeps_the_newest_complete_and_the_best_and_ignores_torn(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        sealed(tmp_path, step)
    (tmp_path / "checkpoint-5" / MARKER).unlink()  # the newest is torn: checkpoint-4 is the newest complete
    (tmp_path / "checkpoint-9").mkdir()  # torn, never counted, never deleted
    deleted = rotate_checkpoints(tmp_path, 1, best=tmp_path / "checkpoint-2")
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-5",
        "checkpoint-9",
    ]
    assert [p.name for p in scan_checkpoints(tmp_path).complete] == ["checkpoint-2", "checkpoint-4"]


def test_rotation_limit_counts_complete_checkpoints_only(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        sealed(tmp_path, step)
    (tmp_path / "checkpoint-4").mkdir()
    assert rotate_checkpoints(tmp_path, 3) == []
    assert [p.name for p in rotate_checkpoints(tmp_path, 2)] == ["checkpoint-1"]
    assert rotate_checkpoints(tmp_path, None) == [] and rotate_checkpoints(tmp_path, 0) == []


def test_stale_temporaries_are_cleared_but_checkpoints_kept(tmp_path: Path) -> None:
    sealed(tmp_path, 1)
    for name in ("tmp-checkpoint-2", "tmp-deleting-checkpoint-1", "tmp-checkpoint-3"):
        (tmp_path / name).mkdir()
    removed = remove_stale_temporaries(tmp_path, keep=tmp_path / "tmp-checkpoint-3")
    assert sorted(p.name for p in removed) == ["tmp-checkpoint-2", "tmp-deleting-checkpoint-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "tmp-checkpoint-3"]


def test_atomic_json_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    from clm_runner.rundir.policy import write_json_atomic

    target = tmp_path / "all_results.json"
    write_json_atomic(target, {"eval_loss": 1.0})
    plain = tmp_path / "plain.json"
    plain.write_text("{}")  # what open() gives under this process's umask
    assert os.stat(target).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


# ---------------------------------------------------------------------------------------------------
# Durability: what reaches the disk before the rename publishes a checkpoint


def record_durability(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (by the path its descriptor names), the marker's opening and every rename, in order."""
    import builtins
    import os

    from clm_runner.rundir import checkpoints

    calls: list[tuple[str, str]] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, builtins.open

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    def recording_open(file, mode="r", *args, **kwargs):
        if "w" in mode:
            calls.append(("write", str(file)))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(checkpoints, "open", recording_open, raising=False)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_every_file_and_the_marker_reach_the_disk_before_the_rename_and_the_rename_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path.resolve()
    staging = run / "tmp-checkpoint-5"
    (staging / "sub").mkdir(parents=True)
    files = [staging / "model.safetensors", staging / "trainer_state.json", staging / "sub" / "extra.bin"]
    for file in files:
        file.write_bytes(b"x" * 10)
    calls = record_durability(monkeypatch)
    seal_checkpoint(staging, run / "checkpoint-5", step=5, facts={"world_size": 1})

    def at(kind: str, what: Path | str) -> int:
        return calls.index((kind, str(what)))

    marker = staging / MARKER
    rename = at("replace", f"{staging} -> {run / 'checkpoint-5'}")
    for file in files:  # every file's data before the marker that vouches for it
        assert at("fsync", file) < at("write", marker)
    for directory in (staging / "sub", staging):  # their entries too
        assert at("fsync", directory) < rename
    assert at("write", marker) < at("fsync", marker) < rename  # the marker itself before the rename
    assert calls.index(("fsync", str(staging)), at("fsync", marker)) < rename  # and its entry
    assert rename < at("fsync", run)  # the rename itself reaches the disk
    assert [c for c in calls if c[0] == "replace"] == [calls[rename]]  # one rename publishes it


def test_a_marker_that_lists_no_trainer_state_is_torn_and_skipped_on_resume(tmp_path: Path, caplog) -> None:
    sealed(tmp_path, 2)
    newest = sealed(tmp_path, 4)
    marker = json.loads((newest / MARKER).read_text())
    del marker["files"]["trainer_state.json"]  # sealed from a staging dir the state never reached
    (newest / MARKER).write_text(json.dumps(marker))
    assert checkpoint_problem(newest) == "its marker lists no trainer_state.json"
    with caplog.at_level(logging.WARNING, logger="clm_runner"):
        plan = plan_output_dir(tmp_path)
    assert plan.resume_from == tmp_path / "checkpoint-2"
    assert any(
        str(newest) in r.getMessage() and "lists no trainer_state.json" in r.getMessage()
        for r in caplog.records
    )
    assert [p.name for p in scan_checkpoints(tmp_path).complete] == ["checkpoint-2"]
