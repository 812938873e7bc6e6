"""[early_stopping]: stop the run after `patience` evaluations in a row that did not improve the best so far.

The state (best value, evaluations without improvement) is replayed from the run's log history rather than
stored: a run resumed from a checkpoint has that checkpoint's log, so it stops at the same evaluation as a run
that was never interrupted, and a run killed after it decided to stop ends at once when resumed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("clm_runner")


def metric_key(metric_for_best_model: str | None) -> str:
    name = metric_for_best_model or "loss"
    return name if name.startswith("eval_") else f"eval_{name}"


@dataclass
class Patience:
    """The rule: an evaluation improves when it beats the best by more than `threshold`."""

    patience: int
    threshold: float
    greater_is_better: bool
    best: float | None = None
    without_improvement: int = 0

    def update(self, value: float) -> bool:
        """Take one evaluation; True when the run should stop."""
        if self.best is None:
            improved = True
        elif self.greater_is_better:
            improved = value > self.best + self.threshold
        else:
            improved = value < self.best - self.threshold
        if improved:
            self.best, self.without_improvement = value, 0
        else:
            self.without_improvement += 1
        return self.without_improvement >= self.patience

    def replay(self, log_history: Iterable[Mapping[str, Any]], key: str) -> bool:
        stop = False
        for entry in log_history:
            if key in entry:
                stop = self.update(float(entry[key]))
        return stop


class EarlyStopping(TrainerCallback):
    def __init__(self, patience: int, threshold: float) -> None:
        self.patience, self.threshold = patience, threshold
        self.rule: Patience | None = None
        self.stopped_at_step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rule = Patience(self.patience, self.threshold, bool(args.greater_is_better))
        self.rule.replay(state.log_history, metric_key(args.metric_for_best_model))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The final evaluation after training (of the best model, with load_best_model_at_end) is not one of
        # the run's evaluations: it must not count as one more without improvement.
        self.rule = None

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kwargs: Any
    ) -> None:
        key = metric_key(args.metric_for_best_model)
        if self.rule is None or key not in metrics:
            return
        if self.rule.update(float(metrics[key])):
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
            logger.info(
                "Early stopping at step %d: %d evaluations without %s improving on %.6g by more than %g.",
                state.global_step,
                self.rule.without_improvement,
                key,
                self.rule.best,
                self.threshold,
            )


def stopped_early(
    log_history: Iterable[Mapping[str, Any]], args: Any, patience: int, threshold: float
) -> bool:
    """Whether the log already holds the evaluation at which the run stopped (a resume has nothing to train)."""
    rule = Patience(patience, threshold, bool(args.greater_is_better))
    return rule.replay(log_history, metric_key(args.metric_for_best_model))
