"""Benchmark: DDP's search for unused parameters, on (the Trainer's default) and off (clm-runner's), 2 CPU processes.

Each run is a real `torchrun --nproc_per_node 2 -m clm_runner train` of the smoke recipe's model on the CPU
(gloo, one thread per process), no evaluation, no checkpoints, `logging_steps = 1`; the only difference
is `training.ddp_find_unused_parameters`. A run's step time is the median over its steps (the first
`--warmup` left out) of clm-runner's per-step tokens/s in trainer_state.json's log (training time only:
logging excluded). The runs alternate (true, false, false, true, ...), so a machine whose load drifts (a
shared box) biases neither; the figure is the median over the runs of each side.

    python benchmarks/ddp_find_unused.py                  # the smoke model, 40 steps, 4 runs of each
    python benchmarks/ddp_find_unused.py --set model.config_overrides=n_layer=8,n_head=6,n_embd=384

Extra `--set` pairs go to every run (a bigger model, another batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE = REPO_ROOT / "recipes" / "smoke.toml"
PROCESSES = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--batch", type=int, default=8, help="per-device train batch size")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each side, alternating")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every run")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_once(opts: argparse.Namespace, search: bool, scratch: Path, index: int) -> dict:
    out = scratch / f"run-{index}"
    sets = [
        f"training.output_dir={out}",
        f"training.max_steps={opts.steps}",
        f"training.per_device_train_batch_size={opts.batch}",
        "training.eval_strategy=no",
        "training.eval_on_start=false",
        "training.save_strategy=no",
        "training.logging_steps=1",
        f"training.ddp_find_unused_parameters={'true' if search else 'false'}",
        *opts.sets,
    ]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "clm_runner", "train", "--recipe", str(SMOKE), "--quiet",
        *[arg for s in sets for arg in ("--set", s)],
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "CLM_RUNNER_CACHE": str(scratch / "cache"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    state = json.loads((out / "trainer_state.json").read_text())
    rates = [e["tokens_per_second"] for e in state["log_history"] if "tokens_per_second" in e]
    recipe = (out / "recipe.toml").read_text()
    assert f"ddp_find_unused_parameters = {'true' if search else 'false'}" in recipe
    tokens_per_step = opts.batch * PROCESSES * block_size(recipe)
    return {"step": statistics.median(tokens_per_step / r for r in rates[opts.warmup :])}


def block_size(recipe_text: str) -> int:
    import tomllib

    return int(tomllib.loads(recipe_text)["data"]["block_size"])


def main() -> int:
    opts = parse_args()
    import torch

    print(
        f"torchrun --nproc_per_node {PROCESSES} on the CPU (gloo, 1 thread each), torch {torch.__version__}; "
        f"recipes/smoke.toml, batch {opts.batch} per process, {opts.steps} steps ({opts.warmup} left out)"
        + (f"; --set {' '.join(opts.sets)}" if opts.sets else "")
    )
    steps: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as scratch:
        run_once(opts, False, Path(scratch), -1)  # untimed: builds the preprocessing cache
        index = 0
        for repeat in range(opts.repeats):
            for search in (True, False) if repeat % 2 == 0 else (False, True):
                result = run_once(opts, search, Path(scratch), index)
                index += 1
                steps[search].append(result["step"])
                print(
                    f"  run {index}: find_unused_parameters={search}: {result['step'] * 1000:.1f} ms/step",
                    flush=True,
                )
    on, off = statistics.median(steps[True]), statistics.median(steps[False])
    print(
        f"median step: search on (the Trainer's default) {on * 1000:.1f} ms, off (clm-runner's default) "
        f"{off * 1000:.1f} ms: {(on - off) * 1000:+.1f} ms, {on / off - 1:+.1%} per step with the search"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
