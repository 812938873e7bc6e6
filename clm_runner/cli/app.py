"""The `clm-runner` click group, its shared options, and the entry point that turns errors into exit statuses.

Only click and the standard library are imported here, so `clm-runner --help` answers at once;
torch, transformers and datasets are imported inside the command bodies.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from clm_runner import __version__
from clm_runner.errors import ClmError

RECIPE_HELP = "TOML recipe file (see recipes/)."
SET_HELP = "Override one recipe key, e.g. --set training.learning_rate=1e-4 (repeatable; value read as TOML)."


class ClmGroup(click.Group):
    """Turns user errors into one clear line and exit status 2; --debug keeps the traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ClmError as exc:
            if ctx.meta.get("clm_runner.debug"):
                raise
            if not exc.quiet:
                click.echo(f"error: {_masked(str(exc))}", err=True)
            ctx.exit(exc.exit_code)


def recipe_options(required: bool = True):
    def decorate(fn):
        fn = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)(fn)
        fn = click.option(
            "--recipe", "-r", "recipe_path", required=required, metavar="FILE", help=RECIPE_HELP
        )(fn)
        return fn

    return decorate


@click.group(cls=ClmGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="clm-runner")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Fine-tune and evaluate causal language models from one TOML recipe.

    \b
    Examples:
      clm-runner train --recipe recipes/gpt2-wikitext.toml
      clm-runner eval --run runs/gpt2-wikitext
      clm-runner recipe show --recipe recipes/smoke.toml --set training.num_train_epochs=1
    """
    ctx.meta["clm_runner.debug"] = debug


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
