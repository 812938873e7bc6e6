"""Shared by the tests: paths, a tiny smoke run (seconds on a CPU) run in-process or as a real subprocess, the
CLI invoked in-process, and the tiny models and tokenizers the tests build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.toml"
ASSETS = REPO / "recipes" / "smoke"
EOS = "<|endoftext|>"

# 1 layer x 32 wide over 32-token blocks: a step takes milliseconds. 32 train blocks / batch 4 = 8 steps per
# epoch, so 12 steps cross an epoch boundary (the sampler reshuffles) and checkpoint-4 sits mid-epoch.
TINY_CONFIG = "n_layer=1,n_head=2,n_embd=32,n_positions=64,vocab_size=2048,bos_token_id=0,eos_token_id=0"
MAX_STEPS = 12


def tiny_sets(output_dir: Path, *extra: str, max_steps: int = MAX_STEPS) -> list[str]:
    sets = [
        f"model.config_overrides={TINY_CONFIG}",
        f"model.tokenizer_name={ASSETS / 'tokenizer'}",
        f"data.train_file={ASSETS / 'train.txt'}",
        f"data.validation_file={ASSETS / 'validation.txt'}",
        "data.block_size=32",
        "data.max_train_samples=32",
        "data.max_eval_samples=16",
        f"training.output_dir={output_dir}",
        "training.per_device_train_batch_size=4",
        "training.per_device_eval_batch_size=16",
        f"training.max_steps={max_steps}",
        "training.save_strategy=steps",
        "training.save_steps=4",
        "training.save_total_limit=5",
        "training.logging_steps=1",
        "training.eval_strategy=no",
        *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def train_args(
    output_dir: Path, *extra: str, max_steps: int = MAX_STEPS, flags: tuple[str, ...] = ()
) -> list[str]:
    return [
        "train",
        "--recipe",
        str(SMOKE),
        "--quiet",
        *flags,
        *tiny_sets(output_dir, *extra, max_steps=max_steps),
    ]


# Runs the CLI as `clm-runner ...` would; CLM_TEST_STEP_DELAY slows every training step (seconds) so a
# test can signal or kill the process mid-run. The delay changes no number: it sleeps between steps.
WRAPPER = """
import os, sys, time
delay = float(os.environ.get("CLM_TEST_STEP_DELAY", "0"))
if delay:
    from clm_runner.train.trainer import ClmTrainer
    original = ClmTrainer.training_step
    def slowed(self, *args, **kwargs):
        time.sleep(delay)
        return original(self, *args, **kwargs)
    ClmTrainer.training_step = slowed
from clm_runner.cli import main
sys.argv = ["clm-runner", *sys.argv[1:]]
sys.exit(main(sys.argv[1:]))
"""


def subprocess_env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "CLM_RUNNER_CACHE": str(cache),
            # One thread everywhere: the same float results in every process, and fair on a shared CPU.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra)
    return env


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    handle = open(log, "w", encoding="utf-8")  # noqa: SIM115 - closed when the process is reaped
    process = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *args], env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd
    )
    process.log_handle = handle  # type: ignore[attr-defined]
    return process


def finish(process: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        process.log_handle.close()  # type: ignore[attr-defined]


def run_cli(
    args: list[str], env: dict[str, str], log: Path, timeout: float = 120, cwd: Path = REPO
) -> tuple[int, str]:
    code = finish(start(args, env, log, cwd), timeout)
    return code, log.read_text(encoding="utf-8")


def wait_for(predicate, process: subprocess.Popen, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"process exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.send_signal(signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a directory): equal snapshots, nothing changed."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def invoke(*args: str, catch_exceptions: bool = False):
    """`clm-runner ARGS` in this process (click's CliRunner). A user error still ends in its exit status; any
    other exception raises, unless catch_exceptions (then it is in the result's `exception`)."""
    from click.testing import CliRunner

    from clm_runner.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch_exceptions)


def sets(*pairs: str) -> list[str]:
    """["--set", pair, ...] for each pair."""
    return [arg for pair in pairs for arg in ("--set", pair)]


def tiny_gpt2_config(**overrides: object):
    """A GPT-2 small enough to train and evaluate in milliseconds (1 layer x 32 wide unless overridden)."""
    from transformers import GPT2Config

    values = dict(
        n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=2048, bos_token_id=0, eos_token_id=0
    )
    values.update(overrides)
    return GPT2Config(**values)


def tiny_base_model(directory: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 with random weights (seeded) and the smoke tokenizer, saved as a pretrained model directory:
    the base model of the adapter tests."""
    import shutil

    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(directory)
    for file in (ASSETS / "tokenizer").iterdir():
        shutil.copy(file, directory / file.name)
    return directory


def lora_sets(base: Path, output_dir: Path, *extra: str, max_steps: int = MAX_STEPS) -> list[str]:
    """tiny_sets for LoRA on `base` (tiny_base_model): rank-4 adapters on PEFT's default for GPT-2 (c_attn)."""
    return tiny_sets(
        output_dir,
        "model.config_overrides=",
        "model.tokenizer_name=",
        "model.model_type=",
        f"model.model_name_or_path={base}",
        "adapter.r=4",
        "adapter.lora_alpha=8",
        "training.learning_rate=5e-3",
        *extra,
        max_steps=max_steps,
    )


def independent_perplexity(model, tokenizer, text_path: Path, block_size: int, max_blocks: int | None = None):
    """Plain forward passes over run_clm-style blocks of the text: (exp(sum NLL / predicted tokens), tokens)."""
    import math

    import torch

    ids: list[int] = []
    for line in text_path.read_text(encoding="utf-8").splitlines(keepends=True):
        ids.extend(tokenizer(line)["input_ids"])
    n_blocks = len(ids) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in range(n_blocks):
            block = torch.tensor([ids[b * block_size : (b + 1) * block_size]])
            logits = model(input_ids=block).logits[0, :-1].double()
            total += -torch.log_softmax(logits, dim=-1).gather(1, block[0, 1:, None]).sum().item()
            count += block_size - 1
    return math.exp(total / count), count


def byte_level_tokenizer(
    texts, *, vocab_size: int = 400, special_tokens=(EOS,), template: tuple | None = None, **roles
):
    """A byte-level BPE trained on `texts`, wrapped for transformers (roles: eos_token=..., model_max_length=...).

    `template=(bos, eos)` makes every row `bos ... eos`, as tokenizers that add special tokens do.
    """
    from tokenizers import processors

    from clm_runner.models.bpe import as_transformers_tokenizer, train_byte_level_bpe

    backend = train_byte_level_bpe(vocab_size=vocab_size, texts=texts, special_tokens=special_tokens)
    if template is not None:
        bos, eos = template
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))],
        )
    return as_transformers_tokenizer(backend, **roles)


def same_weights(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensors, bit for bit."""
    from safetensors.numpy import load_file

    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all((left[k] == right[k]).all() for k in left)


def copy_checkpoints(source: Path, target: Path, steps: tuple[int, ...]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    import shutil

    for step in steps:
        shutil.copytree(source / f"checkpoint-{step}", target / f"checkpoint-{step}")


def completed_run(run: Path, args: list[str], env: dict[str, str]) -> Path:
    """`clm-runner ARGS` (training into `run`) as a real subprocess, to its end; the test fails if it does not."""
    code, text = run_cli(args, env, run.parent / f"{run.name}.log")
    assert code == 0, text[-3000:]
    return run
