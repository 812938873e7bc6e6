"""Compare finished runs: read their Trainer logs, tabulate throughput and perplexity, plot the curves."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

from clm_runner.errors import OutputDirError
from clm_runner.rundir.policy import RECIPE_FILE, TRAINER_STATE, latest_checkpoint

RESULT_FILES = ("all_results.json", "train_results.json", "eval_results.json")


@dataclasses.dataclass(frozen=True)
class RunHistory:
    """What a run directory says about its training: logged curves, final metrics and its recipe."""

    path: Path
    name: str
    # The trainer_state.json that was read: the run's own, or its newest checkpoint's if training stopped early.
    state_file: Path
    global_step: int
    max_steps: int
    # (optimizer step, value) pairs in log order.
    train_loss: tuple[tuple[int, float], ...]
    learning_rate: tuple[tuple[int, float], ...]
    eval_loss: tuple[tuple[int, float], ...]
    # The evaluations during training (the final evaluation after it is in `results`): the exact perplexity
    # each logged (eval_perplexity), else exp(eval_loss) for runs of clm-runner before 0.2.
    eval_perplexity: tuple[tuple[int, float], ...]
    # The step of the best evaluation (trainer_state's best_global_step; with load_best_model_at_end, the
    # final model is that checkpoint's), None when the run did not track one.
    best_step: int | None
    # Last log entry's train_runtime etc. (Trainer's end-of-training summary), empty if absent.
    train_summary: Mapping[str, Any]
    # Keys of all_results.json, then train_results.json, then eval_results.json (later files win).
    results: Mapping[str, Any]
    num_input_tokens_seen: int
    recipe: Mapping[str, Any] | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OutputDirError(
            f"{path} cannot be read as JSON ({error}); the run's files are damaged"
        ) from error


def _newest_checkpoint_state(run_dir: Path) -> Path | None:
    """The newest complete checkpoint's state (torn checkpoints are skipped, as resume skips them)."""
    newest = latest_checkpoint(run_dir, warn=False)
    return newest / TRAINER_STATE if newest is not None else None


def _points(log_history: Sequence[Mapping[str, Any]], key: str) -> tuple[tuple[int, float], ...]:
    return tuple(
        (int(entry["step"]), float(entry[key]))
        for entry in log_history
        if isinstance(entry.get(key), (int, float)) and "step" in entry
    )


