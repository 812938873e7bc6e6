"""Every command answers --help, and --help stays fast because heavy imports are deferred."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from clm_runner.cli import cli

COMMANDS = [
    [],
    ["train"],
    ["eval"],
    ["data"],
    ["recipe"],
    ["recipe", "show"],
    ["recipe", "check"],
    ["report"],
    ["generate"],
    ["model"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "clm-runner")
def test_help(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_every_registered_command_is_covered() -> None:
    top = set(cli.commands)
    assert top <= {c[0] for c in COMMANDS if c}


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys; from clm_runner.cli import main; "
        "main(['--help']); "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'accelerate', 'matplotlib') if m in sys.modules]; "
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_help_answers_within_0_3_seconds() -> None:
    best = min(_time_help() for _ in range(3))
    assert best < 0.3, f"clm-runner --help took {best:.3f}s"


def _time_help() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clm_runner", "--help"], capture_output=True, check=True)
    return time.perf_counter() - start


def test_module_entry_point_version() -> None:
    out = subprocess.run([sys.executable, "-m", "clm_runner", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "clm-runner" in out.stdout
