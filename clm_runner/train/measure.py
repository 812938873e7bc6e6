"""What a run measures: throughput (tokens/s, MFU, peak GPU memory) and the whole run's totals across attempts.

Throughput is measured, not estimated: the seconds are wall-clock stretches of training steps
(`time.perf_counter`), with evaluation, checkpoint saving and logging left out; the tokens are the ones
the micro-batches really held (`ClmTrainer.tokens_trained`). On CUDA the clock is read after a
`torch.cuda.synchronize()` at each logging, evaluation or saving step, so the queued GPU work is counted
where it ran; the Trainer synchronizes there anyway to read the loss, so this adds no stall.

MFU (model FLOPs utilization) = flops_per_token x tokens/s / (peak FLOP/s per GPU x GPUs), where
flops_per_token = 6N + 12*L*d*T from `clm_runner.models.flops.flops_per_token` (N: parameters in matmuls,
L layers, d attention width, T block size; recomputation not counted) and the peak comes from
`clm_runner.train.device.PEAK_FLOPS` for the precision the run's matmuls use. Unknown device: no MFU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState, PrinterCallback
from transformers.trainer_callback import ProgressCallback as HfProgressCallback

from clm_runner.train.display import TrainProgressCallback

logger = logging.getLogger("clm_runner")

GIB = 2**30


class ThroughputCallback(TrainerCallback):
    """Counts training tokens and the seconds spent in training steps; adds tokens/s and MFU to logs."""

    def __init__(
        self,
        *,
        tokens_trained: Callable[[], int],
        flops_per_token: int | None = None,
        peak_flops_total: float | None = None,
        cuda: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.tokens_trained = tokens_trained
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total  # peak of one GPU x number of GPUs
        self.cuda = cuda
        self.clock = clock
        self.seconds = 0.0
        self.tokens = 0
        self._window_seconds = 0.0
        self._window_tokens = 0
        self._tokens_at_start = 0
        self._tokens_at_close = 0
        self._opened_at: float | None = None
        self._training = False

    # A stretch of training opens when the loop (re)starts stepping and closes where the Trainer is about
    # to log, evaluate or save, or the epoch or training ends.
    def _open(self) -> None:
        if self._training:
            self._opened_at = self.clock()

    def _close(self) -> None:
        if self._opened_at is None:
            return
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        elapsed = self.clock() - self._opened_at
        self._opened_at = None
        trained = self.tokens_trained() - self._tokens_at_start
        new_tokens = trained - self.tokens
        self.seconds += elapsed
        self.tokens = trained
        self._window_seconds += elapsed
        self._window_tokens += new_tokens

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens_at_start = self.tokens_trained()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._training = True
        self._open()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._opened_at is None:
            self._open()

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback ran first and said what follows this step.
        if (
            control.should_log
            or control.should_evaluate
            or control.should_save
            or control.should_training_stop
        ):
            self._close()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._close()

    def on_train_end(self, args, state, control, **kwargs):
        self._close()
        self._training = False

    # Log, evaluation and save end with these events: training resumes right after them.
    def on_log(self, args, state, control, **kwargs):
        self._open()

    def on_evaluate(self, args, state, control, **kwargs):
        self._open()

    def on_save(self, args, state, control, **kwargs):
        self._open()

    def annotate_log(self, state: Any, logs: dict[str, Any]) -> None:
        """Add this logging interval's tokens/s (and MFU) to a training log entry, before anyone sees it."""
        if "loss" not in logs:
            return
        self._close()
        if self._window_seconds > 0 and self._window_tokens > 0:
            rate = self._window_tokens / self._window_seconds
            logs["tokens_per_second"] = round(rate, 1)
            mfu = self.mfu(rate)
            if mfu is not None:
                logs["mfu"] = round(mfu, 4)
        self._window_seconds = 0.0
        self._window_tokens = 0

    def mfu(self, tokens_per_second: float) -> float | None:
        if not self.flops_per_token or not self.peak_flops_total:
            return None
        return self.flops_per_token * tokens_per_second / self.peak_flops_total

    def metrics(self) -> dict[str, Any]:
        """train_tokens, train_tokens_per_second, train_mfu (peak known), train_peak_gpu_memory_gb (CUDA)."""
        self._close()
        metrics: dict[str, Any] = {"train_tokens": int(self.tokens)}
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        metrics["train_tokens_per_second"] = round(rate, 1)
        mfu = self.mfu(rate)
        if mfu is not None:
            metrics["train_mfu"] = round(mfu, 4)
        if self.cuda:
            import torch

            # GiB (2**30 bytes), as torch.cuda.memory_summary counts.
            metrics["train_peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        return metrics


class RunTotals(TrainerCallback, ExportableState):
    """The whole run's totals across attempts, kept in every checkpoint's trainer_state.json.

    A resumed attempt starts from the totals of the checkpoint it resumes from (work an interrupted attempt
    did after its last checkpoint is redone, so it is counted once): seconds of training, tokens trained and
    measured training seconds (tokens/s), the summed per-step loss (the run's mean train loss), attempts.
    The tokens are the trainer's count of every micro-batch, so a checkpoint holds exactly its steps' tokens,
    whichever step it is written at (one a signal stops on, between logging steps, included).
    """

    KEYS = ("train_seconds", "step_seconds", "tokens", "loss_sum", "attempts")

    def __init__(self, throughput: ThroughputCallback, block_size: int) -> None:
        self.throughput = throughput
        self.block_size = block_size
        self.tokens_trained = throughput.tokens_trained  # the trainer's counter, every micro-batch
        self._tokens_at_start = 0
        self.base: dict[str, float] = dict.fromkeys(self.KEYS, 0.0)
        self.started: float | None = None
        self.loss_this_attempt = 0.0
        """Summed per-step loss of this attempt so far: ClmTrainer sets it before each checkpoint."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()
        self._tokens_at_start = self.tokens_trained()
        if state.global_step == 0:
            return  # a new run (the Trainer fills stateful_callbacks with our own fresh state)
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, dict) and isinstance(stored.get("attributes"), dict):
            self.base.update({k: float(v) for k, v in stored["attributes"].items() if k in self.KEYS})
        else:
            self.base.update(_estimated_totals(args, state, self.block_size))

    def totals(self) -> dict[str, float]:
        elapsed = time.time() - self.started if self.started is not None else 0.0
        # A checkpoint written where no stretch of steps closed (a signal's) still counts this one's seconds.
        self.throughput._close()
        return {
            "train_seconds": self.base["train_seconds"] + elapsed,
            "step_seconds": self.base["step_seconds"] + self.throughput.seconds,
            "tokens": self.base["tokens"] + (self.tokens_trained() - self._tokens_at_start),
            "loss_sum": self.base["loss_sum"] + self.loss_this_attempt,
            "attempts": self.base["attempts"] + 1,
        }

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": self.totals()}

    def whole_run_metrics(
        self, metrics: dict[str, Any], trainer: Any, throughput: ThroughputCallback
    ) -> dict:
        """train_results' metrics for the whole run, from this attempt's `metrics` and the stored totals."""
        self.loss_this_attempt = float(getattr(trainer, "_total_loss_scalar", 0.0))
        speed = throughput.metrics()  # closes the last stretch of this attempt
        totals = self.totals()
        steps = int(trainer.state.global_step)
        runtime = self.base["train_seconds"] + float(metrics.get("train_runtime", 0.0))
        out = dict(metrics)
        out.update(speed)
        out["train_runtime"] = round(runtime, 4)
        out["train_runtime_this_attempt"] = metrics.get("train_runtime")
        out["train_attempts"] = int(totals["attempts"])
        out["train_tokens"] = int(totals["tokens"])
        if totals["step_seconds"] > 0:
            rate = totals["tokens"] / totals["step_seconds"]
            out["train_tokens_per_second"] = round(rate, 1)
            mfu = throughput.mfu(rate)
            if mfu is not None:
                out["train_mfu"] = round(mfu, 4)
        if steps > 0:
            out["train_loss"] = totals["loss_sum"] / steps
        if runtime > 0:
            out["train_steps_per_second"] = round(steps / runtime, 3)
            blocks = (
                steps * trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
            )
            out["train_samples_per_second"] = round(blocks * trainer.args.world_size / runtime, 3)
        return out


def _estimated_totals(args: Any, state: Any, block_size: int) -> dict[str, float]:
    """Totals of a checkpoint written before RunTotals existed: tokens from the batch arithmetic, the loss
    from the logged (per-interval mean) losses; its seconds are unknown and counted as 0."""
    blocks = state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
    tokens = float(blocks * args.world_size * block_size)
    loss_sum, last = 0.0, 0
    for entry in state.log_history:
        if "loss" in entry and "step" in entry:
            loss_sum += float(entry["loss"]) * (int(entry["step"]) - last)
            last = int(entry["step"])
    return {"tokens": tokens, "loss_sum": loss_sum, "attempts": 1.0}


def install_callbacks(
    trainer: Any, *, config: Any, block_size: int, quiet: bool, adapter: Any = None
) -> tuple[ThroughputCallback, RunTotals]:
    """Replace the Trainer's dict-printing progress with ours; add throughput and whole-run measurement."""
    import torch

    from clm_runner.models.flops import flops_per_token
    from clm_runner.train import device as performance

    for noisy in (PrinterCallback, HfProgressCallback):
        trainer.remove_callback(noisy)
    with contextlib.suppress(ImportError):
        from transformers.utils.notebook import NotebookProgressCallback

        trainer.remove_callback(NotebookProgressCallback)

    args = trainer.args
    cuda = args.device.type == "cuda" and torch.cuda.is_available()
    peak_total = None
    if cuda:
        precision = performance.precision_of(
            {"bf16": args.bf16, "fp16": args.fp16, "tf32": _tf32_enabled(args)}
        )
        peak = performance.peak_flops(torch.cuda.get_device_name(args.device), precision)
        peak_total = peak * args.world_size if peak is not None else None
    try:
        flops = flops_per_token(config, block_size, adapter)
    except Exception as error:  # an exotic config without layer counts: no MFU, never a failed run
        logger.warning("No MFU for this model: %s", error)
        flops = None

    throughput = ThroughputCallback(
        tokens_trained=lambda: trainer.tokens_trained,
        flops_per_token=flops,
        peak_flops_total=peak_total,
        cuda=cuda,
    )
    trainer.add_callback(throughput)
    totals = RunTotals(throughput, block_size)
    trainer.add_callback(totals)
    trainer.add_callback(TrainProgressCallback(quiet=quiet or bool(args.disable_tqdm)))
    return throughput, totals


def _tf32_enabled(args: Any) -> bool:
    import torch

    if args.tf32 is not None:
        return bool(args.tf32)
    matmul = torch.backends.cuda.matmul
    try:
        # torch >= 2.9 (what transformers sets there); reading the legacy flag after it raises.
        precision = getattr(matmul, "fp32_precision", None)
        return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)
    except RuntimeError:
        return False
