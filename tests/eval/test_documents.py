"""`clm-runner eval --documents` against lm-evaluation-harness itself: its rolling windows, its HFLM on a local
model (offline) and the `wikitext` task's figures, on rows, text-file articles and the hub's `wikitext` lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ASSETS, REPO, SMOKE, invoke, sets
from lm_eval_reference import MAX_LENGTH, lm_eval_figures, save_model
from tolerances import FORWARD_RTOL

from clm_runner.errors import ModelError
from clm_runner.eval.documents import batch_windows, prefix_token_id, rolling_max_length, rolling_windows
from clm_runner.eval.scoring import IGNORED

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("documents") / "model")


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("documents") / "bos-model", bos_tokenizer=True)


# ---------------------------------------------------------------------------------------------------
# The window rule, token by token


def lm_eval_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(model input, scored tokens) of each window, as HFLM builds them from lm-eval's own functions."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    pairs = map(make_disjoint_window, get_rolling_token_windows(tokens, prefix, max_length, 1))
    # HFLM._loglikelihood_tokens: the input is (context + continuation)[-(max_length + 1):][:-1] and the
    # continuation is scored on its last len(continuation) positions.
    return [
        ((context + continuation)[-(max_length + 1) :][:-1], continuation) for context, continuation in pairs
    ]


@pytest.mark.parametrize("max_length", [1, 2, 3, 8])
def test_windows_are_lm_evals(max_length: int) -> None:
    prefix = 7
    for n in range(0, 5 * max_length + 3):
        tokens = list(range(100, 100 + n))
        ours = [
            (
                [prefix] * w.prefixed + tokens[w.input_start : w.input_end],
                tokens[w.input_end + 1 - w.n_scored : w.input_end + 1],
            )
            for w in rolling_windows(0, n, max_length)
        ]
        assert ours == lm_eval_windows(tokens, prefix, max_length), (n, max_length)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_windows_give_every_token_lm_evals_context(batch_size: int) -> None:
    """Sorted, right-padded batches: each scored token sits after exactly the context lm-eval gives it."""
    import numpy as np

    prefix, max_length = 3, 8
    documents = [
        np.arange(1000 * (d + 1), 1000 * (d + 1) + n) for d, n in enumerate([0, 1, 5, 8, 9, 17, 30, 3])
    ]
    windows = [w for d, ids in enumerate(documents) for w in rolling_windows(d, len(ids), max_length)]
    expected = []
    for ids in documents:
        for model_input, scored in lm_eval_windows(ids.tolist(), prefix, max_length):
            first = len(model_input) - len(scored)
            expected += [(tuple(model_input[: first + k + 1]), t) for k, t in enumerate(scored)]
    found = []
    for batch in batch_windows(windows, documents, prefix=prefix, batch_size=batch_size):
        assert len(batch.inputs) <= batch_size
        unscored = batch.inputs.shape[1] - batch.targets.shape[1]
        for row, targets in zip(batch.inputs, batch.targets, strict=True):
            found += [
                (tuple(row[: unscored + j + 1].tolist()), int(t))
                for j, t in enumerate(targets)
                if t != IGNORED
            ]
    assert sorted(found) == sorted(expected)


def test_max_length_and_prefix_token_are_hflms() -> None:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import resolve_max_length
    from transformers import GPT2Config, LlamaConfig, PretrainedConfig

    composite = PretrainedConfig(n_positions=1200)
    composite.text_config = GPT2Config(n_positions=40)
    configs = [
        GPT2Config(n_positions=48),
        LlamaConfig(max_position_embeddings=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        composite,
        PretrainedConfig(),  # no positions: the tokenizer's model_max_length, else 2048
    ]
    tokenizers = [SimpleNamespace(model_max_length=77), SimpleNamespace(model_max_length=int(1e30))]
    for config in configs:
        for tokenizer in tokenizers:
            assert rolling_max_length(config, tokenizer) == resolve_max_length(
                config, tokenizer, default=2048
            )

    for bos, eos in ((5, 9), (None, 9), (5, None)):
        tokenizer = SimpleNamespace(bos_token_id=bos, eos_token_id=eos)
        hflm = SimpleNamespace(custom_prefix_token_id=None, tokenizer=tokenizer)
        assert prefix_token_id(tokenizer) == HFLM.prefix_token_id.fget(hflm)
    with pytest.raises(ModelError, match="has neither"):  # lm-eval would feed None to the model
        prefix_token_id(SimpleNamespace(bos_token_id=None, eos_token_id=None))


# ---------------------------------------------------------------------------------------------------
# Documents of our own, end to end against lm-eval


def paragraphs() -> list[str]:
    lines = (ASSETS / "train.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("=")]


def text_of_exactly(tokenizer, n_tokens: int, source: str) -> str:
    """The longest prefix of `source` that the tokenizer turns into exactly `n_tokens` tokens (a window edge)."""
    for end in range(len(source), 0, -1):
        if len(tokenizer(source[:end])["input_ids"]) == n_tokens:
            return source[:end]
    raise AssertionError(f"no prefix of {n_tokens} tokens")


def row_documents(model_dir: Path) -> list[str | None]:
    """Rows of a jsonl file: long and short, window-edge lengths, empty, non-ASCII, one starting with the prefix
    token's text (lm-eval then adds no special tokens) and one holding it further on (special tokens added as
    usual), and a null one (skipped: not a document)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = paragraphs()
    long_text = " ".join(texts[:12])
    edges = [text_of_exactly(tokenizer, n, long_text) for n in (MAX_LENGTH, MAX_LENGTH + 1, 2 * MAX_LENGTH)]
    return [
        *texts[:6],
        " ".join(texts[6:10]),
        *edges,
        "",
        f"{EOS} The harbour opened at dawn. {texts[11]}",
        f"The quay, then {EOS} the harbour.",
        "Zürich — naïve café, 東京 and Ελλάδα: 3°C at noon. " + texts[12],
        None,
        "A. ",
    ]


