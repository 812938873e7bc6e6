"""Data-parallel training on the CPU: torchrun and accelerate launch, 2 gloo processes, one set of results."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ASSETS, REPO, SMOKE, tiny_gpt2_config
from launchers import (
    LAUNCH_TIMEOUT_S,
    PROCESSES,
    accelerate_launch,
    free_port,
    launch_env,
    rank_logs,
    run,
    torchrun,
)
from tolerances import FORWARD_RTOL

from clm_runner.cli import cli
from clm_runner.train import distributed
from clm_runner.train.distributed import (
    GlobalBatch,
    decide_on_rank0,
    describe_preprocessing,
    distributed_training_defaults,
)

TRAIN_BLOCKS = 64
EVAL_BLOCKS = 32
PER_DEVICE = 4
MAX_STEPS = 6
BLOCK_SIZE = 128  # the smoke recipe's


# ---------------------------------------------------------------------------------------------------
# Environment helpers and defaults (no processes started)


def test_rank_and_world_come_from_the_launcher_environment() -> None:
    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    assert (
        distributed.rank(torchrun),
        distributed.local_rank(torchrun),
        distributed.world_size(torchrun),
    ) == (3, 1, 4)
    assert distributed.is_distributed(torchrun) and not distributed.is_main_process(torchrun)
    mpi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert distributed.is_main_process(mpi) and distributed.world_size(mpi) == 2
    alone: dict[str, str] = {}
    assert (distributed.rank(alone), distributed.world_size(alone)) == (0, 1)
    assert distributed.is_main_process(alone) and not distributed.is_distributed(alone)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback applies where there is no GPU")
def test_cpu_multi_process_defaults_to_cpu_and_gloo() -> None:
    two = {"WORLD_SIZE": "2"}
    assert distributed_training_defaults({}, {}) == {}  # one process: the recipe as written
    assert distributed_training_defaults({}, two) == {"use_cpu": True, "ddp_backend": "gloo"}
    # use_cpu = false means "a GPU if there is one"; without one, N lone runs would overwrite each other.
    assert distributed_training_defaults({"use_cpu": False}, two) == {"use_cpu": True, "ddp_backend": "gloo"}
    assert distributed_training_defaults({"use_cpu": True}, two) == {"ddp_backend": "gloo"}
    assert distributed_training_defaults({"ddp_backend": "mpi"}, two) == {"use_cpu": True}
    # ddp_find_unused_parameters is settled against the built model (test_unused_parameters), not here.


def test_only_a_node_main_process_may_rebuild_the_cache() -> None:
    from clm_runner.config.load import load_recipe

    recipe = load_recipe(SMOKE, ["data.overwrite_cache=true"])
    assert recipe.data.overwrite_cache
    main = distributed.recipe_for_preprocessing(recipe, {"RANK": "8", "LOCAL_RANK": "0", "WORLD_SIZE": "16"})
    other = distributed.recipe_for_preprocessing(recipe, {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16"})
    assert main is recipe
    assert not other.data.overwrite_cache and other.data.block_size == recipe.data.block_size
    assert other.training == recipe.training


def test_global_batch_arithmetic() -> None:
    batch = GlobalBatch(per_device=8, accumulation=4, world_size=16, block_size=1024)
    assert batch.blocks == 8 * 4 * 16
    assert batch.tokens == 8 * 4 * 16 * 1024
    text = batch.describe()
    assert "512 blocks" in text and "524,288 tokens" in text and "16 processes" in text


def test_describe_preprocessing_names_builders_and_readers() -> None:
    line = describe_preprocessing([["train", "validation"], [], [], []])
    assert "train, validation built by rank 0;" in line and "read by rank 1, 2, 3" in line
    assert "every rank (2) read the cache" in describe_preprocessing([[], []])


def test_decide_on_rank0_alone_just_runs_the_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.WORLD_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    assert decide_on_rank0(lambda: 41 + 1) == 42
    with pytest.raises(ZeroDivisionError):
        decide_on_rank0(lambda: 1 / 0)


@pytest.mark.parametrize(("n_rows", "world", "batch_size"), [(33, 2, 8), (32, 2, 8), (7, 4, 2), (5, 8, 1)])
@pytest.mark.parametrize("streamed", [False, True], ids=["indexed", "streamed"])
def test_lockstep_padding_gives_every_rank_as_many_forwards_as_rank0(
    n_rows: int, world: int, batch_size: int, streamed: bool
) -> None:
    from transformers import GPT2LMHeadModel

    from clm_runner.eval.perplexity import evaluate_blocks, shard_batches

    model = GPT2LMHeadModel(tiny_gpt2_config(n_embd=16, vocab_size=50, n_positions=16))
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    blocks = torch.randint(0, 50, (n_rows, 8)).numpy()

    def rows():  # a stream has no length: the padding is found after reading it
        return iter(list(blocks)) if streamed else blocks

    counts = []
    for r in range(world):
        forwards.clear()
        evaluate_blocks(model, rows(), batch_size=batch_size, shard=(r, world))
        assert len(forwards) == shard_batches(n_rows, r, world, batch_size)
        forwards.clear()
        evaluate_blocks(model, rows(), batch_size=batch_size, shard=(r, world), lockstep=True)
        counts.append(len(forwards))
    assert counts == [shard_batches(n_rows, 0, world, batch_size)] * world


def _decide_in_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a gloo group: a value, a value kept on rank 0 (share=), and an error, each decided on rank 0."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    import torch.distributed as dist

    from clm_runner.errors import OutputDirError

    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    value = decide_on_rank0(lambda: calls.append(rank) or {"decided_by": rank})
    lock = decide_on_rank0(threading.Lock, share=lambda held: "held on rank 0")  # a lock does not pickle

    def refuse() -> None:
        raise OutputDirError(f"refused on rank {rank}")

    try:
        decide_on_rank0(refuse)
        stopped = None
    except distributed.ReplicaStopped as exc:
        stopped = ("ReplicaStopped", exc.exit_code, exc.error_type, exc.message)
    except OutputDirError as exc:
        stopped = ("OutputDirError", exc.exit_code, type(exc).__name__, str(exc))
    dist.destroy_process_group()
    record = {
        "calls": calls,
        "value": value,
        "lock": type(lock).__name__ if rank == 0 else lock,
        "stopped": stopped,
    }
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(record))


def test_decide_on_rank0_shares_results_and_errors_over_gloo(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_decide_in_rank, args=(PROCESSES, free_port(), str(tmp_path)), nprocs=PROCESSES, join=True)
    rank0, rank1 = (pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(PROCESSES))
    assert rank0["calls"] == [0] and rank1["calls"] == []  # the decision ran once, on rank 0
    assert rank0["value"] == rank1["value"] == {"decided_by": 0}
    assert rank0["lock"] == "lock" and rank1["lock"] == "held on rank 0"
    assert rank0["stopped"] == ("OutputDirError", 2, "OutputDirError", "refused on rank 0")
    assert rank1["stopped"] == ("ReplicaStopped", 2, "OutputDirError", "refused on rank 0")


# ---------------------------------------------------------------------------------------------------
# Real launches: 2 CPU processes under torchrun and under accelerate launch


def tiny_overrides(output_dir: Path) -> list[str]:
    sets = [
        f"model.tokenizer_name={ASSETS / 'tokenizer'}",
        f"data.train_file={ASSETS / 'train.txt'}",
        f"data.validation_file={ASSETS / 'validation.txt'}",
        f"data.max_train_samples={TRAIN_BLOCKS}",
        f"data.max_eval_samples={EVAL_BLOCKS}",
        f"training.output_dir={output_dir}",
        f"training.max_steps={MAX_STEPS}",
        f"training.per_device_train_batch_size={PER_DEVICE}",
        "training.eval_strategy=no",
        "training.save_strategy=steps",
        f"training.save_steps={MAX_STEPS}",
        "training.logging_steps=2",
    ]
    return [arg for s in sets for arg in ("--set", s)]


EXPECTED_FILES = {
    "README.md",
    "all_results.json",
    "config.json",
    "eval_results.json",
    "evaluations.json",
    "generation_config.json",
    "model.safetensors",
    "recipe.toml",
    "run.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "train_results.json",
    "trainer_state.json",
    "training_args.bin",
    "train.log",
    f"checkpoint-{MAX_STEPS}",
}


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict[str, dict]:
    """The same tiny recipe trained under torchrun (fresh preprocessing cache) and accelerate launch."""
    root = tmp_path_factory.mktemp("dist")
    cache, home = root / "cache", root / "home"
    env = launch_env(cache, home)
    out = {}
    torch_run, torch_logs = root / "torchrun", root / "torchrun-logs"
    done = run(
        torchrun(torch_logs, "train", "--recipe", str(SMOKE), "--quiet", *tiny_overrides(torch_run)), env
    )
    out["torchrun"] = {"run": torch_run, "proc": done, "logs": torch_logs, "cache": cache}
    accel_run = root / "accelerate"
    done = run(accelerate_launch("train", "--recipe", str(SMOKE), "--quiet", *tiny_overrides(accel_run)), env)
    out["accelerate"] = {"run": accel_run, "proc": done}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_exit_0_and_leave_one_set_of_results(launches: dict, launcher: str) -> None:
    launch = launches[launcher]
    proc, run_dir = launch["proc"], launch["run"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in run_dir.iterdir()} == EXPECTED_FILES  # no temp files, no second copy
    checkpoint = run_dir / f"checkpoint-{MAX_STEPS}"
    assert sorted(p.name for p in checkpoint.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    for name in ("all_results.json", "eval_results.json", "train_results.json", "trainer_state.json"):
        json.loads((run_dir / name).read_text())  # valid JSON: never two writers interleaved
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    # Data parallel, not 2 lone runs: each step consumed PER_DEVICE blocks on each of the 2 processes.
    assert state["epoch"] == MAX_STEPS * PER_DEVICE * PROCESSES / TRAIN_BLOCKS  # 0.75: exact in binary
    evaluation = json.loads((run_dir / "eval_results.json").read_text())
    assert evaluation["eval_samples"] == EVAL_BLOCKS  # each block scored once, not once per rank
    assert evaluation["eval_tokens"] == EVAL_BLOCKS * (BLOCK_SIZE - 1)
    recipe_text = (run_dir / "recipe.toml").read_text()
    if not torch.cuda.is_available():
        assert "use_cpu = true" in recipe_text and 'ddp_backend = "gloo"' in recipe_text
    # GPT-2 gives every trainable parameter a gradient: DDP does not search for unused ones every step.
    assert "ddp_find_unused_parameters = false" in recipe_text
    printed = proc.stdout + proc.stderr
    if "logs" in launch:
        printed += "".join(rank_logs(launch["logs"]).values())
    batch = f"Global batch: {PER_DEVICE * PROCESSES} blocks per optimizer step = {PER_DEVICE} per device x 1 accumulation"
    assert batch in printed
    assert f"{PER_DEVICE * PROCESSES * BLOCK_SIZE:,} tokens per optimizer step" in printed


@pytest.mark.slow
def test_rank0_preprocesses_and_logs_the_other_rank_stays_quiet(launches: dict) -> None:
    launch = launches["torchrun"]
    assert launch["proc"].returncode == 0
    logs = rank_logs(launch["logs"])
    assert "Preprocessing: train, validation built by rank 0; the cache read by rank 1." in logs[0]
    cached = sorted(p.name for p in (launch["cache"] / "blocks").iterdir())
    assert len(cached) == 2 and not [name for name in cached if name.startswith(".")]  # one build per split
    info = re.compile(r"^\d\d:\d\d:\d\d INFO ", re.MULTILINE)
    assert info.search(logs[0]) and not info.search(logs[1])
    assert "***** eval metrics *****" not in logs[1] and "Global batch" not in logs[1]


@pytest.mark.slow
def test_both_launchers_give_the_same_eval_loss(launches: dict) -> None:
    losses = {}
    for launcher, launch in launches.items():
        assert launch["proc"].returncode == 0
        losses[launcher] = json.loads((launch["run"] / "eval_results.json").read_text())["eval_loss"]
    # The same recipe, seeds, data order, thread count (1) and gloo all-reduce of two ranks under either
    # launcher: the same float operations in the same order, so the same bits.
    assert losses["accelerate"] == losses["torchrun"]


@pytest.mark.slow
def test_two_process_eval_equals_one_process_eval_of_the_saved_model(
    launches: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launch = launches["torchrun"]
    monkeypatch.setenv("CLM_RUNNER_CACHE", str(launch["cache"]))
    written = json.loads((launch["run"] / "eval_results.json").read_text())
    out = tmp_path / "one-process.json"
    result = CliRunner().invoke(cli, ["eval", "--run", str(launch["run"]), "--quiet", "--output", str(out)])
    assert result.exit_code == 0, result.output
    alone = json.loads(out.read_text())
    assert alone["eval_tokens"] == written["eval_tokens"]
    # Each rank scored every other block in its own batches; alone, the blocks sit in other batches.
    assert alone["eval_loss"] == pytest.approx(written["eval_loss"], rel=FORWARD_RTOL)


@pytest.mark.slow
def test_a_model_with_an_unused_trainable_parameter_still_trains_on_two_processes(tmp_path: Path) -> None:
    """GPT-2 with add_cross_attention: its cross-attention layers get no gradient without encoder states.
    With the default false DDP would stop at the second step; the check finds them, says so once, and the
    run trains with DDP's search (recorded in recipe.toml). Set false by the recipe, it is refused."""
    env = launch_env(tmp_path / "cache", tmp_path / "home")
    run_dir, logs = tmp_path / "cross", tmp_path / "logs"
    cross = f"model.config_overrides={TINY_CROSS_ATTENTION}"
    proc = run(torchrun(logs, *cli_args(run_dir), "--set", cross), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = rank_logs(logs)
    said = [line for text in per_rank.values() for line in text.splitlines() if "without a gradient" in line]
    assert len(said) == 1 and said[0] in per_rank[0] and "crossattention" in said[0], said
    assert "ddp_find_unused_parameters = true" in (run_dir / "recipe.toml").read_text()
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    # The same command again: the run is complete. The true it settled on is no change of the recipe.
    again = tmp_path / "again-logs"
    proc = run(torchrun(again, *cli_args(run_dir), "--set", cross), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Run {run_dir} is complete at step {MAX_STEPS}" in rank_logs(again)[0]

    refused, logs = tmp_path / "refused", tmp_path / "refused-logs"
    no_search = ("--set", "training.ddp_find_unused_parameters=false")
    proc = run(
        torchrun(logs, "train", "--recipe", str(SMOKE), *tiny_overrides(refused), "--set", cross, *no_search),
        env,
    )
    per_rank = rank_logs(logs)
    errors = [line for text in per_rank.values() for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ddp_find_unused_parameters = false, but the model leaves" in errors[0], (
        errors
    )
    statuses = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+)", proc.stderr)
    assert sorted(statuses) == [(str(r), "2") for r in range(PROCESSES)], proc.stderr[-3000:]
    assert not refused.exists() or not list(refused.iterdir())


def cli_args(run_dir: Path) -> list[str]:
    return ["train", "--recipe", str(SMOKE), "--quiet", *tiny_overrides(run_dir)]


TINY_CROSS_ATTENTION = "n_layer=1,n_head=2,n_embd=32,n_positions=128,vocab_size=2048,bos_token_id=0,eos_token_id=0,add_cross_attention=True"


@pytest.mark.slow
def test_non_empty_output_dir_is_refused_on_every_rank_with_one_error(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    env = launch_env(tmp_path / "cache", tmp_path / "home")
    logs = tmp_path / "logs"
    proc = run(
        torchrun(logs, "train", "--recipe", str(SMOKE), *tiny_overrides(busy)), env
    )  # timeout: no hang
    assert proc.returncode != 0
    # torchrun reports each rank's exit status; every rank left with the CLI's status for a user error.
    statuses = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+)", proc.stderr)
    assert sorted(statuses) == [(str(r), "2") for r in range(PROCESSES)], proc.stderr[-3000:]
    per_rank = rank_logs(logs)
    errors = [line for text in per_rank.values() for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not empty" in errors[0] and errors[0] in per_rank[0]
    assert "Traceback" not in per_rank[0] + per_rank[1]
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_the_resume_command_keeps_the_launcher_and_its_process_count(monkeypatch) -> None:
    from clm_runner.train.interrupts import resume_command

    argv = ["/x/clm_runner/__main__.py", "train", "--recipe", "r.toml", "--overwrite"]
    torchrun = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "RANK": "0", "TORCHELASTIC_RUN_ID": "x"}
    for name in list(os.environ):
        if name.startswith("ACCELERATE_") or name in distributed.WORLD_SIZE_VARS:
            monkeypatch.delenv(name)
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    assert (
        resume_command(argv, Path("out")) == "torchrun --nproc_per_node 4 -m clm_runner train --recipe r.toml"
    )
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert resume_command(argv, Path("out")) == (
        "torchrun --nnodes 4 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint node0:29500 "
        "-m clm_runner train --recipe r.toml (on each node)"
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resume_command(argv, Path("out")).startswith(
        "accelerate launch --multi_gpu --num_processes 2 -m clm_runner train --recipe r.toml"
    )


def test_resuming_with_another_global_batch_says_so(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from clm_runner.rundir.checkpoints import seal_checkpoint
    from clm_runner.train.distributed import global_batch_change

    staging = tmp_path / "tmp-checkpoint-4"
    staging.mkdir()
    (staging / "trainer_state.json").write_text("{}")
    facts = {"world_size": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
    checkpoint = seal_checkpoint(staging, tmp_path / "checkpoint-4", step=4, facts=facts)
    same = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1, world_size=2)
    assert global_batch_change(checkpoint, same, 128) is None
    alone = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1, world_size=1)
    message = global_batch_change(checkpoint, alone, 128)
    assert "trained with 2 processes and 8 blocks per optimizer step, with 1 and 4" in message
    assert "1,024 -> 512 tokens per step" in message and "gradient_accumulation_steps" in message
    # Made up by accumulation: the same global batch, nothing to say.
    made_up = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=1)
    assert global_batch_change(checkpoint, made_up, 128) is None


@pytest.mark.slow
def test_an_interrupted_torchrun_says_so_once_with_the_launcher_and_resumes(tmp_path: Path) -> None:
    """The printed resume command used to be a single-process `clm-runner train ...`: resumed that way the
    global batch silently changed; and each rank printed the interruption."""
    import shlex
    import signal
    import time

    run = tmp_path / "run"
    env = launch_env(tmp_path / "cache", tmp_path / "home")
    logs = tmp_path / "logs"
    sets = tiny_overrides(run) + ["--set", "training.save_steps=2", "--set", "training.max_steps=40"]
    command = torchrun(logs, "train", "--recipe", str(SMOKE), "--quiet", *sets)
    slow = {"CLM_RUNNER_FAULT": "train.step:delay0.3"}  # a slow machine: time to signal mid-run
    process = subprocess.Popen(
        command, env={**env, **slow}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not (run / "checkpoint-2" / "clm_runner_complete.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # as a scheduler pre-empting the job signals the launcher
    stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    per_rank = rank_logs(logs)
    stopped = [
        line for text in per_rank.values() for line in text.splitlines() if "Stopped by SIGTERM" in line
    ]
    assert len(stopped) == 1 and stopped[0] in per_rank[0], stopped
    resume = stopped[0].partition("Resume with: ")[2]
    assert resume.startswith("torchrun --nproc_per_node 2 -m clm_runner train --recipe "), resume
    received = [
        line for text in per_rank.values() for line in text.splitlines() if "Received SIGTERM" in line
    ]
    assert len(received) == 1
    argv = shlex.split(resume)
    port = str(free_port())
    resumed = run_subprocess(
        [sys.executable, "-m", "torch.distributed.run", *argv[1:3], "--master_addr", "127.0.0.1",
         "--master_port", port, *argv[3:]],
        env,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 40


def run_subprocess(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=REPO
    )
