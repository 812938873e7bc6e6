"""Benchmark: what a checkpoint costs the run, clm-runner's sealed saves against the plain Trainer's.

Both sides train the same seeded random-init GPT-2 (8 layers x 384 wide, 2,048-token vocabulary, 15.1M
parameters) on the same random token blocks (batch 1 x 256), on the CPU, with the same TrainingArguments:
a checkpoint every step, save_total_limit 2. The cost of checkpointing is what it adds to a step:

    cost per save = median step interval with a save every step - median step interval without saves

where a step interval runs from one step's start to the next one's, so it holds the step, its save, and
whatever a background seal takes from the next step (the CPU, a wait for the seal still in flight). Medians
of ~20 intervals per run shrug off the load spikes of a shared machine; the whole run's wall time with and
without saves is printed beside them (it also counts the final wait for the last seal, and every spike).

After one untimed run of each side, each repeat runs the four runs (plain with and without saves,
clm-runner with and without) back to back, the order reversed every other repeat, so a machine whose load
drifts biases no side. The ratio is clm-runner's median cost over the plain Trainer's (medians over the
repeats); the median of the per-repeat ratios is printed beside it.

- plain: `transformers.Trainer` (writes checkpoint-N in place, no fsync; its own rotation);
- clm-runner: `ClmTrainer` with its callbacks (tmp-checkpoint-N, fsync, marker, rename, its rotation).

    python benchmarks/checkpoint_cost.py                  # 7 repeats of 20 steps; the goal is <= 1.1x
    python benchmarks/checkpoint_cost.py --profile        # where one clm-runner save's time goes

Every run allocates memory the same way: the benchmark restarts itself with glibc's mmap threshold
fixed (MALLOC_MMAP_THRESHOLD_; see MMAP_THRESHOLD). `--profile` times each part of clm-runner's saves
(weights, optimizer, RNG, trainer state, fsyncs, seal, rotation) and says on which thread it ran.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The same seeded random-init GPT-2 and random blocks as the throughput benchmark.
from train_throughput import build_blocks, build_model  # noqa: E402

RATIO_GOAL = 1.1
SIDES = ("plain", "clm-runner")
SYNC = "clm-sync"
"""--with-sync: clm-runner sealing and rotating on the training thread, as it did before the background seal."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=384, help="n_embd")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--block", type=int, default=256, help="block size in tokens")
    parser.add_argument("--batch", type=int, default=1, help="per-device train batch size")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (a save after each)")
    parser.add_argument("--limit", type=int, default=2, help="save_total_limit")
    parser.add_argument("--repeats", type=int, default=7, help="rounds of the four runs, order alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scratch", type=Path, default=None, help="where the runs write (default: a temp dir)"
    )
    parser.add_argument("--profile", action="store_true", help="time the parts of clm-runner's saves instead")
    parser.add_argument(
        "--with-sync", action="store_true", help=f"a third side, {SYNC}: the seal on the training thread"
    )
    return parser.parse_args()


def training_arguments(opts: argparse.Namespace, output_dir: str, *, saves: bool) -> dict:
    """The same TrainingArguments for both sides: a checkpoint every step (or none), on the CPU."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": opts.batch,
        "max_steps": opts.steps,
        "save_strategy": "steps" if saves else "no",
        "save_steps": 1,
        "save_total_limit": opts.limit,
        "logging_steps": opts.steps,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": opts.seed,
    }


def build_trainer(side: str, opts: argparse.Namespace, blocks, output_dir: str, *, saves: bool):
    from transformers import Trainer, TrainingArguments, default_data_collator

    kwargs = training_arguments(opts, output_dir, saves=saves)
    model = build_model(opts)
    if side == "plain":
        args = TrainingArguments(**kwargs)
        return Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator)
    from clm_runner.train.device import device_defaults
    from clm_runner.train.measure import install_callbacks
    from clm_runner.train.trainer import ClmTrainer

    kwargs.update(device_defaults(kwargs))  # nothing on a CPU: the same process settings as plain
    args = TrainingArguments(**kwargs)
    trainer = ClmTrainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator)
    _, trainer.run_totals = install_callbacks(trainer, config=model.config, block_size=opts.block, quiet=True)
    if side == SYNC:
        from clm_runner.rundir.sealer import Sealer

        class InlineSealer(Sealer):
            """Runs each seal (fsyncs, marker, rename, rotation) at once, on the training thread."""

            def submit(self, job, *, name):
                self.wait()
                job()

        trainer.sealer = InlineSealer()
    return trainer


class StepClock:
    """perf_counter and process CPU time at the start of every step: the step intervals of a run."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self
        self.marks: list[tuple[float, float]] = []

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.marks.append((time.perf_counter(), time.process_time()))

        self.callback = Callback()

    def median_interval(self, which: int) -> float:
        """Median seconds from one step's start to the next (0: wall, 1: this process's CPU, all threads)."""
        return statistics.median(b[which] - a[which] for a, b in itertools.pairwise(self.marks))


