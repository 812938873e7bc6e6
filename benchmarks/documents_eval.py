"""Benchmark: `clm-runner eval --documents` against lm-evaluation-harness's own run, whole processes, side by side.

The same saved model (a seeded random-init GPT-2) and the same documents (a jsonl file, one document a row) are
scored by three commands, each a fresh process timed from start to exit:

- clm-runner: `python -m clm_runner eval --recipe R --documents` (R names the model dir and the jsonl);
- lm-eval CLI: `python -m lm_eval run --model hf --tasks T --include_path D` with a task T of its own YAML that
  reads the jsonl and reports word_perplexity, byte_perplexity and bits_per_byte (as the `wikitext` task does,
  minus the detokenizer: these documents are not WikiText);
- lm-eval HFLM: a script that builds `HFLM` and calls `loglikelihood_rolling` on the documents, then aggregates
  with lm-eval's own metric functions (lm-eval's scoring without its task machinery).

All three get the same batch size (lm-eval's own default is 1) and the same threads. The runs are interleaved,
in an order that rotates every round, after one untimed warm-up run of each (datasets' cache, the page cache);
the median of each is kept and every run is printed. The figures must agree (1e-5 relative).

    python benchmarks/documents_eval.py [--corpus PATH] [--sets articles paragraphs] [--repeats 3] [--threads N]

The corpus defaults to ../shared/data/pydocs/test.txt.gz next to the repository, when present, else generated
text. Its document boundaries are not marked (a blank line also separates paragraphs), so two sets of documents
are made of it: `articles`, its paragraphs grouped in order into documents of about --document-chars characters
(a WikiText-2 article is about 20,000: most windows are full), and `paragraphs`, each paragraph a document (the
rows of a jsonl file of short texts: most documents are shorter than one window).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from strided_eval import read_corpus  # noqa: E402

DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "data" / "pydocs" / "test.txt.gz"
TASK = "clm_runner_benchmark_documents"
FIGURES = ("word_perplexity", "byte_perplexity", "bits_per_byte")
SETS = ("articles", "paragraphs")

HFLM_SCRIPT = """
import json, sys
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

model_dir, documents, batch_size, out = sys.argv[1:]
texts = [json.loads(line)["text"] for line in open(documents, encoding="utf-8")]
lm = HFLM(pretrained=model_dir, device="cpu", batch_size=int(batch_size), dtype="float32")
requests = [Instance("loglikelihood_rolling", doc={}, arguments=(t,), idx=0, doc_id=i) for i, t in enumerate(texts)]
lls = lm.loglikelihood_rolling(requests, disable_tqdm=True)
counted = [process_results({"page": t}, [ll]) for t, ll in zip(texts, lls)]
figures = {
    "word_perplexity": weighted_perplexity([c["word_perplexity"] for c in counted]),
    "byte_perplexity": weighted_perplexity([c["byte_perplexity"] for c in counted]),
    "bits_per_byte": bits_per_byte([c["bits_per_byte"] for c in counted]),
}
json.dump(figures, open(out, "w"))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="UTF-8 text, optionally .gz")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="document sets to time")
    parser.add_argument("--document-chars", type=int, default=20_000, help="characters per article, about")
    parser.add_argument("--positions", type=int, default=512, help="the model's positions: the window length")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8_192, help="BPE vocabulary trained on the corpus")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass, for every side")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP/MKL threads per process (default: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; each runs every command once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="work in this new dir and keep it")
    return parser.parse_args()


def documents_of(text: str, document_chars: int) -> list[str]:
    """Consecutive non-blank paragraphs grouped into documents of at least `document_chars` characters (the last
    may be shorter; 0: each paragraph a document), each its paragraphs' text as it was."""
    documents, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        if not paragraph.strip():
            continue
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= document_chars:
            documents.append("\n\n".join(current))
            current, size = [], 0
    if current:
        documents.append("\n\n".join(current))
    return documents


def build(workdir: Path, text: str, args: argparse.Namespace) -> tuple[Path, int]:
    """The saved model dir (random-init GPT-2 and a BPE tokenizer trained on the corpus); its parameter count."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from clm_runner.models.bpe import EOS, as_transformers_tokenizer, train_byte_level_bpe

    model_dir = workdir / "model"
    bpe = train_byte_level_bpe(vocab_size=args.vocab_size, texts=text.split("\n\n"))
    tokenizer = as_transformers_tokenizer(bpe, eos_token=EOS, model_max_length=args.positions)
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.positions,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=max(1, args.width // 64),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(model_dir)
    return model_dir, sum(p.numel() for p in model.parameters())


def commands(
    workdir: Path, model_dir: Path, documents: Path, args: argparse.Namespace
) -> dict[str, list[str]]:
    """Each side's whole-process command; each writes its figures where `figures_of` reads them."""
    recipe = workdir / "recipe.toml"
    recipe.write_text(
        f'[model]\nmodel_name_or_path = "{model_dir}"\n\n'
        f'[data]\nvalidation_file = "{documents}"\n\n'
        f'[training]\noutput_dir = "{workdir / "unused"}"\nper_device_eval_batch_size = {args.batch_size}\n'
    )
    task_dir = workdir / "task"
    task_dir.mkdir()
    (task_dir / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {documents}\n"
        'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n" + "".join(f"  - metric: {name}\n" for name in FIGURES)
    )
    python = sys.executable
    return {
        "clm-runner": [
            python, "-m", "clm_runner", "eval", "--recipe", str(recipe), "--documents", "--quiet",
            "--output", str(workdir / "clm-runner.json"),
        ],
        "lm-eval CLI": [
            python, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
            f"pretrained={model_dir},dtype=float32", "--tasks", TASK, "--include_path", str(task_dir),
            "--device", "cpu", "--batch_size", str(args.batch_size), "--output_path", str(workdir / "lm-eval-cli"),
        ],
        "lm-eval HFLM": [
            python, "-c", HFLM_SCRIPT, str(model_dir), str(documents), str(args.batch_size),
            str(workdir / "lm-eval-hflm.json"),
        ],
    }  # fmt: skip


