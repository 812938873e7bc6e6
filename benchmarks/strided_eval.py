"""Benchmark: clm-runner's strided perplexity against the Hugging Face guide's one-window-at-a-time loop.

Both run in one process on the same seeded random-init GPT-2 and the same token stream, and must give
the same perplexity. The reference is the loop from the Transformers guide "Perplexity of fixed-length
models" (batch size 1, labels with -100 on the context, full logits for every window), with two
changes that keep the numbers comparable and change nothing else: it accumulates token-weighted NLL
(loss x scored tokens, the tokens counted after the model's label shift), and its `max_length` is
`context + 1`, because the guide's window includes the last target, whose logits it throws away,
while clm-runner's `context` counts the tokens the model conditions on.

    python benchmarks/strided_eval.py [--corpus PATH] [--context 512] [--stride 256] [--batch-size 8]

The corpus defaults to ../shared/data/pydocs/validation.txt.gz next to the repository, when present,
else to generated text. The tokenizer (byte-level BPE) is trained on the corpus itself.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "data" / "pydocs" / "validation.txt.gz"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="UTF-8 text, optionally .gz")
    parser.add_argument("--context", type=int, default=512, help="window length in tokens")
    parser.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    parser.add_argument("--batch-size", type=int, default=8, help="clm-runner windows per forward")
    parser.add_argument("--max-tokens", type=int, default=60_000, help="evaluate the first N tokens")
    parser.add_argument("--vocab-size", type=int, default=16_384, help="BPE vocabulary trained on the corpus")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved; best kept")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def read_corpus(path: Path | None) -> tuple[str, str]:
    """(text, description); generated prose when no corpus is given and the default is absent."""
    if path is None and DEFAULT_CORPUS.exists():
        path = DEFAULT_CORPUS
    if path is not None:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            return handle.read(), str(path)
    return generated_text(seed=0, n_words=120_000), "generated text (no corpus found)"


def generated_text(*, seed: int, n_words: int) -> str:
    """Zipf-distributed words in sentences and paragraphs: enough structure for BPE to learn merges."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "tor", "as", "rin", "vel", "u", "sen", "dra", "po", "qui", "el"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]
    words = rng.choices(vocabulary, weights=weights, k=n_words)
    sentences, position = [], 0
    while position < len(words):
        length = rng.randint(5, 20)
        sentence = " ".join(words[position : position + length])
        sentences.append(sentence[:1].upper() + sentence[1:] + ".")
        position += length
    paragraphs = [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]
    return "\n\n".join(paragraphs)


def train_tokenizer(text: str, vocab_size: int):
    from clm_runner.models.bpe import EOS, as_transformers_tokenizer, train_byte_level_bpe

    bpe = train_byte_level_bpe(vocab_size=vocab_size, texts=text.split("\n\n"))
    return as_transformers_tokenizer(bpe, eos_token=EOS)


