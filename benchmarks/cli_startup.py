"""Benchmark: how fast `clm-runner --help` answers, against the interpreter alone and the heavy imports it defers.

The CLI module imports only click and the standard library; torch, transformers and datasets are imported
inside the command bodies. This measures, as whole processes in turn (A B C A B C ...), the median wall
time of:

    floor   python -c pass
    help    python -m clm_runner --help
    heavy   python -c "import torch, transformers, datasets"   (what --help would cost without deferring)

and prints help / floor (the CLI's own cost) and heavy / help (what deferring saves).

    python benchmarks/cli_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "floor": [sys.executable, "-c", "pass"],
    "help": [sys.executable, "-m", "clm_runner", "--help"],
    "heavy": [sys.executable, "-c", "import torch, transformers, datasets"],
}


def wall_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=REPO_ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each command (after one warm-up)")
    args = parser.parse_args()
    for command in COMMANDS.values():
        wall_seconds(command)  # warm the page cache
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, command in COMMANDS.items():
            times[name].append(wall_seconds(command))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, command in COMMANDS.items():
        print(
            f"{name:6} median {median[name]:.3f} s  (min {min(times[name]):.3f}, max {max(times[name]):.3f})  {' '.join(command[1:])}"
        )
    print(f"help / floor = {median['help'] / median['floor']:.2f}x   (the CLI's own start-up cost)")
    print(
        f"heavy / help = {median['heavy'] / median['help']:.1f}x   (what deferring the heavy imports saves)"
    )


if __name__ == "__main__":
    main()
