"""clm_runner.PerplexityMetric: clm-runner's exact corpus perplexity as an `evaluate` metric, offline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ASSETS, REPO, SMOKE, independent_perplexity, invoke, sets, tiny_base_model
from tolerances import FORWARD_RTOL

BLOCK = 32
TEXT = ASSETS / "harbour" / "validation.txt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base_model(tmp_path_factory.mktemp("metric") / "model")


def rows() -> list[str]:
    # A .txt file's rows as `clm-runner eval` reads them: one per line.
    return TEXT.read_text(encoding="utf-8").splitlines(keepends=True)


def clm_runner_eval(model_dir: Path, tmp_path: Path, *flags: str) -> dict:
    """`clm-runner eval` of the model on TEXT's rows, BLOCK-token blocks (or strided windows with flags): its
    metrics and how they were computed, in one dict."""
    cli = invoke(
        "eval",
        "--recipe",
        SMOKE,
        *sets(
            "model.model_type=",
            "model.config_overrides=",
            "model.tokenizer_name=",
            f"model.model_name_or_path={model_dir}",
            f"data.train_file={TEXT}",
            f"data.validation_file={TEXT}",
            f"data.block_size={BLOCK}",
            f"training.output_dir={tmp_path / 'unused'}",
        ),
        *flags,
        "--quiet",
        "--json",
    )
    assert cli.exit_code == 0, cli.output
    (only,) = json.loads(cli.stdout)["evaluations"]
    return {**only["metrics"], **only["evaluation"]}


def test_the_metric_equals_clm_runner_eval_and_a_plain_forward(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clm_runner import PerplexityMetric

    result = PerplexityMetric().compute(predictions=rows(), model_id=str(model_dir), block_size=BLOCK)
    via_cli = clm_runner_eval(model_dir, tmp_path)
    expected, tokens = independent_perplexity(
        AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), TEXT, BLOCK
    )
    assert result["tokens"] == via_cli["eval_tokens"] == tokens
    assert result["perplexity"] == pytest.approx(via_cli["perplexity"], rel=FORWARD_RTOL)
    assert result["perplexity"] == pytest.approx(expected, rel=FORWARD_RTOL)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    for key in ("bits_per_byte", "word_perplexity"):
        assert result[key] == pytest.approx(via_cli[key], rel=FORWARD_RTOL)
    assert result["method"] == "blocks" and result["block_size"] == BLOCK


def test_strided_windows_match_clm_runner_eval_strided(model_dir: Path, tmp_path: Path) -> None:
    from clm_runner import PerplexityMetric

    result = PerplexityMetric().compute(
        predictions=rows(), model_id=str(model_dir), block_size=BLOCK, stride=16
    )
    via_cli = clm_runner_eval(model_dir, tmp_path, "--stride", "16")
    assert result["method"] == via_cli["method"] == "strided"
    assert result["tokens"] == via_cli["eval_tokens"]
    assert result["perplexity"] == pytest.approx(via_cli["perplexity"], rel=FORWARD_RTOL)


def test_evaluate_combine_and_save_accept_it(model_dir: Path, tmp_path: Path) -> None:
    import evaluate

    from clm_runner import PerplexityMetric

    combined = evaluate.combine([PerplexityMetric()])
    result = combined.compute(predictions=rows(), model_id=str(model_dir), block_size=BLOCK)
    alone = PerplexityMetric().compute(predictions=rows(), model_id=str(model_dir), block_size=BLOCK)
    assert result["perplexity"] == alone["perplexity"]
    saved = Path(evaluate.save(str(tmp_path), **result))
    assert json.loads(saved.read_text())["perplexity"] == alone["perplexity"]


def test_importing_clm_runner_does_not_import_evaluate() -> None:
    code = "import sys, clm_runner; print('evaluate' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_documents_mode_equals_eval_documents_and_lm_eval(tmp_path: Path) -> None:
    from lm_eval_reference import MAX_LENGTH, lm_eval_figures, save_model

    from clm_runner import PerplexityMetric

    model = save_model(tmp_path / "model")
    texts = [line for line in rows() if line.strip()][:12]
    result = PerplexityMetric().compute(predictions=texts, model_id=str(model), documents=True, batch_size=4)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    out = tmp_path / "documents.json"
    cli = invoke(
        "eval",
        "--recipe",
        SMOKE,
        *sets(
            "model.model_type=",
            "model.config_overrides=",
            "model.tokenizer_name=",
            f"model.model_name_or_path={model}",
            f"data.train_file={data}",
            f"data.validation_file={data}",
            "training.per_device_eval_batch_size=4",
            f"training.output_dir={tmp_path / 'unused'}",
        ),
        "--documents",
        "--quiet",
        "--output",
        out,
    )
    assert cli.exit_code == 0, cli.output
    via_cli = json.loads(out.read_text())
    # The same documents in the same batches through the same code: the same floats.
    for key in (
        "perplexity",
        "word_perplexity",
        "byte_perplexity",
        "bits_per_byte",
        "tokens",
        "words",
        "bytes",
    ):
        assert result[key] == via_cli[key], key
    assert result["documents"] == len(texts) and result["method"] == "documents"
    assert result["context"] == MAX_LENGTH
    reference = lm_eval_figures(model, texts)
    assert sum(n > MAX_LENGTH for n in reference.token_counts) >= 3
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert result[key] == pytest.approx(getattr(reference, key), rel=FORWARD_RTOL), key


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stride": 8}, "documents and stride are two methods"),
        ({"block_size": 8}, "documents are scored in windows of `context` tokens, not blocks"),
    ],
)
def test_documents_mode_refuses_what_it_would_ignore(model_dir: Path, options: dict, message: str) -> None:
    from clm_runner import PerplexityMetric
    from clm_runner.errors import EvalError

    with pytest.raises(EvalError, match=message):
        PerplexityMetric().compute(predictions=["a text"], model_id=str(model_dir), documents=True, **options)