def wikitext_articles() -> list[list[str]]:
    """WikiText-style articles, each its raw lines: headings of every level, blank lines of one space, @-@ and
    friends, brackets; of many lengths, one shorter than a window."""
    texts = paragraphs()
    articles = []
    for k in range(7):
        part = texts[3 * k : 3 * k + k % 3 + 1]
        lines = [f" = Title {k} = ", " ", f" {part[0]} ", " ", " = = History = = ", " "]
        lines += [
            f" It is 3 @.@ 5 km long , 1 @,@ 200 m high ( about ) and well @-@ known ; the town 's {k} . ",
            " ",
        ]
        for paragraph in part[1:]:
            lines += [" = = = Detail = = = ", " ", f" {paragraph} ", " "]
        articles.append(lines)
    articles.insert(3, [" = Tiny = ", " ", " Short . ", " "])
    return articles


def raw_wikitext() -> tuple[list[str], list[str]]:
    """(the raw file's lines, its pages as EleutherAI/wikitext_document_level holds them, by construction)."""
    articles = wikitext_articles()
    lines = [" ", *(line for article in articles for line in article), ""]  # the file ends with "\n"
    pages = ["\n".join(article) for article in articles]
    pages[-1] += "\n"
    return lines, pages


def clm_runner_documents(model_dir: Path, tmp_path: Path, data_sets: list[str], *flags: str) -> dict:
    out = tmp_path / "documents.json"
    cli = invoke(
        "eval",
        "--recipe",
        SMOKE,
        *sets(
            "model.model_type=",
            "model.config_overrides=",
            "model.tokenizer_name=",
            f"model.model_name_or_path={model_dir}",
            f"training.output_dir={tmp_path / 'unused'}",
            *data_sets,
        ),
        "--documents",
        "--quiet",
        "--json",
        "--output",
        out,
        *flags,
    )
    assert cli.exit_code == 0, cli.output
    return numbers_and_description(cli.stdout, out)


def numbers_and_description(stdout: str, out: Path) -> dict:
    """--json's metrics and how they were computed, in one dict; the --output file holds the numbers alone."""
    (evaluation,) = json.loads(stdout)["evaluations"]
    metrics, description = evaluation["metrics"], evaluation["evaluation"]
    assert json.loads(out.read_text()) == metrics
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    return {**metrics, **description}


def assert_equal_figures(ours: dict, reference, n_documents: int) -> None:
    assert sum(n > MAX_LENGTH for n in reference.token_counts) >= 3  # several documents span several windows
    assert ours["documents"] == n_documents
    assert (ours["tokens"], ours["words"], ours["bytes"]) == (
        reference.tokens,
        reference.words,
        reference.bytes,
    )
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[key] == pytest.approx(getattr(reference, key), rel=FORWARD_RTOL), key