def figures_of(name: str, workdir: Path) -> dict[str, float]:
    if name == "clm-runner":
        return json.loads((workdir / "clm-runner.json").read_text())
    if name == "lm-eval HFLM":
        return json.loads((workdir / "lm-eval-hflm.json").read_text())
    (results,) = sorted((workdir / "lm-eval-cli").rglob("results_*.json"))[-1:]
    task = json.loads(results.read_text())["results"][TASK]
    return {figure: task[f"{figure},none"] for figure in FIGURES}


def timed(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children) of one run; fails loudly."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({done.returncode}); see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text, corpus_description = read_corpus(
        args.corpus or (DEFAULT_CORPUS if DEFAULT_CORPUS.exists() else None)
    )
    with tempfile.TemporaryDirectory(prefix="clm-runner-documents-bench-") as scratch:
        workdir = Path(scratch) if args.keep is None else args.keep
        workdir.mkdir(parents=True, exist_ok=args.keep is None)
        model_dir, n_parameters = build(workdir, text, args)
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            HF_DATASETS_CACHE=str(workdir / "datasets-cache"),
            CLM_RUNNER_CACHE=str(workdir / "clm-runner-cache"),
            PYTHONPATH=str(REPO_ROOT),
        )
        if args.threads is not None:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        report_setup(args, corpus_description, n_parameters)
        for name in args.sets:
            texts = documents_of(text, args.document_chars if name == "articles" else 0)
            compare(workdir / name, model_dir, texts, env, args)


def compare(
    workdir: Path, model_dir: Path, texts: list[str], env: dict[str, str], args: argparse.Namespace
) -> None:
    """Time the three commands on one set of documents, interleaved; print the figures and the ratios."""
    workdir.mkdir()
    documents = workdir / "documents.jsonl"
    documents.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    runs = commands(workdir, model_dir, documents, args)
    sizes = sorted(len(t) for t in texts)
    print(
        f"\n{workdir.name}: {len(texts):,} documents, {sum(sizes):,} characters "
        f"(median {sizes[len(sizes) // 2]:,}, longest {sizes[-1]:,})",
        flush=True,
    )
    for name, command in runs.items():  # warm-up, untimed
        timed(command, env, workdir / f"{name}.log")
    if args.repeats < 1:
        return
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(args.repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            seconds, cpu_seconds = timed(runs[name], env, workdir / f"{name}.log")
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            print(
                f"  round {round_index + 1}: {name:13} {seconds:7.2f} s wall {cpu_seconds:7.2f} s CPU",
                flush=True,
            )
    report(runs, wall, cpu, {name: figures_of(name, workdir) for name in runs}, workdir)


def report_setup(args: argparse.Namespace, corpus: str, n_parameters: int) -> None:
    import torch
    import transformers
    from lm_eval import __version__ as lm_eval_version

    print(f"corpus: {corpus}")
    print(
        f"model: GPT-2 random init seed {args.seed}, {args.layers} layers, {args.width} wide, {args.positions} "
        f"positions, vocab {args.vocab_size:,} (BPE trained on the corpus), {n_parameters / 1e6:.1f}M params"
    )
    threads = args.threads or f"torch's default ({torch.get_num_threads()})"
    print(
        f"batch size {args.batch_size} on every side; threads {threads}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, lm_eval {lm_eval_version}; {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}"
    )


def report(
    runs: dict[str, list[str]],
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    figures: dict[str, dict[str, float]],
    workdir: Path,
) -> None:
    ours = json.loads((workdir / "clm-runner.json").read_text())
    print(
        f"clm-runner scored {ours['documents']:,} documents, {ours['tokens']:,} tokens in "
        f"{ours['eval_samples']:,} windows"
    )
    print(f"{'':14}{'wall s':>9}{'CPU s':>9}{'word ppl':>14}{'byte ppl':>10}{'bits/byte':>11}   (medians)")
    for name in runs:
        f = figures[name]
        print(
            f"{name:14}{statistics.median(wall[name]):>9.2f}{statistics.median(cpu[name]):>9.2f}"
            f"{f['word_perplexity']:>14.6g}{f['byte_perplexity']:>10.6g}{f['bits_per_byte']:>11.6g}"
        )
    worst = max(abs(figures[n][k] - ours[k]) / abs(ours[k]) for n in runs for k in FIGURES)
    print(f"largest relative difference of a figure from clm-runner's: {worst:.1e}")
    for name in runs:
        if name == "clm-runner":
            continue
        ratio_wall = statistics.median(wall[name]) / statistics.median(wall["clm-runner"])
        ratio_cpu = statistics.median(cpu[name]) / statistics.median(cpu["clm-runner"])
        print(
            f"{name} / clm-runner: {ratio_wall:.2f}x wall, {ratio_cpu:.2f}x CPU (above 1: clm-runner is faster)"
        )
    if worst > 1e-5:
        raise SystemExit("the figures differ by more than 1e-5 relative")


if __name__ == "__main__":
    main()
