"""ClmTrainer: the Hugging Face Trainer with clm-runner's exact evaluation and crash-safe checkpoints.

The Trainer's own eval loss is a mean of batch means and its accuracy needs every prediction kept in
memory; here evaluation sums NLL and correct tokens per batch (flat memory), shards blocks across ranks
without padding, and all-reduces the sums, so every world size gives the same number.

Checkpoints are written under a temporary name and sealed (clm_runner.rundir.checkpoints) on a background
thread (clm_runner.rundir.sealer), waited for wherever a checkpoint is relied on; metric and state files are
replaced atomically; a SIGINT/SIGTERM stops after the current step with a checkpoint
(clm_runner.train.interrupts).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import Trainer

from clm_runner import faults
from clm_runner.rundir.policy import TRAINER_STATE, save_metrics, write_json_atomic, write_text_atomic
from clm_runner.rundir.sealer import Sealer
from clm_runner.train.checkpoints import save_checkpoint_atomically, seal_before_reporters
from clm_runner.train.interrupts import GracefulStop

logger = logging.getLogger("clm_runner")


class ClmTrainer(Trainer):
    # Tokens in the micro-batches trained so far, all ranks (even batches: this rank's count x world size).
    tokens_trained: int = 0

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        faults.point("train.step")
        # numel reads the shape only: no device sync.
        self.tokens_trained += int(inputs["input_ids"].numel()) * self.args.world_size
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Measuring callbacks (tokens/s, MFU) fill in their numbers before log_history and reporters see them.
        for callback in self.callback_handler.callbacks:
            annotate = getattr(callback, "annotate_log", None)
            if annotate is not None:
                annotate(self.state, logs)
        super().log(logs, start_time)

    graceful_stop: GracefulStop | None = None
    """Set by `train` to stop after the step in which a SIGINT/SIGTERM arrived."""
    run_totals: Any = None
    """clm_runner.train.measure.RunTotals, set by `train`: the whole run's totals, saved in every checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Rotation is ours (complete checkpoints only, newest complete kept); upstream's would also delete
        # the newest checkpoint at the end when save_total_limit=1 and a best checkpoint differs.
        self.checkpoint_limit = self.args.save_total_limit
        self._last_checkpoint_step: int | None = None
        self.sealer = Sealer()
        """Seals this process's checkpoints in the background, one at a time (only where should_save)."""
        seal_before_reporters(self.callback_handler, self.wait_for_checkpoint)

    final_weights_step: int | None = None
    """The step whose weights the model holds after train(): the last one, or the best one it loaded."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        checkpoint = kwargs.get("resume_from_checkpoint")
        self.final_weights_step = None
        if checkpoint and self._steps_left(checkpoint) <= 0:
            return self._end_at_checkpoint(checkpoint)
        self.args.save_total_limit = None
        # eval_on_start is the untrained model's baseline: a resumed run has it in its log already.
        eval_on_start = self.args.eval_on_start
        if checkpoint:
            self.args.eval_on_start = False
        try:
            output = super().train(*args, **kwargs)
            # The last checkpoint (a SIGINT's too) is sealed before the run reports it or writes its results.
            self.wait_for_checkpoint()
        except BaseException:  # a second signal during that wait too: no seal is left in flight
            self._finish_seal_after_failure()
            raise
        finally:
            self.args.save_total_limit = self.checkpoint_limit
            self.args.eval_on_start = eval_on_start
        if self.final_weights_step is None:
            self.final_weights_step = self.state.global_step
        return output

    def wait_for_checkpoint(self) -> None:
        """Return once the checkpoint being sealed is complete, on every rank (all ranks must call it)."""
        self.sealer.wait()
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _finish_seal_after_failure(self) -> None:
        """Training failed or was stopped at once: let the seal in flight finish, so the newest checkpoint the
        error names is whole. The first error is the one reported; the seal's, if it failed too, is logged."""
        import logging

        try:
            self.sealer.wait()
        except Exception as exc:
            logging.getLogger("clm_runner").warning("The checkpoint being sealed was not sealed: %s", exc)

    def _init_training_state(self, *args: Any, **kwargs: Any) -> Any:
        with _quiet_about_the_recorded_best():
            trained = super()._init_training_state(*args, **kwargs)
        self._best_checkpoint_in_run_dir()
        return trained

    def _best_checkpoint_in_run_dir(self) -> None:
        """The best checkpoint is this run dir's checkpoint-<best step>, if it is there and complete.

        A resumed state records it as a path: absolute, or relative to the working dir the run was started
        from. A moved run dir, or a relative output_dir resumed from another working dir, makes that path
        wrong (or, worse, right for some other run's checkpoint).
        """
        recorded = self.state.best_model_checkpoint
        step = self.state.best_global_step
        if not step and not recorded:
            return
        from clm_runner.rundir.checkpoints import checkpoint_problem

        path = Path(self.args.output_dir) / (f"checkpoint-{step}" if step else Path(recorded).name)
        problem = checkpoint_problem(path)
        self.state.best_model_checkpoint = str(path) if problem is None else None
        if problem is not None:
            logger.warning(
                "The best checkpoint so far, %s, cannot be used (%s): unless a later evaluation beats it, the "
                "run ends with its last model.",
                path,
                problem,
            )

    def _load_best_model(self) -> None:
        """Load the best checkpoint's weights, and remember that the model now holds them."""
        from clm_runner.rundir.checkpoints import checkpoint_problem

        self.wait_for_checkpoint()  # the best checkpoint may be the one still being sealed
        best = self.state.best_model_checkpoint
        problem = "not recorded" if best is None else checkpoint_problem(Path(best))
        if problem is not None:
            logger.warning(
                "Not loading the best model from %s (%s): the run ends with its last model.", best, problem
            )
            return
        super()._load_best_model()
        self.final_weights_step = self.state.best_global_step

    early_stopping: Any = None
    """clm_runner.config.schema.EarlyStoppingConfig when the recipe has [early_stopping]."""
    last_evaluation: tuple[int, dict[str, Any]] | None = None
    """(global step, metrics) of the newest evaluation of the validation set that this process ran."""

    def _steps_left(self, checkpoint: str) -> int:
        """Optimizer steps the run has left after `checkpoint` (upstream would train one more at 0)."""
        import json

        try:
            saved = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
            done = int(saved["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 1
        if self.early_stopping is not None:
            from clm_runner.train.early_stopping import stopped_early

            rule = self.early_stopping
            if stopped_early(saved.get("log_history", []), self.args, rule.patience, rule.threshold):
                return 0  # the run had decided to stop at this checkpoint's evaluation
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return 1  # their own loading path: leave it to upstream
        target = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
        return target - done

    def _end_at_checkpoint(self, checkpoint: str) -> Any:
        """Resumed at the run's last step: nothing to train, so finish from the checkpoint as it is.

        Upstream's loop resumed there trains one step past the end (it checks max_steps after a step), which
        would change the final model and the results of a run that was only cut short while finishing.
        """
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
        self.final_weights_step = self.state.global_step
        self._best_checkpoint_in_run_dir()
        self._total_loss_scalar = 0.0
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_model()
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        metrics = {
            "train_runtime": 0.0,
            "train_samples_per_second": 0.0,
            "train_steps_per_second": 0.0,
            "total_flos": self.state.total_flos,
            "train_loss": 0.0,
            "epoch": self.state.epoch,
        }
        return TrainOutput(self.state.global_step, 0.0, metrics)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # The recipe's learning rate and optimizer settings over the checkpoint's (clm_runner.train.resume_settings).
        from clm_runner.train.resume_settings import apply_recipe_settings, describe, recipe_settings

        applies = checkpoint is not None and not self.is_deepspeed_enabled  # DeepSpeed: the run warns
        wanted = recipe_settings(self.optimizer, self.lr_scheduler) if applies else None
        super()._load_optimizer_and_scheduler(checkpoint)
        if wanted is not None:
            applied = apply_recipe_settings(self.optimizer, self.lr_scheduler, wanted)
            if applied and self.args.should_log:
                logger.info(describe(applied, Path(checkpoint).name))

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A tied output head (GPT-2's lm_head is the token embedding) is saved once, so its key is "missing"
        # from every checkpoint; the tie restores it. Only other missing keys are worth a warning.
        aliases = _tied_aliases(self.model)
        missing = [key for key in load_result.missing_keys if key not in aliases]
        if len(missing) != len(load_result.missing_keys):
            self.model.tie_weights()
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.run_totals is not None:
            # The summed loss so far, as upstream computes it at a logging step (mean over ranks): a resumed
            # attempt continues from it, so train_loss covers the whole run.
            from transformers.trainer_pt_utils import nested_gather

            pending = nested_gather(self._tr_loss.detach().clone(), self.args.parallel_mode).mean().item()
            self.run_totals.loss_this_attempt = self._total_loss_scalar + pending
        # training_args.bin inside the checkpoint records the user's limit, not the None set during train.
        self.args.save_total_limit = self.checkpoint_limit
        try:
            save_checkpoint_atomically(self, model, trial, limit=self.checkpoint_limit, sealer=self.sealer)
        finally:
            self.args.save_total_limit = None
        self._last_checkpoint_step = self.state.global_step

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        # A seal that failed in the background (a full disk) stops the run at the next step, not at the end.
        self.sealer.raise_if_failed()
        stop = self.graceful_stop
        if stop is not None and stop.stopped_at_step is not None:
            # The epoch-end pass after we stopped: the checkpoint is written, evaluate and save nothing more.
            self.control.should_evaluate = self.control.should_save = self.control.should_log = False
        super()._maybe_log_save_evaluate(*args, **kwargs)
        if stop is None or stop.stopped_at_step is not None or not stop.should_stop(self.args):
            return
        if self._last_checkpoint_step != self.state.global_step:
            model = args[2] if len(args) > 2 else kwargs.get("model", self.model)
            trial = args[3] if len(args) > 3 else kwargs.get("trial")
            self._save_checkpoint(model, trial)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        self.control.should_training_stop = True
        stop.stopped_at_step = self.state.global_step

    def save_metrics(self, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
        """Trainer.save_metrics, each file replaced atomically."""
        if not self.is_world_process_zero():
            return
        if combined:
            save_metrics(Path(self.args.output_dir), split, metrics)
        else:
            write_json_atomic(Path(self.args.output_dir) / f"{split}_results.json", metrics)

    def save_state(self) -> None:
        """Trainer.save_state, replaced atomically (same JSON as TrainerState.save_to_json)."""
        if not self.is_world_process_zero():
            return
        import dataclasses
        import json

        text = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"
        write_text_atomic(Path(self.args.output_dir) / TRAINER_STATE, text)

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        # An evaluation may pick the best checkpoint, and early stopping may end the run on it: the one being
        # sealed is complete first (evaluations are rare; the seal is mostly done by then).
        self.wait_for_checkpoint()
        metrics = self.exact_metrics(eval_dataset, metric_key_prefix=metric_key_prefix)
        if eval_dataset is None and metric_key_prefix == "eval":
            # The step whose weights this evaluation scored, in this process (see train.results).
            self.last_evaluation = (self.state.global_step, dict(metrics))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def parameters_are_sharded(self) -> bool:
        """True when a forward pass is a collective: FSDP, or DeepSpeed ZeRO stage 3."""
        if self.is_fsdp_enabled:
            return True
        if self.is_deepspeed_enabled:
            from transformers.integrations import is_deepspeed_zero3_enabled

            return is_deepspeed_zero3_enabled()
        return False

    def exact_metrics(self, eval_dataset: Any = None, *, metric_key_prefix: str = "eval") -> dict[str, Any]:
        """eval_loss, eval_perplexity, eval_accuracy, eval_samples, eval_tokens: exact, token-weighted.

        With [[data.mix]] sources each validated on its own, `eval_dataset` is a dict of them: each is scored
        (eval_NAME_loss, eval_NAME_perplexity, ...) and the overall numbers are their exact, token-weighted total.
        """
        from clm_runner import faults
        from clm_runner.eval.result import PerplexityResult, speed_metrics

        faults.point("evaluate")
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        start = time.perf_counter()
        parts = dataset if isinstance(dataset, dict) else {None: dataset}
        results = {name: self._score(blocks) for name, blocks in parts.items()}
        metrics: dict[str, Any] = {}
        for name, result in [
            *((n, r) for n, r in results.items() if n is not None),
            (None, PerplexityResult.merge(results.values())),
        ]:
            # eval_perplexity, beside eval_loss: TensorBoard files it under eval/ (run_clm's results-file key,
            # "perplexity", is added to the final evaluation's metrics by `train`).
            metrics.update(
                result.prefixed(metric_key_prefix if name is None else f"{metric_key_prefix}_{name}")
            )
        global_batch = self.args.per_device_eval_batch_size * self.args.world_size
        metrics.update(
            speed_metrics(metric_key_prefix, time.perf_counter() - start, results.values(), global_batch)
        )
        if self.state.epoch is not None:
            metrics["epoch"] = self.state.epoch
        return metrics

    def _score(self, dataset: Any) -> Any:
        """Every rank scores its shard of `dataset`; the exact total over all ranks (a PerplexityResult)."""
        import torch

        from clm_runner.eval.perplexity import evaluate_blocks, reduce_across_ranks
        from clm_runner.train.display import evaluation_progress

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=True)
        was_training = model.training
        with self.autocast_smart_context_manager(), evaluation_progress(self, dataset) as progress:
            result = evaluate_blocks(
                model,
                dataset,
                batch_size=self.args.per_device_eval_batch_size,
                device=self.args.device,
                shard=(self.args.process_index, self.args.world_size),
                progress=progress,
                # Under FSDP / ZeRO-3 each forward gathers parameters from every rank, so a rank with one
                # batch fewer runs a throw-away batch: otherwise the others wait for it forever.
                lockstep=self.args.world_size > 1 and self.parameters_are_sharded(),
            )
        if was_training:
            model.train()
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            result = reduce_across_ranks(result, device=self.args.device)
        return result


@contextlib.contextmanager
def _quiet_about_the_recorded_best() -> Iterator[None]:
    """Upstream warns, on resume, that the best checkpoint's recorded path is gone; ClmTrainer then finds it
    in the run dir (or says itself that it cannot), so the warning would only mislead."""

    def drop(record: logging.LogRecord) -> bool:
        return "recorded in the resumed state does not exist" not in record.getMessage()

    upstream = logging.getLogger("transformers.trainer")
    upstream.addFilter(drop)
    try:
        yield
    finally:
        upstream.removeFilter(drop)


def _tied_aliases(model: Any) -> set[str]:
    """Parameter names that are the same tensor as a parameter named earlier (tied weights)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            aliases.add(name)
        else:
            seen[id(parameter)] = name
    return aliases
