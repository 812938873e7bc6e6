"""Launching `clm-runner` as 2 CPU processes (gloo) under torchrun or accelerate launch, for the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers import REPO

from clm_runner.train import distributed

PROCESSES = 2
LAUNCH_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(cache: Path, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "CLM_RUNNER_CACHE": str(cache),
            "HF_HOME": str(home),  # no stray accelerate default_config.yaml from the developer's home
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
    )
    for name in distributed.RANK_VARS + distributed.WORLD_SIZE_VARS + distributed.LOCAL_RANK_VARS:
        env.pop(name, None)
    return env


def torchrun(log_dir: Path, *clm_args: str) -> list[str]:
    # --log-dir/--redirects: each rank's stdout and stderr in its own file, to see who printed what.
    # --monitor-interval 1: when ranks stop on an error, all of them have left before the agent looks.
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--monitor-interval", "1",
        "--log-dir", str(log_dir), "--redirects", "3",
        "-m", "clm_runner", *clm_args,
    ]  # fmt: skip


def accelerate_launch(*clm_args: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        "-m", "clm_runner", *clm_args,
    ]  # fmt: skip


def rank_logs(log_dir: Path) -> dict[int, str]:
    """rank -> that rank's stderr, from torchrun --log-dir (one attempt, since --max-restarts is 0)."""
    found = {int(p.parent.name): p.read_text() for p in log_dir.glob("*/attempt_0/*/stderr.log")}
    assert sorted(found) == list(range(PROCESSES)), found
    return found


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=REPO
    )
