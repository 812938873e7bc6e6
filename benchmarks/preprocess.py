"""Benchmark: clm-runner's preprocessing against a run_clm-style datasets.map pipeline, as whole processes.

Each measurement is its own Python process with fresh caches, on the same text corpus and the same GPT-2-like
byte-level BPE tokenizer (vocab 50257, trained here on part of the corpus because the hub is unreachable):

  clm-runner   prepare_splits(train + validation carved at 5%), cold then warm (cache hit)
  run_clm      load_dataset("text") with run_clm's train[:5%] / train[5%:] slices, datasets.map calling the
               tokenizer on 1000-row batches with num_proc = cores, then run_clm's group_texts with
               itertools.chain via map; cold, then warm (its datasets cache)

and clm-runner's peak RSS (the measured process and its workers, from getrusage) on a ~100 MB corpus.

    python benchmarks/preprocess.py [--corpus FILE[.gz]] [--mb 20] [--big-mb 100] [--scratch DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = Path("/work/shared/data/pydocs/train.txt.gz")
BLOCK_SIZE = 1024
VOCAB_SIZE = 50257
TOKENIZER_TRAINING_BYTES = 8 << 20


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    """1, 5, 15 minute load averages: other work on the machine skews every timing."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


# ---------------------------------------------------------------------------------------------------
# Setup (in the parent, once)


