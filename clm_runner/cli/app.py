"""The `clm-runner` command line: parse, validate, report. The work lives in plain modules.

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
                click.echo(f"error: {exc}", err=True)
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


# ---------------------------------------------------------------------------------------------------
# recipe


@cli.group(cls=ClmGroup)
def recipe() -> None:
    """Inspect and validate recipes without running them."""


@recipe.command("show")
@recipe_options()
def recipe_show(recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved recipe as TOML, every default filled in.

    \b
    Example:
      clm-runner recipe show --recipe recipes/smoke.toml --set data.block_size=64
    """
    from clm_runner.config.schema import load_recipe, render_toml, resolved_dict, unrecorded_secrets
    from clm_runner.train.run import training_kwargs

    loaded = load_recipe(recipe_path, overrides)
    # The values `train` will use here: what it always sets (do_train, do_eval) and this device's defaults.
    resolved = resolved_dict(loaded, training_overrides=training_kwargs(loaded))
    header = f"Resolved from {recipe_path}: every key with the value `clm-runner train` uses on this machine"
    click.echo(render_toml(resolved, header=header, unrecorded=unrecorded_secrets(loaded)), nl=False)


@recipe.command("check")
@recipe_options()
def recipe_check(recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Run every check `train` runs before any heavy work, without training.

    Keys, types and values; the TrainingArguments train would build; files and directories the recipe
    names; the tokenizer, config and block size; the hub where it is needed; and what the output dir
    allows (new, resume, refused).

    \b
    Example:
      clm-runner recipe check --recipe recipes/smoke.toml
    """
    from clm_runner.config.schema import load_recipe
    from clm_runner.logs import setup_logging
    from clm_runner.train.run import TrainOptions, prepare_run

    setup_logging(quiet=True)
    loaded = load_recipe(recipe_path, overrides)
    setup = prepare_run(loaded, TrainOptions())
    click.echo(f"{recipe_path}: ok (block_size {setup.block_size}). {setup.plan.note}")


# ---------------------------------------------------------------------------------------------------
# train / eval / data


@cli.command()
@recipe_options()
@click.option("--overwrite", is_flag=True, help="Train into a non-empty output dir that holds no checkpoint.")
@click.option("--no-resume", is_flag=True, help="Start from scratch even if the output dir has checkpoints.")
@click.option(
    "--resume-from",
    type=click.Path(),
    default=None,
    metavar="CHECKPOINT",
    help="Resume from this checkpoint.",
)
@click.option("--quiet", "-q", is_flag=True, help="Plain log lines instead of live progress bars.")
def train(
    recipe_path: str,
    overrides: tuple[str, ...],
    overwrite: bool,
    no_resume: bool,
    resume_from: str | None,
    quiet: bool,
) -> None:
    """Fine-tune (or train from scratch) as the recipe says, then evaluate.

    A non-empty output dir is refused unless it holds checkpoints, which are resumed from.

    \b
    Examples:
      clm-runner train --recipe recipes/gpt2-wikitext.toml
      clm-runner train --recipe recipes/smoke.toml --set training.num_train_epochs=1
    """
    from clm_runner.config.schema import load_recipe

    loaded = load_recipe(recipe_path, overrides)
    from clm_runner.train.run import TrainOptions, run_training

    run_training(
        loaded,
        TrainOptions(
            overwrite=overwrite,
            resume=not no_resume,
            resume_from=resume_from,
            quiet=quiet,
            argv=tuple(sys.argv),
        ),
    )


@cli.command("eval")
@click.option(
    "--run", "run_dir", type=click.Path(), default=None, metavar="DIR", help="A trained run's output dir."
)
@recipe_options(required=False)
@click.option(
    "--checkpoint", type=click.Path(), default=None, metavar="PATH", help="Evaluate this checkpoint."
)
@click.option(
    "--all-checkpoints", is_flag=True, help="Evaluate every checkpoint of --run (writes eval_history.json)."
)
@click.option("--split", default=None, help="Split to score: validation (default), test or train.")
@click.option("--stride", type=int, default=None, help="Strided sliding-window perplexity with this stride.")
@click.option(
    "--context", type=int, default=None, help="Window length for --stride (default: the block size)."
)
@click.option(
    "--output", "-o", type=click.Path(), default=None, metavar="FILE", help="Write the metrics as JSON."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def eval_command(
    run_dir: str | None,
    recipe_path: str | None,
    overrides: tuple[str, ...],
    checkpoint: str | None,
    all_checkpoints: bool,
    split: str | None,
    stride: int | None,
    context: int | None,
    output: str | None,
    quiet: bool,
) -> None:
    """Perplexity of a trained run, one checkpoint, or any model.

    \b
    Examples:
      clm-runner eval --run runs/smoke
      clm-runner eval --run runs/smoke --checkpoint checkpoint-111 --split test
      clm-runner eval --recipe recipes/gpt2-wikitext.toml --set model.model_name_or_path=gpt2 --stride 512
    """
    if run_dir is None and recipe_path is None:
        raise click.UsageError(
            "Say what to evaluate: --run DIR (a trained run) or --recipe FILE (any model)."
        )
    from clm_runner.eval.job import EvalRequest, run_eval

    outcome = run_eval(
        EvalRequest(
            run_dir=run_dir,
            recipe_path=recipe_path,
            overrides=overrides,
            checkpoint=checkpoint,
            all_checkpoints=all_checkpoints,
            split=split,
            stride=stride,
            context=context,
            output=output,
            quiet=quiet,
        )
    )
    click.echo(render_eval_table(outcome.rows, label=outcome.label))
    for path in outcome.written:
        click.echo(f"Wrote {path}")


def render_eval_table(rows: list[dict], *, label: str = "split") -> str:
    from clm_runner.cli.tables import render_table

    headers = [label, "method", "blocks", "tokens", "loss", "perplexity", "accuracy"]
    lines = [
        [
            str(r.get(label, r.get("split"))),
            str(r.get("method", "blocks")),
            f"{r['eval_samples']:,}",
            f"{r['eval_tokens']:,}",
            f"{r['eval_loss']:.4f}",
            f"{r['perplexity']:.3f}",
            f"{r['eval_accuracy']:.4f}",
        ]
        for r in rows
    ]
    return render_table(headers, lines, left_columns=2)


@cli.command()
@recipe_options()
@click.option(
    "--save", type=click.Path(), default=None, metavar="DIR", help="Write the blocks with save_to_disk."
)
def data(recipe_path: str, overrides: tuple[str, ...], save: str | None) -> None:
    """Prepare (and cache) the recipe's data; print rows, tokens and blocks per split.

    \b
    Example:
      clm-runner data --recipe recipes/smoke.toml --save /tmp/smoke-blocks
    """
    from clm_runner.config.schema import load_recipe

    loaded = load_recipe(recipe_path, overrides, require_output_dir=False)
    from clm_runner.data.summary import run_data

    run_data(loaded, save=save)


# ---------------------------------------------------------------------------------------------------
# report / generate / model


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(), metavar="RUN [RUN ...]")
def report(runs: tuple[str, ...]) -> None:
    """Plot loss, perplexity and learning rate of runs; print a summary table.

    Writes report.png into the first run's directory; several runs are overlaid.

    \b
    Examples:
      clm-runner report runs/smoke
      clm-runner train --recipe recipes/smoke.toml --set training.learning_rate=3e-3 --set training.output_dir=runs/smoke-lr3e-3
      clm-runner report runs/smoke runs/smoke-lr3e-3
    """
    from pathlib import Path

    from clm_runner.rundir.report import load_run, plot_runs, render_table, summarize

    histories = [load_run(Path(r)) for r in runs]
    click.echo(render_table(summarize(histories)))
    out = plot_runs(histories, Path(runs[0]) / "report.png")
    click.echo(f"\nWrote {out}")


@cli.command()
@click.argument("run", type=click.Path(), metavar="RUN")
@click.option("--prompt", "-p", required=True, help="Text the generation starts from.")
@click.option("--max-new-tokens", type=int, default=50, show_default=True, help="Tokens to add.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 means greedy decoding.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option(
    "--top-k", type=int, default=50, show_default=True, help="Sample among the k likeliest (0: off)."
)
@click.option("--seed", type=int, default=None, help="Same seed, same text.")
@click.option("--num-samples", "-n", type=int, default=1, show_default=True, help="Texts to generate.")
def generate(
    run: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    num_samples: int,
) -> None:
    """Continue a prompt with a trained run (or any checkpoint or model directory).

    \b
    Example:
      clm-runner generate runs/smoke --prompt " = Valley of" --seed 1 --num-samples 2
    """
    from clm_runner.logs import setup_logging
    from clm_runner.models.generate import generate_text

    setup_logging(quiet=True)
    texts = generate_text(
        run,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        num_samples=num_samples,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            click.echo(f"--- sample {i + 1} ---")
        click.echo(text)


@cli.command("model")
@recipe_options()
def model_command(recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Show the model's architecture, exact parameter count and FLOPs per token (no weights loaded).

    \b
    Example:
      clm-runner model --recipe recipes/gpt2-wikitext.toml
    """
    from clm_runner.config.schema import load_recipe

    loaded = load_recipe(recipe_path, overrides, require_output_dir=False)
    from clm_runner.models.loading import load_config
    from clm_runner.models.summary import describe_model, render_summary

    config = load_config(loaded.model)
    click.echo(render_summary(describe_model(config, seq_len=loaded.data.block_size)))


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
    return status if isinstance(status, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
