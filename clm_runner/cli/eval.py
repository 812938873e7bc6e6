"""`clm-runner eval`: hand the request to clm_runner.eval.job and print what it measured."""

from __future__ import annotations

import click

from clm_runner.cli.app import (
    checkpoint_option,
    cli,
    json_option,
    output_option,
    print_json,
    quiet_option,
    recipe_options,
    run_option,
)


@cli.command("eval")
@run_option()
@recipe_options(required=False)
@checkpoint_option()
@click.option(
    "--all-checkpoints", is_flag=True, help="Evaluate every checkpoint of --run (writes eval_history.json)."
)
@click.option("--split", default=None, help="Split to score: validation (default), test or train.")
@click.option("--stride", type=int, default=None, help="Strided sliding-window perplexity with this stride.")
@click.option(
    "--documents",
    is_flag=True,
    help="Score each document on its own in rolling windows: lm-evaluation-harness's word_perplexity, "
    "byte_perplexity and bits_per_byte.",
)
@click.option(
    "--context",
    type=int,
    default=None,
    help="Window length for --stride (default: the block size) or --documents (default: the model's).",
)
@output_option(
    "Write the metrics as JSON, numbers only (run_clm's keys); with --all-checkpoints, eval_history.json's "
    "document (how, once; each checkpoint's name and numbers)"
)
@json_option()
@quiet_option()
def eval_command(
    run_dir: str | None,
    recipe_path: str | None,
    overrides: tuple[str, ...],
    checkpoint: str | None,
    all_checkpoints: bool,
    split: str | None,
    stride: int | None,
    documents: bool,
    context: int | None,
    output: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Perplexity of a trained run, one checkpoint, or any model.

    The metrics files hold numbers only, with run_clm's keys; how each was computed (split, method, block
    size, model, data) is in the run's evaluations.json, and in --json's document.

    \b
    Examples:
      clm-runner eval --run runs/smoke
      clm-runner eval --run runs/smoke --checkpoint checkpoint-111 --split test
      clm-runner eval --run runs/smoke --json
      clm-runner eval --recipe recipes/gpt2-wikitext.toml --set model.model_name_or_path=gpt2 --stride 512
      clm-runner eval --recipe recipes/gpt2-wikitext.toml --split test --documents
    """
    if run_dir is None and recipe_path is None:
        raise click.UsageError(
            "Say what to evaluate: --run DIR (a trained run) or --recipe FILE (any model)."
        )
    to_stdout = output == "-"
    if to_stdout and as_json:
        raise click.UsageError("--json and --output - both print to standard output; choose one.")
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
            output=None if to_stdout else output,
            quiet=quiet,
            documents=documents,
        )
    )
    if as_json:
        print_json(
            {
                "evaluations": [row.document() for row in outcome.rows],
                "written": [str(path) for path in outcome.written],
            }
        )
        return
    # With the metrics on standard output, the table and the file list go to standard error.
    render = render_documents_table if documents else render_eval_table
    click.echo(render(outcome.rows, label=outcome.label), err=to_stdout)
    for path in outcome.written:
        click.echo(f"Wrote {path}", err=to_stdout)
    if to_stdout:
        print_json(outcome.output_document)


def render_eval_table(rows: list, *, label: str = "split") -> str:
    """One line per evaluation; a [[data.mix]] evaluation also one per source, before its total."""
    from clm_runner.cli.tables import render_table

    headers = [label, "method", "blocks", "tokens", "loss", "perplexity", "accuracy"]
    lines = []
    for row in rows:
        r, about = row.metrics, row.description
        what, method = str(about.get(label, about.get("split"))), str(about.get("method", "blocks"))
        for name in about.get("sources") or []:
            lines.append(
                [
                    f"{what}: {name}",
                    method,
                    f"{r[f'eval_{name}_samples']:,}",
                    f"{r[f'eval_{name}_tokens']:,}",
                    f"{r[f'eval_{name}_loss']:.4f}",
                    f"{r[f'eval_{name}_perplexity']:.3f}",
                    f"{r[f'eval_{name}_accuracy']:.4f}",
                ]
            )
        lines.append(
            [
                f"{what}: all" if about.get("sources") else what,
                method,
                f"{r['eval_samples']:,}",
                f"{r['eval_tokens']:,}",
                f"{r['eval_loss']:.4f}",
                f"{r['perplexity']:.3f}",
                f"{r['eval_accuracy']:.4f}",
            ]
        )
    return render_table(headers, lines, left_columns=2)


DOCUMENT_COLUMNS = (
    ("documents", "documents"),
    ("tokens", "tokens"),
    ("words", "words"),
    ("bytes", "bytes"),
    ("perplexity", "perplexity"),
    ("word ppl", "word_perplexity"),
    ("byte ppl", "byte_perplexity"),
    ("bits/byte", "bits_per_byte"),
)


def render_documents_table(rows: list, *, label: str = "split") -> str:
    """One line per per-document evaluation (a [[data.mix]] one: one per source too), then its convention."""
    from clm_runner.cli.tables import render_table

    lines = []
    for row in rows:
        r, about = row.metrics, row.description
        what = str(about.get(label, about.get("split")))
        named = [(f"{what}: {name}", f"eval_{name}_") for name in about.get("sources") or []]
        named.append((f"{what}: all" if about.get("sources") else what, ""))
        for title, prefix in named:
            lines.append([title, *(_figure(r.get(prefix + key)) for _, key in DOCUMENT_COLUMNS)])
    table = render_table([label, *(header for header, _ in DOCUMENT_COLUMNS)], lines)
    about = rows[0].description
    windows = f"windows of {about['context']} tokens; documents: {about['documents_from']}"
    return f"{table}\n{windows}\n{about['convention']}"


def _figure(value: object) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 100 else f"{value:,.2f}"
    return "n/a"