@pytest.mark.parametrize(("bos", "batch_size"), [(False, 5), (False, 1), (True, 4)])
def test_rows_equal_lm_eval(
    model_dir: Path, bos_model_dir: Path, tmp_path: Path, bos: bool, batch_size: int
) -> None:
    directory = bos_model_dir if bos else model_dir
    rows = row_documents(model_dir)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows), encoding="utf-8")
    ours = clm_runner_documents(
        directory,
        tmp_path,
        [
            f"data.train_file={data}",
            f"data.validation_file={data}",
            f"training.per_device_eval_batch_size={batch_size}",
        ],
    )
    documents = [row for row in rows if row is not None]
    assert_equal_figures(ours, lm_eval_figures(directory, documents), len(documents))
    assert ours["null_rows"] == 1 and ours["method"] == "documents" and ours["context"] == MAX_LENGTH
    assert ours["documents_from"] == "rows"


@pytest.mark.parametrize("context", [None, 16])
def test_text_file_articles_equal_lm_eval(model_dir: Path, tmp_path: Path, context: int | None) -> None:
    lines, pages = raw_wikitext()
    data = tmp_path / "wiki.txt"
    data.write_text("\n".join(lines), encoding="utf-8")
    flags = ["--context", str(context)] if context else []
    ours = clm_runner_documents(
        model_dir, tmp_path, [f"data.train_file={data}", f"data.validation_file={data}"], *flags
    )
    assert_equal_figures(ours, lm_eval_figures(model_dir, pages, max_length=context), len(pages))
    assert ours["context"] == (context or MAX_LENGTH)


def test_the_hub_wikitext_equals_lm_evals_wikitext_task(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub's `wikitext` rows (stood in for: the Hub is offline) -> articles, detokenized as the task does."""
    import datasets
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    from clm_runner.data import sources

    lines, pages = raw_wikitext()
    hub_rows = [line + "\n" if line.strip() else "" for line in lines[:-1]]  # as the hub holds the lines
    loaded = []

    def hub(data, model, splits, carve=True):
        loaded.append((data.dataset_name, data.dataset_config_name, list(splits)))
        return {split: datasets.Dataset.from_dict({"text": hub_rows}) for split in splits}

    monkeypatch.setattr(sources, "_load_hub", hub)
    wikitext = ["data.dataset_name=wikitext", "data.dataset_config_name=wikitext-2-raw-v1"]
    ours = clm_runner_documents(
        model_dir, tmp_path, [*wikitext, "data.train_file=", "data.validation_file="], "--split", "test"
    )
    assert loaded == [("wikitext", "wikitext-2-raw-v1", ["test"])]
    scored = [wikitext_detokenizer({"page": page}) for page in pages]
    assert scored != pages  # the detokenizer changed something, so scoring the raw pages would show
    assert_equal_figures(ours, lm_eval_figures(model_dir, scored, pages), len(pages))
    assert "detokenizer" in ours["documents_from"]


def test_max_eval_samples_keeps_the_first_documents(model_dir: Path, tmp_path: Path) -> None:
    rows = [row for row in row_documents(model_dir) if row is not None]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows), encoding="utf-8")
    ours = clm_runner_documents(
        model_dir,
        tmp_path,
        [f"data.train_file={data}", f"data.validation_file={data}", "data.max_eval_samples=7"],
    )
    assert_equal_figures(ours, lm_eval_figures(model_dir, rows[:7]), 7)


def test_a_mix_is_scored_per_source_and_in_total(model_dir: Path, tmp_path: Path) -> None:
    """[[data.mix]] sources with their own validation: each source's figures, and the total over all documents."""
    with_null = row_documents(model_dir)
    rows = [row for row in with_null if row is not None]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": row}) + "\n" for row in with_null), encoding="utf-8")
    lines, pages = raw_wikitext()
    text = tmp_path / "wiki.txt"
    text.write_text("\n".join(lines), encoding="utf-8")
    recipe = tmp_path / "mix.toml"
    recipe.write_text(
        f'[model]\nmodel_name_or_path = "{model_dir}"\n\n[data]\n'
        f'[[data.mix]]\nname = "wiki"\ntrain_file = "{text}"\nvalidation_file = "{text}"\n\n'
        f'[[data.mix]]\nname = "rows"\ntrain_file = "{jsonl}"\nvalidation_file = "{jsonl}"\n\n'
        f'[training]\noutput_dir = "{tmp_path / "unused"}"\n'
    )
    out = tmp_path / "mix.json"
    cli = invoke("eval", "--recipe", recipe, "--documents", "--quiet", "--json", "--output", out)
    assert cli.exit_code == 0, cli.output
    ours = numbers_and_description(cli.stdout, out)
    assert ours["sources"] == ["wiki", "rows"]
    for name, documents in (("wiki", pages), ("rows", rows)):
        mine = {
            key.removeprefix(f"eval_{name}_"): v for key, v in ours.items() if key.startswith(f"eval_{name}_")
        }
        assert_equal_figures(mine, lm_eval_figures(model_dir, documents), len(documents))
    assert_equal_figures(ours, lm_eval_figures(model_dir, pages + rows), len(pages) + len(rows))
    assert (ours["eval_wiki_null_rows"], ours["eval_rows_null_rows"], ours["null_rows"]) == (0, 1, 1)


