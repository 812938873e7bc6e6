"""Data-parallel runs under torchrun or `accelerate launch`: who is rank 0, and rank 0 decides for all.

The launchers start N copies of `python -m clm_runner train` and describe the job in environment
variables (RANK, LOCAL_RANK, WORLD_SIZE); the process group itself is created later, by
TrainingArguments (accelerate's PartialState). The helpers here read the environment, so they work
before that; the collective ones (`decide_on_rank0`, `gather_to_all`) need the group and create it only
if nobody has yet.

Anything that must happen once per job (deciding whether the output dir may be used, taking a lock,
writing a file) runs on global rank 0; `decide_on_rank0` shares its result, or its error, with every
rank, so all ranks go on with the same decision or all stop with the same exit status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from clm_runner.config.schema import Recipe
from clm_runner.errors import ClmError

logger = logging.getLogger("clm_runner")

T = TypeVar("T")

# torchrun and accelerate set the first name; MPI launchers (accelerate --cpu with mpirun) the others.
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _int_from_env(names: Sequence[str], default: int, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def rank(environ: Mapping[str, str] | None = None) -> int:
    """Global rank of this process (0 when not launched by a distributed launcher)."""
    return _int_from_env(RANK_VARS, 0, environ)


def local_rank(environ: Mapping[str, str] | None = None) -> int:
    """Rank of this process on its node (0 when not launched by a distributed launcher)."""
    return _int_from_env(LOCAL_RANK_VARS, 0, environ)


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """Number of processes in the job, over all nodes (1 when not launched by a distributed launcher)."""
    return _int_from_env(WORLD_SIZE_VARS, 1, environ)


def is_distributed(environ: Mapping[str, str] | None = None) -> bool:
    return world_size(environ) > 1


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """True on global rank 0: the one process that writes the run's files and logs at INFO."""
    return rank(environ) == 0