def read_corpus(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return handle.read()


def make_corpus(source: bytes, megabytes: float, target: Path) -> Path:
    """`source` repeated (whole copies, then a line-aligned part) to at least `megabytes` MB."""
    if target.exists():
        return target
    wanted = int(megabytes * 1_000_000)
    if not source.endswith(b"\n"):
        source += b"\n"
    temporary = target.with_suffix(".partial")
    with temporary.open("wb") as out:
        written = 0
        while written + len(source) <= wanted:
            out.write(source)
            written += len(source)
        if written < wanted:
            cut = source.find(b"\n", wanted - written)
            out.write(source[: cut + 1 if cut >= 0 else len(source)])
    temporary.rename(target)
    return target


def make_tokenizer(source: bytes, directory: Path) -> Path:
    """A GPT-2-like tokenizer: byte-level BPE, vocab 50257, <|endoftext|>, model_max_length 1024."""
    if (directory / "tokenizer.json").exists():
        return directory
    from clm_runner.models.bpe import as_transformers_tokenizer, train_byte_level_bpe

    text = source[:TOKENIZER_TRAINING_BYTES].decode("utf-8", errors="replace")
    backend = train_byte_level_bpe(
        vocab_size=VOCAB_SIZE, texts=text.splitlines(keepends=True), byte_level_post_processor=True
    )
    tokenizer = as_transformers_tokenizer(
        backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=BLOCK_SIZE,
    )
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------------
# Measurements (each in a child process)


def measure_clm_runner(corpus: str, tokenizer_dir: str, cache: str, hf_cache: str) -> dict:
    os.environ["CLM_RUNNER_CACHE"] = cache
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from clm_runner.config.load import load_recipe
    from clm_runner.data.prepare import prepare_splits

    recipe = load_recipe(
        None,
        [
            "model.model_type=gpt2",
            f"model.tokenizer_name={tokenizer_dir}",
            f"model.cache_dir={hf_cache}",
            f"data.train_file={corpus}",
        ],
        require_output_dir=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    started = time.perf_counter()
    out = prepare_splits(recipe, tokenizer, BLOCK_SIZE, ["train", "validation"], progress=False)
    return {
        "pipeline_seconds": time.perf_counter() - started,
        "train_tokens": out["train"].stats.tokens,
        "validation_tokens": out["validation"].stats.tokens,
        "train_blocks": len(out["train"].blocks),
        "validation_blocks": len(out["validation"].blocks),
        "from_cache": all(split.from_cache for split in out.values()),
    }


def measure_run_clm(corpus: str, tokenizer_dir: str, cache: str, hf_cache: str) -> dict:
    """run_clm.py's preprocessing, as it is written there (one text file, no validation file)."""
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    started = time.perf_counter()
    data_files = {"train": corpus}
    raw = datasets.DatasetDict(
        {
            "validation": datasets.load_dataset(
                "text", data_files=data_files, split="train[:5%]", cache_dir=hf_cache, keep_linebreaks=True
            ),
            "train": datasets.load_dataset(
                "text", data_files=data_files, split="train[5%:]", cache_dir=hf_cache, keep_linebreaks=True
            ),
        }
    )
    column_names = list(raw["train"].features)

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized = raw.map(tokenize_function, batched=True, num_proc=cores(), remove_columns=column_names)
    block_size = BLOCK_SIZE

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True, num_proc=cores())
    pipeline_seconds = time.perf_counter() - started
    import pyarrow.compute as pc

    lengths = {
        name: pc.sum(pc.list_value_length(tokenized[name].data.table.column("input_ids"))).as_py()
        for name in ("train", "validation")
    }
    return {
        "pipeline_seconds": pipeline_seconds,
        "train_tokens": lengths["train"],
        "validation_tokens": lengths["validation"],
        "train_blocks": len(grouped["train"]),
        "validation_blocks": len(grouped["validation"]),
    }


MEASUREMENTS = {"clm-runner": measure_clm_runner, "run_clm": measure_run_clm}


def child_main(args: argparse.Namespace) -> None:
    # Both pipelines need these; importing them first keeps import time out of "pipeline s".
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    started = time.perf_counter()
    result = MEASUREMENTS[args.measure](args.corpus, args.tokenizer, args.cache, args.hf_cache)
    result["inner_seconds"] = time.perf_counter() - started
    # ru_maxrss is KiB on Linux. Pool workers have been joined, so RUSAGE_CHILDREN covers them.
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result["peak_rss_mb"] = max(own.ru_maxrss, children.ru_maxrss) / 1024
    # CPU time of the process and its workers: less skewed than wall time by other load on the machine.
    result["cpu_seconds"] = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    print("RESULT " + json.dumps(result))


def run_child(measure: str, corpus: Path, tokenizer: Path, cache: Path, hf_cache: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        measure,
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tokenizer),
        "--cache",
        str(cache),
        "--hf-cache",
        str(hf_cache),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{measure} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["seconds"] = seconds
    return result


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="text file (.txt or .txt.gz)")
    parser.add_argument("--mb", type=float, default=20, help="corpus size for the timing comparison (MB)")
    parser.add_argument(
        "--big-mb", type=float, default=100, help="corpus size for the peak memory run (MB); 0 skips"
    )
    parser.add_argument("--scratch", type=Path, default=None, help="work dir (default: a temporary dir)")
    parser.add_argument("--child", choices=sorted(MEASUREMENTS), dest="measure", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--hf-cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.corpus = str(args.corpus)
        child_main(args)
        return

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="clm-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    source = read_corpus(args.corpus)
    corpus = make_corpus(source, args.mb, scratch / f"corpus-{args.mb:g}mb.txt")
    tokenizer = make_tokenizer(source, scratch / "tokenizer")
    runs = scratch / "runs"
    shutil.rmtree(runs, ignore_errors=True)

    def dirs(name: str) -> tuple[Path, Path]:
        return runs / name / "clm-cache", runs / name / "hf-cache"

    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB, from {args.corpus})")
    vocabulary = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    print(
        f"tokenizer: byte-level BPE, vocab {vocabulary}, block size {BLOCK_SIZE}; cores available: {cores()}"
    )
    print(f"python {sys.version.split()[0]}; load average before: {load_average()}")
    print(
        "each row is one fresh process; 'process s' is its whole wall time (imports, tokenizer load included),"
    )
    print("'pipeline s' the preprocessing alone (raw text -> train and validation blocks), 'CPU s' the")
    print("process's and its workers' CPU time")
    print()
    results = {}
    results["clm-runner cold"] = run_child("clm-runner", corpus, tokenizer, *dirs("clm"))
    results["clm-runner warm"] = run_child("clm-runner", corpus, tokenizer, *dirs("clm"))
    results["run_clm cold"] = run_child("run_clm", corpus, tokenizer, *dirs("run_clm"))
    results["run_clm warm"] = run_child("run_clm", corpus, tokenizer, *dirs("run_clm"))
    print(
        f"{'measurement':<17}{'process s':>10}{'pipeline s':>11}{'CPU s':>8}{'peak RSS MB':>12}"
        f"{'train tokens':>14}{'train blocks':>13}"
    )
    for name, result in results.items():
        print(
            f"{name:<17}{result['seconds']:>10.2f}{result['pipeline_seconds']:>11.2f}{result['cpu_seconds']:>8.1f}"
            f"{result['peak_rss_mb']:>12.0f}"
            f"{result['train_tokens']:>14,}{result['train_blocks']:>13,}"
        )
    assert results["clm-runner warm"]["from_cache"], "the second clm-runner run did not hit its cache"
    same_tokens = all(
        results["clm-runner cold"][key] == results["run_clm cold"][key]
        for key in ("train_tokens", "validation_tokens")
    )
    print()
    print(f"same token counts in both pipelines (train and validation): {same_tokens}")

    def ratio(slow: str, fast: str, key: str) -> float:
        return results[slow][key] / results[fast][key]

    for label, slow, fast, goal in (
        ("cold", "run_clm cold", "clm-runner cold", "goal >= 3x"),
        ("warm", "run_clm cold", "clm-runner warm", "goal >= 20x"),
        ("warm vs warm", "run_clm warm", "clm-runner warm", "run_clm-style reusing its datasets cache"),
    ):
        print(
            f"{label + ':':<14}clm-runner {ratio(slow, fast, 'pipeline_seconds'):6.1f}x faster (pipeline), "
            f"{ratio(slow, fast, 'seconds'):5.1f}x (whole process), {ratio(slow, fast, 'cpu_seconds'):5.1f}x (CPU) "
            f"  [{slow} / {fast}; {goal}]"
        )

    if args.big_mb > 0:
        big = make_corpus(source, args.big_mb, scratch / f"corpus-{args.big_mb:g}mb.txt")
        result = run_child("clm-runner", big, tokenizer, *dirs("big"))
        print()
        print(
            f"big:          clm-runner cold on {big.stat().st_size / 1e6:.0f} MB: {result['seconds']:.1f} s process, "
            f"{result['pipeline_seconds']:.1f} s pipeline, peak RSS {result['peak_rss_mb']:.0f} MB "
            f"(goal < 2048 MB), {result['train_tokens']:,} train tokens"
        )
    print(f"load average after: {load_average()}")
    shutil.rmtree(runs, ignore_errors=True)
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
