"""`clm-runner eval` end to end on a tiny saved model: blocks, strided, run_clm grouping, checkpoints."""

from __future__ import annotations

import json
import math
from itertools import chain
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ASSETS, invoke, tiny_gpt2_config
from tolerances import FORWARD_RTOL

from clm_runner.cli import cli
from clm_runner.rundir.checkpoints import seal_checkpoint

BLOCK = 64


def save_tiny_model(directory: Path, seed: int = 0) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = tiny_gpt2_config(n_layer=2, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(directory)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A directory shaped like a finished run: model, tokenizer, recipe.toml, two checkpoints."""
    run = tmp_path_factory.mktemp("evalrun") / "run"
    save_tiny_model(run, seed=0)
    for step, seed in ((10, 1), (20, 2)):
        staging = run / f"tmp-checkpoint-{step}"
        save_tiny_model(staging, seed=seed)
        (staging / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        seal_checkpoint(staging, run / f"checkpoint-{step}", step=step)  # complete, as `train` writes them
    # A test split of its own text, so a split mixed up with another would show.
    test_text = run.parent / "test.txt"
    test_text.write_text((ASSETS / "train.txt").read_text(encoding="utf-8")[-20000:], encoding="utf-8")
    (run / "recipe.toml").write_text(
        f"""
[model]
model_type = "gpt2"
tokenizer_name = "{ASSETS / "tokenizer"}"

[data]
train_file = "{ASSETS / "train.txt"}"
validation_file = "{ASSETS / "validation.txt"}"
test_file = "{test_text}"
block_size = {BLOCK}

[training]
output_dir = "{run}"
per_device_eval_batch_size = 4
"""
    )
    return run


def token_stream(model_dir: Path, text_path: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = text_path.read_text(encoding="utf-8").splitlines(keepends=True)
    return list(chain.from_iterable(tokenizer(line)["input_ids"] for line in lines))


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def nll_of(model, ids: list[int], first_scored: int) -> tuple[float, int]:
    """Summed NLL of ids[first_scored:] given everything before it in `ids` (a plain forward pass)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0].double(), dim=-1)
    targets = x[0, first_scored:]
    picked = logp[first_scored - 1 : len(ids) - 1].gather(1, targets[:, None])
    return -picked.sum().item(), len(targets)