# ---------------------------------------------------------------------------------------------------
# The command


def test_documents_refuse_what_they_cannot_do(model_dir: Path, tmp_path: Path) -> None:
    base = [
        "eval",
        "--recipe",
        SMOKE,
        *sets(
            "model.model_type=",
            "model.config_overrides=",
            "model.tokenizer_name=",
            f"model.model_name_or_path={model_dir}",
            f"training.output_dir={tmp_path / 'unused'}",
        ),
        "--documents",
    ]
    cases = [
        (["--stride", "8"], "--documents and --stride are two methods; choose one"),
        (
            ["--set", "data.streaming=true", "--set", "training.max_steps=1"],
            "does not work with data.streaming",
        ),
        (["--context", "64"], f"set --context to {MAX_LENGTH} or less"),
        (["--context", "0"], "--context 0: give a positive number of tokens"),
    ]
    for flags, message in cases:
        result = invoke(*base, *flags)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_a_runs_documents_evaluation_goes_to_evals_without_importing_lm_eval(
    model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    (run / "recipe.toml").write_text(
        f'[model]\nmodel_type = "gpt2"\ntokenizer_name = "{ASSETS / "tokenizer"}"\n\n'
        f'[data]\ntrain_file = "{ASSETS / "train.txt"}"\nvalidation_file = "{ASSETS / "validation.txt"}"\n'
        f'block_size = {MAX_LENGTH}\n\n[training]\noutput_dir = "{run}"\n'
    )
    check = (
        "import sys; from clm_runner.cli import main; code = main(sys.argv[1:]); "
        "assert 'lm_eval' not in sys.modules, 'clm_runner imported lm_eval'; sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", check, "eval", "--run", str(run), "--documents", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    written = run / "evals" / f"validation_documents{MAX_LENGTH}.json"
    assert f"Wrote {written}" in done.stdout
    assert "word ppl" in done.stdout and "lm-evaluation-harness" in done.stdout
    assert json.loads(written.read_text())["documents"] > 0  # numbers only; how they were made is recorded:
    described = json.loads((run / "evaluations.json").read_text())[f"evals/{written.name}"]
    assert described["method"] == "documents" and described["context"] == MAX_LENGTH
    assert "lm-evaluation-harness" in described["convention"] and described["documents_from"].startswith(
        "WikiText"
    )
    assert not (run / "eval_results.json").exists()  # training's own evaluation is blocks, never this


def test_the_table_shows_each_figure_under_its_heading() -> None:
    from clm_runner.cli.eval import render_documents_table
    from clm_runner.eval.job import Evaluation

    metrics = {
        "documents": 7,
        "tokens": 1234,
        "words": 567,
        "bytes": 8901,
        "perplexity": 11.5,
        "word_perplexity": 22.5,
        "byte_perplexity": 3.25,
        "bits_per_byte": 1.75,
    }
    about = {"split": "test", "context": 32, "documents_from": "rows", "convention": "lm-eval's"}
    header, row = render_documents_table([Evaluation(metrics, about)]).splitlines()[:2]
    cells = dict(zip(header.replace(" ppl", "_ppl").split(), row.split(), strict=True))
    assert cells == {
        "split": "test",
        "documents": "7",
        "tokens": "1,234",
        "words": "567",
        "bytes": "8,901",
        "perplexity": "11.5000",
        "word_ppl": "22.5000",
        "byte_ppl": "3.2500",
        "bits/byte": "1.7500",
    }
