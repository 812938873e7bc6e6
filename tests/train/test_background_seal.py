"""Checkpoints sealed in the background: a ClmTrainer trains on meanwhile, and whatever relies on one waits.

In-process runs of a tiny GPT-2 whose every seal is slowed down (SEAL_DELAY, far longer than its steps,
saves and evaluations), so a step, an evaluation or a callback that did not wait would find the checkpoint
still being sealed: tmp-checkpoint-N, no checkpoint-N. The CLI's kills and resumes around a seal in flight
are in tests/integration/test_faults.py.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import same_weights, tiny_gpt2_config
from transformers import TrainerCallback

from clm_runner.rundir.checkpoints import checkpoint_problem, scan_checkpoints
from clm_runner.rundir.policy import is_leftover
from clm_runner.train import checkpoints

SEAL_DELAY = 0.4
"""Seconds each seal sleeps before it starts: a step or evaluation of this model takes milliseconds."""
STEPS, EVERY = 6, 2


@pytest.fixture
def slow_seals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every seal sleeps SEAL_DELAY first; the steps sealed, in order."""
    real, sealed = checkpoints.seal_checkpoint, []

    def slow(staging: Path, final: Path, **kwargs: Any) -> Path:
        time.sleep(SEAL_DELAY)
        done = real(staging, final, **kwargs)
        sealed.append(kwargs["step"])
        return done

    monkeypatch.setattr(checkpoints, "seal_checkpoint", slow)
    return sealed


def tiny_trainer(run: Path, *callbacks: TrainerCallback, **extra: Any):
    from transformers import GPT2LMHeadModel, TrainingArguments, default_data_collator, set_seed

    from clm_runner.train.trainer import ClmTrainer

    set_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(n_positions=32, vocab_size=97))
    blocks = np.random.default_rng(0).integers(0, 97, size=(16, 32)).astype(np.int64)
    dataset = [{"input_ids": row, "labels": row} for row in blocks]
    values: dict[str, Any] = {
        "output_dir": str(run),
        "per_device_train_batch_size": 4,
        "max_steps": STEPS,
        "learning_rate": 1e-2,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "steps",
        "save_steps": EVERY,
        "save_total_limit": 2,
        "disable_tqdm": True,
        "seed": 0,
        **extra,
    }
    trainer = ClmTrainer(
        model=model,
        args=TrainingArguments(**values),
        train_dataset=dataset,
        eval_dataset=dataset[:8],
        data_collator=default_data_collator,
        callbacks=list(callbacks),
    )
    return trainer


def sealed_dirs(run: Path) -> list[str]:
    return [p.name for p in scan_checkpoints(run).complete]


def leftovers(run: Path) -> list[str]:
    return [p.name for p in run.iterdir() if is_leftover(p.name)]


class Recorder(TrainerCallback):
    """Records, at each event it is given, whether the checkpoint it names is sealed (None: it is)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str | None]] = []

    def record(self, event: str, args: Any, step: int) -> None:
        self.seen.append((event, step, checkpoint_problem(Path(args.output_dir) / f"checkpoint-{step}")))


def test_training_goes_on_while_the_seal_is_in_flight_and_ends_with_every_checkpoint_sealed(
    tmp_path: Path, slow_seals: list[int]
) -> None:
    class StepsDuringSeal(TrainerCallback):
        in_flight_at: list[int] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if (Path(args.output_dir) / f"tmp-checkpoint-{EVERY}").is_dir():
                self.in_flight_at.append(state.global_step)

    watcher = StepsDuringSeal()
    trainer = tiny_trainer(tmp_path / "run", watcher)
    trainer.train()
    # checkpoint-2 was sealed while step 3 trained (sealed inline, its tmp dir would be gone by then).
    assert EVERY in watcher.in_flight_at
    assert slow_seals == [2, 4, 6]
    assert sealed_dirs(tmp_path / "run") == ["checkpoint-4", "checkpoint-6"] and not leftovers(
        tmp_path / "run"
    )


def test_a_reporter_that_uploads_checkpoints_finds_each_one_sealed(
    tmp_path: Path, slow_seals: list[int]
) -> None:
    """wandb, MLflow, Neptune, ClearML and Flyte upload checkpoint-N on_save; Comet and DagsHub upload the
    output dir on_train_end: a callback clm-runner did not write gets the checkpoint sealed."""

    class Uploader(Recorder):
        def on_save(self, args, state, control, **kwargs):
            self.record("save", args, state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            self.record("train_end", args, state.global_step)
            self.seen.append(("leftovers", 0, ", ".join(leftovers(Path(args.output_dir))) or None))

    uploader = Uploader()
    tiny_trainer(tmp_path / "run", uploader).train()
    assert uploader.seen == [
        ("save", 2, None),
        ("save", 4, None),
        ("save", 6, None),
        ("train_end", 6, None),
        ("leftovers", 0, None),
    ]


def test_an_evaluation_starts_once_the_previous_checkpoint_is_sealed(
    tmp_path: Path, slow_seals: list[int]
) -> None:
    class Evaluations(Recorder):
        def on_evaluate(self, args, state, control, **kwargs):
            if state.global_step > EVERY:  # the checkpoint saved before this evaluation
                self.record("evaluate", args, state.global_step - EVERY)

    evaluations = Evaluations()
    tiny_trainer(tmp_path / "run", evaluations, eval_strategy="steps", eval_steps=EVERY).train()
    # The evaluation at step N runs before step N's save; N - 2, which it may pick as the best, is sealed.
    assert evaluations.seen == [("evaluate", 2, None), ("evaluate", 4, None)]


def test_load_best_model_at_end_loads_the_best_checkpoint_once_it_is_sealed(
    tmp_path: Path, slow_seals: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step's evaluation is the best, and its checkpoint is saved after it: the run ends with that
    checkpoint's seal in flight, and loads the best model from it once it is sealed."""
    from transformers import Trainer

    class Chosen(TrainerCallback):
        """A metric whose best is the last evaluation, by construction."""

        def on_evaluate(self, args, state, control, metrics, **kwargs):
            metrics["eval_chosen"] = state.global_step

    loaded: list[str | None] = []
    upstream = Trainer._load_best_model

    def load(self: Any) -> None:
        loaded.append(self.state.best_model_checkpoint)
        upstream(self)

    monkeypatch.setattr(Trainer, "_load_best_model", load)
    run = tmp_path / "run"
    trainer = tiny_trainer(
        run,
        Chosen(),
        eval_strategy="steps",
        eval_steps=EVERY,
        load_best_model_at_end=True,
        metric_for_best_model="chosen",
        greater_is_better=True,
    )
    trainer.train()
    assert trainer.state.best_global_step == STEPS and trainer.final_weights_step == STEPS
    assert loaded == [str(run / f"checkpoint-{STEPS}")]  # not skipped as "not a directory"
    trainer.save_model(str(tmp_path / "final"))
    assert same_weights(
        tmp_path / "final" / "model.safetensors", run / f"checkpoint-{STEPS}" / "model.safetensors"
    )