def evaluated(*args: str) -> tuple[dict, dict]:
    """`eval ... --json`: (the metrics, numbers only; how they were computed) of its one evaluation."""
    result = invoke("eval", *args, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    (only,) = json.loads(result.stdout)["evaluations"]
    return only["metrics"], only["evaluation"]


def test_blocks_eval_of_a_run_equals_plain_forward_passes(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    result = invoke("eval", "--run", str(run_dir), "--quiet", "--output", str(out))
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    about = json.loads((run_dir / "evaluations.json").read_text())["eval_results.json"]
    ids = token_stream(run_dir, ASSETS / "validation.txt")
    model = load(run_dir)
    total, count = 0.0, 0
    for b in range(len(ids) // BLOCK):
        nll, n = nll_of(model, ids[b * BLOCK : (b + 1) * BLOCK], 1)
        total, count = total + nll, count + n
    assert about["method"] == "blocks" and about["block_size"] == BLOCK
    assert metrics["eval_tokens"] == count
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=FORWARD_RTOL)
    assert about["split"] == "validation"
    # eval of a run's final model is recorded where run_clm keeps it
    assert json.loads((run_dir / "eval_results.json").read_text())["perplexity"] == metrics["perplexity"]


@pytest.mark.parametrize(("context", "stride"), [(64, 32), (48, 48), (100, 30)])
def test_strided_eval_equals_naive_windows(run_dir: Path, tmp_path: Path, context: int, stride: int) -> None:
    metrics, about = evaluated(
        "--run", str(run_dir), "--checkpoint", str(run_dir / "checkpoint-10"),
        "--stride", str(stride), "--context", str(context),
    )  # fmt: skip
    ids = token_stream(run_dir, ASSETS / "validation.txt")
    model = load(run_dir / "checkpoint-10")
    # Windows of `context` input tokens start every `stride` tokens; each scores the targets (the
    # inputs shifted by one) that no earlier window scored. Token 0 is never a target.
    total, count, scored_until, start = 0.0, 0, 1, 0
    while scored_until < len(ids):
        end = min(start + context + 1, len(ids))  # the window's inputs and its last target
        nll, n = nll_of(model, ids[start:end], scored_until - start)
        total, count, scored_until, start = total + nll, count + n, end, start + stride
    assert metrics["eval_tokens"] == count == len(ids) - 1
    assert about["method"] == "strided" and about["stride"] == stride and about["context"] == context
    assert about["checkpoint"] == "checkpoint-10"
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=FORWARD_RTOL)
    assert metrics["bits_per_byte"] > 0 and metrics["word_perplexity"] > metrics["perplexity"]


def test_run_clm_grouping_equals_a_run_clm_style_pipeline(run_dir: Path, tmp_path: Path) -> None:
    """run_clm's own recipe: datasets.map tokenization, 1000-row group_texts, Trainer.evaluate."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    out = tmp_path / "r.json"
    result = invoke(
        "eval", "--run", str(run_dir), "--set", "data.grouping=run_clm", "--quiet", "--output", str(out)
    )
    assert result.exit_code == 0, result.output
    ours = json.loads(out.read_text())

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    raw = load_dataset(
        "text", data_files={"validation": str(ASSETS / "validation.txt")}, keep_linebreaks=True
    )
    tokenized = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // BLOCK) * BLOCK
        result = {k: [t[i : i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    blocks = tokenized.map(group_texts, batched=True)["validation"]
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_eval_batch_size=4, report_to="none")

    def trainer_loss(model) -> float:
        trainer = Trainer(model=model, args=args, data_collator=default_data_collator)
        return trainer.evaluate(eval_dataset=blocks)["eval_loss"]

    assert ours["eval_samples"] == len(blocks)
    # Told that GPT-2's loss shifts labels, the Trainer's number is the exact one.
    fixed = load(run_dir)
    fixed.loss_type = "ForCausalLM"
    # The Trainer batches the same blocks as 4 per batch like ours, but computes full logits and its own
    # mean loss: the same float32 forward, rounded another way.
    assert ours["perplexity"] == pytest.approx(math.exp(trainer_loss(fixed)), rel=FORWARD_RTOL)
    # Left alone, transformers 5 divides each block's NLL by T instead of T - 1 predicted tokens for
    # GPT2LMHeadModel (its class name matches no loss type): the loss run_clm reports is scaled by
    # (T - 1) / T. clm-runner's models carry the fix (modeling.mark_causal_loss).
    assert trainer_loss(load(run_dir)) == pytest.approx(
        ours["eval_loss"] * (BLOCK - 1) / BLOCK, rel=FORWARD_RTOL
    )


def test_all_checkpoints_writes_history(run_dir: Path) -> None:
    result = invoke("eval", "--run", str(run_dir), "--all-checkpoints", "--quiet")
    assert result.exit_code == 0, result.output
    history = json.loads((run_dir / "eval_history.json").read_text())["checkpoints"]
    assert [row["checkpoint"] for row in history] == ["checkpoint-10", "checkpoint-20"]
    # different weights, different numbers
    assert history[0]["metrics"]["perplexity"] != history[1]["metrics"]["perplexity"]
    assert "checkpoint-10" in result.output and "checkpoint-20" in result.output


def blocks_nll(model_dir: Path, ids: list[int], n_blocks: int | None = None) -> tuple[float, int]:
    """Summed NLL and predicted tokens of disjoint BLOCK-token blocks, by plain forward passes."""
    model = load(model_dir)
    total, count = 0.0, 0
    for b in range(n_blocks if n_blocks is not None else len(ids) // BLOCK):
        nll, n = nll_of(model, ids[b * BLOCK : (b + 1) * BLOCK], 1)
        total, count = total + nll, count + n
    return total, count


def test_test_split_equals_plain_forward_passes_over_the_test_file(run_dir: Path, tmp_path: Path) -> None:
    test_metrics, about = evaluated("--run", str(run_dir), "--split", "test")
    assert about["split"] == "test"
    total, count = blocks_nll(run_dir, token_stream(run_dir, run_dir.parent / "test.txt"))
    assert test_metrics["eval_tokens"] == count
    assert test_metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=FORWARD_RTOL)


def test_other_evaluations_of_a_run_never_replace_trainings_result(run_dir: Path, tmp_path: Path) -> None:
    """eval --run rewrote eval_results.json and all_results.json for any split, method, checkpoint or data."""
    result = invoke("eval", "--run", str(run_dir), "--quiet")  # the evaluation training runs at its end
    assert result.exit_code == 0, result.output
    trainings = {name: (run_dir / name).read_bytes() for name in ("eval_results.json", "all_results.json")}
    other = tmp_path / "other.txt"
    other.write_text((ASSETS / "train.txt").read_text(encoding="utf-8")[:30000], encoding="utf-8")
    cases = [
        (["--split", "test"], "test_blocks64.json"),
        (["--stride", "32"], "validation_strided-context64-stride32.json"),
        (["--checkpoint", "checkpoint-10"], "checkpoint-10_validation_blocks64.json"),
        (["--set", f"data.validation_file={other}"], "validation_blocks64_recipe-"),
    ]
    for args, name in cases:
        result = invoke("eval", "--run", str(run_dir), "--quiet", *args)
        assert result.exit_code == 0, result.output
        (written,) = [
            Path(line[len("Wrote ") :])
            for line in result.output.splitlines()
            if line.startswith("Wrote ") and "evaluations.json" not in line
        ]
        assert written.parent == run_dir / "evals" and written.name.startswith(name), written
        assert json.loads(written.read_text())["eval_tokens"] > 0
        assert {n: (run_dir / n).read_bytes() for n in trainings} == trainings
    described = json.loads((run_dir / "evaluations.json").read_text())["evals/test_blocks64.json"]
    assert described["split"] == "test" and described["method"] == "blocks"


def test_strided_eval_scores_the_text_of_the_first_max_eval_samples_blocks(
    run_dir: Path, tmp_path: Path
) -> None:
    """data.max_eval_samples used to be ignored by --stride, which scored the whole split."""
    out = tmp_path / "s.json"
    result = invoke(
        "eval", "--run", str(run_dir), "--stride", "32", "--set", "data.max_eval_samples=5",
        "--quiet", "--output", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    ids = token_stream(run_dir, ASSETS / "validation.txt")[: 5 * BLOCK]  # the text of the first 5 blocks
    assert metrics["eval_tokens"] == len(ids) - 1
    model = load(run_dir)
    total, scored_until, start = 0.0, 1, 0
    while scored_until < len(ids):
        end = min(start + BLOCK + 1, len(ids))
        nll, _ = nll_of(model, ids[start:end], scored_until - start)
        total, scored_until, start = total + nll, end, start + 32
    assert metrics["perplexity"] == pytest.approx(math.exp(total / (len(ids) - 1)), rel=FORWARD_RTOL)


@pytest.mark.parametrize("limit", [None, 5])
def test_streamed_blocks_evaluate_as_the_same_blocks_not_streamed(
    run_dir: Path, tmp_path: Path, limit
) -> None:
    """eval of data.streaming = true called len() on an IterableDataset and died with a TypeError."""
    extra = ["--set", f"data.max_eval_samples={limit}"] if limit else []
    outs = {}
    for streaming in ("false", "true"):
        outs[streaming] = tmp_path / f"{streaming}.json"
        result = invoke(
            "eval", "--run", str(run_dir), "--set", f"data.streaming={streaming}", *extra,
            "--quiet", "--output", str(outs[streaming]),
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    cached, streamed = (json.loads(outs[k].read_text()) for k in ("false", "true"))
    for key in ("eval_tokens", "eval_samples", "bits_per_byte", "word_perplexity"):
        assert streamed.get(key) == cached.get(key), key
    # Same blocks, read from another source: the same forward passes, in batches of the same shape.
    assert streamed["eval_loss"] == cached["eval_loss"]
    total, count = blocks_nll(run_dir, token_stream(run_dir, ASSETS / "validation.txt"), limit)
    assert streamed["eval_tokens"] == count
    assert streamed["perplexity"] == pytest.approx(math.exp(total / count), rel=FORWARD_RTOL)


def test_eval_of_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["eval", "--run", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a clm-runner run" in result.output
    assert "Traceback" not in result.output


def test_eval_any_model_through_a_recipe(run_dir: Path, tmp_path: Path) -> None:
    checkpoint = run_dir / "checkpoint-20"
    any_model, about = evaluated(
        "--recipe", str(run_dir / "recipe.toml"), "--set", f"model.model_name_or_path={checkpoint}"
    )
    from_run, _ = evaluated("--run", str(run_dir), "--checkpoint", str(checkpoint))
    assert about["model"] == str(checkpoint)
    # The same weights, tokens and batches in the same process: the same float operations, bit for bit.
    assert any_model["eval_loss"] == from_run["eval_loss"]
