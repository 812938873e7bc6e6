"""LoRA end to end: train, the output dir, eval = merged export = a plain forward, resume, generate, export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    ASSETS,
    SMOKE,
    completed_run,
    copy_checkpoints,
    independent_perplexity,
    invoke,
    lora_sets,
    losses_by_step,
    run_cli,
    same_weights,
    sets,
    snapshot,
    tiny_base_model,
    tiny_sets,
    train_args,
)
from tolerances import FORWARD_RTOL

pytestmark = pytest.mark.slow

EVAL_BLOCKS, BLOCK = 16, 32  # tiny_sets: data.max_eval_samples, data.block_size
ADAPTER_PARAMETERS = 4 * (32 + 96)  # rank 4 on the one c_attn (32 -> 96) of the tiny GPT-2


@pytest.fixture(scope="module")
def base(workdir: Path) -> Path:
    return tiny_base_model(workdir / "base")


def lora_train(base: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--recipe", str(SMOKE), "--quiet", *lora_sets(base, run, *extra)]


@pytest.fixture(scope="module")
def lora_run(workdir: Path, env: dict[str, str], base: Path) -> Path:
    return completed_run(workdir / "lora", lora_train(base, workdir / "lora"), env)


@pytest.fixture(scope="module")
def merged(lora_run: Path, workdir: Path) -> Path:
    result = invoke("export", lora_run, "--merge", "--output", workdir / "merged")
    assert result.exit_code == 0, result.output
    return workdir / "merged"


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_the_output_dir_holds_the_adapter_and_says_on_which_base(lora_run: Path, base: Path) -> None:
    names = {p.name for p in lora_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= names
    assert {
        "recipe.toml",
        "run.json",
        "eval_results.json",
        "train_results.json",
        "trainer_state.json",
    } <= names
    assert "model.safetensors" not in names  # the base is not copied into every run
    saved = json.loads((lora_run / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["target_modules"] == ["c_attn"]
    from clm_runner.config.load import load_recipe

    recorded = load_recipe(lora_run / "recipe.toml", require_output_dir=False).adapter
    assert recorded is not None and recorded.lora["target_modules"] == ["c_attn"]  # PEFT's default, resolved
    manifest = json.loads((lora_run / "run.json").read_text())
    assert manifest["adapter"]["trainable_parameters"] == ADAPTER_PARAMETERS
    assert manifest["adapter"]["adapted_modules"] == ["transformer.h.0.attn.c_attn"]
    assert manifest["base_model"]["path"] == str(base.resolve())
    assert set(manifest["base_model"]["files"]) == {"config.json", "model.safetensors"}
    card = (lora_run / "README.md").read_text()
    assert "## LoRA adapter" in card and str(base) in card
    assert f"{ADAPTER_PARAMETERS:,} trainable of" in (lora_run / "train.log").read_text()
    # Every checkpoint is sealed and holds the adapter with the optimizer state.
    for checkpoint in ("checkpoint-4", "checkpoint-8", "checkpoint-12"):
        held = {p.name for p in (lora_run / checkpoint).iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "clm_runner_complete.json"} <= held


def test_peft_loads_the_output_dir_on_its_base(lora_run: Path, base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora_run)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == ADAPTER_PARAMETERS


def test_only_the_adapter_parameters_change(lora_run: Path, base: Path, merged: Path) -> None:
    adapter = tensors(lora_run / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in key or ".lora_B." in key for key in adapter)
    assert any(t.abs().sum() > 0 for key, t in adapter.items() if ".lora_B." in key)  # B starts at zero
    assert not same_weights(
        lora_run / "checkpoint-4" / "adapter_model.safetensors", lora_run / "adapter_model.safetensors"
    )
    # The merged model is the base with W + scale * B @ A in the adapted module only, every other weight the base's.
    before, after = tensors(base / "model.safetensors"), tensors(merged / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {key for key in before if not (before[key] == after[key]).all()}
    assert changed == {"transformer.h.0.attn.c_attn.weight"}


def test_eval_of_the_adapter_equals_its_merged_export_and_a_plain_forward(
    lora_run: Path, base: Path, merged: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_out, merged_out = tmp_path / "adapter.json", tmp_path / "merged.json"
    result = invoke("eval", "--run", lora_run, "--quiet", "--output", adapter_out)
    assert result.exit_code == 0, result.output
    merged_sets = sets(
        "model.model_type=",
        "model.config_overrides=",
        "model.tokenizer_name=",
        f"model.model_name_or_path={merged}",
    )
    result = invoke(
        "eval",
        "--recipe",
        SMOKE,
        *tiny_sets(tmp_path / "unused"),
        *merged_sets,
        "--quiet",
        "--output",
        merged_out,
    )
    assert result.exit_code == 0, result.output
    via_adapter = json.loads(adapter_out.read_text())
    via_merged = json.loads(merged_out.read_text())
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora_run)
    expected, tokens = independent_perplexity(
        plain, AutoTokenizer.from_pretrained(lora_run), ASSETS / "validation.txt", BLOCK, EVAL_BLOCKS
    )
    assert via_adapter["eval_tokens"] == via_merged["eval_tokens"] == tokens
    assert via_adapter["perplexity"] == pytest.approx(via_merged["perplexity"], rel=FORWARD_RTOL)
    assert via_adapter["perplexity"] == pytest.approx(expected, rel=FORWARD_RTOL)
    assert via_merged["perplexity"] == pytest.approx(expected, rel=FORWARD_RTOL)
    trained = json.loads((lora_run / "eval_results.json").read_text())
    assert trained["perplexity"] == pytest.approx(expected, rel=FORWARD_RTOL)  # train's own final evaluation


def test_the_merged_export_loads_with_no_peft_installed(merged: Path) -> None:
    assert not (merged / "adapter_config.json").exists()
    code = (
        "import sys; sys.modules['peft'] = None\n"  # `import peft` now fails, as where it is not installed
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r}); AutoTokenizer.from_pretrained({str(merged)!r})\n"
        "print(type(m).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "GPT2LMHeadModel"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in merged.iterdir()
    }


def test_generate_report_and_model_work_on_the_run_and_its_checkpoints(lora_run: Path) -> None:
    for target in (lora_run, lora_run / "checkpoint-8"):
        result = invoke(
            "generate", target, "--prompt", " = Valley", "--temperature", "0", "--max-new-tokens", "5"
        )
        assert result.exit_code == 0, result.output
        assert result.output.startswith(" = Valley")
    result = invoke("eval", "--run", lora_run, "--checkpoint", "checkpoint-8", "--quiet")
    assert result.exit_code == 0, result.output
    assert (lora_run / "evals" / "checkpoint-8_validation_blocks32.json").exists()
    result = invoke("model", "--run", lora_run / "checkpoint-4")
    assert result.exit_code == 0, result.output
    assert (
        "c_attn: lora.Linear" in result.output
        and f"trainable parameters:  {ADAPTER_PARAMETERS:,} (" in result.output
    )
    result = invoke("report", lora_run)
    assert result.exit_code == 0, result.output
    assert "lora" in result.output


def test_a_killed_adapter_run_resumes_to_the_same_losses(
    workdir: Path, env: dict[str, str], base: Path, lora_run: Path
) -> None:
    run = workdir / "killed"
    # Killed as the save at step 8 starts: after step 8 trained, and after checkpoint-4's background seal
    # (a save waits for the one before it; a kill at step 7 could still find that seal in flight).
    code, text = run_cli(
        lora_train(base, run),
        {**env, "CLM_RUNNER_FAULT": "checkpoint.staging@2:kill"},
        workdir / "killed.log",
    )
    assert code == -9, text[-2000:]
    assert (run / "checkpoint-4").is_dir() and not (run / "checkpoint-8").exists()
    completed_run(run, lora_train(base, run), env)
    expected = {step: loss for step, loss in losses_by_step(lora_run).items() if step > 4}
    assert {step: loss for step, loss in losses_by_step(run).items() if step > 4} == expected
    assert same_weights(run / "adapter_model.safetensors", lora_run / "adapter_model.safetensors")
    final = json.loads((run / "eval_results.json").read_text())["eval_loss"]
    assert final == json.loads((lora_run / "eval_results.json").read_text())["eval_loss"]


def test_a_run_started_elsewhere_finds_its_relative_base(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(base.parent)  # the recipe names the base relative to where `train` ran
    run = tmp_path / "relative"
    result = invoke(*lora_train(Path(base.name), run, "training.save_strategy=no"))
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)  # `base` does not resolve here; run.json's absolute path does
    result = invoke("generate", run, "--prompt", " = Valley", "--temperature", "0", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output


def test_a_base_that_cannot_be_found_is_one_clear_line(lora_run: Path) -> None:
    before = snapshot(lora_run)
    result = invoke("eval", "--run", lora_run, "--set", "model.model_name_or_path=/no/such/base", "--quiet")
    assert result.exit_code == 2
    assert "is a LoRA adapter; its base model '/no/such/base' can't be loaded" in result.output
    assert "--set model.model_name_or_path=DIR" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert snapshot(lora_run) == before


def test_export_refuses_a_non_empty_output_and_a_4bit_merge(lora_run: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    result = invoke("export", lora_run, "--merge", "--output", occupied)
    assert result.exit_code == 2 and "is not empty" in result.output
    assert snapshot(occupied) == {"notes.txt": b"mine"}
    # A QLoRA run (trained on a GPU machine, copied here): merging into 4-bit weights is refused.
    qlora = tmp_path / "qlora"
    shutil.copytree(lora_run, qlora)
    recipe = qlora / "recipe.toml"
    recipe.write_text(recipe.read_text().replace("load_in_4bit = false", "load_in_4bit = true"))
    result = invoke("export", qlora, "--merge", "--output", tmp_path / "out")
    assert result.exit_code == 2 and "4-bit base" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    result = invoke(
        "export", qlora, "--merge", "--output", tmp_path / "out", "--set", "adapter.load_in_4bit=false"
    )
    assert result.exit_code == 0, result.output


def test_export_of_a_full_run_copies_its_final_model(
    workdir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    run = completed_run(workdir / "full", train_args(workdir / "full", max_steps=4), env)
    for flags in ((), ("--merge",)):
        out = tmp_path / f"export{len(flags)}"
        result = invoke("export", run, *flags, "--output", out)
        assert result.exit_code == 0, result.output
        assert {p.name for p in out.iterdir()} == {
            "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
        }  # fmt: skip
        assert same_weights(out / "model.safetensors", run / "model.safetensors")
    result = invoke("export", run, "--checkpoint", "checkpoint-4", "--output", tmp_path / "ckpt")
    assert result.exit_code == 0 and same_weights(
        tmp_path / "ckpt" / "model.safetensors", run / "checkpoint-4" / "model.safetensors"
    )


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ('["q_proj"]', "Layers it can adapt: c_attn, c_fc, c_proj, lm_head, wpe, wte."),
        ('["ln_1"]', "PEFT can't adapt this gpt2 model"),
    ],
)
def test_bad_placements_are_refused_before_anything_is_written(
    base: Path, tmp_path: Path, targets: str, expected: str
) -> None:
    run = tmp_path / "never"
    for command in ("recipe check", "train"):
        args = lora_train(base, run, f"adapter.target_modules={targets}")
        if command == "recipe check":
            args = ["recipe", "check", *args[1:]]
            args.remove("--quiet")
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output
        assert not run.exists()


def test_a_two_process_adapter_run_under_torchrun(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launchers import PROCESSES, launch_env, run, torchrun

    cache = tmp_path / "cache"
    run_dir = tmp_path / "ddp"
    done = run(torchrun(tmp_path / "logs", *lora_train(base, run_dir)), launch_env(cache, tmp_path / "home"))
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name for p in run_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "checkpoint-12"} <= names
    assert "model.safetensors" not in names and not [n for n in names if n.startswith("tmp-")]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["devices"]["world_size"] == PROCESSES
    # The evaluation both ranks ran (each scored half the blocks) equals one process scoring them all.
    monkeypatch.setenv("CLM_RUNNER_CACHE", str(cache))
    out = tmp_path / "alone.json"
    result = invoke("eval", "--run", run_dir, "--quiet", "--output", out)
    assert result.exit_code == 0, result.output
    written = json.loads((run_dir / "eval_results.json").read_text())
    alone = json.loads(out.read_text())
    assert alone["eval_tokens"] == written["eval_tokens"]
    assert alone["eval_loss"] == pytest.approx(written["eval_loss"], rel=FORWARD_RTOL)


def test_a_checkpoint_resumes_only_into_a_run_of_its_kind(lora_run: Path, base: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    copy_checkpoints(lora_run, run, (4,))
    before = snapshot(run)
    full = [
        "train",
        "--recipe",
        str(SMOKE),
        "--quiet",
        *tiny_sets(run),
        *sets(f"model.model_name_or_path={base}"),
    ]
    full += sets("model.model_type=", "model.config_overrides=", "model.tokenizer_name=")
    other_rank = lora_train(base, run, "adapter.r=8")
    # A key left unset resolves to PEFT's default (r = 8): the check compares what the recipe resolves to.
    unset_rank = lora_train(base, run, "adapter.r=")
    # A key that is not among the shaping ones but adds tensors: the planned weights file differs.
    tokens = lora_train(base, run, "adapter.trainable_token_indices=[1, 2]")
    for args, expected in (
        (full, "holds a LoRA adapter, but the recipe has no [adapter] section"),
        (other_rank, "adapter.r = 8 (the checkpoint's: 4)"),
        (unset_rank, "adapter.r = 8 (the checkpoint's: 4)"),
        (
            tokens,
            "holds other tensors than the recipe plans (base_model.model.transformer.wte.token_adapter."
            "trainable_tokens_delta: none in the checkpoint, shape [2, 32] planned)",
        ),
    ):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert expected in result.output and "--no-resume --overwrite" in result.output
        assert snapshot(run) == before


@pytest.mark.parametrize(
    "adapter",
    [
        ['adapter.target_modules=["wte"]'],
        ['adapter.target_modules=["lm_head"]'],
        ['adapter.target_modules=["wte", "lm_head", "c_attn"]'],
        ["adapter.target_modules=.*(wte|lm_head)"],  # a regex
        ['adapter.target_modules=["lm_head"]', 'adapter.modules_to_save=["wte"]'],
        ['adapter.modules_to_save=["lm_head"]'],
        ["adapter.trainable_token_indices=[1, 2, 3]"],
        ["adapter.use_dora=true"],
    ],
    ids=[
        "wte",
        "lm_head",
        "both-tied-and-c_attn",
        "regex",
        "lm_head-and-saved-wte",
        "saved-lm_head",
        "tokens",
        "dora",
    ],
)
def test_the_merged_export_scores_what_the_adapter_run_scores(
    base: Path, tmp_path: Path, adapter: list[str]
) -> None:
    """For every kind of target the recipe accepts: the run's own final evaluation equals the merged export's.
    GPT-2 ties wte to lm_head: an adapter merged into the shared weight changed both (1,473 became 1e9)."""
    run, merged = tmp_path / "run", tmp_path / "merged"
    result = invoke(
        *lora_train(
            base,
            run,
            *adapter,
            "training.save_strategy=no",
            "training.learning_rate=3e-2",
            "training.max_steps=4",
        )
    )
    assert result.exit_code == 0, result.output
    result = invoke("export", run, "--merge", "--output", merged)
    assert result.exit_code == 0, result.output
    out = tmp_path / "merged.json"
    merged_sets = sets(
        "model.model_type=",
        "model.config_overrides=",
        "model.tokenizer_name=",
        f"model.model_name_or_path={merged}",
    )
    result = invoke(
        "eval", "--recipe", SMOKE, *tiny_sets(tmp_path / "unused"), *merged_sets, "--quiet", "--output", out
    )
    assert result.exit_code == 0, result.output
    trained = json.loads((run / "eval_results.json").read_text())
    via_merged = json.loads(out.read_text())
    assert via_merged["eval_tokens"] == trained["eval_tokens"]
    assert via_merged["perplexity"] == pytest.approx(trained["perplexity"], rel=FORWARD_RTOL)


def test_an_adapter_recipe_does_not_resume_a_full_checkpoint(base: Path, tmp_path: Path) -> None:
    """A full run's checkpoint, found in the output dir or named by --resume-from: refused, exit 2, one line,
    the run dir unchanged byte for byte (in `recipe check` too)."""
    full = tmp_path / "full"
    full_args = ["train", "--recipe", str(SMOKE), "--quiet", *tiny_sets(full, max_steps=4)]
    full_args += sets("model.model_type=", "model.config_overrides=", "model.tokenizer_name=")
    result = invoke(*full_args, *sets(f"model.model_name_or_path={base}"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    copy_checkpoints(full, run, (4,))
    before = snapshot(run)
    found = lora_train(base, run)
    named = [*lora_train(base, tmp_path / "other"), "--resume-from", str(run / "checkpoint-4")]
    checked = ["recipe", "check", *found[1:]]
    checked.remove("--quiet")
    for args in (found, named, checked):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.output
        assert "checkpoint-4 holds a full model, but the recipe has an [adapter] section" in lines[0]
        assert "--no-resume --overwrite" in lines[0]
        assert snapshot(run) == before
    assert not (tmp_path / "other").exists()
