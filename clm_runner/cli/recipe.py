"""`clm-runner recipe show|check|from-args`: the resolved recipe, every check `train` runs before any work, and
run_clm.py's arguments turned into a recipe."""

from __future__ import annotations

from pathlib import Path

import click

from clm_runner.cli.app import (
    ClmGroup,
    cli,
    json_option,
    output_option,
    quiet_option,
    recipe_options,
    refuse_existing,
)


@cli.group(cls=ClmGroup)
def recipe() -> None:
    """Inspect, validate and convert recipes without running them."""


@recipe.command("show")
@recipe_options()
@output_option("Write the recipe to FILE, a new file (default: standard output)")
@json_option()
def recipe_show(recipe_path: str, overrides: tuple[str, ...], output: str | None, as_json: bool) -> None:
    """Print the fully resolved recipe as TOML (or JSON), every default filled in.

    \b
    Examples:
      clm-runner recipe show --recipe recipes/smoke.toml --set data.block_size=64
      clm-runner recipe show --recipe recipes/smoke.toml --json
    """
    import json

    from clm_runner.config.load import load_recipe
    from clm_runner.config.render import render_toml, resolved_dict, unrecorded_secrets
    from clm_runner.train.setup import training_kwargs

    refuse_existing(output)
    loaded = load_recipe(recipe_path, overrides)
    # The values `train` will use here: what it always sets (do_train, do_eval) and this device's defaults.
    resolved = resolved_dict(loaded, training_overrides=training_kwargs(loaded))
    if as_json:
        text = json.dumps(resolved, indent=2, sort_keys=True, default=str) + "\n"
    else:
        header = (
            f"Resolved from {recipe_path}: every key with the value `clm-runner train` uses on this machine"
        )
        text = render_toml(resolved, header=header, unrecorded=unrecorded_secrets(loaded))
    write_text(output, text)


@recipe.command("check")
@recipe_options()
@quiet_option()
def recipe_check(recipe_path: str, overrides: tuple[str, ...], quiet: bool) -> None:
    """Run every check `train` runs before any heavy work, without training.

    Keys, types and values; the TrainingArguments train would build; files and directories the recipe
    names; the tokenizer, config and block size; where [adapter]'s adapters go; the hub where it is
    needed; and what the output dir allows (new, resume, refused).

    \b
    Example:
      clm-runner recipe check --recipe recipes/smoke.toml
    """
    from clm_runner.config.load import load_recipe
    from clm_runner.logs import setup_logging
    from clm_runner.train.setup import TrainOptions, prepare_run

    setup_logging(quiet=quiet)
    loaded = load_recipe(recipe_path, overrides)
    setup = prepare_run(loaded, TrainOptions(quiet=quiet))
    click.echo(f"{recipe_path}: ok (block_size {setup.block_size}). {setup.plan.note}")
    if setup.adapter is not None:
        click.echo(setup.adapter.describe())


@recipe.command(
    "from-args",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@output_option("Write the recipe to FILE, a new file (default: standard output)")
@click.option(
    "--clm-runner-defaults",
    is_flag=True,
    help="Leave clm-runner's defaults where they differ from run_clm's (grouping, GPU speed-ups, "
    "block size refusal, final evaluation) instead of pinning run_clm's choice.",
)
@click.argument("run_clm_args", nargs=-1, type=click.UNPROCESSED, metavar="-- RUN_CLM_ARGS... | ARGS.json")
def recipe_from_args(output: str | None, clm_runner_defaults: bool, run_clm_args: tuple[str, ...]) -> None:
    """Turn run_clm.py's arguments (its flags, or its JSON file) into a commented TOML recipe.

    The recipe trains what run_clm would have: every flag becomes its recipe key, transformers' renames
    done, and where clm-runner's defaults differ from run_clm's, run_clm's choice is pinned with a comment
    (unless --clm-runner-defaults). A flag clm-runner has no equivalent for is refused, naming the fix.

    \b
    Examples:
      clm-runner recipe from-args -- --model_name_or_path openai-community/gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --do_train --do_eval --output_dir runs/gpt2-wikitext
      clm-runner recipe from-args --output job.toml args.json
    """
    from clm_runner.config.from_run_clm import convert_run_clm_args

    refuse_existing(output)
    converted = convert_run_clm_args(
        list(run_clm_args), clm_runner_defaults=clm_runner_defaults, recipe_path=output
    )
    write_text(output, converted.text)
    if output not in (None, "-"):
        click.echo(f"Wrote {output}: run it with clm-runner {converted.command} --recipe {output}", err=True)


def write_text(output: str | None, text: str) -> None:
    """Standard output for none or "-", else a new file."""
    if output in (None, "-"):
        click.echo(text, nl=False)
        return
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
