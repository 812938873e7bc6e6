"""The GPU code paths, run for real on a CUDA machine (skipped elsewhere; tests/test_performance.py fakes
CUDA to check the choices on the CPU): bf16 + TF32 by default, fused AdamW, torch.compile, SDPA attention,
and the exact evaluation under bf16 autocast."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_gpt2_config, train_args

from clm_runner.cli import cli

pytestmark = pytest.mark.gpu

BF16_RTOL = 2e-2
"""bf16 keeps 8 significant bits (relative spacing 2**-7 = 7.8e-3): matmuls under bf16 autocast round
their inputs to it, so a mean NLL over a few hundred tokens moves by a fraction of that spacing; 2e-2
bounds it and still catches a wrong token count or label shift on short splits (> 3e-2 here)."""


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("CLM_RUNNER_CACHE", str(root / "cache"))
    try:
        args = train_args(
            root / "run",
            "training.use_cpu=false",
            "training.eval_strategy=steps",
            "training.eval_steps=4",
            max_steps=8,
        )
        result = CliRunner().invoke(cli, args)
    finally:
        monkeypatch.undo()
    assert result.exit_code == 0, result.output
    return root / "run"


def test_bf16_and_tf32_are_the_default_and_training_stays_finite(gpu_run: Path) -> None:
    performance = json.loads((gpu_run / "run.json").read_text())["performance"]
    if torch.cuda.is_bf16_supported():
        assert performance["precision"] == "bf16" and performance["tf32"] is True
    else:
        assert performance["precision"] == "fp16"
    results = json.loads((gpu_run / "train_results.json").read_text())
    assert math.isfinite(results["train_loss"]) and results["train_tokens_per_second"] > 0
    assert results["train_peak_gpu_memory_gb"] > 0


def test_the_optimizer_is_fused_adamw_and_attention_is_sdpa(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel, TrainingArguments, default_data_collator

    from clm_runner.train.trainer import ClmTrainer

    model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=64, n_positions=32))
    blocks = [{"input_ids": torch.arange(32) % 64, "labels": torch.arange(32) % 64}] * 8
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", bf16=True)
    trainer = ClmTrainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator)
    trainer.create_optimizer()
    assert trainer.optimizer.defaults.get("fused") is True  # adamw_torch_fused, transformers' default
    assert model.config._attn_implementation == "sdpa"  # flash / memory-efficient kernels where they apply


def test_compiled_training_gives_eager_losses_on_cuda(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CLM_RUNNER_CACHE", str(tmp_path / "cache"))
    losses = {}
    for compile_ in ("false", "true"):
        run = tmp_path / compile_
        args = train_args(run, "training.use_cpu=false", f"training.torch_compile={compile_}", max_steps=6)
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        history = json.loads((run / "trainer_state.json").read_text())["log_history"]
        losses[compile_] = [entry["loss"] for entry in history if "loss" in entry]
    # Both in bf16: fused kernels round bf16 sums differently, and the steps compound it.
    assert losses["true"] == pytest.approx(losses["false"], rel=BF16_RTOL)


def test_exact_evaluation_under_bf16_autocast_matches_fp32(gpu_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from clm_runner.config.load import load_recipe
    from clm_runner.data.blocks import prepare_splits
    from clm_runner.eval.perplexity import evaluate_blocks

    model = AutoModelForCausalLM.from_pretrained(gpu_run, dtype=torch.float32).cuda()
    recipe = load_recipe(gpu_run / "recipe.toml", require_output_dir=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpu_run)
    blocks = prepare_splits(recipe, tokenizer, 32, ["validation"], progress=False)["validation"].blocks
    fp32 = evaluate_blocks(model, blocks, batch_size=8, device="cuda")
    bf16 = evaluate_blocks(model, blocks, batch_size=8, device="cuda", autocast_dtype=torch.bfloat16)
    assert bf16.tokens == fp32.tokens
    assert bf16.eval_loss == pytest.approx(fp32.eval_loss, rel=BF16_RTOL)