def launcher_prefix(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(the launcher and its process options, a note) to repeat this process's launch; ("", "") alone.

    torchrun (and `accelerate launch`, which starts its processes through torchrun's agent) describes the
    job in the environment: WORLD_SIZE, LOCAL_WORLD_SIZE, and the rendezvous of a multi-node job.
    """
    env = os.environ if environ is None else environ
    world = world_size(env)
    if world <= 1:
        return "", ""
    local = _int_from_env(("LOCAL_WORLD_SIZE",), world, env)
    nodes = max(1, world // max(1, local))
    if any(name.startswith("ACCELERATE_") for name in env):
        prefix = f"accelerate launch --multi_gpu --num_processes {world}"
        if nodes > 1:
            prefix += f" --num_machines {nodes} --machine_rank $NODE_RANK"
        return prefix + " -m clm_runner", " (with the accelerate options you launched it with)"
    prefix = f"torchrun --nproc_per_node {local}"
    note = ""
    if nodes > 1:
        endpoint = f"{env.get('MASTER_ADDR', 'HOST')}:{env.get('MASTER_PORT', '29500')}"
        prefix = f"torchrun --nnodes {nodes} --nproc_per_node {local} --rdzv-backend c10d --rdzv-endpoint {endpoint}"
        note = " (on each node)"
    return prefix + " -m clm_runner", note


# ---------------------------------------------------------------------------------------------------
# Backend choice


def has_collective_accelerator() -> bool:
    """True where the processes can train on a device with its own collective backend (CUDA, XPU, ...).

    Apple's MPS has none, so on a Mac, as on a CPU-only machine, a multi-process run trains on the CPU.
    """
    import torch

    if torch.cuda.is_available():
        return True
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return accelerator is not None and accelerator.type not in ("cpu", "mps")


def distributed_training_defaults(
    training: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """TrainingArguments keys a multi-process run needs: on a machine without a GPU, CPU + gloo.

    Without use_cpu, accelerate 1.x on a machine with no GPU finds no distributed backend under torchrun
    and starts N independent single-process runs that overwrite each other's files, so there it is set
    whatever the recipe says (use_cpu = false means "a GPU if there is one"). With use_cpu, accelerate
    picks MPI over gloo wherever torch was built with MPI, so gloo is named unless the recipe chose.
    """
    if not is_distributed(environ):
        return {}
    defaults: dict[str, Any] = {}
    use_cpu = bool(training.get("use_cpu"))
    if not use_cpu and not has_collective_accelerator():
        defaults["use_cpu"] = use_cpu = True
    if use_cpu and training.get("ddp_backend") is None:
        defaults["ddp_backend"] = "gloo"
    return defaults


def check_one_job(args: Any, environ: Mapping[str, str] | None = None) -> None:
    """Refuse to go on when the launcher started N processes but the Trainer sees N separate runs."""
    launched = world_size(environ)
    if launched > 1 and args.world_size != launched:
        raise ClmError(
            f"Launched as {launched} processes, but each one trains alone (the Trainer sees a world of "
            f"{args.world_size}): no distributed backend was found for this device. Set training.use_cpu = true "
            "to train on the CPU with gloo, or launch a single process."
        )


# ---------------------------------------------------------------------------------------------------
# Process group and collectives


def default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def ensure_process_group() -> bool:
    """Make sure the process group exists in a multi-process run; False in a single-process one.

    clm-runner builds TrainingArguments first, whose accelerate state creates the group with the
    recipe's backend and timeout; this only covers callers that reach a collective before that.
    """
    if not is_distributed():
        return False
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    if not dist.is_initialized():
        dist.init_process_group(backend=default_backend())
    return True


def _object_device() -> Any:
    """Where broadcast_object_list stages its bytes: NCCL moves only CUDA tensors."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


class ReplicaStopped(ClmError):
    """Raised on ranks other than 0 when rank 0's decision failed.

    Rank 0 reports the error once, with its message; the other ranks leave with the same exit status
    and print nothing (`quiet`), so a refused run shows one error, not one per process. The status,
    message and error type are kept for callers that are not the CLI.
    """

    quiet = True

    def __init__(self, exit_code: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.error_type = error_type

    def __str__(self) -> str:
        return f"rank 0 stopped the run ({self.error_type}: {self.message})"


@dataclass(frozen=True)
class _Outcome:
    """What rank 0 sends: the shared value, or how its decision failed."""

    value: Any = None
    error_type: str | None = None
    message: str = ""
    exit_code: int = 0


def decide_on_rank0(fn: Callable[[], T], *, share: Callable[[T], Any] | None = None) -> T:
    """Run `fn` on global rank 0 only and give every rank its result, or stop every rank with its error.

    On rank 0 an error from `fn` propagates unchanged (the CLI prints it and exits 2 for a ClmError);
    the other ranks raise ReplicaStopped with the same exit status (2 for a ClmError, 1 otherwise) and
    print nothing. Every rank must call this at the same point (it is a collective), and no rank waits
    for long: the decision is all that is exchanged.

    `share` picks what the other ranks receive (default: the result itself, which must pickle). For a
    result that must stay on rank 0, such as a held lock, pass `share=lambda lock: None`: rank 0 gets
    the lock, the others get None, and all of them know the lock was taken.
    """
    if not ensure_process_group():
        return fn()
    import torch.distributed as dist

    if is_main_process():
        try:
            result = fn()
        except Exception as exc:
            code = exc.exit_code if isinstance(exc, ClmError) else 1
            outcome = _Outcome(error_type=type(exc).__name__, message=str(exc), exit_code=code)
            _broadcast(outcome, dist)
            # Rank 0 leaves only once every rank holds the error: a launcher that sees one process end
            # stops the others, which would otherwise die by its signal instead of with this status.
            dist.barrier()
            raise
        _broadcast(_Outcome(value=share(result) if share is not None else result), dist)
        return result
    outcome = _broadcast(None, dist)
    if outcome.error_type is not None:
        dist.barrier()
        raise ReplicaStopped(outcome.exit_code, outcome.message, outcome.error_type)
    return outcome.value


def leave_process_group(timeout_s: float = 60.0) -> None:
    """Leave the process group together and tear it down before the process exits.

    A rank that exits while a peer's gloo connection to it is open can make that peer abort (SIGABRT)
    instead of leaving with its own exit status; a monitored barrier (which names a missing rank instead of
    waiting forever) and an explicit teardown let every rank leave with the status it chose.
    """
    import datetime

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except Exception:  # a peer already gone: nothing to wait for
        pass
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    # The launcher stops every rank once one has exited with a non-zero status (a refused start exits 2 on
    # all of them); a rank still in its last milliseconds would then die by that SIGTERM instead of leaving
    # with its own status. Past this point there is nothing left to stop.
    import signal

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _broadcast(outcome: _Outcome | None, dist: Any) -> _Outcome:
    box = [outcome]
    dist.broadcast_object_list(box, src=0, device=_object_device())
    return box[0]


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank ([value] in a single-process run)."""
    if not ensure_process_group():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def recipe_for_preprocessing(recipe: Recipe, environ: Mapping[str, str] | None = None) -> Recipe:
    """The recipe as this rank prepares data with: only each node's main process may rebuild the cache.

    Preprocessing runs under main_process_first: the node's main process builds, the others then read.
    With data.overwrite_cache they would rebuild it after it, once each, and replace its files.
    """
    if local_rank(environ) == 0 or not recipe.data.overwrite_cache:
        return recipe
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, overwrite_cache=False))


# ---------------------------------------------------------------------------------------------------
# What each rank prints


def quiet_replica_logging() -> None:
    """On ranks other than 0: clm_runner's logger at WARNING, datasets and transformers bars off.

    The Trainer already sets transformers' own level per rank (TrainingArguments.log_level_replica).
    """
    if is_main_process():
        return
    logging.getLogger("clm_runner").setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class GlobalBatch:
    """What one optimizer step consumes, over all processes."""

    per_device: int
    accumulation: int
    world_size: int
    block_size: int

    @property
    def blocks(self) -> int:
        return self.per_device * self.accumulation * self.world_size

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    def describe(self) -> str:
        return (
            f"Global batch: {self.blocks:,} blocks per optimizer step = {self.per_device} per device "
            f"x {self.accumulation} accumulation x {self.world_size} processes; "
            f"{self.tokens:,} tokens per optimizer step ({self.block_size}-token blocks)."
        )


def global_batch(args: Any, block_size: int) -> GlobalBatch:
    """The global batch of built TrainingArguments (their world_size is the data-parallel one)."""
    return GlobalBatch(
        per_device=args.per_device_train_batch_size,
        accumulation=args.gradient_accumulation_steps,
        world_size=args.world_size,
        block_size=block_size,
    )


def describe_preprocessing(built_by_rank: Sequence[Sequence[str]]) -> str:
    """One line saying which ranks built which split and which only read the cache."""
    builders = [r for r, built in enumerate(built_by_rank) if built]
    readers = [r for r, built in enumerate(built_by_rank) if not built]
    splits = sorted({name for built in built_by_rank for name in built})
    if not builders:
        return f"Preprocessing: every rank ({len(readers)}) read the cache."
    return (
        f"Preprocessing: {', '.join(splits)} built by rank {', '.join(map(str, builders))}; "
        f"the cache read by rank {', '.join(map(str, readers)) or '-'}."
    )


def global_batch_change(checkpoint: Path, args: Any, block_size: int) -> str | None:
    """A warning when a run resumes with another global batch than the checkpoint was trained with."""
    from clm_runner.rundir.checkpoints import read_marker

    marker = read_marker(checkpoint)
    keys = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
    if not all(isinstance(marker.get(key), int) for key in keys):
        return None
    before = (
        marker["world_size"] * marker["per_device_train_batch_size"] * marker["gradient_accumulation_steps"]
    )
    now = global_batch(args, block_size)
    if before == now.blocks:
        return None
    processes = f"{marker['world_size']} process{'es' if marker['world_size'] != 1 else ''}"
    return (
        f"Resuming {checkpoint.name}, trained with {processes} and {before} blocks per optimizer step, with "
        f"{now.world_size} and {now.blocks} ({before * block_size:,} -> {now.tokens:,} tokens per step): the "
        "global batch changed, and so do the steps per epoch and the losses. To keep it, launch as many "
        "processes as before, or set training.gradient_accumulation_steps to make up the difference."
    )
