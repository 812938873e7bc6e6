"""SIGINT and SIGTERM during a run: finish the current step, write a checkpoint, say how to resume, exit 130/143.

While training runs, the first signal only raises a flag; the Trainer checks it after every optimizer step
(see ClmTrainer._maybe_log_save_evaluate), saves a checkpoint and stops. A second signal, or one that
arrives before training starts or after it ends, stops at once with `StopNow`. The run then ends with
`RunInterrupted`, whose exit status is 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from clm_runner.config.secrets import drop_secret_sets, redact_argv
from clm_runner.errors import ClmError
from clm_runner.train.distributed import launcher_prefix

logger = logging.getLogger("clm_runner")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code_for(signum: int) -> int:
    """The shell's convention: 128 + signal number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopNow(BaseException):
    """Raised from the signal handler to stop at once. A BaseException, so `except Exception` can't eat it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


class RunInterrupted(ClmError):
    """The run was stopped by a signal; the CLI exits with 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, *, signum: int, quiet: bool = False) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = exit_code_for(signum)
        self.quiet = quiet
        """True once the run has said it (rank 0 logs the stop and the resume command, to the console and
        train.log): the CLI then leaves with the status and prints nothing more."""


class GracefulStop:
    """The run's SIGINT/SIGTERM handlers, and what they asked for."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stopped_at_step: int | None = None
        """The step after which training stopped for the signal (its checkpoint is checkpoint-N)."""
        self._graceful = False
        self._previous: dict[int, Any] = {}

    def install(self) -> GracefulStop:
        for signum in HANDLED_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (an embedding application): leave signals alone
                break
        return self

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @contextlib.contextmanager
    def during_training(self) -> Iterator[GracefulStop]:
        """Inside this block a first signal waits for the step to end; outside it stops at once."""
        self._graceful = True
        try:
            yield self
        finally:
            self._graceful = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self._graceful and self.signum is None:
            self.signum = signum
            from clm_runner.train.distributed import is_main_process

            if is_main_process():  # a launcher forwards the signal to every rank; one line says it
                logger.warning(
                    "Received %s: finishing this step, then writing a checkpoint and stopping. "
                    "Send it again to stop at once without a checkpoint.",
                    signal_name(signum),
                )
            return
        self.signum = self.signum or signum
        raise StopNow(signum)

    def should_stop(self, args: Any) -> bool:
        """Whether to stop now; in a multi-process run every rank must agree, or collectives would hang."""
        local = self.signum is not None
        if getattr(args, "world_size", 1) <= 1:
            return local
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return local
        flag = torch.tensor([1 if local else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = signal.SIGTERM  # another rank got the signal
        return bool(flag.item())


def resume_command(
    argv: Sequence[str], output_dir: Path, secrets: Iterable[str] = (), *, keep_resume_from: bool = False
) -> str:
    """The command that continues this run: the same one, minus flags that would stop it from resuming.

    `--resume-from` is dropped once the run has started (run.json records the checkpoint it named, and the
    run dir holds its line): given again it would go back there. Before that, it is what says where the
    line starts, and is kept. A token given with `--set model.token=...` is left out (it is never printed);
    the command says so.
    """
    launcher, launcher_note = launcher_prefix()
    program = launcher or "clm-runner"
    args = list(argv[1:]) if argv else []
    if "train" not in args:
        return f"{program} train --recipe {shlex.quote(str(output_dir / 'recipe.toml'))}{launcher_note}"
    kept: list[str] = []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg in ("--no-resume", "--overwrite"):
            continue
        if arg == "--resume-from" and not keep_resume_from:
            skip_next = True
            continue
        if arg.startswith("--resume-from=") and not keep_resume_from:
            continue
        kept.append(arg)
    kept, dropped = drop_secret_sets(kept)
    command = f"{program} " + shlex.join(redact_argv(kept, secrets)) + launcher_note
    if dropped:
        command += f"  (add --set {dropped[0]}=YOUR_TOKEN again, or set HF_TOKEN: tokens are never printed)"
    return command
