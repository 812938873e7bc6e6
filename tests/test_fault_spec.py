"""CLM_RUNNER_FAULT: several faults at once, each counting its own hits (what make fault-test relies on)."""

from __future__ import annotations

import errno
import signal

import pytest

from clm_runner import faults


def test_each_fault_of_a_spec_is_parsed_with_its_hit_action_and_rank() -> None:
    spec = "checkpoint.sealing@2:delay0.5,train.step@10:kill:rank1,,evaluate"
    parsed = [faults._parse(part) for part in spec.split(",")]
    assert parsed == [
        ("checkpoint.sealing", 2, "delay0.5", None),
        ("train.step", 10, "kill", 1),
        None,
        ("evaluate", 1, "kill", None),
    ]
    with pytest.raises(ValueError, match="the action must be one of"):
        faults._parse("train.step@3:delayed")


def test_several_faults_count_their_own_hits(monkeypatch: pytest.MonkeyPatch) -> None:
    active = tuple(
        map(faults._parse, ["checkpoint.sealing@2:delay0.5", "train.step@3:sigint", "evaluate:enospc"])
    )
    monkeypatch.setattr(faults, "_ACTIVE", active)
    monkeypatch.setattr(faults, "_hits", [0] * len(active))
    slept, signalled = [], []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    monkeypatch.setattr(faults.os, "kill", lambda pid, signum: signalled.append(signum))
    for _ in range(3):
        faults.point("checkpoint.sealing")
        faults.point("train.step")
    assert slept == [0.5, 0.5]  # every hit from the 2nd on
    assert signalled == [signal.SIGINT]  # the 3rd train.step only, though checkpoint.sealing was hit too
    with pytest.raises(OSError) as raised:
        faults.point("evaluate", "/run/eval")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == "/run/eval"
    faults.point("evaluate")  # the 1st hit only
