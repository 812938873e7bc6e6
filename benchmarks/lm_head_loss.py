"""Benchmark: what the language-model head and its loss cost on a GPU, full logits against fused/chunked CE.

For GPT-2's head ([batch, block, 768] hidden states x [50257, 768] tied weights) it times forward +
backward and records peak memory of:

- full: `lm_head` then `F.cross_entropy` on the whole [batch*block, 50257] logits, as transformers'
  ForCausalLMLoss does (logits upcast to fp32);
- full, compiled: the same under `torch.compile` (what clm-runner's default compile gives);
- chunked: logits and loss computed `--chunk` rows at a time, each chunk recomputed in backward
  (torch.utils.checkpoint), so the full logits never exist;
- liger: liger-kernel's `LigerFusedLinearCrossEntropyLoss`, when liger-kernel is installed.

Every variant's loss and input gradient are checked against `full` (loss within 1e-4).

    python benchmarks/lm_head_loss.py [--batch 8] [--block 1024] [--chunk 4096] [--dtype bf16]

Needs CUDA; on a CPU it says so and stops.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk", type=int, default=4096, help="rows (tokens) per chunk")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--iterations", type=int, default=20)
    return parser.parse_args()


def full_loss(hidden, weight, labels):
    import torch.nn.functional as F

    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), labels)


def chunked_loss(hidden, weight, labels, chunk: int):
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def piece(h, y):
        return F.cross_entropy((h @ weight.t()).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(
            piece, hidden[start : start + chunk], labels[start : start + chunk], use_reentrant=False
        )
    return total / hidden.shape[0]


def measure(name: str, loss_fn, hidden, weight, labels, iterations: int) -> dict:
    import torch

    def once():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        loss = loss_fn(h, w, labels)
        loss.backward()
        return loss.detach(), h.grad

    for _ in range(3):  # warm-up (and compilation)
        once()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(iterations):
        loss, grad = once()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iterations
    return {
        "name": name,
        "ms": seconds * 1e3,
        "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
        "loss": loss.item(),
        "grad": grad,
    }


def main() -> int:
    opts = parse_args()
    import torch

    if not torch.cuda.is_available():
        print(
            "lm_head_loss.py needs a CUDA GPU: the cost of [batch, block, vocab] logits is a GPU-memory question."
        )
        return 0
    dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows = opts.batch * opts.block
    hidden = torch.randn(rows, opts.width, device="cuda", dtype=dtype, generator=generator)
    weight = torch.randn(opts.vocab, opts.width, device="cuda", dtype=dtype, generator=generator) * 0.02
    labels = torch.randint(0, opts.vocab, (rows,), device="cuda", generator=generator)
    print(
        f"{torch.cuda.get_device_name(0)}; hidden [{rows}, {opts.width}] x head [{opts.vocab}, {opts.width}], "
        f"{opts.dtype}; full logits alone: {rows * opts.vocab * hidden.element_size() / 2**30:.2f} GiB "
        f"({rows * opts.vocab * 4 / 2**30:.2f} GiB more as fp32)"
    )

    variants = [
        ("full", full_loss),
        ("full, compiled", torch.compile(full_loss)),
        (f"chunked ({opts.chunk} rows)", lambda h, w, y: chunked_loss(h, w, y, opts.chunk)),
    ]
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        variants.append(("liger fused linear CE", lambda h, w, y: liger(w, h, y)))
    except ImportError:
        print("liger-kernel not installed: its fused linear cross-entropy is not measured")

    results = [measure(name, fn, hidden, weight, labels, opts.iterations) for name, fn in variants]
    reference = results[0]
    print(f"{'variant':<28}{'ms fwd+bwd':>12}{'peak GiB':>10}{'loss':>12}{'|dloss|':>10}{'max |dgrad|':>13}")
    for r in results:
        grad_error = (r["grad"].float() - reference["grad"].float()).abs().max().item()
        print(
            f"{r['name']:<28}{r['ms']:>12.2f}{r['peak_gib']:>10.2f}{r['loss']:>12.6f}"
            f"{abs(r['loss'] - reference['loss']):>10.1e}{grad_error:>13.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
