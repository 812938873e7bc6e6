"""What a run shows: one live progress bar per phase on a terminal, plain log lines elsewhere, and train.log.

Every training and evaluation log entry becomes one plain line on the `clm_runner.progress` logger: written
to train.log always, and shown on stderr instead of a live bar when --quiet is given or stderr is not a
terminal (a Slurm or CI log would otherwise fill with carriage-return frames).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

from transformers import TrainerCallback

progress_logger = logging.getLogger("clm_runner.progress")


class TrainProgressCallback(TrainerCallback):
    """The training phase's live bar (loss, learning rate, tokens/s, rate, ETA) or, quiet, plain lines.

    Every training and evaluation log entry also becomes one plain line on the `clm_runner.progress`
    logger: shown on stderr when quiet, written to train.log always.
    """

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not self.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="Training",
                unit=" steps",
                dynamic_ncols=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = format_log_line(logs, state)
        if line is None:
            return
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix_str(postfix_of(logs), refresh=False)
        progress_logger.info(line, extra={"console": self.quiet or self.bar is None})

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @contextlib.contextmanager
    def evaluation_progress(self, total: int | None) -> Iterator[Callable[[int], None] | None]:
        """A bar for the exact evaluation, fed with the number of blocks done; None when quiet."""
        if self.quiet:
            yield None
            return
        from tqdm.auto import tqdm

        with tqdm(total=total, desc="Evaluating", unit=" blocks", leave=False, dynamic_ncols=True) as bar:

            def advance(done: int) -> None:
                bar.update(done - bar.n)

            yield advance


def postfix_of(logs: dict[str, Any]) -> str:
    parts = [f"loss={logs['loss']:.4f}"]
    if "learning_rate" in logs:
        parts.append(f"lr={logs['learning_rate']:.2e}")
    if "tokens_per_second" in logs:
        parts.append(f"{logs['tokens_per_second']:,.0f} tok/s")
    if "mfu" in logs:
        parts.append(f"MFU {logs['mfu']:.1%}")
    return " ".join(parts)


def format_log_line(logs: dict[str, Any], state: Any) -> str | None:
    """One readable line for a log entry: a training step, an evaluation, or the end-of-training summary."""
    epoch = logs.get("epoch", state.epoch)
    where = f"step {state.global_step}/{state.max_steps}" + (
        f" epoch {epoch:.2f}" if epoch is not None else ""
    )
    if "loss" in logs:
        parts = [where, f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.3e}")
        if logs.get("grad_norm") is not None and math.isfinite(float(logs["grad_norm"])):
            parts.append(f"grad_norm {float(logs['grad_norm']):.3f}")
        if "tokens_per_second" in logs:
            parts.append(f"tokens/s {logs['tokens_per_second']:,.0f}")
        if "mfu" in logs:
            parts.append(f"MFU {logs['mfu']:.1%}")
        return " | ".join(parts)
    if "eval_loss" in logs:
        parts = [where, "eval", f"loss {logs['eval_loss']:.4f}"]
        perplexity = logs.get("eval_perplexity", logs.get("perplexity"))
        if perplexity is not None:
            parts.append(f"perplexity {perplexity:.3f}")
            # [[data.mix]] sources validated on their own: eval_NAME_perplexity, in the order they were logged.
            per_source = [
                f"{key[len('eval_') : -len('_perplexity')]} {value:.3f}"
                for key, value in logs.items()
                if key.startswith("eval_") and key.endswith("_perplexity") and key != "eval_perplexity"
            ]
            if per_source:
                parts[-1] += f" ({', '.join(per_source)})"
        if "eval_accuracy" in logs:
            parts.append(f"accuracy {logs['eval_accuracy']:.4f}")
        return " | ".join(parts)
    if "train_runtime" in logs:
        parts = [where, "training done", f"runtime {logs['train_runtime']:.1f}s"]
        if "train_loss" in logs:
            parts.append(f"train_loss {logs['train_loss']:.4f}")
        return " | ".join(parts)
    return None


def throughput_line(metrics: dict[str, Any]) -> str:
    """The run's measured speed in one line, for the console and train.log."""
    line = f"Trained {metrics['train_tokens']:,} tokens at {metrics['train_tokens_per_second']:,.0f} tokens/s"
    if "train_mfu" in metrics:
        line += f", MFU {metrics['train_mfu']:.1%}"
    if "train_peak_gpu_memory_gb" in metrics:
        line += f", peak GPU memory {metrics['train_peak_gpu_memory_gb']:.2f} GiB"
    return line


@contextlib.contextmanager
def evaluation_progress(trainer: Any, dataset: Any) -> Iterator[Callable[[int], None] | None]:
    """The progress callable for `perplexity.evaluate_blocks` on this rank, or None (quiet, other ranks)."""
    display = next(
        (c for c in trainer.callback_handler.callbacks if isinstance(c, TrainProgressCallback)), None
    )
    if display is None or not trainer.is_world_process_zero():
        yield None
        return
    try:
        rows = len(dataset)
    except TypeError:
        total = None
    else:
        rank, world = trainer.args.process_index, trainer.args.world_size
        total = len(range(rank, rows, world))
    with display.evaluation_progress(total) as advance:
        yield advance
