"""Training to the best model: perplexity at every evaluation, the best checkpoint kept through rotation, a kill
and a resume, and early stopping, on a tiny run built to overfit (8 training blocks, a constant high learning
rate: the validation loss falls, bottoms out and rises again within 40 steps)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import (
    ASSETS,
    completed_run,
    independent_perplexity,
    invoke,
    losses_by_step,
    run_cli,
    same_weights,
    snapshot,
    train_args,
)
from tolerances import FORWARD_RTOL

BLOCK = 32
EVAL_BLOCKS = 16
EVERY = 4
STEPS = 40
OVERFIT = (
    "data.max_train_samples=8",
    f"data.max_eval_samples={EVAL_BLOCKS}",
    "training.learning_rate=1e-2",
    "training.lr_scheduler_type=constant",
    "training.warmup_steps=0",
    "training.eval_strategy=steps",
    f"training.eval_steps={EVERY}",
    f"training.save_steps={EVERY}",
    "training.save_total_limit=1",
    "training.load_best_model_at_end=true",
    "training.eval_on_start=true",
)


def overfit_train(run: Path, *extra: str) -> list[str]:
    return train_args(run, *OVERFIT, *extra, max_steps=STEPS)


def evaluations(run_dir: Path) -> dict[int, dict]:
    """The periodic evaluations in trainer_state.json's log history, by step (the final one is in eval_results)."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in history if "eval_loss" in entry}


def first_best(evals: dict[int, dict]) -> int:
    """The step of the lowest eval loss; the earliest on a tie (the Trainer keeps the first best)."""
    return min(evals, key=lambda step: (evals[step]["eval_loss"], step))


@pytest.fixture(scope="module")
def reference(workdir: Path, env: dict[str, str]) -> Path:
    return completed_run(workdir / "reference", overfit_train(workdir / "reference"), env)


def test_the_run_overfits_so_the_best_is_not_the_last(reference: Path) -> None:
    evals = evaluations(reference)
    assert sorted(evals) == list(
        range(0, STEPS + 1, EVERY)
    )  # eval_on_start: step 0 is the untrained baseline
    assert EVERY < first_best(evals) < STEPS - EVERY, {s: e["eval_loss"] for s, e in evals.items()}


