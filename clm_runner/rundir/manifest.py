"""run.json: what produced a run (command, resolved recipe, versions, devices, code, data, seed) and its status.

Written atomically at the start (status running) and rewritten on every change, so at any moment the file
says what the run is and how it ended: completed, failed or interrupted. A resumed run keeps the earlier
attempts under `previous_attempts`. No secret is ever written: the hub token (model.token,
training.hub_token, HF_TOKEN) is redacted, in the recipe, the command line and any error text.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clm_runner.config.schema import Recipe
from clm_runner.config.secrets import redact_argv, scrub, secret_values
from clm_runner.rundir.policy import read_json, write_text_atomic

MANIFEST_NAME = "run.json"
STATUSES = ("running", "completed", "failed", "interrupted")
MANIFEST_FORMAT = 1

SOFTWARE = (
    "transformers",
    "torch",
    "datasets",
    "accelerate",
    "peft",
    "tokenizers",
    "huggingface_hub",
    "numpy",
)


# ---------------------------------------------------------------------------------------------------
# The facts


def software_versions() -> dict[str, str | None]:
    from importlib import metadata

    from clm_runner import __version__

    versions: dict[str, str | None] = {"clm_runner": __version__, "python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def platform_info() -> dict[str, Any]:
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python_implementation": platform.python_implementation(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
    }


def device_info(args: Any = None) -> dict[str, Any]:
    """The devices training runs on: the Trainer's device and world size, and every visible GPU."""
    import torch

    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "gpus": []}
    if torch.cuda.is_available():
        info["cuda_version"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if args is not None:
        info["device"] = str(args.device)
        info["world_size"] = int(args.world_size)
        info["n_gpu"] = int(args.n_gpu)
    return info


def git_state(path: Path | None = None) -> dict[str, Any] | None:
    """The commit (and whether the tree has changes) of the git checkout clm_runner runs from, if any."""
    where = path or Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status), "root": git("rev-parse", "--show-toplevel")}


def recipe_hash(resolved: Mapping[str, Any]) -> str:
    """sha256 of the resolved recipe as canonical JSON: equal hashes, equal effective settings."""
    text = json.dumps(resolved, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime())


# ---------------------------------------------------------------------------------------------------
# The file


class RunManifest:
    """The run.json of one training attempt; every change rewrites the file atomically."""

    def __init__(self, output_dir: Path, record: dict[str, Any], secrets: Sequence[str]) -> None:
        self.path = output_dir / MANIFEST_NAME
        self.record = record
        self._secrets = list(secrets)

    @classmethod
    def start(
        cls,
        output_dir: Path,
        *,
        recipe: Recipe,
        resolved: Mapping[str, Any],
        argv: Sequence[str],
        seed: int,
        data: Mapping[str, Any],
        devices: Mapping[str, Any],
        resumed_from: Path | None,
        branched_from: Mapping[str, Any] | None = None,
    ) -> RunManifest:
        """`branched_from`: the checkpoint this attempt was told to resume from (--resume-from); without
        one, an attempt continuing the run in the dir keeps the one its run.json named (the line's)."""
        secrets = secret_values(recipe)
        old = _read_record(output_dir / MANIFEST_NAME)
        previous = _previous_attempts(old)
        if branched_from is None and old is not None:
            branched_from = old.get("branched_from")
        record: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "status": "running",
            "command": redact_argv(argv, secrets),
            "cwd": os.getcwd(),
            "pid": os.getpid(),
            "recipe_file": recipe.source,
            "recipe": resolved,
            "recipe_hash": recipe_hash(resolved),
            "versions": software_versions(),
            "platform": platform_info(),
            "devices": dict(devices),
            "git": git_state(),
            "data": dict(data),
            "seed": seed,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "branched_from": dict(branched_from) if branched_from else None,
            "started_at": _now(),
            "ended_at": None,
            "global_step": None,
            "error": None,
            "previous_attempts": previous,
        }
        manifest = cls(output_dir, record, secrets)
        manifest.write()
        return manifest

    def update(self, **fields: Any) -> None:
        self.record.update(fields)
        self.write()

    def finish(self, status: str, *, global_step: int | None = None, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        self.update(status=status, ended_at=_now(), global_step=global_step, error=error)

    def write(self) -> None:
        text = json.dumps(self.record, indent=2, sort_keys=True, default=str) + "\n"
        write_text_atomic(self.path, scrub(text, self._secrets))


def _read_record(path: Path) -> dict[str, Any] | None:
    """The run.json an earlier attempt left in the output dir, if any (and readable)."""
    try:
        old = read_json(path)
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def _previous_attempts(old: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Earlier attempts in this output dir (a resumed run), newest last, without their own history."""
    if old is None:
        return []
    attempts = [a for a in old.get("previous_attempts", []) if isinstance(a, dict)]
    summary_keys = (
        "status",
        "command",
        "started_at",
        "ended_at",
        "global_step",
        "resumed_from",
        "branched_from",
        "recipe_hash",
        "error",
    )
    last = {key: old.get(key) for key in summary_keys}
    if last["status"] == "running":
        # We hold the output dir's lock, so that process is gone: it died (SIGKILL, power, OOM) mid-run.
        last["status"] = "failed"
        last["error"] = "the process ended without recording an end (killed?)"
    attempts.append(last)
    return attempts