def timed_run(side: str, opts: argparse.Namespace, blocks, *, saves: bool) -> dict:
    """train() once: its step intervals, its wall time, the training thread's time in each save."""
    import gc

    with tempfile.TemporaryDirectory(dir=opts.scratch) as output_dir:
        trainer = build_trainer(side, opts, blocks, output_dir, saves=saves)
        clock = StepClock()
        trainer.add_callback(clock.callback)
        in_save: list[float] = []
        save = trainer._save_checkpoint

        def timed_save(*args, **kwargs):
            start = time.perf_counter()
            try:
                return save(*args, **kwargs)
            finally:
                in_save.append(time.perf_counter() - start)

        trainer._save_checkpoint = timed_save
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        checkpoints = sorted(p.name for p in Path(output_dir).iterdir() if p.name.startswith("checkpoint-"))
        del trainer
        gc.collect()
    return {
        "step": clock.median_interval(0),
        "step_cpu": clock.median_interval(1),
        "wall": wall,
        "in_save": in_save,
        "checkpoints": checkpoints,
    }


# ---------------------------------------------------------------------------------------------------
# --profile: where clm-runner's save time goes


PROFILED = {
    "clm_runner.rundir.checkpoints": ("seal_checkpoint", "rotate_checkpoints", "fsync_path"),
    "clm_runner.rundir.files": ("fsync_path",),
}
TRAINER_PARTS = ("save_model", "_save_optimizer_and_scheduler", "_save_rng_state", "_save_checkpoint")


@contextlib.contextmanager
def timing_parts(trainer, times: dict):
    """Wrap the save's parts wherever clm_runner's modules hold them; record (thread, seconds) per call."""
    import importlib

    from transformers.trainer_callback import TrainerState

    def wrap(function, label):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                thread = threading.current_thread()
                where = "training thread" if thread is threading.main_thread() else "background thread"
                times[label].append((where, time.perf_counter() - start))

        return timed

    originals = []
    for module_name, names in PROFILED.items():
        module = importlib.import_module(module_name)
        for name in names:
            function = getattr(module, name)
            for holder in [m for n, m in sys.modules.items() if n.startswith("clm_runner") and m is not None]:
                if getattr(holder, name, None) is function:
                    originals.append((holder, name, function))
                    setattr(holder, name, wrap(function, name))
    for name in TRAINER_PARTS:
        setattr(trainer, name, wrap(getattr(trainer, name), name))
    sealer = getattr(trainer, "sealer", None)
    if sealer is not None:  # the training thread's waits for a seal still in flight
        sealer.wait = wrap(sealer.wait, "Sealer.wait")
    save_to_json = TrainerState.save_to_json
    TrainerState.save_to_json = wrap(save_to_json, "TrainerState.save_to_json")
    try:
        yield
    finally:
        TrainerState.save_to_json = save_to_json
        for holder, name, function in reversed(originals):
            setattr(holder, name, function)


def profile(opts: argparse.Namespace, blocks) -> None:
    times: dict[str, list] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(dir=opts.scratch) as output_dir:
        trainer = build_trainer("clm-runner", opts, blocks, output_dir, saves=True)
        with timing_parts(trainer, times):
            trainer.train()
    print(f"clm-runner, {opts.steps} saves: ms per save (calls per save, median ms per call), thread")
    for label, calls in times.items():
        threads = sorted({thread for thread, _ in calls})
        per_save = sum(seconds for _, seconds in calls) * 1000 / opts.steps
        median = statistics.median(seconds for _, seconds in calls) * 1000
        print(
            f"  {label:<32}{per_save:>8.1f} ms  ({len(calls) / opts.steps:.0f} x {median:.1f} ms)  {', '.join(threads)}"
        )


# ---------------------------------------------------------------------------------------------------


MMAP_THRESHOLD = str(32 * 2**20)
"""glibc's malloc raises its mmap threshold after the first large free (up to 32 MiB), and a torch.save of
the optimizer state frees large buffers: runs with saves would then allocate the steps' activations from
the heap and train faster than runs without, on both sides. Fixed at glibc's dynamic maximum, every run
allocates the same way."""


