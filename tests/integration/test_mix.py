"""[[data.mix]] end to end: the realised shares, reproducible with the seed, and per-source validation whose
perplexities are exact and add up, token-weighted, to the overall one (in `train`, `eval` and `data`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import ASSETS, SMOKE, TINY_CONFIG, completed_run, independent_perplexity, invoke, sets
from tolerances import FORWARD_RTOL

BLOCK = 32
SOURCES = {
    "encyclopedia": (ASSETS / "train.txt", ASSETS / "validation.txt"),
    "harbour": (ASSETS / "harbour" / "train.txt", ASSETS / "harbour" / "validation.txt"),
}


def mix_recipe(
    path: Path,
    output_dir: Path,
    weights: tuple[float, float] | None = (0.7, 0.3),
    shared_validation: Path | None = None,
) -> Path:
    tables = []
    for index, (name, (train, validation)) in enumerate(SOURCES.items()):
        weight = f"weight = {weights[index]}\n" if weights else ""
        own = "" if shared_validation else f'validation_file = "{validation}"\n'
        tables.append(f'[[data.mix]]\nname = "{name}"\ntrain_file = "{train}"\n{own}{weight}')
    path.write_text(
        f'[model]\nmodel_type = "gpt2"\nconfig_overrides = "{TINY_CONFIG}"\n'
        f'tokenizer_name = "{ASSETS / "tokenizer"}"\n\n'
        f"[data]\nblock_size = {BLOCK}\n"
        + (f'validation_file = "{shared_validation}"\n' if shared_validation else "")
        + "\n"
        + "\n".join(tables)
        + "\n"
        f'[training]\noutput_dir = "{output_dir}"\nper_device_train_batch_size = 4\n'
        'per_device_eval_batch_size = 16\nmax_steps = 6\nlogging_steps = 1\neval_strategy = "steps"\n'
        'eval_steps = 3\nsave_strategy = "no"\nreport_to = "none"\nuse_cpu = true\nseed = 42\n'
    )
    return path


def saved_train_blocks(tmp_path: Path, name: str, *extra: str) -> list[list[int]]:
    import datasets

    save = tmp_path / name
    result = invoke(
        "data", "--recipe", mix_recipe(tmp_path / "mix.toml", tmp_path / "run"), *extra, "--save", save
    )
    assert result.exit_code == 0, result.output
    return datasets.load_from_disk(str(save))["train"]["input_ids"]


def source_blocks(path: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    ids = [
        i
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
        for i in tokenizer(line)["input_ids"]
    ]
    return len(ids) // BLOCK


def test_data_prints_each_source_and_its_realised_share(tmp_path: Path) -> None:
    result = invoke("data", "--recipe", mix_recipe(tmp_path / "mix.toml", tmp_path / "run"))
    assert result.exit_code == 0, result.output
    rows = {
        tuple(line.split()[:2]): line.split()
        for line in result.output.splitlines()
        if line.split()[:1] in (["encyclopedia"], ["harbour"])
    }
    available = {name: source_blocks(train) for name, (train, _) in SOURCES.items()}
    # Undersampling: the largest mix that uses no block twice; harbour (30%) is the scarce one.
    total = min(math.floor(n / w) for n, w in zip(available.values(), (0.7, 0.3), strict=True))
    for name, weight in zip(SOURCES, (0.7, 0.3), strict=True):
        row = rows[(name, "train")]
        assert int(row[4].replace(",", "")) == available[name]  # the source's own blocks
        taken = int(row[5].replace(",", ""))
        assert abs(taken / total - weight) < 1 / total
        assert row[6] == f"{taken / total:.4f}" and row[7] == f"{weight:.4f}"
    assert rows[("harbour", "train")][5].replace(",", "") == str(available["harbour"])


def test_the_mix_is_reproducible_with_its_seed(tmp_path: Path) -> None:
    first = saved_train_blocks(tmp_path, "a")
    again = saved_train_blocks(tmp_path, "b")
    other = saved_train_blocks(tmp_path, "c", *sets("data.mix_seed=7"))
    assert first == again
    assert len(other) == len(first) and other != first
    # The same blocks of the scarce source (all of them) and another choice from the plentiful one.
    assert sorted(map(tuple, other)) != sorted(map(tuple, first))


@pytest.fixture(scope="module")
def mix_run(workdir: Path, env: dict[str, str]) -> Path:
    run = workdir / "mix-run"
    recipe = mix_recipe(workdir / "mix.toml", run)
    return completed_run(run, ["train", "--recipe", str(recipe), "--quiet"], env)


def test_per_source_validation_is_exact_and_adds_up(mix_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = json.loads((mix_run / "eval_results.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(mix_run)
    tokenizer = AutoTokenizer.from_pretrained(mix_run)
    nll, tokens = 0.0, 0
    for name, (_, validation) in SOURCES.items():
        expected, count = independent_perplexity(model, tokenizer, validation, BLOCK)
        assert final[f"eval_{name}_tokens"] == count
        assert final[f"eval_{name}_perplexity"] == pytest.approx(expected, rel=FORWARD_RTOL)
        nll += final[f"eval_{name}_loss"] * count
        tokens += count
    assert final["eval_tokens"] == tokens
    counts = [final[f"eval_{name}_tokens"] for name in SOURCES]
    assert counts[0] != counts[1]  # else a plain mean of the two would pass for the token-weighted one
    assert final["eval_samples"] == sum(final[f"eval_{name}_samples"] for name in SOURCES)
    # Token-weighted, not the mean of the two: the totals of one float64 sum, up to its rounding.
    assert final["eval_loss"] == pytest.approx(nll / tokens, rel=1e-12)
    assert final["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-12)
    history = json.loads((mix_run / "trainer_state.json").read_text())["log_history"]
    periodic = [entry for entry in history if "eval_harbour_perplexity" in entry]
    assert [entry["step"] for entry in periodic] == [3, 6]


def test_eval_of_a_mix_run_reports_each_source_and_all(mix_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = invoke("eval", "--run", mix_run, "--output", out)
    assert result.exit_code == 0, result.output
    assert "validation: harbour" in result.output and "validation: all" in result.output
    metrics = json.loads(out.read_text())
    final = json.loads((mix_run / "eval_results.json").read_text())
    described = json.loads((mix_run / "evaluations.json").read_text())["eval_results.json"]
    assert described["sources"] == list(SOURCES) and "sources" not in metrics  # numbers only in metrics
    for key in ("perplexity", "eval_encyclopedia_perplexity", "eval_harbour_perplexity"):
        assert metrics[key] == pytest.approx(final[key], rel=FORWARD_RTOL)
    manifest = json.loads((mix_run / "run.json").read_text())
    sources = manifest["data"]["prepared"]["train"]["sources"]
    assert (
        sum(s["blocks_in_mix"] for s in sources.values()) == manifest["data"]["prepared"]["train"]["blocks"]
    )


def test_one_source_without_weight_behaves_as_plain_data(tmp_path: Path) -> None:
    """A mix of one unweighted source takes all its blocks: the same blocks as [data] naming that file."""
    import datasets

    one = tmp_path / "one.toml"
    text = mix_recipe(tmp_path / "two.toml", tmp_path / "run", weights=None).read_text()
    one.write_text(
        text.split("[[data.mix]]")[0]
        + "[[data.mix]]"
        + text.split("[[data.mix]]")[1]
        + text[text.index("[training]") :]
    )
    result = invoke("data", "--recipe", one, "--save", tmp_path / "mixed")
    assert result.exit_code == 0, result.output
    plain = sets(
        f"data.train_file={SOURCES['encyclopedia'][0]}",
        f"data.validation_file={SOURCES['encyclopedia'][1]}",
        f"model.config_overrides={TINY_CONFIG}",
        f"model.tokenizer_name={ASSETS / 'tokenizer'}",
        f"data.block_size={BLOCK}",
        f"training.output_dir={tmp_path / 'plain-run'}",
    )
    result = invoke("data", "--recipe", SMOKE, *plain, "--save", tmp_path / "plain")
    assert result.exit_code == 0, result.output
    mixed = datasets.load_from_disk(str(tmp_path / "mixed"))["train"]["input_ids"]
    assert mixed == datasets.load_from_disk(str(tmp_path / "plain"))["train"]["input_ids"]


def test_the_shipped_best_model_recipe_runs(workdir: Path, env: dict[str, str]) -> None:
    """recipes/smoke-best.toml (mix, per-step evaluation, early stopping, best model), shortened to 20 steps."""
    run = workdir / "smoke-best"
    args = ["train", "--recipe", str(SMOKE.parent / "smoke-best.toml"), "--quiet"]
    args += sets(
        f"training.output_dir={run}",
        "training.max_steps=20",
        "training.eval_steps=10",
        "training.save_steps=10",
    )
    completed_run(run, args, env)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["best_model"]["final_model_is_best"] is True
    assert manifest["early_stopping"]["max_steps"] == 20
    final = json.loads((run / "eval_results.json").read_text())
    assert {"eval_encyclopedia_perplexity", "eval_harbour_perplexity", "perplexity"} <= set(final)
    train = manifest["data"]["prepared"]["train"]["sources"]
    assert {name: s["blocks_in_mix"] for name, s in train.items()} == {"encyclopedia": 459, "harbour": 197}


def test_a_validation_file_in_data_is_shared_by_every_source(tmp_path: Path) -> None:
    shared = SOURCES["harbour"][1]
    recipe = mix_recipe(tmp_path / "mix.toml", tmp_path / "run", shared_validation=shared)
    result = invoke("data", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    validation = next(line.split() for line in lines if line.startswith("validation"))
    assert int(validation[3].replace(",", "")) == source_blocks(shared)  # the shared file, once
    per_source = [line.split()[:2] for line in lines if line.split()[:1] in (["encyclopedia"], ["harbour"])]
    assert per_source == [["encyclopedia", "train"], ["harbour", "train"]]  # no validation of their own
    out = tmp_path / "eval.json"
    model = sets(f"training.output_dir={tmp_path / 'run'}")
    result = invoke("eval", "--recipe", recipe, *model, "--quiet", "--output", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert "sources" not in metrics and metrics["eval_samples"] == source_blocks(shared)


def test_a_shared_validation_file_leaves_every_train_row_to_training(tmp_path: Path) -> None:
    """With [data].validation_file no source carves a validation split from its train rows: each trains on
    every row of its file (it used to lose 5%, carved and then used for nothing: 4,857 of 5,113 rows)."""
    recipe = mix_recipe(tmp_path / "mix.toml", tmp_path / "run", shared_validation=SOURCES["harbour"][1])
    result = invoke("data", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    rows = {tuple(line.split()[:2]): line.split() for line in result.output.splitlines()}
    for name, (train, _) in SOURCES.items():
        row = rows[(name, "train")]
        assert int(row[2].replace(",", "")) == len(train.read_text(encoding="utf-8").splitlines())
        assert int(row[4].replace(",", "")) == source_blocks(train)


def test_a_hub_source_shares_the_validation_and_test_files_without_carving(tmp_path: Path) -> None:
    """A dataset_name source (a hub layout on disk, train split only) beside shared validation and test files:
    accepted (the shared test_file used to be taken as the source's own, a dataset_name-with-files clash) and
    all its train rows trained on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = (ASSETS / "harbour" / "train.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    repo = tmp_path / "corpus"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": lines}), repo / "data" / "train-00000.parquet")
    recipe = tmp_path / "mix.toml"
    recipe.write_text(
        f'[model]\nmodel_type = "gpt2"\nconfig_overrides = "{TINY_CONFIG}"\n'
        f'tokenizer_name = "{ASSETS / "tokenizer"}"\n\n'
        f'[data]\nblock_size = {BLOCK}\nvalidation_file = "{ASSETS / "validation.txt"}"\n'
        f'test_file = "{ASSETS / "harbour" / "validation.txt"}"\n\n'
        f'[[data.mix]]\nname = "log"\ndataset_name = "{repo}"\n\n'
        f'[[data.mix]]\nname = "encyclopedia"\ntrain_file = "{ASSETS / "train.txt"}"\n\n'
        f'[training]\noutput_dir = "{tmp_path / "run"}"\n'
    )
    result = invoke("data", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    rows = {tuple(line.split()[:2]): line.split() for line in result.output.splitlines()}
    assert int(rows[("log", "train")][2].replace(",", "")) == len(lines)
    assert int(rows[("encyclopedia", "train")][2].replace(",", "")) == len(
        (ASSETS / "train.txt").read_text(encoding="utf-8").splitlines()
    )


def test_a_shared_validation_file_is_read_on_its_own_terms(tmp_path: Path) -> None:
    """The shared file is not read as the first source: a jsonl source with text_column = "content" beside a
    shared .txt validation file, and the limit of max_train_samples kept in the mix's proportions."""
    rows = (ASSETS / "harbour" / "train.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text("".join(json.dumps({"content": row, "n": i}) + "\n" for i, row in enumerate(rows)))
    recipe = tmp_path / "mix.toml"
    recipe.write_text(
        f'[model]\nmodel_type = "gpt2"\nconfig_overrides = "{TINY_CONFIG}"\n'
        f'tokenizer_name = "{ASSETS / "tokenizer"}"\n\n'
        f"[data]\nblock_size = {BLOCK}\nmax_train_samples = 100\n"
        f'validation_file = "{ASSETS / "validation.txt"}"\n\n'
        f'[[data.mix]]\nname = "log"\ntrain_file = "{jsonl}"\ntext_column = "content"\nweight = 1\n\n'
        f'[[data.mix]]\ntrain_file = "{ASSETS / "train.txt"}"\nweight = 3\n\n'
        f'[training]\noutput_dir = "{tmp_path / "run"}"\n'
    )
    result = invoke("data", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    rows_by = {tuple(line.split()[:2]): line.split() for line in result.output.splitlines()}
    validation = next(line.split() for line in result.output.splitlines() if line.startswith("validation"))
    assert int(validation[3].replace(",", "")) == source_blocks(ASSETS / "validation.txt")
    # "smoke" is train.txt's folder: a source named after a generic file name takes its folder's.
    taken = {name: int(rows_by[(name, "train")][5]) for name in ("log", "smoke")}
    assert taken == {"log": 25, "smoke": 75}


def test_the_best_model_can_be_chosen_by_one_source(workdir: Path, env: dict[str, str]) -> None:
    """metric_for_best_model = "harbour_perplexity": the target corpus decides, lower is better."""
    run = workdir / "by-source"
    recipe = mix_recipe(workdir / "by-source.toml", run)
    args = ["train", "--recipe", str(recipe), "--quiet"]
    args += sets(
        "training.save_strategy=steps",
        "training.save_steps=3",
        "training.load_best_model_at_end=true",
        "training.metric_for_best_model=harbour_perplexity",
        "training.learning_rate=3e-2",
        "training.max_steps=9",
    )
    completed_run(run, args, env)
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    scores = {e["step"]: e["eval_harbour_perplexity"] for e in history if "eval_harbour_perplexity" in e}
    best = min(scores, key=lambda step: (scores[step], step))
    record = json.loads((run / "run.json").read_text())["best_model"]
    assert record["metric"] == "harbour_perplexity" and record["global_step"] == best
    assert record["value"] == scores[best]
    final = json.loads((run / "eval_results.json").read_text())
    assert final["eval_harbour_perplexity"] == pytest.approx(scores[best], rel=FORWARD_RTOL)
