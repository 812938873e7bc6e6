"""One grammar across commands: every command's click parameters walked, and the behaviour behind each rule.

--run DIR names a run wherever one is used (the positional RUN kept as an alias); --checkpoint takes a path or
a name; -o/--output is where the result goes, "-" standard output where the result is a stream; --quiet on
every command that logs; --json on the commands scripts read; --debug before or after the subcommand; file
completion for --recipe and key completion for --set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import REPO, SMOKE, sets

from clm_runner.cli import cli, main

RUN_COMMANDS = {"eval", "model", "generate", "export", "report"}
"""Commands that read a trained run."""
POSITIONAL_RUN = {"generate", "export", "report"}
"""Commands that took the run as a positional argument before --run: RUN stays as an alias."""
LOGGING = {"train", "eval", "data", "generate", "export", "model", "recipe check"}
"""Commands that log (progress bars or log lines while they load models or data)."""
JSON = {"data", "recipe show", "model", "report", "eval"}
STREAM_OUTPUT = {"eval", "report", "recipe show", "recipe from-args"}
"""Commands whose --output is a file ("-": standard output); export's is a directory."""


def leaf_commands(group: click.Group = cli, prefix: str = "") -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            out.update(leaf_commands(command, f"{path} "))
        else:
            out[path] = command
    return out


def option(command: click.Command, flag: str) -> click.Option | None:
    return next((p for p in command.params if isinstance(p, click.Option) and flag in p.opts), None)


COMMANDS = leaf_commands()


