"""Promises the README makes, each exercised end to end through `train` (or the CLI), not in pieces."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from itertools import chain
from pathlib import Path

import pytest
import torch
from helpers import (
    ASSETS,
    REPO,
    SMOKE,
    finish,
    invoke,
    start,
    subprocess_env,
    tiny_gpt2_config,
    train_args,
    wait_for,
)
from tolerances import FORWARD_RTOL

pytestmark = pytest.mark.slow


def pretrained_dir(directory: Path) -> Path:
    """A small GPT-2 with trained-looking (seeded, non-default) weights and the smoke tokenizer, saved."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.manual_seed(3)
    model = GPT2LMHeadModel(tiny_gpt2_config())
    with torch.no_grad():
        model.transformer.wte.weight.mul_(3.0)  # far from what a fresh init of the same config gives
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(directory)
    return directory


def validation_blocks_nll(model_dir: Path, block: int, n_blocks: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = (ASSETS / "validation.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    ids = list(chain.from_iterable(tokenizer(line)["input_ids"] for line in lines))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(n_blocks):
            x = torch.tensor([ids[b * block : (b + 1) * block]])
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
            total -= logp.gather(1, x[0, 1:, None]).sum().item()
            count += block - 1
    return total, count


def test_fine_tuning_a_pretrained_local_model_starts_from_its_weights(tmp_path: Path) -> None:
    """The reference job's path: weights loaded with from_pretrained (not a fresh init), then trained."""
    base = pretrained_dir(tmp_path / "base")
    run = tmp_path / "run"
    result = invoke(
        "train", "--recipe", str(SMOKE), "--quiet",
        "--set", f"model.model_name_or_path={base}", "--set", "model.model_type=",
        "--set", "model.config_overrides=", "--set", "model.tokenizer_name=",
        "--set", f"data.train_file={ASSETS / 'train.txt'}", "--set", f"data.validation_file={ASSETS / 'validation.txt'}",
        "--set", "data.block_size=32", "--set", "data.max_train_samples=32", "--set", "data.max_eval_samples=8",
        "--set", f"training.output_dir={run}", "--set", "training.max_steps=3", "--set", "training.eval_strategy=no",
        "--set", "training.save_strategy=no",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    on_start = next(entry for entry in history if "eval_loss" in entry and entry["step"] == 0)
    total, count = validation_blocks_nll(base, 32, 8)
    # The untrained baseline is the loaded model's own loss: its weights came from the directory.
    assert on_start["eval_loss"] == pytest.approx(total / count, rel=FORWARD_RTOL)
    trained, _ = validation_blocks_nll(run, 32, 8)
    assert trained != total  # and training changed them
    assert str(base) in (run / "README.md").read_text()  # the model card names the base model


def test_data_prints_what_training_will_see_and_saves_it(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    saved = tmp_path / "blocks"
    result = invoke(
        "data", "--recipe", str(SMOKE),
        "--set", f"model.tokenizer_name={ASSETS / 'tokenizer'}",
        "--set", f"data.train_file={ASSETS / 'train.txt'}", "--set", f"data.validation_file={ASSETS / 'validation.txt'}",
        "--save", str(saved),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    for split, name in (("train", "train.txt"), ("validation", "validation.txt")):
        lines = (ASSETS / name).read_text(encoding="utf-8").splitlines(keepends=True)
        tokens = sum(len(tokenizer(line)["input_ids"]) for line in lines)
        row = re.search(rf"^{split}\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)", result.output, re.MULTILINE)
        assert row, result.output
        rows, counted, blocks, dropped = (int(v.replace(",", "")) for v in row.groups())
        assert (rows, counted, blocks, dropped) == (len(lines), tokens, tokens // 128, tokens % 128)
    import datasets

    loaded = datasets.load_from_disk(str(saved))
    assert len(loaded["validation"]) == int(
        re.search(r"^validation\s+[\d,]+\s+[\d,]+\s+([\d,]+)", result.output, re.MULTILINE)
        .group(1)
        .replace(",", "")
    )


def test_overwrite_trains_into_a_directory_of_other_files_and_keeps_them(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    result = invoke("train", *train_args(run, max_steps=2, flags=("--overwrite",))[1:])
    assert result.exit_code == 0, result.output
    assert (run / "notes.txt").read_text() == "keep me" and (run / "model.safetensors").is_file()
    assert not (run / "previous-runs").exists()  # there was no run to move aside


def test_do_eval_false_skips_the_final_evaluation_and_its_data(tmp_path: Path, fresh_cache: Path) -> None:
    run = tmp_path / "run"
    result = invoke(
        "train", *train_args(run, "training.do_eval=false", "training.eval_on_start=false", max_steps=2)[1:]
    )
    assert result.exit_code == 0, result.output
    assert not (run / "eval_results.json").exists()
    assert "eval_loss" not in json.loads((run / "all_results.json").read_text())
    prepared = json.loads((run / "run.json").read_text())["data"]["prepared"]
    assert list(prepared) == ["train"]  # the validation split was not even prepared
    shown = invoke("recipe", "show", "--recipe", str(SMOKE))
    assert "do_eval = true" in shown.output and "do_train = true" in shown.output  # what train uses


def test_a_run_repeats_from_its_recipe_toml_alone(tmp_path: Path) -> None:
    first = tmp_path / "first"
    result = invoke("train", *train_args(first, max_steps=4)[1:])
    assert result.exit_code == 0, result.output
    again = tmp_path / "again"
    result = invoke("train", "--recipe", str(first / "recipe.toml"), "--set", f"training.output_dir={again}")
    assert result.exit_code == 0, result.output
    # The same resolved recipe, seed and machine: the same float operations, the same numbers.
    for name in ("eval_results.json", "train_results.json"):
        a, b = (json.loads((d / name).read_text()) for d in (first, again))
        assert a.get("eval_loss") == b.get("eval_loss") and a.get("train_loss") == b.get("train_loss")


def test_debug_shows_the_traceback_of_a_user_error(tmp_path: Path) -> None:
    env = subprocess_env(tmp_path / "cache")
    for flags, shows in (((), False), (("--debug",), True)):
        done = subprocess.run(
            [sys.executable, "-m", "clm_runner", *flags, "recipe", "check", "--recipe", str(tmp_path / "none.toml")],
            env=env, capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        assert ("Traceback (most recent call last)" in done.stderr) is shows, done.stderr
        assert "Recipe file not found" in done.stderr


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = subprocess_env(tmp_path / "cache", CLM_TEST_STEP_DELAY="0.5")
    log = tmp_path / "log.txt"
    process = start(train_args(run, "training.save_steps=100", max_steps=40), env, log)
    wait_for(lambda: "step 2/40" in log.read_text(), process, what="training under way")
    process.send_signal(signal.SIGINT)
    wait_for(lambda: "Received SIGINT" in log.read_text(), process, what="the first SIGINT noted")
    process.send_signal(signal.SIGINT)
    assert finish(process) == 130
    text = log.read_text()
    assert "Stopped at once by SIGINT (no checkpoint was written yet)" in text and "Traceback" not in text
    assert not list(run.glob("checkpoint-*"))  # the second signal did not wait for one
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "interrupted" and "at once" in manifest["error"]
