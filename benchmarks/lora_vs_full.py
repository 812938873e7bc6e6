"""Benchmark: LoRA against full fine-tuning on the CPU, the same base, data and steps, side by side.

For each model size (the smoke recipe's 2 x 128 GPT-2 and a 6 x 384 one), a base is first trained from
scratch on recipes/smoke/train.txt (Wikipedia-like text); then two fine-tuning runs start from it on another
domain (the Python documentation of ../shared/data/pydocs, or recipes/smoke text when that is absent):

  full   every weight trained (learning rate 1e-3)
  lora   rank-16 adapters on every attention and MLP matrix, base frozen (learning rate 3e-3)

Each run is `clm-runner train` in its own process; the table gives its trainable parameters, its peak RSS
(getrusage of that process), its training tokens/s (clm-runner's own measure, train_tokens_per_second) and
the validation perplexity it reaches, then the LoRA / full ratios.

    python benchmarks/lora_vs_full.py [--steps 40] [--base-steps 60] [--scratch DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "recipes" / "smoke.toml"
PYDOCS = REPO.parent / "shared" / "data" / "pydocs"

SIZES = {
    "smoke 2x128": "n_layer=2,n_head=4,n_embd=128",
    "6x384": "n_layer=6,n_head=6,n_embd=384",
}
COMMON = "n_positions=128,vocab_size=2048,bos_token_id=0,eos_token_id=0"

# Runs `clm-runner ARGS` and writes this process's peak RSS (kB on Linux) to $PEAK_RSS_FILE.
WRAPPER = """
import os, resource, sys
from clm_runner.cli import main
code = main(sys.argv[1:])
with open(os.environ["PEAK_RSS_FILE"], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
sys.exit(code)
"""


def sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def corpus(scratch: Path) -> tuple[Path, Path, str]:
    """(train file, validation file, name) of the fine-tuning domain."""
    if not (PYDOCS / "train.txt.gz").exists():
        return (
            REPO / "recipes/smoke/train.txt",
            REPO / "recipes/smoke/validation.txt",
            "recipes/smoke (no pydocs)",
        )
    files = []
    for split in ("train", "validation"):
        target = scratch / f"pydocs-{split}.txt"
        with gzip.open(PYDOCS / f"{split}.txt.gz", "rb") as source:
            target.write_bytes(source.read())
        files.append(target)
    return files[0], files[1], "pydocs (Python documentation)"


def train(args: list[str], scratch: Path, name: str) -> dict:
    rss_file = scratch / f"{name}.rss"
    env = {**os.environ, "PEAK_RSS_FILE": str(rss_file), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, "train", "--quiet", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return {"peak_rss_mb": int(rss_file.read_text()) / 1024}


def result(run_dir: Path, peak: dict) -> dict:
    trained = json.loads((run_dir / "train_results.json").read_text())
    evaluated = json.loads((run_dir / "eval_results.json").read_text())
    manifest = json.loads((run_dir / "run.json").read_text())
    if "adapter" in manifest:
        trainable = manifest["adapter"]["trainable_parameters"]
        total = manifest["adapter"]["total_parameters"]
    else:
        from safetensors import safe_open

        with safe_open(str(run_dir / "model.safetensors"), "pt") as f:
            trainable = total = sum(_numel(f, k) for k in f.keys())  # noqa: SIM118 - a safetensors handle, not a dict
    return {
        **peak,
        "trainable": trainable,
        "total": total,
        "tokens_per_s": trained["train_tokens_per_second"],
        "perplexity": evaluated["perplexity"],
    }


def _numel(handle, key: str) -> int:
    size = 1
    for dim in handle.get_slice(key).get_shape():
        size *= dim
    return size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps of each run")
    parser.add_argument("--base-steps", type=int, default=60, help="steps training each base from scratch")
    parser.add_argument("--scratch", type=Path, default=None)
    opts = parser.parse_args()
    scratch = opts.scratch or Path(tempfile.mkdtemp(prefix="lora-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    train_file, validation_file, domain = corpus(scratch)

    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"bases: trained from scratch for {opts.base_steps} steps on recipes/smoke/train.txt")
    print(
        f"fine-tuning: {opts.steps} steps x 16 blocks x 128 tokens on {domain}; validation: its first 64 blocks"
    )
    rows = []
    for size, shape in SIZES.items():
        slug = size.split()[-1]
        base = scratch / f"base-{slug}"
        train(
            ["--recipe", str(SMOKE), *sets(
                f"model.config_overrides={shape},{COMMON}", f"training.output_dir={base}",
                f"training.max_steps={opts.base_steps}", "training.eval_strategy=no", "training.save_strategy=no",
                "training.eval_on_start=false", "data.max_eval_samples=8",
            )],
            scratch, f"base-{slug}",
        )  # fmt: skip
        for method in ("full", "lora"):
            run_dir = scratch / f"{method}-{slug}"
            extra = (
                ["adapter.r=16", "adapter.lora_alpha=32", 'adapter.target_modules=["c_attn","c_proj","c_fc"]',
                 "training.learning_rate=3e-3"]
                if method == "lora"
                else ["training.learning_rate=1e-3"]
            )  # fmt: skip
            peak = train(
                ["--recipe", str(SMOKE), *sets(
                    f"model.model_name_or_path={base}", "model.model_type=", "model.config_overrides=",
                    "model.tokenizer_name=", f"data.train_file={train_file}", f"data.validation_file={validation_file}",
                    "data.max_eval_samples=64", f"training.output_dir={run_dir}", f"training.max_steps={opts.steps}",
                    "training.eval_strategy=no", "training.eval_on_start=false", "training.save_strategy=no",
                    "training.warmup_steps=0.1", *extra,
                )],
                scratch, f"{method}-{slug}",
            )  # fmt: skip
            rows.append((size, method, result(run_dir, peak)))

    print()
    print(
        f"{'model':<12} {'method':<6} {'trainable':>11} {'of':>11} {'peak RSS':>10} {'tokens/s':>9} {'perplexity':>10}"
    )
    for size, method, r in rows:
        print(
            f"{size:<12} {method:<6} {r['trainable']:>11,} {r['total']:>11,} {r['peak_rss_mb']:>8.0f}MB"
            f" {r['tokens_per_s']:>9,.0f} {r['perplexity']:>10.2f}"
        )
    print()
    for size in SIZES:
        full = next(r for s, m, r in rows if s == size and m == "full")
        lora = next(r for s, m, r in rows if s == size and m == "lora")
        print(
            f"{size}: LoRA / full: trainable {lora['trainable'] / full['trainable']:.3f}, "
            f"peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.3f}, tokens/s {lora['tokens_per_s'] / full['tokens_per_s']:.2f}, "
            f"perplexity {lora['perplexity'] / full['perplexity']:.3f}"
        )


if __name__ == "__main__":
    main()
