"""One run per output dir, run.json (content, status, no secret), rotation at the end, and the security defaults."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    SMOKE,
    byte_level_tokenizer,
    invoke,
    run_cli,
    snapshot,
    subprocess_env,
    tiny_gpt2_config,
    train_args,
)

from clm_runner.config.secrets import redact_argv, scrub
from clm_runner.errors import ClmError, ModelError
from clm_runner.rundir.checkpoints import scan_checkpoints
from clm_runner.rundir.lock import LOCK_NAME, RunLock, ensure_free, read_owner
from clm_runner.rundir.manifest import recipe_hash
from clm_runner.train.interrupts import resume_command

pytestmark = pytest.mark.slow


@pytest.fixture
def clm_log() -> list[str]:
    """Messages of the clm_runner logger (it does not propagate, so caplog cannot see them)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("clm_runner")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


HOLDER = """
import sys, time
from pathlib import Path
from clm_runner.rundir.lock import RunLock
lock = RunLock.acquire(Path(sys.argv[1]), "clm-runner train --recipe holder.toml")
print("ready", flush=True)
time.sleep(120)
"""


# ---------------------------------------------------------------------------------------------------
# The lock


def test_a_live_owner_is_refused_naming_it_and_nothing_changes(tmp_path: Path, fresh_cache: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        before = snapshot(run)
        result = invoke("train", *train_args(run)[1:])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        assert f"in use by pid {holder.pid} on {socket.gethostname()}" in errors[0]
        assert "holder.toml" in errors[0] and "another training.output_dir" in errors[0]
        assert "Traceback" not in result.output
        assert snapshot(run) == before
        with pytest.raises(ClmError, match=f"pid {holder.pid}"):
            RunLock.acquire(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing: its lock is stale now, and is taken over.
    assert read_owner(run / LOCK_NAME).pid == holder.pid
    with RunLock.acquire(run, "me") as lock:
        assert read_owner(lock.path).pid == os.getpid()
        with pytest.raises(ClmError, match=f"pid {os.getpid()}"):
            ensure_free(run)  # a second user in this very process is refused too
    assert not (run / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_with_a_warning(
    tmp_path: Path, fresh_cache: Path, clm_log: list[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    record = {
        "pid": pid,
        "host": socket.gethostname(),
        "command": "clm-runner train old",
        "started_at": time.time(),
    }
    (run / LOCK_NAME).write_text(json.dumps(record))
    result = invoke("train", *train_args(run, max_steps=2)[1:])
    assert result.exit_code == 0, result.output
    takeover = [m for m in clm_log if "Taking over the stale lock" in m]
    assert len(takeover) == 1 and f"pid {pid}" in takeover[0]
    assert not (run / LOCK_NAME).exists()  # released at the end
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_a_lock_from_another_host_is_not_stolen(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    record = {"pid": dead_pid(), "host": "some-other-node", "command": "", "started_at": 0}
    (run / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(ClmError, match=f"some-other-node.*delete {run / LOCK_NAME}"):
        ensure_free(run)


# ---------------------------------------------------------------------------------------------------
# run.json


def test_run_json_records_what_produced_the_run_and_no_secret(tmp_path: Path) -> None:
    """A real process, so its whole log is checked too; three secrets, three routes."""
    model_token = "hf_" + "M" * 34
    env_token = "hf_" + "E" * 34
    hub_token = "hf_" + "H" * 34
    run = tmp_path / "run"
    args = train_args(run, f"model.token={model_token}", f"training.hub_token={hub_token}", max_steps=4)
    env = subprocess_env(tmp_path / "cache", HF_TOKEN=env_token)
    code, log = run_cli(args, env, tmp_path / "train.log")
    assert code == 0, log

    for secret in (model_token, env_token, hub_token):
        assert secret not in log
        for path in run.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"{secret[:5]}... found in {path}"

    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["global_step"] == 4
    assert manifest["command"][:3] == ["clm-runner", "train", "--recipe"]
    assert "model.token=<redacted>" in manifest["command"]  # a record of what was typed, never read back
    # No placeholder where a secret was: a placeholder read back would be sent to the Hub as the token.
    assert "token" not in manifest["recipe"]["model"] and "hub_token" not in manifest["recipe"]["training"]
    assert manifest["secrets_not_recorded"] == ["model.token", "training.hub_token"]
    recipe_toml = (run / "recipe.toml").read_text()
    assert "<redacted>" not in recipe_toml and "# model.token was set and is not recorded" in recipe_toml
    assert manifest["recipe"]["training"]["max_steps"] == 4
    assert manifest["recipe_hash"] == recipe_hash(manifest["recipe"])
    for package in ("clm_runner", "transformers", "torch", "datasets", "accelerate", "python"):
        assert manifest["versions"][package]
    import torch
    import transformers

    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["transformers"] == transformers.__version__
    assert manifest["platform"]["system"] and manifest["devices"]["device"] == "cpu"
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert manifest["git"]["commit"] == head
    train_file = REPO / "recipes" / "smoke" / "train.txt"
    (listed,) = manifest["data"]["splits"]["train"]["files"]
    assert listed["sha256"] == hashlib.sha256(train_file.read_bytes()).hexdigest()
    assert listed["size"] == train_file.stat().st_size
    assert manifest["seed"] == 42
    assert manifest["started_at"] <= manifest["ended_at"]
    assert manifest["previous_attempts"] == []


SECRETS_BY_ROUTE = {
    "model.token": "corp-model-key-123456789",
    "training.hub_token": "corp-hub-key-987654321",
    "HF_TOKEN": "corp-env-key-555555555",
    "WANDB_API_KEY": "corp-wandb-key-4444444",
}
"""A value per route, none shaped like hf_...: the catch-all pattern cannot hide a route that leaks."""


def secret_train_args(run: Path) -> list[str]:
    """A short train command that passes the two recipe secrets of SECRETS_BY_ROUTE with --set."""
    return train_args(
        run,
        f"model.token={SECRETS_BY_ROUTE['model.token']}",
        f"training.hub_token={SECRETS_BY_ROUTE['training.hub_token']}",
        max_steps=4,
    )


def test_secrets_that_do_not_look_like_hub_tokens_reach_no_file_and_no_console(tmp_path: Path) -> None:
    """Each route on its own value, none shaped like hf_...: the catch-all pattern cannot hide a route that
    leaks. A run interrupted (its resume command printed) and resumed, so every line and file is seen."""
    secrets = SECRETS_BY_ROUTE
    run = tmp_path / "run"
    args = secret_train_args(run)
    env = subprocess_env(
        tmp_path / "cache", HF_TOKEN=secrets["HF_TOKEN"], WANDB_API_KEY=secrets["WANDB_API_KEY"]
    )
    code, first = run_cli(args, {**env, "CLM_RUNNER_FAULT": "train.step@2:sigint"}, tmp_path / "first.log")
    assert code == 130, first[-3000:]
    assert "Resume with:" in first
    code, second = run_cli(args, env, tmp_path / "second.log")
    assert code == 0, second[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "completed"

    for route, secret in secrets.items():
        assert secret not in first and secret not in second, f"{route} on the console"
        for path in [p for p in run.rglob("*") if p.is_file()]:
            assert secret.encode() not in path.read_bytes(), f"{route} in {path.relative_to(run)}"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["secrets_not_recorded"] == ["model.token", "training.hub_token"]
    recipe_toml = (run / "recipe.toml").read_text()
    for dotted in ("model.token", "training.hub_token"):
        assert f"# {dotted} was set and is not recorded" in recipe_toml


# Runs `clm-runner` with every training step logging the secrets (a library warning, one of ours) and the
# second one failing with them in its message: the routes a value takes when something else prints it.
LEAKY_WRAPPER = """
import logging, os, sys
from clm_runner.train.trainer import ClmTrainer
original = ClmTrainer.training_step
def leaky(self, *args, **kwargs):
    secrets = os.environ["TEST_SECRETS"].split(",")
    for secret in secrets:
        logging.getLogger("transformers.trainer").warning("library says %s", secret)
        logging.getLogger("clm_runner").warning("we say " + secret)
    if self.state.global_step >= 1:
        raise RuntimeError("crashed holding " + " and ".join(secrets))
    return original(self, *args, **kwargs)
ClmTrainer.training_step = leaky
from clm_runner.cli import main
sys.argv = ["clm-runner", *sys.argv[1:]]
sys.exit(main(sys.argv[1:]))
"""


def test_secrets_printed_by_a_library_or_an_error_are_masked_everywhere(tmp_path: Path) -> None:
    secrets = SECRETS_BY_ROUTE
    run = tmp_path / "run"
    args = secret_train_args(run)
    env = subprocess_env(
        tmp_path / "cache",
        HF_TOKEN=secrets["HF_TOKEN"],
        WANDB_API_KEY=secrets["WANDB_API_KEY"],
        TEST_SECRETS=",".join(secrets.values()),
    )
    done = subprocess.run(
        [sys.executable, "-c", LEAKY_WRAPPER, *args], env=env, capture_output=True, text=True, cwd=REPO
    )
    console = done.stdout + done.stderr
    assert done.returncode == 1, console[-3000:]
    assert "library says" in console and "crashed holding" in console  # the routes were taken
    log = (run / "train.log").read_text()
    assert "library says" in log and "we say" in log
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("RuntimeError: crashed holding")
    for route, secret in secrets.items():
        assert secret not in console, f"{route} on the console"
        for path in [p for p in run.rglob("*") if p.is_file()]:
            assert secret.encode() not in path.read_bytes(), f"{route} in {path.relative_to(run)}"


def test_a_crash_marks_the_run_failed_and_frees_the_dir(
    tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clm_runner.train.trainer import ClmTrainer

    def explode(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ClmTrainer, "train", explode)
    run = tmp_path / "run"
    result = invoke("train", *train_args(run, max_steps=2)[1:], catch_exceptions=True)
    assert isinstance(result.exception, RuntimeError)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == "RuntimeError: disk on fire"
    assert manifest["ended_at"]
    assert not (run / LOCK_NAME).exists()


def test_a_rerun_from_recipe_toml_sends_no_placeholder_as_a_token(
    tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recipe.toml used to hold token = "<redacted>": the documented rerun sent it to the Hub and set HF_TOKEN
    to it, overriding the user's real token."""
    real = "hf_" + "R" * 34
    monkeypatch.setenv("HF_TOKEN", real)
    run = tmp_path / "run"
    result = invoke(
        "train", *train_args(run, f"model.token={real}", f"training.hub_token={real}", max_steps=2)[1:]
    )
    assert result.exit_code == 0, result.output
    rerun = tmp_path / "rerun"
    result = invoke("train", "--recipe", str(run / "recipe.toml"), "--set", f"training.output_dir={rerun}")
    assert result.exit_code == 0, result.output
    assert os.environ["HF_TOKEN"] == real
    from clm_runner.config.load import load_recipe

    reread = load_recipe(run / "recipe.toml")
    assert reread.model.token is None and "hub_token" not in reread.training
    # A recipe.toml written by clm-runner 0.1.0 held the placeholder: refused with the fix, never sent.
    old = tmp_path / "old.toml"
    old.write_text((run / "recipe.toml").read_text().replace("[model]\n", '[model]\ntoken = "<redacted>"\n'))
    result = invoke("eval", "--recipe", str(old))
    assert result.exit_code == 2
    assert "model.token = '<redacted>' is a placeholder" in result.output and "HF_TOKEN" in result.output


def test_the_printed_resume_command_leaves_a_secret_out_and_says_so() -> None:
    secret = "hf_" + "s" * 34
    command = resume_command(
        [
            "clm-runner",
            "train",
            "-r",
            "r.toml",
            "--set",
            f"model.token={secret}",
            "--set",
            "data.block_size=8",
        ],
        Path("out"),
        [secret],
    )
    assert secret not in command and "<redacted>" not in command
    assert command.startswith("clm-runner train -r r.toml --set data.block_size=8")
    assert "add --set model.token=YOUR_TOKEN again, or set HF_TOKEN" in command


def test_redaction_helpers() -> None:
    secret = "hf_" + "x" * 34
    argv = ["clm-runner", "train", "--set", f"model.token={secret}", "--set", "training.hub_token=abc123"]
    assert redact_argv(argv) == [
        "clm-runner",
        "train",
        "--set",
        "model.token=<redacted>",
        "--set",
        "training.hub_token=<redacted>",
    ]
    assert scrub(f"token {secret} and sekrit", ["sekrit"]) == "token <redacted> and <redacted>"
    command = resume_command(
        [
            "/bin/clm-runner",
            "train",
            "-r",
            "r.toml",
            "--no-resume",
            "--overwrite",
            "--resume-from",
            "x/checkpoint-3",
        ],
        Path("out"),
    )
    assert command == "clm-runner train -r r.toml"


# ---------------------------------------------------------------------------------------------------
# Rotation at the end of training


def test_save_total_limit_1_with_best_model_keeps_the_newest_complete(
    tmp_path: Path, fresh_cache: Path
) -> None:
    """Upstream deletes the newest checkpoint at the end here (save_total_limit=1 and a best one); we don't."""
    run = tmp_path / "run"
    extra = (
        "training.eval_strategy=steps",
        "training.eval_steps=2",
        "training.save_steps=2",
        "training.save_total_limit=1",
        "training.load_best_model_at_end=true",
        "training.metric_for_best_model=loss",
        "training.greater_is_better=true",  # the loss falls, so "best" is the first eval: not the newest
    )
    result = invoke("train", *train_args(run, *extra, max_steps=6)[1:])
    assert result.exit_code == 0, result.output
    state = json.loads((run / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"]).name
    complete = [p.name for p in scan_checkpoints(run).complete]
    assert "checkpoint-6" in complete and best in complete
    assert best != "checkpoint-6", "the scenario needs a best checkpoint that is not the newest"
    assert complete == sorted([best, "checkpoint-6"], key=lambda name: int(name.split("-")[1]))
    assert not scan_checkpoints(run).torn


# ---------------------------------------------------------------------------------------------------
# Security


def test_trust_remote_code_is_off_by_default_and_warns_when_set(
    tmp_path: Path, fresh_cache: Path, clm_log
) -> None:
    from clm_runner.config.load import load_recipe

    assert load_recipe(SMOKE).model.trust_remote_code is False
    result = invoke("train", *train_args(tmp_path / "run", "model.trust_remote_code=true", max_steps=1)[1:])
    assert result.exit_code == 0, result.output
    assert any(
        "trust_remote_code = true" in m and "code shipped with the model will run" in m for m in clm_log
    )


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    from clm_runner.models.trained import load_trained

    model = GPT2LMHeadModel(tiny_gpt2_config(n_embd=8, vocab_size=16, n_positions=8))
    model.config.save_pretrained(tmp_path)
    # A tokenizer beside the weights, so what is refused is the pickled weights file alone.
    byte_level_tokenizer(["a fixture text, enough for a tokenizer"]).save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors"):
        load_trained(str(tmp_path))


def unsafe_torch_loads(source: str) -> list[str]:
    """torch.load calls that do not pass weights_only=True (they could unpickle arbitrary code)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("torch.load"):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if keywords.get("weights_only") != "True":
                found.append(ast.unparse(node))
    return found


def test_every_torch_load_in_clm_runner_uses_weights_only() -> None:
    probe = "import torch\ntorch.load('a')\ntorch.load('b', weights_only=False)\ntorch.load('c', weights_only=True)\n"
    assert unsafe_torch_loads(probe) == ["torch.load('a')", "torch.load('b', weights_only=False)"]
    for path in sorted((REPO / "clm_runner").rglob("*.py")):
        assert unsafe_torch_loads(path.read_text()) == [], path


# ---------------------------------------------------------------------------------------------------
# Starting over, and what a run dir is readable by


def complete_names(run: Path) -> list[str]:
    return [p.name for p in scan_checkpoints(run).complete]


def test_starting_over_moves_the_old_run_aside_so_the_two_never_mix(
    tmp_path: Path, fresh_cache: Path
) -> None:
    """--no-resume --overwrite used to train beside the old checkpoints: rotation then deleted the new run's
    checkpoints as soon as they were sealed, and the next resume picked the old run's newest."""
    run = tmp_path / "run"
    old = invoke(
        "train", *train_args(run, "training.save_steps=2", "training.save_total_limit=2", max_steps=8)[1:]
    )
    assert old.exit_code == 0, old.output
    assert complete_names(run) == ["checkpoint-6", "checkpoint-8"]
    before = snapshot(run)

    new = invoke(
        "train",
        *train_args(
            run,
            "training.save_steps=1",
            "training.save_total_limit=2",
            max_steps=4,
            flags=("--no-resume", "--overwrite"),
        )[1:],
    )
    assert new.exit_code == 0, new.output
    (archived,) = (run / "previous-runs").iterdir()
    assert snapshot(archived) == before  # nothing of the old run deleted or changed
    assert complete_names(run) == ["checkpoint-3", "checkpoint-4"]  # the new run's, none rotated away
    assert json.loads((run / "run.json").read_text())["previous_attempts"] == []  # a new run, its own record

    # The next automatic resume continues the new run, not the old one.
    more = invoke(
        "train", *train_args(run, "training.save_steps=1", "training.save_total_limit=2", max_steps=6)[1:]
    )
    assert more.exit_code == 0, more.output
    assert f"resuming from {run / 'checkpoint-4'}" in more.output
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 6
    assert snapshot(archived) == before


def test_every_file_of_a_run_dir_gets_the_mode_a_plain_open_would(tmp_path: Path, fresh_cache: Path) -> None:
    """The safetensors writer made model.safetensors 0600 (final and in every checkpoint): colleagues on a
    shared cluster could read the metrics but not load the model."""
    run = tmp_path / "run"
    result = invoke("train", *train_args(run, "training.save_steps=2", max_steps=4)[1:])
    assert result.exit_code == 0, result.output
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.relative_to(run).as_posix() for p in files} >= {
        "model.safetensors",
        "checkpoint-4/model.safetensors",
    }
    wrong = {
        p.relative_to(run).as_posix(): oct(p.stat().st_mode & 0o777)
        for p in files
        if p.stat().st_mode & 0o777 != expected
    }
    assert wrong == {}


def test_a_closed_console_does_not_end_the_run(tmp_path: Path) -> None:
    """`clm-runner train ... | head -2` used to mark the run failed on a broken pipe, with nothing in train.log."""
    import subprocess as sp

    from helpers import WRAPPER

    run = tmp_path / "run"
    env = subprocess_env(tmp_path / "cache")
    args = train_args(run, "training.logging_steps=1", max_steps=12)
    args.remove("--quiet")
    process = sp.Popen(
        [sys.executable, "-c", WRAPPER, *args], env=env, stdout=sp.PIPE, stderr=sp.STDOUT, cwd=REPO
    )
    for _ in range(2):
        process.stdout.readline()
    process.stdout.close()  # as `head -2` does once it has its lines
    assert process.wait(timeout=120) == 0
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["global_step"] == 12
    log = (run / "train.log").read_text()
    assert "Standard output was closed" in log and "step 12/12" in log