def test_the_walk_sees_every_command() -> None:
    assert set(COMMANDS) == {
        "train", "eval", "data", "report", "generate", "model", "export",
        "recipe show", "recipe check", "recipe from-args",
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_follows_the_grammar(name: str) -> None:
    command = COMMANDS[name]
    run = option(command, "--run")
    assert (run is not None) == (name in RUN_COMMANDS), name
    if run is not None:
        assert run.metavar == "DIR" and isinstance(run.type, click.Path), name
    positional = [p for p in command.params if isinstance(p, click.Argument) and p.name == "run"]
    if name in POSITIONAL_RUN - {"report"}:
        assert positional and not positional[0].required, name
    checkpoint = option(command, "--checkpoint")
    if checkpoint is not None:
        assert checkpoint.metavar == "PATH|NAME" and isinstance(checkpoint.type, click.Path), name
        assert "path, or its name inside --run" in checkpoint.help
    output = option(command, "--output")
    if output is not None:
        assert "-o" in output.opts and isinstance(output.type, click.Path), name
        assert ("'-': standard output" in output.help) == (name in STREAM_OUTPUT), name
    quiet = option(command, "--quiet")
    assert (quiet is not None) == (name in LOGGING), name
    if quiet is not None:
        assert "-q" in quiet.opts and quiet.is_flag
    as_json = option(command, "--json")
    assert (as_json is not None) == (name in JSON), name
    debug = option(command, "--debug")
    assert debug is not None and debug.is_flag, name  # the global option, after the subcommand too
    recipe = option(command, "--recipe")
    if recipe is not None:
        assert isinstance(recipe.type, click.Path), name  # the shell completes file names
    overrides = option(command, "--set")
    if overrides is not None:
        assert overrides._custom_shell_complete is not None, name


def test_every_run_command_has_a_checkpoint_option_but_report() -> None:
    for name in RUN_COMMANDS - {"report"}:
        assert option(COMMANDS[name], "--checkpoint") is not None, name


# ---------------------------------------------------------------------------------------------------
# The behaviour behind the rules


class Logged(Exception):
    """Raised by a stand-in for setup_logging: what the command asked for."""


@pytest.mark.parametrize("name", sorted(LOGGING))
@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_reaches_the_logging_setup(name: str, quiet: bool, monkeypatch, tmp_path: Path) -> None:
    """--quiet is not decoration: each command hands it to clm_runner.logs.setup_logging."""
    import clm_runner.logs

    def record(*, quiet: bool = False) -> bool:
        raise Logged(quiet)

    monkeypatch.setattr(clm_runner.logs, "setup_logging", record)
    recipe = ["--recipe", str(SMOKE), *sets(f"training.output_dir={tmp_path / 'out'}")]
    args = {
        "train": ["train", *recipe],
        "eval": ["eval", *recipe],
        "data": ["data", *recipe],
        "generate": ["generate", "--run", str(tmp_path), "--prompt", "x"],
        "export": ["export", "--run", str(tmp_path), "--output", str(tmp_path / "x")],
        "model": ["model", *recipe],
        "recipe check": ["recipe", "check", *recipe],
    }[name]
    result = CliRunner().invoke(cli, [*args, *(["--quiet"] if quiet else [])])
    assert isinstance(result.exception, Logged), result.output
    assert result.exception.args == (quiet,)


def test_debug_after_the_subcommand_shows_the_traceback(capsys) -> None:
    """`train --debug` was "No such option"."""
    assert main(["train", "--recipe", "absent.toml"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    for argv in (
        ["--debug", "train", "--recipe", "absent.toml"],
        ["train", "--recipe", "absent.toml", "--debug"],
        ["recipe", "show", "--debug", "--recipe", "absent.toml"],
    ):
        # --debug lets the error through as a crash: its traceback (secrets masked), exit status 1.
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "RecipeError" in err and "absent.toml" in err, err


@pytest.mark.parametrize("command", ["generate", "export"])
def test_run_and_its_positional_alias_name_one_run(command: str, tmp_path: Path, capsys) -> None:
    extra = ["--prompt", "x"] if command == "generate" else ["--output", str(tmp_path / "out")]
    assert main([command, "runs/a", "--run", "runs/b", *extra]) == 2
    assert "name two runs" in capsys.readouterr().err
    assert main([command, *extra]) == 2
    assert "--run DIR" in capsys.readouterr().err


def test_an_export_to_standard_output_is_refused(capsys) -> None:
    assert main(["export", "--run", "runs/smoke", "--output", "-"]) == 2
    assert "a directory of files" in capsys.readouterr().err


def test_recipe_show_json_and_output(tmp_path: Path) -> None:
    out = tmp_path / "resolved.toml"
    base = ["recipe", "show", "--recipe", str(SMOKE)]
    result = CliRunner().invoke(cli, [*base, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "[training]" in out.read_text()
    result = CliRunner().invoke(cli, [*base, "--output", str(out)])
    assert result.exit_code == 2 and "exists" in result.output  # nothing on disk is lost
    result = CliRunner().invoke(cli, [*base, "--json", "--set", "data.block_size=64"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["data"]["block_size"] == 64 and "learning_rate" in document["training"]
    assert CliRunner().invoke(cli, [*base, "-o", "-"]).stdout.startswith("# Resolved from")


def test_model_json_counts_the_parameters() -> None:
    result = CliRunner().invoke(cli, ["model", "--recipe", str(SMOKE), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    text = CliRunner().invoke(cli, ["model", "--recipe", str(SMOKE), "--quiet"]).stdout
    assert f"total_parameters: {document['total_parameters']}" in text
    assert document["flops_per_token"] > 0 and document["root"]["children"]


# ---------------------------------------------------------------------------------------------------
# Shell completion


def complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash completion offers for the last word of `words` (click's bash_complete protocol)."""
    environment = {
        **os.environ,
        **(env or {}),
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
        "_CLM_RUNNER_COMPLETE": "bash_complete",
    }
    code = "import sys; from clm_runner.cli import main; sys.exit(main())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    return [line.split(",", 1)[1] for line in out.stdout.splitlines() if "," in line]


def test_set_completes_sections_then_keys_and_recipe_completes_files() -> None:
    assert complete("clm-runner train --set da") == ["data."]
    keys = complete("clm-runner train --set data.block")
    assert keys == ["data.block_size="]
    assert "eval.stride=" in complete("clm-runner eval --set eval.")
    assert complete("clm-runner train --set training.learning_ra") == ["training.learning_rate="]
    environment = {"COMP_WORDS": "clm-runner train --recipe recipes/sm"}
    assert complete(environment["COMP_WORDS"]) == ["recipes/sm"]  # "file": the shell lists the files


def test_completion_script_is_what_the_readme_says() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for shell in ("bash", "zsh", "fish"):
        assert f"_CLM_RUNNER_COMPLETE={shell}_source clm-runner" in readme
    out = subprocess.run(
        [sys.executable, "-m", "clm_runner"],
        env={**os.environ, "_CLM_RUNNER_COMPLETE": "bash_source"},
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert "complete -o nosort -F" in out.stdout or "_clm_runner_completion" in out.stdout
