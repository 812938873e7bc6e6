"""`clm-runner generate`: continue a prompt with a trained run."""

from __future__ import annotations

import click

from clm_runner.cli.app import (
    checkpoint_option,
    cli,
    complete_set,
    model_location,
    one_run,
    quiet_option,
    run_option,
)


@cli.command()
@click.argument("run", type=click.Path(), required=False, metavar="[RUN]")
@run_option(help="A trained run's output dir, a checkpoint dir or any model dir (RUN is the same).")
@checkpoint_option()
@click.option("--prompt", "-p", required=True, help="Text the generation starts from.")
@click.option("--max-new-tokens", type=int, default=50, show_default=True, help="Tokens to add.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 means greedy decoding.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option(
    "--top-k", type=int, default=50, show_default=True, help="Sample among the k likeliest (0: off)."
)
@click.option("--seed", type=int, default=None, help="Same seed, same text.")
@click.option("--num-samples", "-n", type=int, default=1, show_default=True, help="Texts to generate.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    shell_complete=complete_set,
    metavar="model.KEY=VALUE",
    help="For an adapter run: where its base model is, e.g. --set model.model_name_or_path=DIR.",
)
@quiet_option()
def generate(
    run: str | None,
    run_dir: str | None,
    checkpoint: str | None,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    num_samples: int,
    overrides: tuple[str, ...],
    quiet: bool,
) -> None:
    """Continue a prompt with a trained run (or any checkpoint or model directory).

    \b
    An adapter run (LoRA) is put back on its base model, found in the run's recipe.toml.

    \b
    Examples:
      clm-runner generate --run runs/smoke --prompt " = Valley of" --seed 1 --num-samples 2
      clm-runner generate --run runs/smoke-lora --checkpoint checkpoint-37 --prompt " = Valley of" --temperature 0
    """
    from clm_runner.logs import setup_logging
    from clm_runner.models.generate import generate_text

    source = model_location(one_run(run, run_dir), checkpoint)
    setup_logging(quiet=quiet)
    texts = generate_text(
        source,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        num_samples=num_samples,
        overrides=overrides,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            click.echo(f"--- sample {i + 1} ---")
        click.echo(text)
