"""Benchmark: clm-runner's training path against a plain Trainer with run_clm's defaults, side by side.

Both train the same seeded random-init GPT-2 on the same token blocks for the same steps, in one
process, in back-to-back pairs whose order alternates (plain then clm-runner, clm-runner then plain,
...). The ratio is the median of the pairs' ratios, so a machine whose load drifts (a shared box)
biases neither side:

- plain: `transformers.Trainer` with run_clm's TrainingArguments defaults (fp32, no TF32, eager,
  data loaded in the main process; SDPA attention and fused AdamW, transformers' own defaults);
- clm-runner: `ClmTrainer` with `performance.device_defaults` (bf16 + TF32 + torch.compile + dataloader
  workers on a bf16 GPU; nothing on the CPU) and clm-runner's callbacks (throughput, progress).

Tokens/s are timed the same way for both by a separate clock callback: from the end of step `--warmup`
(compilation, worker start-up, allocator warm-up excluded) to the end of the last step, with a CUDA
synchronize at both ends. MFU = flops_per_token x tokens/s / peak, with flops_per_token = 6N + 12*L*d*T
(`clm_runner.models.flops.flops_per_token`) and the peak the GPU's dense bf16 one for both columns.

    python benchmarks/train_throughput.py                  # CPU: tiny GPT-2, must be >= 0.95x
    python benchmarks/train_throughput.py --gpu-config     # GPT-2 124M, block 1024, batch 8 (the reference recipe)

Token ids are random (a 50257-token vocabulary in --gpu-config): throughput does not depend on the text.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

CPU_RATIO_GOAL = 0.95
GPU_RATIO_GOAL = 4.0
GPU_MFU_GOAL = 0.40


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-config", action="store_true", help="GPT-2 124M, block 1024, batch 8, 40 steps")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--width", type=int, default=None, help="n_embd")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--block", type=int, default=None, help="block size in tokens")
    parser.add_argument("--batch", type=int, default=None, help="per-device train batch size")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads on a CPU run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.gpu_config:
        preset = dict(
            layers=12, width=768, heads=12, vocab=50257, block=1024, batch=8, steps=40, warmup=10, repeats=2
        )
    else:  # the smoke recipe's model: a CPU minute or two for all runs together
        preset = dict(
            layers=2, width=128, heads=4, vocab=2048, block=128, batch=16, steps=16, warmup=2, repeats=6
        )
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    return args


class StepClock:
    """Wall and process-CPU seconds from the end of step `warmup` to the end of step `steps`.

    CUDA is synchronized at both marks. The CPU clock (this process's CPU time, all its threads) is
    what a shared CPU machine can compare fairly: other tenants' load stretches wall time, not it.
    """

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step in (warmup, steps):
                    if cuda:
                        import torch

                        torch.cuda.synchronize()
                    clock.marks[state.global_step] = (time.perf_counter(), time.process_time())

        self.callback = Callback()
        self.marks: dict[int, tuple[float, float]] = {}
        self.warmup, self.steps = warmup, steps

    def seconds(self, which: int) -> float:
        return self.marks[self.steps][which] - self.marks[self.warmup][which]


def build_model(opts: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(opts.seed)
    config = GPT2Config(
        n_layer=opts.layers,
        n_head=opts.heads,
        n_embd=opts.width,
        n_positions=opts.block,
        vocab_size=opts.vocab,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def build_blocks(opts: argparse.Namespace):
    import datasets
    import numpy as np

    rows = opts.batch * opts.steps
    ids = np.random.default_rng(opts.seed).integers(0, opts.vocab, size=(rows, opts.block), dtype=np.int64)
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}).with_format("torch")


def base_arguments(opts: argparse.Namespace, output_dir: str) -> dict:
    """run_clm's TrainingArguments with only what the benchmark needs set."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": opts.batch,
        "max_steps": opts.steps,
        "save_strategy": "no",
        "report_to": "none",
        "seed": opts.seed,
    }


FLOAT32_PRECISION_SETTINGS = ("", "cuda.matmul", "cudnn")  # torch.backends[.<path>].fp32_precision


def float32_precision_state() -> dict[str, str]:
    """torch's process-wide TF32 switches (torch >= 2.9), which TrainingArguments(tf32=True) flips for good."""
    import torch

    state = {}
    for path in FLOAT32_PRECISION_SETTINGS:
        owner = torch.backends
        for part in filter(None, path.split(".")):
            owner = getattr(owner, part)
        if hasattr(owner, "fp32_precision"):
            state[path] = owner.fp32_precision
    return state


def restore_float32_precision(state: dict[str, str]) -> None:
    import torch

    for path, value in state.items():  # the global one first: setting it resets the others
        owner = torch.backends
        for part in filter(None, path.split(".")):
            owner = getattr(owner, part)
        owner.fp32_precision = value


