"""The `clm-runner` click group, its shared options, and the entry point that turns errors into exit statuses.

Only click and the standard library are imported here, so `clm-runner --help` answers at once;
torch, transformers and datasets are imported inside the command bodies.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem

from clm_runner import __version__
from clm_runner.errors import ClmError

RECIPE_HELP = "TOML recipe file (see recipes/)."
SET_HELP = "Override one recipe key, e.g. --set training.learning_rate=1e-4 (repeatable; value read as TOML)."
RUN_HELP = "A trained run's output dir (a checkpoint dir works too)."
CHECKPOINT_HELP = "A checkpoint: its path, or its name inside --run (checkpoint-500)."
QUIET_HELP = "Plain log lines instead of live progress bars."
JSON_HELP = "Print one JSON document to stdout, for scripts."
DEBUG_HELP = "Show full tracebacks for errors."


def _remember_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # meta is shared by every context of one command line: the group's handler reads it
        ctx.meta["clm_runner.debug"] = True


def debug_option() -> click.Option:
    return click.Option(
        ["--debug"], is_flag=True, expose_value=False, callback=_remember_debug, help=DEBUG_HELP
    )


class ClmGroup(click.Group):
    """Turns user errors into one clear line and exit status 2; --debug keeps the traceback.

    Every command added takes the global --debug too, so it works after the subcommand as before it.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any(param.name == "debug" for param in cmd.params):
            cmd.params.append(debug_option())
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ClmError as exc:
            if ctx.meta.get("clm_runner.debug"):
                raise
            if not exc.quiet:
                click.echo(f"error: {_masked(str(exc))}", err=True)
            ctx.exit(exc.exit_code)


def complete_set(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Shell completion of --set: the sections, then each section's keys (from the recipe schema)."""
    from clm_runner.config.load import section_keys
    from clm_runner.config.schema import ALL_SECTIONS

    section, dot, _ = incomplete.partition(".")
    if not dot:
        return [CompletionItem(f"{name}.") for name in ALL_SECTIONS if name.startswith(incomplete)]
    return [
        CompletionItem(f"{section}.{key}=")
        for key in section_keys(section)
        if f"{section}.{key}".startswith(incomplete.partition("=")[0])
    ]


def recipe_options(required: bool = True):
    def decorate(fn):
        fn = click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help=SET_HELP,
            shell_complete=complete_set,
        )(fn)
        fn = click.option(
            "--recipe",
            "-r",
            "recipe_path",
            required=required,
            type=click.Path(),  # completes file names; the recipe reader says what is wrong with one
            metavar="FILE",
            help=RECIPE_HELP,
        )(fn)
        return fn

    return decorate


def run_option(*, multiple: bool = False, help: str = RUN_HELP):
    return click.option(
        "--run", "run_dir", type=click.Path(), multiple=multiple, default=None, metavar="DIR", help=help
    )


def checkpoint_option():
    return click.option(
        "--checkpoint", type=click.Path(), default=None, metavar="PATH|NAME", help=CHECKPOINT_HELP
    )


def quiet_option():
    return click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)


def json_option():
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)


def output_option(what: str, *, metavar: str = "FILE", required: bool = False, stdout: bool = True):
    """-o/--output: where the command's result goes; "-" is stdout wherever the result is a stream."""
    help_text = f"{what} ('-': standard output)." if stdout else f"{what}."
    return click.option(
        "--output", "-o", type=click.Path(), required=required, default=None, metavar=metavar, help=help_text
    )


def one_run(positional: str | None, option: str | None) -> str | None:
    """RUN given as a positional argument (kept as an alias) or as --run DIR: the same thing, once."""
    if positional is not None and option is not None and positional != option:
        raise click.UsageError(f"RUN {positional} and --run {option} name two runs; give one.")
    return option if option is not None else positional


def model_location(run: str | None, checkpoint: str | None) -> Path:
    """--run and --checkpoint together: the checkpoint (a path, or a name inside the run), else the run."""
    if checkpoint is not None:
        from clm_runner.rundir.checkpoints import resolve_checkpoint

        return resolve_checkpoint(Path(run) if run is not None else None, checkpoint)
    if run is None:
        raise click.UsageError("Say which run: --run DIR (or --checkpoint PATH).")
    return Path(run)


def refuse_existing(output: str | None, option: str = "--output") -> None:
    """A file an --output would replace is refused: nothing already on disk is lost."""
    if output not in (None, "-") and Path(output).exists():
        raise click.UsageError(f"{option} {output} exists; remove it or choose another path.")


def print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))


@click.group(cls=ClmGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="clm-runner")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Fine-tune and evaluate causal language models from one TOML recipe.

    \b
    Examples:
      clm-runner train --recipe recipes/gpt2-wikitext.toml
      clm-runner eval --run runs/gpt2-wikitext
      clm-runner recipe show --recipe recipes/smoke.toml --set training.num_train_epochs=1
      clm-runner recipe from-args -- --model_name_or_path gpt2 --dataset_name wikitext ...

    \b
    Shell completion (bash; zsh and fish: see the README):
      eval "$(_CLM_RUNNER_COMPLETE=bash_source clm-runner)"
    """
    if debug:
        ctx.meta["clm_runner.debug"] = True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for the console script and `python -m clm_runner`; returns the exit status."""
    from clm_runner.cli.streams import survive_closed_output

    survive_closed_output()
    try:
        return _run(argv)
    finally:
        if "torch.distributed" in sys.modules:  # never imported by --help and the light commands
            from clm_runner.train.distributed import leave_process_group

            leave_process_group()


def _run(argv: Sequence[str] | None) -> int:
    try:
        # With standalone_mode=False click returns ctx.exit()'s status instead of raising it.
        status = cli.main(
            args=list(argv) if argv is not None else None, prog_name="clm-runner", standalone_mode=False
        )
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        # One form for every error, click's usage errors included: "error: what (see COMMAND --help)".
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        return 130
    except Exception:
        # A crash keeps its traceback (exit 1, as Python's own), with any secret in its text masked.
        import traceback

        sys.stderr.write(_masked(traceback.format_exc()))
        return 1
    return status if isinstance(status, int) else 0


def _masked(text: str) -> str:
    from clm_runner.config.secrets import scrub, secret_values

    return scrub(text, secret_values())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