def build_model(tokenizer, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    model.loss_type = "ForCausalLM"  # what transformers falls back to for GPT-2 anyway, minus the warning
    return model


def hf_guide_strided_loop(model, stream, *, context: int, stride: int) -> tuple[float, int, int]:
    """The guide's loop with batch size 1; returns (total NLL in nats, scored tokens, windows)."""
    import torch

    encodings = torch.as_tensor(stream)[None]
    max_length = context + 1
    seq_len = encodings.size(1)
    nll_sum, n_tokens, n_windows, prev_end_loc = 0.0, 0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        n_windows += 1
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            # outputs.loss is the mean over the labels that survive the model's shift by one.
            neg_log_likelihood = outputs.loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens, n_windows


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO_ROOT))
    import numpy as np
    import torch
    import transformers

    from clm_runner.eval.perplexity import evaluate_strided

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    text, corpus_description = read_corpus(args.corpus)
    tokenizer = train_tokenizer(text, args.vocab_size)
    stream = np.asarray(tokenizer(text)["input_ids"][: args.max_tokens], dtype=np.int64)
    model = build_model(tokenizer, args.seed)
    n_parameters = sum(p.numel() for p in model.parameters())

    print(f"corpus: {corpus_description}")
    print(f"tokens: {len(stream):,} (vocab {len(tokenizer):,}, byte-level BPE trained on the corpus)")
    print(
        f"model: GPT-2 random init seed {args.seed}, 4 layers, 256 wide, 4 heads, {n_parameters / 1e6:.1f}M params"
    )
    print(f"strided eval: context {args.context}, stride {args.stride}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}"
    )

    # Warm up every code path (allocator, kernels) on a short prefix so none pays a first-call cost.
    warmup = stream[: 3 * args.context]
    hf_guide_strided_loop(model, warmup, context=args.context, stride=args.stride)
    evaluate_strided(model, warmup, context=args.context, stride=args.stride, batch_size=args.batch_size)
    model_body_only(model, warmup, context=args.context, stride=args.stride)

    # Other processes may share the cores: interleave the runs and keep each one's fastest. Process CPU
    # time is reported too; with --threads 1 it is the figure least disturbed by other processes.
    runs = {
        "guide": lambda: hf_guide_strided_loop(model, stream, context=args.context, stride=args.stride),
        "runner": lambda: evaluate_strided(
            model, stream, context=args.context, stride=args.stride, batch_size=args.batch_size
        ),
        "body": lambda: model_body_only(model, stream, context=args.context, stride=args.stride),
    }
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            outputs[name] = run()
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)
    guide_nll, guide_tokens, guide_windows = outputs["guide"]
    result = outputs["runner"]
    best_wall = {name: min(times) for name, times in wall.items()}
    best_cpu = {name: min(times) for name, times in cpu.items()}

    guide_ppl = math.exp(guide_nll / guide_tokens)
    runner_ppl = result.perplexity
    print()
    print(f"{'':36}{'perplexity':>12}{'tokens':>9}{'windows':>9}{'wall s':>9}{'CPU s':>9}{'tokens/s':>10}")
    rows = [
        ("HF guide loop (batch 1)", f"{guide_ppl:.6g}", guide_tokens, guide_windows, "guide"),
        (
            f"clm-runner strided (batch {args.batch_size})",
            f"{runner_ppl:.6g}",
            result.tokens,
            result.samples,
            "runner",
        ),
        ("model body only, no head (batch 1)", "-", result.tokens, result.samples, "body"),
    ]
    for label, perplexity, tokens, windows, name in rows:
        print(
            f"{label:36}{perplexity:>12}{tokens:>9,}{windows:>9}{best_wall[name]:>9.2f}{best_cpu[name]:>9.2f}"
            f"{tokens / best_wall[name]:>10,.0f}"
        )
    print()
    print(f"best of {args.repeats} interleaved runs; every run's wall seconds:")
    for label, name in [("guide", "guide"), ("clm-runner", "runner"), ("body only", "body")]:
        print(f"  {label:11}{' '.join(f'{t:.2f}' for t in wall[name])}")
    print(f"relative difference in perplexity: {abs(runner_ppl - guide_ppl) / guide_ppl:.2e}")
    print(f"relative difference in total NLL:  {abs(result.nll_sum - guide_nll) / guide_nll:.2e}")
    print(
        f"speed-up of clm-runner over the guide loop: {best_wall['guide'] / best_wall['runner']:.2f}x wall, "
        f"{best_cpu['guide'] / best_cpu['runner']:.2f}x CPU"
    )
    print(
        "ceiling for any exact method (guide / body only: LM head and loss for free): "
        f"{best_wall['guide'] / best_wall['body']:.2f}x wall, {best_cpu['guide'] / best_cpu['body']:.2f}x CPU"
    )
    if guide_tokens != result.tokens:
        raise SystemExit(f"scored token counts differ: guide {guide_tokens}, clm-runner {result.tokens}")


def model_body_only(model, stream, *, context: int, stride: int) -> None:
    """The transformer layers over every window, without LM head or loss: work no exact method can skip.

    Every window must run all its tokens through all layers (positions and context differ from window to
    window, so nothing carries over), so this time bounds any exact strided evaluation from below.
    """
    import torch

    with torch.inference_mode():
        for begin in range(0, len(stream) - 1, stride):
            end = min(begin + context, len(stream) - 1)
            model.transformer(torch.as_tensor(stream[begin:end])[None], use_cache=False)
            if end == len(stream) - 1:
                break


if __name__ == "__main__":
    main()