def main() -> int:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # malloc reads it at process start
    opts = parse_args()
    sides = (*SIDES, SYNC) if opts.with_sync else SIDES
    import torch
    import transformers

    torch.set_num_threads(opts.threads)
    blocks = build_blocks(opts)
    parameters = sum(p.numel() for p in build_model(opts).parameters())
    where = opts.scratch or Path(tempfile.gettempdir())
    print(
        f"device: CPU ({platform.processor() or platform.machine()}); torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"model: GPT-2 n_layer={opts.layers} n_embd={opts.width} n_head={opts.heads} vocab={opts.vocab}, "
        f"{parameters / 1e6:.1f}M parameters; batch {opts.batch} x {opts.block}; {opts.steps} steps, a save "
        f"after each, save_total_limit {opts.limit}; {torch.get_num_threads()} torch thread(s); runs in {where}"
    )
    if opts.profile:
        with contextlib.redirect_stdout(sys.stderr):
            profile(opts, blocks)  # the plain Trainer prints its log dicts on stdout
        return 0

    measures = ("step", "step_cpu", "wall")  # cost per save from: step intervals, their CPU time, whole runs
    costs = {side: {m: [] for m in measures} for side in sides}
    in_save: dict[str, list[float]] = {side: [] for side in sides}
    ratios: list[float] = []
    # SYNC differs from clm-runner only in its saves: its runs without saves would be clm-runner's.
    runs = [(side, saves) for side in sides for saves in (True, False) if saves or side != SYNC]
    for side in sides:  # untimed: the first run of each side pays for lazy imports and allocator growth
        with contextlib.redirect_stdout(sys.stderr):
            timed_run(side, opts, blocks, saves=True)
    for repeat in range(opts.repeats):
        order = runs if repeat % 2 == 0 else runs[::-1]
        results = {}
        for side, saves in order:
            with contextlib.redirect_stdout(sys.stderr):
                results[side, saves] = result = timed_run(side, opts, blocks, saves=saves)
            if saves:
                in_save[side].extend(result["in_save"])
                kept = result["checkpoints"]
                assert len(result["in_save"]) == opts.steps and len(kept) == opts.limit, (side, kept)
        for side in sides:
            with_saves, without = results[side, True], results["clm-runner" if side == SYNC else side, False]
            for measure in ("step", "step_cpu"):
                costs[side][measure].append(with_saves[measure] - without[measure])
            costs[side]["wall"].append((with_saves["wall"] - without["wall"]) / opts.steps)
        ratios.append(costs["clm-runner"]["step"][-1] / costs["plain"]["step"][-1])
        print(
            f"  repeat {repeat + 1}: "
            + "; ".join(
                f"{side} {costs[side]['step'][-1] * 1000:.0f} ms/save (step {results[side, True]['step'] * 1000:.0f} "
                f"ms with saves; whole run {costs[side]['wall'][-1] * 1000:.0f} ms/save)"
                for side in sides
            )
            + f"; ratio {ratios[-1]:.2f}; steps without saves: "
            + ", ".join(f"{side} {results[side, False]['step'] * 1000:.0f} ms" for side in SIDES),
            flush=True,
        )

    print()
    print("cost per save, medians over the repeats:")
    print(f"{'':<12}{'step interval':>15}{'its CPU time':>15}{'whole run':>12}{'in _save_checkpoint':>22}")
    medians = {side: {m: statistics.median(costs[side][m]) for m in measures} for side in sides}
    for side in sides:
        inside = statistics.median(in_save[side])
        print(
            f"{side:<12}"
            + "".join(f"{medians[side][m] * 1000:>12.0f} ms" for m in measures)
            + f"{inside * 1000:>19.0f} ms"
        )
    ratio = {m: medians["clm-runner"][m] / medians["plain"][m] for m in measures}
    print(
        f"ratio clm-runner / plain: {ratio['step']:.2f} (step interval), {ratio['step_cpu']:.2f} (its CPU time), "
        f"{ratio['wall']:.2f} (whole run); median of the repeats' step ratios {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f})"
    )
    if SYNC in sides:
        before = {m: medians[SYNC][m] / medians["plain"][m] for m in measures}
        print(
            f"ratio {SYNC} / plain (sealed on the training thread): {before['step']:.2f} (step interval), "
            f"{before['step_cpu']:.2f} (its CPU time), {before['wall']:.2f} (whole run)"
        )
    ok = ratio["step"] <= RATIO_GOAL
    print(
        f"goal: cost per save <= {RATIO_GOAL}x the plain Trainer's (step interval): "
        + ("met" if ok else "NOT met")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
