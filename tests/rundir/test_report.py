"""Run reports: trainer_state.json parsing, the comparison table and the PNG of curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clm_runner.errors import OutputDirError
from clm_runner.rundir.checkpoints import seal_checkpoint
from clm_runner.rundir.report import load_run, plot_runs, render_table, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir: Path, log_history: list[dict], *, global_step: int, **files: object) -> Path:
    run_dir.mkdir(parents=True)
    state = {"global_step": global_step, "max_steps": global_step, "log_history": log_history}
    (run_dir / "trainer_state.json").write_text(json.dumps(state))
    for file_name, content in files.items():
        target = run_dir / file_name.replace("__", ".")
        target.write_text(content if isinstance(content, str) else json.dumps(content))
    return run_dir


def _train_entries(steps: list[int], start_loss: float) -> list[dict]:
    return [
        {
            "step": step,
            "loss": start_loss - 0.1 * i,
            "learning_rate": 5e-4 * (1 - i / len(steps)),
            "epoch": i / 4,
        }
        for i, step in enumerate(steps)
    ]


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    # Run A: results files give tokens and the final perplexity directly.
    history_a = _train_entries([10, 20, 30, 40], start_loss=4.0) + [
        {"step": 20, "eval_loss": 3.5, "epoch": 0.5},
        {"step": 40, "eval_loss": 3.0, "epoch": 1.0},
        {"step": 40, "train_runtime": 99.0, "train_samples_per_second": 3.2, "train_loss": 3.8},
    ]
    run_a = _write_run(
        tmp_path / "run-a",
        history_a,
        global_step=40,
        train_results__json={"train_runtime": 80.0, "train_tokens": 163_840},
        eval_results__json={"eval_loss": 3.01, "perplexity": 20.3},
    )
    # Run B: no results files, tokens come from recipe.toml, no evaluation at all.
    history_b = _train_entries([5, 10, 15], start_loss=5.0) + [
        {"step": 15, "train_runtime": 12.5, "train_loss": 4.9},
    ]
    recipe = "[data]\nblock_size = 128\n\n[training]\nper_device_train_batch_size = 4\ngradient_accumulation_steps = 2\n"
    run_b = _write_run(tmp_path / "run-b", history_b, global_step=15, recipe__toml=recipe)
    return run_a, run_b


def test_load_run_reads_curves_and_results(two_runs):
    run_a = load_run(two_runs[0])
    assert run_a.name == "run-a"
    assert run_a.global_step == 40
    assert [step for step, _ in run_a.train_loss] == [10, 20, 30, 40]
    assert run_a.eval_loss == ((20, 3.5), (40, 3.0))
    assert run_a.learning_rate[0] == (10, 5e-4)
    assert run_a.train_summary["train_runtime"] == 99.0
    assert run_a.results["perplexity"] == 20.3
    assert load_run(two_runs[1]).recipe["data"]["block_size"] == 128


def test_summary_rows_use_the_most_direct_record(two_runs):
    rows = summarize([load_run(path) for path in two_runs])
    row_a, row_b = rows
    assert row_a["run"] == "run-a"
    assert row_a["steps"] == 40
    assert row_a["tokens"] == 163_840
    assert row_a["time_s"] == 80.0  # train_results.json wins over the log's 99.0
    assert row_a["tokens_per_s"] == 163_840 / 80.0
    assert row_a["final_perplexity"] == 20.3
    assert row_a["best_perplexity"] == math.exp(3.0)

    assert row_b["tokens"] == 15 * 4 * 2 * 128
    assert row_b["time_s"] == 12.5
    assert row_b["tokens_per_s"] == 15 * 4 * 2 * 128 / 12.5
    assert row_b["final_perplexity"] is None
    assert row_b["best_perplexity"] is None


def test_final_perplexity_falls_back_to_the_last_logged_eval(tmp_path):
    run_dir = _write_run(
        tmp_path / "only-log",
        [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 2.5}, {"step": 2, "eval_loss": 2.25}],
        global_step=2,
    )
    (row,) = summarize([load_run(run_dir)])
    assert row["final_perplexity"] == math.exp(2.25)
    assert row["best_perplexity"] == math.exp(2.25)
    assert row["tokens"] is None and row["time_s"] is None and row["tokens_per_s"] is None


def test_table_is_aligned_with_exact_values(two_runs):
    table = render_table(summarize([load_run(path) for path in two_runs]))
    lines = table.splitlines()
    assert lines[0].split() == [
        "run",
        "steps",
        "tokens",
        "time",
        "(s)",
        "tokens/s",
        "final",
        "ppl",
        "best",
        "ppl",
        "best",
        "step",
    ]
    assert lines[1].split() == [
        "run-a",
        "40",
        "163,840",
        "80.0",
        "2,048",
        "20.30",
        f"{math.exp(3.0):.2f}",
        "40",
    ]
    assert lines[2].split() == ["run-b", "15", "15,360", "12.5", "1,229", "-", "-", "-"]
    # Right-aligned numeric columns end at the same character position on every line.
    assert len({len(line) for line in lines}) == 1


def test_plot_writes_a_png_for_runs_with_and_without_eval(two_runs, tmp_path):
    import matplotlib.image

    out_path = two_runs[0] / "report.png"
    returned = plot_runs([load_run(path) for path in two_runs], out_path)
    assert returned == out_path
    assert out_path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(out_path)
    height, width, channels = pixels.shape
    assert (width, height) == (16 * 120, round(4.8 * 120))
    assert channels in (3, 4)
    assert pixels.std() > 0  # something was drawn

    no_eval = plot_runs([load_run(two_runs[1])], tmp_path / "nested" / "b.png")
    assert no_eval.read_bytes()[:8] == PNG_SIGNATURE


def test_bad_directories_raise_output_dir_errors(tmp_path):
    with pytest.raises(OutputDirError, match="is not a clm-runner run \\(no trainer_state.json\\)"):
        load_run(tmp_path)
    with pytest.raises(OutputDirError, match="not a directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(OutputDirError, match="cannot be read as JSON"):
        load_run(tmp_path)


def test_interrupted_run_is_read_from_its_newest_checkpoint(tmp_path):
    run_dir = tmp_path / "interrupted"
    for step in (2, 10, 12):
        staging = run_dir / f"tmp-checkpoint-{step}"
        _write_run(staging, [{"step": step, "loss": 1.0 / step}], global_step=step)
        if step < 12:  # checkpoint-12 stays torn (never sealed): it must be skipped
            seal_checkpoint(staging, run_dir / f"checkpoint-{step}", step=step)
        else:
            staging.rename(run_dir / f"checkpoint-{step}")
    run = load_run(run_dir)
    assert run.state_file == run_dir / "checkpoint-10" / "trainer_state.json"
    assert run.global_step == 10
    assert run.name == "interrupted"


def test_report_output_file_json_and_standard_output(two_runs, tmp_path):
    """`report --output FILE`: the plot goes there (it always went into the first run's dir)."""
    from click.testing import CliRunner

    from clm_runner.cli import cli

    run_a, run_b = (str(path) for path in two_runs)
    plot = tmp_path / "plots" / "compare.png"
    result = CliRunner().invoke(
        cli, ["report", "--run", run_a, "--run", run_b, "--output", str(plot), "--json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["plot"] == str(plot) and plot.read_bytes().startswith(PNG_SIGNATURE)
    assert [row["run"] for row in document["runs"]] == ["run-a", "run-b"]
    assert document["runs"][0]["final_perplexity"] == 20.3
    assert not (two_runs[0] / "report.png").exists()
    # RUN arguments are the same as --run; "-" puts the PNG on standard output, the table on standard error.
    result = CliRunner().invoke(cli, ["report", run_a, "--run", run_b, "--output", "-"])
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes.startswith(PNG_SIGNATURE) and "run-b" in result.stderr
    assert not Path("-").exists() and not (two_runs[0] / "report.png").exists()
