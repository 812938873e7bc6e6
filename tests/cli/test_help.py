"""Every command answers --help, and --help stays fast because heavy imports are deferred.

How fast is measured by benchmarks/cli_startup.py, not here: a wall-clock bound fails on a loaded machine.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import REPO

from clm_runner.cli import cli
from clm_runner.config.schema import tomllib

COMMANDS = [
    [],
    ["train"],
    ["eval"],
    ["data"],
    ["recipe"],
    ["recipe", "show"],
    ["recipe", "check"],
    ["recipe", "from-args"],
    ["report"],
    ["generate"],
    ["model"],
    ["export"],
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


def test_module_entry_point_version() -> None:
    out = subprocess.run([sys.executable, "-m", "clm_runner", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "clm-runner" in out.stdout


# What `make smoke-test` leaves: runs/smoke, its 4 epochs of ceil(580 blocks / 16) = 37 steps, of whose
# checkpoints save_total_limit = 2 keeps the last two.
# recipes/smoke-lora.toml: 1 epoch, 37 steps, one checkpoint.
SMOKE_RUN = {"runs/smoke", "runs/smoke/checkpoint-111", "runs/smoke/checkpoint-148"}
SMOKE_RUN |= {"runs/smoke-lora", "runs/smoke-lora/checkpoint-37"}


def _examples(text: str) -> list[list[str]]:
    return [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith("clm-runner ")]


def _output_dir(args: list[str]) -> str:
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    for item in sets:
        if item.startswith("training.output_dir="):
            return item.partition("=")[2]
    recipe = tomllib.loads((REPO / args[args.index("--recipe") + 1]).read_text())
    return recipe["training"]["output_dir"]


def test_help_examples_name_only_paths_that_exist_or_that_an_example_creates() -> None:
    """Examples in --help named directories that no command creates (runs/smoke/checkpoint-40)."""
    made = set(SMOKE_RUN)
    for command in COMMANDS:
        text = CliRunner().invoke(cli, [*command, "--help"]).output
        for args in _examples(text):
            if "train" in args:
                made.add(_output_dir(args))
            if "--" in args:  # what follows is another program's command line (recipe from-args)
                args = args[: args.index("--")]
            flags = dict(zip(args, args[1:], strict=False))
            if "--recipe" in flags:
                assert (REPO / flags["--recipe"]).is_file(), args
            runs = [value for flag, value in zip(args, args[1:], strict=False) if flag == "--run"]
            if not runs and args[1] in ("report", "generate", "export"):  # RUN, the positional alias
                runs = [a for a in args[2:] if not a.startswith("-")][: None if args[1] == "report" else 1]
            assert all(r in made for r in runs), args
            if "--checkpoint" in flags:
                assert f"{runs[0]}/{flags['--checkpoint']}" in made, args


@pytest.mark.parametrize(
    "args",
    [["train"], ["eval", "--stride", "x"], ["recipe", "check", "--recipe", "absent.toml"], ["nonsense"]],
    ids=["missing option", "bad option value", "user error", "unknown command"],
)
def test_every_error_is_one_lowercase_error_line(args: list[str], capsys: pytest.CaptureFixture) -> None:
    """Some errors began `Error:` (click's own) and others `error:`."""
    from clm_runner.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Error:" not in err
