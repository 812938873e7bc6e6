"""[early_stopping]'s patience rule, as a unit, against an oracle written here: both directions, a threshold, and a
resumed run that replays its log. Values are multiples of 1/8, so every comparison is exact."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import TrainerControl

from clm_runner.train.early_stopping import EarlyStopping, stopped_early

EVERY = 4  # steps between evaluations


def oracle_stop(values: list[float], patience: int, threshold: float, greater_is_better: bool) -> int | None:
    """The index of the evaluation after which the run stops: the patience-th in a row whose gain over the best
    so far (the last evaluation that improved) is not more than `threshold`. None: it never stops."""
    best = None
    misses = 0
    for index, value in enumerate(values):
        gain = None if best is None else (value - best if greater_is_better else best - value)
        if gain is None or gain > threshold:
            best, misses = value, 0
            continue
        misses += 1
        if misses == patience:
            return index
    return None


def args_for(metric: str, greater_is_better: bool) -> SimpleNamespace:
    return SimpleNamespace(metric_for_best_model=metric, greater_is_better=greater_is_better)


def log_of(values: list[float], key: str) -> list[dict]:
    """trainer_state's log history with one evaluation every EVERY steps (and training losses between)."""
    history: list[dict] = []
    for index, value in enumerate(values):
        step = (index + 1) * EVERY
        history.append({"step": step - 1, "loss": 9.0})
        history.append({"step": step, key: value})
    return history


def run_callback(
    values: list[float], patience: int, threshold: float, metric: str, greater: bool, resumed_after: int = 0
) -> int | None:
    """Evaluations through the callback, the first `resumed_after` of them replayed from a resumed run's log.
    Returns the index of the evaluation it stopped at (None: never)."""
    key = f"eval_{metric}"
    args = args_for(metric, greater)
    callback = EarlyStopping(patience, threshold)
    state = SimpleNamespace(
        log_history=log_of(values[:resumed_after], key), global_step=resumed_after * EVERY
    )
    callback.on_train_begin(args, state, TrainerControl())
    for index in range(resumed_after, len(values)):
        state.global_step = (index + 1) * EVERY
        control = TrainerControl()
        callback.on_evaluate(args, state, control, metrics={key: values[index], "epoch": 1.0})
        if control.should_training_stop:
            assert callback.stopped_at_step == state.global_step
            return index
    assert callback.stopped_at_step is None
    return None


# Hand-checked cases: the oracle must say what a person reading the rule says.
CASES = [
    # loss falls by 0.5, then by 0.25 (not more than the threshold 0.25: a miss), then rises twice.
    ([4.0, 3.5, 3.25, 3.5, 3.75], 2, 0.25, False, 3),
    # the same with threshold 0: 3.25 improves, the run stops one evaluation later.
    ([4.0, 3.5, 3.25, 3.5, 3.75], 2, 0.0, False, 4),
    # accuracy (higher is better) rises by 0.125, then stays: with threshold 0.125 both are misses.
    ([0.25, 0.375, 0.375, 0.5], 2, 0.125, True, 2),
    # misses, then an improvement of more than the threshold resets the count.
    ([0.25, 0.25, 0.75, 0.75, 0.75], 2, 0.125, True, 4),
    # creeping improvements add up: 0.125 at a time against the last improving value, threshold 0.25.
    ([1.0, 1.125, 1.25, 1.375], 3, 0.25, True, None),
    # a perfectly flat metric stops after exactly `patience` evaluations past the first.
    ([2.0, 2.0, 2.0, 2.0], 3, 0.0, False, 3),
    ([2.0, 2.0, 2.0, 2.0], 4, 0.0, False, None),
]


@pytest.mark.parametrize(("values", "patience", "threshold", "greater", "stop"), CASES)
def test_the_oracle_and_the_callback_stop_where_a_reader_of_the_rule_says(
    values: list[float], patience: int, threshold: float, greater: bool, stop: int | None
) -> None:
    assert oracle_stop(values, patience, threshold, greater) == stop
    metric = "accuracy" if greater else "loss"
    for resumed_after in range(len(values) + 1):
        if stop is not None and resumed_after > stop:
            break  # a run resumed past its stop is ended before training (see the replay test)
        assert run_callback(values, patience, threshold, metric, greater, resumed_after) == stop


values_strategy = st.lists(st.integers(0, 32).map(lambda n: n / 8), min_size=1, max_size=12)


@given(
    values=values_strategy,
    patience=st.integers(1, 4),
    threshold=st.sampled_from([0.0, 0.125, 0.25, 0.5]),
    greater=st.booleans(),
    split=st.integers(0, 12),
)
def test_the_callback_and_a_resumed_replay_agree_with_the_oracle(
    values: list[float], patience: int, threshold: float, greater: bool, split: int
) -> None:
    stop = oracle_stop(values, patience, threshold, greater)
    metric = "accuracy" if greater else "perplexity"
    split = min(split, len(values) if stop is None else stop)
    assert run_callback(values, patience, threshold, metric, greater, resumed_after=split) == stop
    # A resumed run's check before training: its log holds the stopping evaluation (its last), or not yet.
    key = f"eval_{metric}"
    for kept in range(len(values) + 1 if stop is None else stop + 2):
        log = log_of(values[:kept], key)
        expected = stop is not None and stop < kept
        assert stopped_early(log, args_for(metric, greater), patience, threshold) is expected


def test_the_final_evaluation_after_training_is_not_counted() -> None:
    args = args_for("loss", False)
    callback = EarlyStopping(1, 0.0)
    state = SimpleNamespace(log_history=[], global_step=4)
    callback.on_train_begin(args, state, TrainerControl())
    callback.on_evaluate(args, state, TrainerControl(), metrics={"eval_loss": 1.0})
    callback.on_train_end(args, state, TrainerControl())
    control = TrainerControl()
    callback.on_evaluate(args, state, control, metrics={"eval_loss": 2.0})
    assert not control.should_training_stop and callback.stopped_at_step is None