def test_a_seal_that_failed_stops_the_run_at_the_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """checkpoint-2's seal fails (a full disk) while step 3 trains: the run stops at step 3, with that error,
    not at the next save (step 4) or at its end."""

    def full_disk(staging: Path, final: Path, **kwargs: Any) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(staging))

    monkeypatch.setattr(checkpoints, "seal_checkpoint", full_disk)

    class SealFailsDuringStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == EVERY + 1:
                deadline = time.monotonic() + 10
                while trainer.sealer.in_flight and time.monotonic() < deadline:
                    time.sleep(0.01)

    trainer = tiny_trainer(tmp_path / "run", SealFailsDuringStep3())
    with pytest.raises(OSError) as raised:
        trainer.train()
    assert raised.value.errno == errno.ENOSPC
    assert trainer.state.global_step == EVERY + 1
    assert sealed_dirs(tmp_path / "run") == [] and leftovers(tmp_path / "run") == [f"tmp-checkpoint-{EVERY}"]


def test_a_step_that_fails_lets_the_seal_in_flight_finish_first(
    tmp_path: Path, slow_seals: list[int]
) -> None:
    class FailsAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == EVERY:
                raise RuntimeError("step 3 failed")

    trainer = tiny_trainer(tmp_path / "run", FailsAtStep3())
    with pytest.raises(RuntimeError, match="step 3 failed"):
        trainer.train()
    assert sealed_dirs(tmp_path / "run") == [f"checkpoint-{EVERY}"] and not leftovers(tmp_path / "run")


def test_saves_every_step_each_wait_for_the_seal_before(tmp_path: Path, slow_seals: list[int]) -> None:
    """The next save removes temporary dirs left by a killed attempt: never the one still being sealed."""
    run = tmp_path / "run"
    tiny_trainer(run, save_steps=1, save_total_limit=2).train()
    assert slow_seals == list(range(1, STEPS + 1))
    assert sealed_dirs(run) == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"] and not leftovers(run)


def test_stopped_at_once_while_waiting_for_the_last_seal_the_seal_still_finishes(
    tmp_path: Path, slow_seals: list[int]
) -> None:
    """A second Ctrl-C (StopNow) while train() waits for the last seal: the run stops, but not with that seal
    in flight, so the checkpoint the stop message names as the newest is whole and no thread writes into the
    run dir after its lock is released."""
    from clm_runner.train.interrupts import StopNow

    trainer = tiny_trainer(tmp_path / "run")

    def second_signal() -> None:
        raise StopNow(2)

    trainer.wait_for_checkpoint = second_signal  # what train() calls once the loop is done
    with pytest.raises(StopNow):
        trainer.train()
    assert not trainer.sealer.in_flight
    assert sealed_dirs(tmp_path / "run") == ["checkpoint-4", "checkpoint-6"] and not leftovers(
        tmp_path / "run"
    )