def run_side(
    side: str, opts: argparse.Namespace, blocks, cuda: bool, precision_state: dict[str, str]
) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    # Each side starts from torch's own defaults: clm-runner's TF32 must not leak into the plain run.
    restore_float32_precision(precision_state)
    torch._dynamo.reset()  # no compiled graph or recompile count carried over from the previous run
    with tempfile.TemporaryDirectory() as output_dir:
        kwargs = base_arguments(opts, output_dir)
        model = build_model(opts)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        clock = StepClock(opts.warmup, opts.steps, cuda)
        own_rate = None
        if side == "plain":
            args = TrainingArguments(**kwargs)
            trainer = Trainer(
                model=model, args=args, train_dataset=blocks, data_collator=default_data_collator
            )
            trainer.add_callback(clock.callback)
            trainer.train()
        else:
            from clm_runner.train.device import device_defaults
            from clm_runner.train.measure import install_callbacks
            from clm_runner.train.trainer import ClmTrainer

            kwargs.update(device_defaults(kwargs))
            args = TrainingArguments(**kwargs)
            trainer = ClmTrainer(
                model=model, args=args, train_dataset=blocks, data_collator=default_data_collator
            )
            throughput = install_callbacks(trainer, config=model.config, block_size=opts.block, quiet=False)
            trainer.add_callback(clock.callback)
            trainer.train()
            own_rate = throughput.metrics()["train_tokens_per_second"]
        peak_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        del trainer, model
    tokens = (opts.steps - opts.warmup) * opts.batch * opts.block
    return {
        "tokens_per_second": tokens / clock.seconds(0),
        "tokens_per_cpu_second": tokens / clock.seconds(1),
        "callback_tokens_per_second": own_rate,
        "peak_memory_gib": peak_memory,
    }


def main() -> int:
    opts = parse_args()
    import torch
    import transformers

    from clm_runner.models.flops import flops_per_token
    from clm_runner.train import device as performance

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(opts.threads)
    device_name = (
        torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    )
    blocks = build_blocks(opts)
    precision_state = float32_precision_state()
    config = build_model(opts).config
    flops = flops_per_token(config, opts.block)
    peak = performance.peak_flops(device_name, "bf16") if cuda else None
    print(f"device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(
        f"model: GPT-2 n_layer={opts.layers} n_embd={opts.width} n_head={opts.heads} vocab={opts.vocab}; "
        f"block {opts.block}, batch {opts.batch}, {opts.steps} steps ({opts.warmup} warm-up, untimed), "
        f"{opts.repeats} pairs of runs, order alternating; {flops:,} FLOPs/token (6N + 12*L*d*T)"
        + ("" if cuda else f"; {torch.get_num_threads()} torch thread(s)")
    )
    print("clm-runner " + performance.describe_line(performance.describe({})))

    rates: dict[str, list[dict]] = {"plain": [], "clm-runner": []}
    pair_ratios: dict[str, list[float]] = {"tokens_per_second": [], "tokens_per_cpu_second": []}
    for repeat in range(opts.repeats):
        order = ["plain", "clm-runner"] if repeat % 2 == 0 else ["clm-runner", "plain"]
        for side in order:
            # The plain Trainer prints its log dicts on stdout (run_clm's behaviour): keep them off the table.
            with contextlib.redirect_stdout(sys.stderr):
                result = run_side(side, opts, blocks, cuda, precision_state)
            rates[side].append(result)
        plain, ours = rates["plain"][-1], rates["clm-runner"][-1]
        for key, ratios in pair_ratios.items():
            ratios.append(ours[key] / plain[key])
        print(
            f"  pair {repeat + 1} ({' then '.join(order)}): tokens/s plain {plain['tokens_per_second']:,.0f}, "
            f"clm-runner {ours['tokens_per_second']:,.0f} (ratio {pair_ratios['tokens_per_second'][-1]:.3f}); "
            f"tokens per CPU-second plain {plain['tokens_per_cpu_second']:,.0f}, "
            f"clm-runner {ours['tokens_per_cpu_second']:,.0f} (ratio {pair_ratios['tokens_per_cpu_second'][-1]:.3f})",
            flush=True,
        )

    print()
    print(
        f"{'':<12}{'tokens/s':>12}{'tokens/CPU-s':>14}{'MFU vs bf16 peak':>18}{'peak GPU GiB':>14}   (medians)"
    )
    medians = {}
    for side, results in rates.items():
        median = statistics.median(r["tokens_per_second"] for r in results)
        cpu_median = statistics.median(r["tokens_per_cpu_second"] for r in results)
        medians[side] = median
        mfu = f"{flops * median / peak:.1%}" if peak else "n/a"
        memory = f"{max(r['peak_memory_gib'] for r in results):.2f}" if cuda else "n/a"
        print(f"{side:<12}{median:>12,.0f}{cpu_median:>14,.0f}{mfu:>18}{memory:>14}")
    own = [r["callback_tokens_per_second"] for r in rates["clm-runner"]]
    print(
        f"clm-runner's own measurement (all steps, warm-up included): median {statistics.median(own):,.0f} tokens/s"
    )
    wall_ratio = statistics.median(pair_ratios["tokens_per_second"])
    cpu_ratio = statistics.median(pair_ratios["tokens_per_cpu_second"])
    print(
        f"ratio clm-runner / plain, median of the pairs: {wall_ratio:.3f} (tokens/s), {cpu_ratio:.3f} (tokens/CPU-s)"
    )

    if cuda:
        mfu = flops * medians["clm-runner"] / peak if peak else None
        ratio = wall_ratio
        ok = ratio >= GPU_RATIO_GOAL and (mfu is None or mfu >= GPU_MFU_GOAL)
        print(
            f"goal (GPU): ratio >= {GPU_RATIO_GOAL} and MFU >= {GPU_MFU_GOAL:.0%}: "
            + ("met" if ok else "NOT met")
            + ("" if peak else " (no peak known for this GPU: MFU not checked)")
        )
    else:
        # On a CPU both sides do the same arithmetic; what differs is overhead, i.e. CPU time per token.
        ok = cpu_ratio >= CPU_RATIO_GOAL
        print(f"goal (CPU): tokens/CPU-s ratio >= {CPU_RATIO_GOAL}: " + ("met" if ok else "NOT met"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
