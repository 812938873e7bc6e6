"""Named fault points: the places where a crash could tear something, for proving that nothing tears.

Every place where a kill, a full disk or a lost permission could leave a run half written calls
`point("name", path)`: around each file of a checkpoint, its seal and rename, rotation's deletes, every
results / manifest / model-card write, the final save, evaluation, start-up. Off by default, at the cost of
one comparison; switched on by the environment variable CLM_RUNNER_FAULT, which names a point (the
failpoint idea of etcd, and FoundationDB's simulation testing):

    CLM_RUNNER_FAULT=POINT[@HIT][:ACTION][:rankR][,POINT...]

- POINT: a name below (`write.run.json`, `checkpoint.model`, ...).
- HIT: fire the N-th time the point is reached in this process (default 1).
- ACTION: `kill` (SIGKILL this process, the default), `torn` (cut the point's file, or the largest file
  under its directory, to half its size, then SIGKILL: a kill in the middle of writing it), `enospc` (the
  write fails: no space left on the device), `eacces` (permission denied), `erofs` (read-only file system),
  `sigint` / `sigterm` (send this process the signal, as Ctrl-C or a scheduler would: at `train.step@N` the
  run stops after step N of this attempt), `delayS` (sleep S seconds at every hit from the N-th on: a slow
  machine, so a test can signal a run).
- rankR: only on global rank R of a multi-process run.
- Several faults, separated by commas, each counting its own hits: `checkpoint.sealing@2:delay60,train.step@10`
  slows the second checkpoint's seal and kills the run two steps later, while that seal is in flight.

tests/test_faults.py (`make fault-test`) kills a real `train` at every point in turn and resumes it.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

ENV = "CLM_RUNNER_FAULT"

POINTS = (
    "startup.lock",  # the output dir's lock is taken
    "startup.begun",  # run.json, train.log and recipe.toml are written: the run has started
    "checkpoint.staging",  # tmp-checkpoint-N exists, nothing in it yet
    "checkpoint.model",  # the weights (and tokenizer) are in tmp-checkpoint-N
    "checkpoint.optimizer",  # optimizer, scheduler, scaler and RNG states too
    "checkpoint.state",  # trainer_state.json too
    "checkpoint.taken",  # every file of tmp-checkpoint-N is written: the training thread goes on from here
    "checkpoint.sealing",  # the background seal of tmp-checkpoint-N starts (training goes on meanwhile)
    "checkpoint.marker",  # the completion marker is written; the rename has not happened
    "checkpoint.renamed",  # tmp-checkpoint-N became checkpoint-N; rotation has not run
    "rotation.delete",  # an old checkpoint is renamed to tmp-deleting-checkpoint-N, not yet removed
    "train.step",  # a training step starts
    "evaluate",  # an evaluation starts
    "train.end",  # the last step is done; nothing of the end of the run is written
    "final.save",  # the final model is staged in tmp-final, not yet moved into place
    "card.write",  # the model card is about to be written
)
"""The points besides `write.<file name>`, which every atomic file write passes (run.json, recipe.toml,
train_results.json, eval_results.json, all_results.json, trainer_state.json, ...) between writing its
temporary file and renaming it into place."""

ACTIONS = ("kill", "torn", "enospc", "eacces", "erofs", "sigint", "sigterm")
_SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}
_ERRNO = {"enospc": errno.ENOSPC, "eacces": errno.EACCES, "erofs": errno.EROFS}


def _parse(spec: str | None) -> tuple[str, int, str, int | None] | None:
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    name, _, hit = name.partition("@")
    action, rank = "kill", None
    for part in filter(None, rest.split(":")):
        if part.startswith("rank"):
            rank = int(part[4:])
        else:
            action = part
    if action not in ACTIONS and not (action.startswith("delay") and _is_number(action[5:])):
        raise ValueError(f"{ENV}={spec!r}: the action must be one of {', '.join(ACTIONS)} or delayS")
    return name, int(hit or 1), action, rank


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_ACTIVE = tuple(fault for fault in map(_parse, (os.environ.get(ENV) or "").split(",")) if fault is not None)
_hits = [0] * len(_ACTIVE)


def _tear(path: Path) -> None:
    """Cut a file (or the largest file under a directory) to half its size, as a kill mid-write leaves it."""
    files = (
        [path]
        if path.is_file()
        else sorted(path.rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else -1)
    )
    target = files[-1] if files else None
    if target is not None and target.is_file():
        with open(target, "r+b") as handle:
            handle.truncate(target.stat().st_size // 2)


def point(name: str, path: str | Path | None = None) -> None:
    """A place where a crash could tear something: fails here when CLM_RUNNER_FAULT names it, else nothing."""
    if not _ACTIVE:
        return
    for index, (target, hit, action, rank) in enumerate(_ACTIVE):
        if target == name:
            _strike(index, hit, action, rank, path)


def _strike(index: int, hit: int, action: str, rank: int | None, path: str | Path | None) -> None:
    if rank is not None and int(os.environ.get("RANK", "0")) != rank:
        return
    _hits[index] += 1
    if action.startswith("delay"):
        if _hits[index] >= hit:
            time.sleep(float(action[5:]))
        return
    if _hits[index] != hit:
        return
    if action == "torn" and path is not None:
        _tear(Path(path))
    if action in ("kill", "torn"):
        os.kill(os.getpid(), signal.SIGKILL)
    if action in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[action])
        return
    code = _ERRNO[action]
    raise OSError(code, os.strerror(code), str(path) if path is not None else None)