def test_perplexity_at_each_evaluation_is_exact_on_that_checkpoint(reference: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    evals = evaluations(reference)
    for entry in evals.values():
        # The same number, computed once (exp of the exact mean NLL), not a second estimate.
        assert entry["eval_perplexity"] == pytest.approx(math.exp(entry["eval_loss"]), rel=1e-12)
    tokenizer = AutoTokenizer.from_pretrained(reference)
    kept = sorted(int(p.name.split("-")[1]) for p in reference.glob("checkpoint-*"))
    assert kept == [first_best(evals), STEPS]  # save_total_limit = 1, and the best checkpoint beside it
    for step in kept:
        model = AutoModelForCausalLM.from_pretrained(reference / f"checkpoint-{step}")
        expected, tokens = independent_perplexity(
            model, tokenizer, ASSETS / "validation.txt", BLOCK, EVAL_BLOCKS
        )
        assert evals[step]["eval_tokens"] == tokens
        assert evals[step]["eval_perplexity"] == pytest.approx(expected, rel=FORWARD_RTOL)


def test_the_final_model_is_the_best_checkpoint(reference: Path, tmp_path: Path) -> None:
    evals = evaluations(reference)
    best = first_best(evals)
    state = json.loads((reference / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best}"
    record = json.loads((reference / "run.json").read_text())["best_model"]
    assert record == {
        "checkpoint": f"checkpoint-{best}",
        "global_step": best,
        "metric": "loss",
        "value": evals[best]["eval_loss"],
        "final_model_is_best": True,
    }
    assert same_weights(
        reference / "model.safetensors", reference / f"checkpoint-{best}" / "model.safetensors"
    )
    final = json.loads((reference / "eval_results.json").read_text())
    # The same weights over the same blocks in the same batches, in the same process: the same floats.
    assert final["eval_loss"] == evals[best]["eval_loss"]
    assert final["perplexity"] == evals[best]["eval_perplexity"]
    out = tmp_path / "eval.json"
    result = invoke("eval", "--run", reference, "--quiet", "--output", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["perplexity"] == pytest.approx(final["perplexity"], rel=FORWARD_RTOL)


def test_the_best_checkpoint_survives_a_kill_and_a_resume(
    workdir: Path, env: dict[str, str], reference: Path
) -> None:
    best = first_best(evaluations(reference))
    # Killed in the last evaluation (step 40; the first is eval_on_start's): after the best was found and
    # the newest checkpoint rotated past it. An evaluation starts once the checkpoint being sealed in the
    # background (and its rotation) is done, so checkpoint-36 is sealed and checkpoint-32 gone.
    evaluation = STEPS // EVERY + 1
    run = workdir / "killed"
    code, text = run_cli(
        overfit_train(run), {**env, "CLM_RUNNER_FAULT": f"evaluate@{evaluation}:kill"}, workdir / "killed.log"
    )
    assert code == -9, text[-2000:]
    newest = STEPS - EVERY
    kept = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert kept == sorted({best, newest})
    completed_run(run, overfit_train(run), env)
    # The resumed run remembers the best so far: same best, same final (best) model, same final evaluation.
    assert (
        json.loads((run / "run.json").read_text())["best_model"]
        == json.loads((reference / "run.json").read_text())["best_model"]
    )
    assert {s: e["eval_loss"] for s, e in evaluations(run).items()} == {
        s: e["eval_loss"] for s, e in evaluations(reference).items()
    }
    assert losses_by_step(run) == losses_by_step(reference)
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")
    assert (
        json.loads((run / "eval_results.json").read_text())["perplexity"]
        == json.loads((reference / "eval_results.json").read_text())["perplexity"]
    )


def test_a_moved_run_dir_ends_with_its_best_model(
    workdir: Path, env: dict[str, str], reference: Path
) -> None:
    """Killed after its last checkpoint, moved, resumed: trainer_state.json names the best checkpoint at its old
    path. The run used to end with the last model while run.json said final_model_is_best."""
    run = workdir / "before-move"
    code, text = run_cli(
        overfit_train(run), {**env, "CLM_RUNNER_FAULT": "train.end:kill"}, workdir / "move.log"
    )
    assert code == -9, text[-2000:]
    moved = workdir / "moved"
    run.rename(moved)
    completed_run(moved, overfit_train(moved), env)
    assert (
        json.loads((moved / "run.json").read_text())["best_model"]
        == json.loads((reference / "run.json").read_text())["best_model"]
    )
    assert same_weights(moved / "model.safetensors", reference / "model.safetensors")
    assert (
        json.loads((moved / "eval_results.json").read_text())["perplexity"]
        == (json.loads((reference / "eval_results.json").read_text())["perplexity"])
    )


def test_a_relative_output_dir_resumed_from_another_working_dir_ends_with_its_own_best(
    workdir: Path, env: dict[str, str], reference: Path
) -> None:
    """Started as `output_dir = "run"` in one working dir, resumed as "../first/run" from another, where a
    `run/checkpoint-N` of some other model happens to exist: the best checkpoint is this run dir's."""
    best = first_best(evaluations(reference))
    first, second = workdir / "first", workdir / "second"
    first.mkdir()
    code, text = run_cli(
        overfit_train(Path("run")),
        {**env, "CLM_RUNNER_FAULT": "train.end:kill"},
        workdir / "cwd.log",
        cwd=first,
    )
    assert code == -9, text[-2000:]
    decoy = second / "run" / f"checkpoint-{best}"
    shutil.copytree(reference / f"checkpoint-{STEPS}", decoy)  # another model at the recorded relative path
    code, text = run_cli(overfit_train(Path("../first/run")), env, workdir / "cwd-2.log", cwd=second)
    assert code == 0, text[-2000:]
    run = first / "run"
    assert json.loads((run / "run.json").read_text())["best_model"]["final_model_is_best"] is True
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")
    assert not same_weights(run / "model.safetensors", decoy / "model.safetensors")


def test_a_best_checkpoint_that_is_gone_is_not_claimed_as_the_final_model(
    workdir: Path, env: dict[str, str], reference: Path
) -> None:
    best = first_best(evaluations(reference))
    run = workdir / "best-gone"
    code, text = run_cli(
        overfit_train(run), {**env, "CLM_RUNNER_FAULT": "train.end:kill"}, workdir / "gone.log"
    )
    assert code == -9, text[-2000:]
    shutil.rmtree(run / f"checkpoint-{best}")
    code, text = run_cli(overfit_train(run), env, workdir / "gone-2.log")
    assert code == 0, text[-2000:]
    assert "the run ends with its last model" in text
    record = json.loads((run / "run.json").read_text())["best_model"]
    assert record["global_step"] == best and record["final_model_is_best"] is False
    assert same_weights(run / "model.safetensors", run / f"checkpoint-{STEPS}" / "model.safetensors")
    final = json.loads((run / "eval_results.json").read_text())
    assert final["eval_loss"] == evaluations(reference)[STEPS]["eval_loss"]  # the last model's, scored


def expected_stop(evals: dict[int, dict], patience: int, threshold: float = 0.0) -> int | None:
    """The step of the evaluation after which `patience` evaluations in a row failed to beat the best."""
    best, misses = math.inf, 0
    for step in sorted(evals):
        loss = evals[step]["eval_loss"]
        if loss < best - threshold:
            best, misses = loss, 0
        else:
            misses += 1
            if misses == patience:
                return step
    return None


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_stops_at_the_right_evaluation(
    workdir: Path, env: dict[str, str], reference: Path, patience: int
) -> None:
    evals = evaluations(reference)
    stop = expected_stop(evals, patience)
    assert stop is not None and stop < STEPS, "the reference run must plateau for this test to mean anything"
    run = workdir / f"patience-{patience}"
    # load_best_model_at_end unset: [early_stopping] ends with the best model by default.
    args = overfit_train(run, f"early_stopping.patience={patience}", "training.load_best_model_at_end=")
    completed_run(run, args, env)
    seen = {s: e for s, e in evals.items() if s <= stop}
    assert {s: e["eval_loss"] for s, e in evaluations(run).items()} == {
        s: e["eval_loss"] for s, e in seen.items()
    }
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["early_stopping"] == {"stopped_early": True, "at_step": stop, "max_steps": STEPS}
    best = first_best(seen)
    assert manifest["best_model"]["checkpoint"] == f"checkpoint-{best}"
    assert manifest["best_model"]["final_model_is_best"] is True
    assert same_weights(run / "model.safetensors", run / f"checkpoint-{best}" / "model.safetensors")
    assert json.loads((run / "eval_results.json").read_text())["eval_loss"] == seen[best]["eval_loss"]
    assert "Early stopping at step" in (run / "train.log").read_text()
    # The same command again: the run is complete (it stopped early), not resumed for the steps it skipped.
    before = snapshot(run)
    code, text = run_cli(args, env, workdir / f"patience-{patience}-again.log")
    assert code == 0 and "is complete" in text, text[-2000:]
    assert snapshot(run) == before


def test_the_final_evaluation_is_not_counted_as_one_more_without_improvement(
    workdir: Path, env: dict[str, str], reference: Path
) -> None:
    """Patience one more than the evaluations after the best: the run trains to its end. The final evaluation
    (of the best model, so no improvement) is not an evaluation of the run and must not make it 'stop early'."""
    evals = evaluations(reference)
    best = first_best(evals)
    patience = len([step for step in evals if step > best]) + 1
    assert expected_stop(evals, patience) is None
    run = workdir / "patience-long"
    completed_run(run, overfit_train(run, f"early_stopping.patience={patience}"), env)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["early_stopping"] == {"stopped_early": False, "at_step": STEPS, "max_steps": STEPS}
    assert "Early stopping" not in (run / "train.log").read_text()


def test_report_marks_the_best_point(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.axes

    from clm_runner.rundir.report import load_run, plot_runs

    evals = evaluations(reference)
    best = first_best(evals)
    result = invoke("report", reference)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith(reference.name))
    assert row.split()[-1] == str(best)  # the "best step" column
    drawn: list[tuple] = []
    original = matplotlib.axes.Axes.plot

    def recording(self, *args, **kwargs):
        drawn.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    plot_runs([load_run(reference)], tmp_path / "report.png")
    stars = [args for args, kwargs in drawn if kwargs.get("marker") == "*"]
    assert stars == [([best], [evals[best]["eval_perplexity"]])]