def load_run(path: str | Path) -> RunHistory:
    """Read one run directory (a clm-runner output_dir) without loading any model."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise OutputDirError(f"{run_dir} is not a directory; pass a run's output_dir")
    state_file = run_dir / TRAINER_STATE
    if not state_file.is_file():
        # The Trainer writes the run-level state only at the end; an interrupted run has it per checkpoint.
        state_file = _newest_checkpoint_state(run_dir)
        if state_file is None:
            raise OutputDirError(
                f"{run_dir} is not a clm-runner run (no {TRAINER_STATE}); pass a run's output_dir"
            )
    state = _read_json(state_file)
    if not isinstance(state, dict) or not isinstance(state.get("log_history", []), list):
        raise OutputDirError(f"{state_file} is not a Trainer state (no log_history list)")
    log_history = [entry for entry in state.get("log_history", []) if isinstance(entry, dict)]

    results: dict[str, Any] = {}
    for file_name in RESULT_FILES:
        if (run_dir / file_name).is_file():
            loaded = _read_json(run_dir / file_name)
            if isinstance(loaded, dict):
                results.update(loaded)

    recipe = None
    if (run_dir / RECIPE_FILE).is_file():
        try:
            recipe = tomllib.loads((run_dir / RECIPE_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise OutputDirError(f"{run_dir / 'recipe.toml'} cannot be parsed ({error})") from error

    train_summary = next((entry for entry in reversed(log_history) if "train_runtime" in entry), {})
    # The final evaluation is logged after the training summary, at the last step: with
    # load_best_model_at_end it is the best model's, so it is not a point of the training curve.
    end = next((i for i, entry in enumerate(log_history) if "train_runtime" in entry), len(log_history))
    during = log_history[:end]
    eval_loss = _points(during, "eval_loss")
    logged_perplexity = _points(during, "eval_perplexity")
    if len(logged_perplexity) != len(eval_loss):
        logged_perplexity = tuple((step, perplexity(loss)) for step, loss in eval_loss)
    best_step = state.get("best_global_step")
    return RunHistory(
        path=run_dir,
        name=run_dir.resolve().name,
        state_file=state_file,
        global_step=int(state.get("global_step") or 0),
        max_steps=int(state.get("max_steps") or 0),
        train_loss=_points(log_history, "loss"),
        learning_rate=_points(log_history, "learning_rate"),
        eval_loss=eval_loss,
        eval_perplexity=logged_perplexity,
        best_step=int(best_step) if isinstance(best_step, int) else None,
        train_summary=dict(train_summary),
        results=results,
        num_input_tokens_seen=int(state.get("num_input_tokens_seen") or 0),
        recipe=recipe,
    )


def perplexity(mean_loss_nats: float) -> float:
    """exp(mean cross-entropy in nats per token); inf instead of OverflowError for diverged runs."""
    try:
        return math.exp(mean_loss_nats)
    except OverflowError:
        return math.inf


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def tokens_per_optimizer_step(recipe: Mapping[str, Any] | None) -> int | None:
    """per_device_train_batch_size * gradient_accumulation_steps * block_size from a saved recipe.

    Assumes one training process: the recipe does not record how many devices the run used. A missing
    gradient_accumulation_steps means 1, the Trainer's default.
    """
    if recipe is None:
        return None
    data, training = recipe.get("data", {}), recipe.get("training", {})
    if not isinstance(data, Mapping) or not isinstance(training, Mapping):
        return None
    block_size = _positive_int(data.get("block_size"))
    batch_size = _positive_int(training.get("per_device_train_batch_size"))
    accumulation = _positive_int(training.get("gradient_accumulation_steps", 1))
    if block_size is None or batch_size is None or accumulation is None:
        return None
    return block_size * batch_size * accumulation


def _training_tokens(run: RunHistory) -> int | None:
    """Tokens trained on, from the most to the least direct record."""
    recorded = _positive_int(run.results.get("train_tokens"))
    if recorded is not None:
        return recorded
    # Counted by the Trainer (include_num_input_tokens_seen), summed over all processes.
    if run.num_input_tokens_seen > 0:
        return run.num_input_tokens_seen
    per_step = tokens_per_optimizer_step(run.recipe)
    return per_step * run.global_step if per_step is not None else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _display_names(runs: Sequence[RunHistory]) -> list[str]:
    """Directory names, or the paths as given where two runs share a directory name."""
    names = [run.name for run in runs]
    return [str(run.path) if names.count(run.name) > 1 else run.name for run in runs]


def summarize(runs: Sequence[RunHistory]) -> list[dict[str, Any]]:
    """One row per run: run, steps, tokens, time_s, tokens_per_s, final_perplexity, best_perplexity.

    tokens: train_results' train_tokens, else the Trainer's num_input_tokens_seen, else
    steps x per-device batch x accumulation x block_size from recipe.toml (one process assumed), else None.
    time_s: train_runtime of this training call (a resumed run counts only its last session).
    tokens_per_s: tokens / time_s when both are known, else the results' train_tokens_per_second.
    final_perplexity: eval_results' perplexity, else the last logged evaluation's.
    best_perplexity: lowest perplexity over the evaluations during training and the final one.
    best_step: the step of the best evaluation the run tracked (metric_for_best_model), else of the lowest
    perplexity logged.
    """
    rows = []
    for run, name in zip(runs, _display_names(runs), strict=True):
        tokens = _training_tokens(run)
        time_s = _number(run.results.get("train_runtime", run.train_summary.get("train_runtime")))
        if tokens is not None and time_s:
            tokens_per_s = tokens / time_s
        else:
            tokens_per_s = _number(run.results.get("train_tokens_per_second"))
        logged = [value for _, value in run.eval_perplexity]
        final = _number(run.results.get("perplexity"))
        if final is None and logged:
            final = logged[-1]
        if final is None and _number(run.results.get("eval_loss")) is not None:
            final = perplexity(float(run.results["eval_loss"]))
        candidates = logged + ([final] if final is not None else [])
        rows.append(
            {
                "run": name,
                "steps": run.global_step,
                "tokens": tokens,
                "time_s": time_s,
                "tokens_per_s": tokens_per_s,
                "final_perplexity": final,
                "best_perplexity": min(candidates) if candidates else None,
                "best_step": _best_point(run)[0] if run.eval_perplexity else None,
            }
        )
    return rows


_COLUMNS = (
    ("run", "run", lambda value: str(value)),
    ("steps", "steps", lambda value: f"{value:,}"),
    ("tokens", "tokens", lambda value: f"{value:,}"),
    ("time_s", "time (s)", lambda value: f"{value:,.1f}"),
    ("tokens_per_s", "tokens/s", lambda value: f"{value:,.0f}"),
    ("final_perplexity", "final ppl", lambda value: f"{value:,.2f}"),
    ("best_perplexity", "best ppl", lambda value: f"{value:,.2f}"),
    ("best_step", "best step", lambda value: f"{value:,}"),
)


def _best_point(run: RunHistory) -> tuple[int, float]:
    """(step, perplexity) of the best evaluation: the one the run tracked, else the lowest perplexity."""
    tracked = [point for point in run.eval_perplexity if point[0] == run.best_step]
    return tracked[-1] if tracked else min(run.eval_perplexity, key=lambda point: point[1])


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain aligned text: run names left-aligned, numbers right-aligned, '-' where unknown."""
    cells = [[header for _, header, _ in _COLUMNS]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else formatter(row[key]) for key, _, formatter in _COLUMNS])
    widths = [max(len(line[index]) for line in cells) for index in range(len(_COLUMNS))]
    lines = []
    for line in cells:
        padded = [line[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines) + "\n"


def _note_missing(axes: Any, what: str) -> None:
    axes.text(0.5, 0.5, what, transform=axes.transAxes, ha="center", va="center", color="gray")


def plot_runs(runs: Sequence[RunHistory], out_path: str | Path) -> Path:
    """Loss, eval perplexity and learning rate against optimizer step for several runs, as a 120-dpi PNG."""
    import matplotlib

    # The CLI may run on a machine without a display; Agg renders straight to files.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    names = _display_names(runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, (loss_axes, perplexity_axes, lr_axes) = plt.subplots(1, 3, figsize=(16, 4.8))
    try:
        all_perplexities: list[float] = []
        for index, (run, name) in enumerate(zip(runs, names, strict=True)):
            color = colors[index % len(colors)]
            if run.train_loss:
                steps, losses = zip(*run.train_loss, strict=True)
                loss_axes.plot(steps, losses, color=color, label=f"{name} train")
            if run.eval_loss:
                steps, losses = zip(*run.eval_loss, strict=True)
                loss_axes.plot(steps, losses, color=color, linestyle="--", marker="o", label=f"{name} eval")
            if run.eval_perplexity:
                eval_steps, perplexities = zip(*run.eval_perplexity, strict=True)
                all_perplexities.extend(value for value in perplexities if math.isfinite(value))
                perplexity_axes.plot(eval_steps, perplexities, color=color, marker="o", label=name)
                best_step, best = _best_point(run)
                perplexity_axes.plot(
                    [best_step], [best], color=color, marker="*", markersize=16, markeredgecolor="black",
                    linestyle="none", label=f"{name} best: {best:,.2f} at step {best_step:,}",
                )  # fmt: skip
            if run.learning_rate:
                steps, rates = zip(*run.learning_rate, strict=True)
                lr_axes.plot(steps, rates, color=color, label=name)

        loss_axes.set_title("Training and evaluation loss")
        loss_axes.set_ylabel("loss (nats/token)")
        perplexity_axes.set_title("Evaluation perplexity")
        perplexity_axes.set_ylabel("perplexity")
        # Early perplexities can be orders of magnitude above the final ones; a log axis keeps both legible.
        if all_perplexities and max(all_perplexities) / min(all_perplexities) > 10:
            perplexity_axes.set_yscale("log")
        lr_axes.set_title("Learning rate schedule")
        lr_axes.set_ylabel("learning rate")
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        panels = (
            (loss_axes, "no loss logged"),
            (perplexity_axes, "no evaluation logged"),
            (lr_axes, "no learning rate logged"),
        )
        for axes, missing in panels:
            axes.set_xlabel("step (optimizer updates)")
            axes.grid(True, alpha=0.3)
            if axes.lines:
                axes.legend(fontsize="small")
            else:
                _note_missing(axes, missing)
        figure.tight_layout()
        figure.savefig(out_path, dpi=120, format="png")
    finally:
        plt.close(figure)
    return out_path
