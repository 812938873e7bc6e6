"""Every bad input of the "a typo must not cost a run" list: exit 2, one clear line, no traceback, nothing changed.

Each case builds a small world (recipe, data, output dir) under tmp_path, snapshots it, runs the CLI, and
checks: exit status 2, exactly one `error:` line that names the problem and its fix, no traceback, and
every file and directory of the world as it was (a new output dir is not left behind either).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ASSETS, REPO, TINY_CONFIG, snapshot

from clm_runner.cli import cli
from clm_runner.rundir.checkpoints import seal_checkpoint

pytestmark = pytest.mark.usefixtures("fresh_cache")  # outside the world each test snapshots


TEXT = (ASSETS / "train.txt").read_text(encoding="utf-8")[:20000]


def recipe_text(world: Path, *, data: str | None = None, model: str | None = None, extra: str = "") -> str:
    model = model or (
        f'model_type = "gpt2"\nconfig_overrides = "{TINY_CONFIG}"\ntokenizer_name = "{ASSETS / "tokenizer"}"'
    )
    data = data or f'train_file = "{world / "train.txt"}"\nvalidation_file = "{world / "valid.txt"}"'
    return (
        f"[model]\n{model}\n\n[data]\n{data}\nblock_size = 32\n\n"
        f'[training]\noutput_dir = "{world / "out"}"\nmax_steps = 2\nreport_to = "none"\n{extra}\n'
    )


@dataclass
class World:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.toml"

    @property
    def out(self) -> Path:
        return self.root / "out"


@pytest.fixture
def world(tmp_path: Path) -> World:
    root = tmp_path / "world"
    root.mkdir()
    (root / "train.txt").write_text(TEXT, encoding="utf-8")
    (root / "valid.txt").write_text(TEXT[:5000], encoding="utf-8")
    (root / "recipe.toml").write_text(recipe_text(root), encoding="utf-8")
    return World(root)


def refuse(world: World, args: list[str], *fragments: str) -> str:
    """Run the CLI and check the refusal contract; returns the error line."""
    before = snapshot(world.root)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert snapshot(world.root) == before, "the refusal changed files on disk"
    return errors[0]


def train(world: World, *sets: str, recipe: Path | None = None) -> list[str]:
    return [
        "train",
        "--recipe",
        str(recipe or world.recipe),
        "--quiet",
        *[a for s in sets for a in ("--set", s)],
    ]


# ---------------------------------------------------------------------------------------------------
# Recipe


def test_missing_recipe_file(world: World) -> None:
    refuse(
        world,
        train(world, recipe=world.root / "nope.toml"),
        "Recipe file not found",
        "nope.toml",
        "Check the path",
    )


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ('[model]\nmodel_type = = "gpt2"\n', "line 2, column 14"),
        ('[model]\nmodel_type = "gpt2"\ntokenizer_name = \'x\n', "line 3, column 20"),  # unclosed at the end
        ("[model\nmodel_type = 1\n", "line 1, column 7"),
    ],
)
def test_toml_syntax_error_names_line_and_column(world: World, text: str, position: str) -> None:
    world.recipe.write_text(text)
    refuse(world, train(world), "not valid TOML", position, "Fix the syntax")


def test_unknown_key_names_the_closest_valid_one(world: World) -> None:
    world.recipe.write_text(world.recipe.read_text().replace("block_size = 32", "blok_size = 32"))
    refuse(world, train(world), "unknown key data.blok_size", "did you mean data.block_size?")


def test_unknown_training_key_names_the_closest_valid_one(world: World) -> None:
    refuse(
        world,
        train(world, "training.learnig_rate=1e-4"),
        "unknown key training.learnig_rate",
        "training.learning_rate",
    )


def test_wrong_type(world: World) -> None:
    refuse(world, train(world, 'training.max_steps="ten"'), "training.max_steps must be an integer", "'ten'")
    refuse(world, train(world, "data.block_size=1.5"), "data.block_size must be an integer")


def test_conflicting_keys(world: World) -> None:
    refuse(
        world,
        train(world, "model.model_name_or_path=gpt2"),
        "Can't use model.config_overrides with",
        "model.model_name_or_path",
        "Choose one",
    )
    refuse(
        world, train(world, "data.dataset_name=wikitext"), "data.dataset_name together with data.train_file"
    )


# ---------------------------------------------------------------------------------------------------
# --set


def test_set_without_equals(world: World) -> None:
    refuse(
        world, train(world, "training.max_steps"), "Malformed --set 'training.max_steps'", "section.key=value"
    )


def test_set_with_an_unknown_section(world: World) -> None:
    refuse(world, train(world, "trainig.max_steps=3"), "unknown section [trainig]", "did you mean training?")


# ---------------------------------------------------------------------------------------------------
# Data


def test_missing_data_file(world: World) -> None:
    refuse(
        world,
        train(world, f"data.train_file={world.root / 'absent.txt'}"),
        "absent.txt does not exist",
        "Fix the path",
    )


def test_unsupported_extension(world: World) -> None:
    (world.root / "train.docx").write_bytes(b"PK\x03\x04 not text")
    refuse(
        world,
        train(world, f"data.train_file={world.root / 'train.docx'}"),
        "unsupported extension '.docx'",
        "Rename or convert",
    )


@pytest.mark.parametrize("content", ["", "\n\n   \n\t\n"], ids=["empty", "blank-only"])
def test_empty_or_blank_data(world: World, content: str) -> None:
    (world.root / "train.txt").write_text(content)
    line = refuse(world, train(world), "train.txt")
    assert ("is empty. Put text in it" in line) or (
        "only blank text" in line and "Give it some text" in line
    ), line


@pytest.mark.slow
@pytest.mark.parametrize("out_dir", ["absent", "pre-created empty"])
def test_data_too_short_for_one_block(world: World, out_dir: str) -> None:
    """Found while preparing data, after the output dir is locked: the start must still leave it as it was
    (a pre-created empty dir used to keep a train.log, so the retry was refused as non-empty)."""
    if out_dir != "absent":
        world.out.mkdir()
    (world.root / "train.txt").write_text("Only a few words here.\n")
    refuse(
        world,
        train(world),
        "too few for one block of 32 tokens",
        "Give it more text, or lower data.block_size",
    )
    (world.root / "train.txt").write_text(TEXT, encoding="utf-8")
    result = CliRunner().invoke(cli, train(world, "training.max_steps=1"))
    assert result.exit_code == 0, result.output  # the retry needs no --overwrite


def test_block_longer_than_the_models_positions(world: World, tmp_path_factory) -> None:
    """Accepted by train (run_clm's rule caps by model_max_length only) and failing at the final evaluation,
    after the whole training; now refused before any data is prepared."""
    cache = Path(os.environ["CLM_RUNNER_CACHE"])
    refuse(
        world,
        train(world, "data.block_size=128"),
        "data.block_size = 128 is longer than the model's 64 positions",
        "set data.block_size to 64 or less",
    )
    refuse(
        world,
        ["recipe", "check", "--recipe", str(world.recipe), "--set", "data.block_size=128"],
        "64 positions",
    )
    assert not (cache / "blocks").exists()  # nothing was tokenized


@pytest.mark.parametrize(
    ("sets", "refused"),
    [
        (["data.block_size=64"], None),  # the model's 64 positions exactly
        (["data.block_size=65"], "data.block_size = 65 is longer than the model's 64 positions"),
        (["data.validation_file=", "data.validation_split_percentage=1"], None),
        (["data.validation_file=", "data.validation_split_percentage=99"], None),
        (["data.validation_file=", "data.validation_split_percentage=0"], "between 1 and 99; got 0"),
        (["data.validation_file=", "data.validation_split_percentage=100"], "between 1 and 99; got 100"),
    ],
    ids=["block-64", "block-65", "percent-1", "percent-99", "percent-0", "percent-100"],
)
def test_refusals_at_their_boundaries(world: World, sets: list[str], refused: str | None) -> None:
    """The last value accepted and the first refused, in `recipe check` and `train` alike."""
    check = ["recipe", "check", "--recipe", str(world.recipe), *[a for s in sets for a in ("--set", s)]]
    if refused is None:
        result = CliRunner().invoke(cli, check)
        assert result.exit_code == 0, result.output
        assert "ok (block_size" in result.output
        return
    assert refuse(world, check, refused) == refuse(world, train(world, *sets), refused)


@pytest.mark.parametrize("size", [0, -4])
def test_block_size_zero_or_less(world: World, size: int) -> None:
    refuse(world, train(world, f"data.block_size={size}"), "data.block_size must be a positive number")


@pytest.mark.slow
def test_non_utf8_data_is_a_clear_error_or_replaced_on_request(world: World) -> None:
    (world.root / "train.txt").write_bytes(TEXT.encode("utf-8") + b"caf\xe9 latin-1 bytes\n")
    refuse(world, train(world), "train.txt", "UTF-8", 'encoding_errors = "replace"')
    result = CliRunner().invoke(cli, train(world, 'data.encoding_errors="replace"', "training.max_steps=1"))
    assert result.exit_code == 0, result.output
    assert json.loads((world.out / "run.json").read_text())["status"] == "completed"


# ---------------------------------------------------------------------------------------------------
# Output dir


def test_non_empty_output_dir_without_checkpoints(world: World) -> None:
    world.out.mkdir()
    (world.out / "notes.txt").write_text("precious")
    refuse(world, train(world), "not empty", "notes.txt", "--overwrite")


def test_output_dir_in_use(world: World) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from clm_runner.rundir.lock import RunLock;"
            "RunLock.acquire(Path(sys.argv[1]), 'clm-runner train'); print('ready', flush=True); time.sleep(60)",
            str(world.out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        refuse(world, train(world), f"in use by pid {holder.pid}", "another training.output_dir")
    finally:
        holder.kill()
        holder.wait()


def test_output_dir_with_only_torn_checkpoints(world: World) -> None:
    staging = world.out / "tmp-checkpoint-4"
    staging.mkdir(parents=True)
    (staging / "trainer_state.json").write_text("{}")
    seal_checkpoint(staging, world.out / "checkpoint-4", step=4)
    (world.out / "checkpoint-4" / "trainer_state.json").write_text("{}  ")  # changed after sealing: torn
    refuse(world, train(world), "only torn checkpoints", "checkpoint-4", "--overwrite")


def test_a_checkpoint_resumes_only_into_a_model_of_its_shapes(world: World, tmp_path: Path) -> None:
    """A recipe whose model differs from the checkpoint's (wider, deeper) used to fail loading the state dict
    after the model was built (a traceback, exit 1); the checkpoint's tensors are compared with the planned
    model's first. The recipe it was trained with still resumes."""
    import shutil

    first = tmp_path / "first"
    result = CliRunner().invoke(cli, train(world, f"training.output_dir={first}", "training.save_steps=2"))
    assert result.exit_code == 0, result.output
    shutil.copytree(first / "checkpoint-2", world.out / "checkpoint-2")
    more = "training.max_steps=4"
    check = ["recipe", "check", "--recipe", str(world.recipe), "--set", more]
    result = CliRunner().invoke(cli, check)
    assert result.exit_code == 0 and "resuming from" in result.output, result.output
    for change, fragment in (
        ("n_embd=32", "transformer.h.0.attn.c_attn.bias: shape [96] in the checkpoint, shape [192] planned"),
        ("n_layer=1", "transformer.h.1.ln_1.weight: none in the checkpoint, shape [32] planned"),
    ):
        other = TINY_CONFIG.replace(change, change.replace("32", "64").replace("1", "2"))
        sets = [f"model.config_overrides={other}", more]
        checked = refuse(
            world, [*check, "--set", sets[0]], "holds other tensors than the recipe plans", fragment
        )
        assert refuse(world, train(world, *sets), fragment) == checked


# ---------------------------------------------------------------------------------------------------
# Hub while offline


def test_hub_model_while_offline(world: World) -> None:
    model = 'model_name_or_path = "openai-community/gpt2"'
    world.recipe.write_text(recipe_text(world.root, model=model))
    refuse(
        world, train(world), "Can't reach the Hugging Face Hub", "openai-community/gpt2", "local directory"
    )


def test_hub_dataset_while_offline(world: World) -> None:
    world.recipe.write_text(recipe_text(world.root, data='dataset_name = "someone/unseen-dataset"'))
    refuse(world, train(world), "Hugging Face Hub", "someone/unseen-dataset")


# ---------------------------------------------------------------------------------------------------
# eval


def test_eval_on_a_directory_that_is_not_a_run(world: World) -> None:
    plain = world.root / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a run")
    refuse(
        world,
        ["eval", "--run", str(plain)],
        "is not a clm-runner run (no recipe.toml)",
        "Pass a run's output_dir",
    )
    refuse(world, ["eval", "--run", str(world.root / "missing")], "no such directory", "output_dir of a")
    # A recipe but no trained model (world holds recipe.toml): named too.
    refuse(
        world,
        ["eval", "--run", str(world.root)],
        "holds no saved model (no config.json or adapter_config.json)",
        "checkpoint-N",
    )


# ---------------------------------------------------------------------------------------------------
# Options a command would accept and then not use


def saved_model(world: World, name: str, adapter: bool) -> Path:
    """A directory that looks like a saved model (refusals come before any file in it is read)."""
    directory = world.root / name
    directory.mkdir()
    (directory / ("adapter_config.json" if adapter else "config.json")).write_text("{}")
    return directory


@pytest.mark.parametrize(
    ("adapter", "merge"),
    [(True, False), (False, False), (False, True)],
    ids=["adapter", "full", "full-merge"],
)
def test_export_refuses_a_set_it_would_not_use(world: World, adapter: bool, merge: bool) -> None:
    """--set changes the base an adapter is merged into; without --merge (or for a full model) nothing reads it."""
    source = saved_model(world, "model", adapter)
    args = [
        "export",
        str(source),
        "--output",
        str(world.root / "exported"),
        "--set",
        "model.model_name_or_path=x",
    ]
    refuse(world, args + (["--merge"] if merge else []), "--set", "only with --merge on an adapter")


def test_generate_refuses_a_set_it_would_not_use(world: World) -> None:
    full = saved_model(world, "full", adapter=False)
    refuse(world, ["generate", str(full), "--prompt", "x", "--set", "model.dtype=float16"], "is a full model")
    adapter = saved_model(world, "adapter", adapter=True)
    refuse(world, ["generate", str(adapter), "--prompt", "x", "--set", "data.block_size=8"], "model.* keys")


def test_eval_refuses_a_run_and_a_recipe_together(world: World) -> None:
    """--run used to win silently over --recipe."""
    run = saved_model(world, "run", adapter=False)
    refuse(
        world, ["eval", "--run", str(run), "--recipe", str(world.recipe)], "--run and --recipe", "choose one"
    )


# ---------------------------------------------------------------------------------------------------
# recipe check runs what train runs before any heavy work


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["data.train_file=absent.txt"], "absent.txt does not exist"),
        (["training.eval_strategy=epochs"], "did you mean 'epoch'?"),
        (["training.lr_scheduler_type=cosin"], "did you mean 'cosine'?"),
        (["model.config_overrides=n_layer=two"], "model.config_overrides 'n_layer=two'"),
        ([f"model.tokenizer_name={ASSETS / 'tokenizr'}"], "no such directory"),
        (["data.block_size=128"], "longer than the model's 64 positions"),
        (["training.per_device_train_batch_size=0"], "at least 1 block"),
        (["training.report_to=wandb"], "not installed"),
        (["data.validation_split_seed=-1"], "data.validation_split_seed must be 0 or more; got -1"),
        (["data.text_column=nope"], "data.text_column = 'nope' is not a column of the data; columns: text"),
        (
            ["training.fsdp=true"],
            "training.fsdp shards the model across processes, and this run is one process",
        ),
        (["training.lr_scheduler_kwargs={foo=1}"], "unexpected keyword argument 'foo'"),
        (["training.lr_scheduler_type=cosine_with_min_lr"], "One of min_lr or min_lr_rate should be set"),
        (
            ["training.lr_scheduler_type=constant", "training.lr_scheduler_kwargs={num_cycles=2}"],
            "the constant schedule takes no arguments",
        ),
        (["training.optim_args=bogus"], "must be key=value pairs separated by commas"),
        (["training.optim=sgd", "training.optim_args=momentun=0.9"], "'sgd' does not read 'momentun'"),
        (
            ["training.gradient_checkpointing=true", "training.gradient_checkpointing_kwargs={foo=1}"],
            "is not what torch.utils.checkpoint takes",
        ),
        (
            ["training.gradient_checkpointing_kwargs={use_reentrant=false}"],
            "training.gradient_checkpointing_kwargs is read only with gradient checkpointing",
        ),
        (
            ["training.fsdp_config={min_num_params=1000}"],
            "training.fsdp_config tunes FSDP, which this recipe does not turn on",
        ),
        (["training.torch_compile_backend=tvm"], "needs tvm, which is not installed"),
        ([f"model.tokenizer_name={ASSETS}"], "holds no tokenizer (tokenizer.json, "),
        (
            [
                "training.gradient_checkpointing=true",
                "training.gradient_checkpointing_kwargs={every_n_layers=0}",
            ],
            "every_n_layers must be a whole number of layers, 1 or more",
        ),
        (["training.torch_compile_backend=nope"], "is not a torch.compile backend here"),
        (["training.torch_compile_mode=fast"], "training.torch_compile_mode = 'fast' is not one of default"),
        (["training.accelerator_config=absent.json"], "names a file that can't be read"),
    ],
    ids=[
        "train_file",
        "eval_strategy",
        "scheduler",
        "config_overrides",
        "tokenizer",
        "block",
        "batch",
        "report",
        "validation-seed",
        "text-column",
        "fsdp-one-process",
        "scheduler-kwargs",
        "scheduler-needs-kwargs",
        "scheduler-takes-none",
        "optim-args",
        "optim-args-unread",
        "checkpointing-kwargs",
        "checkpointing-kwargs-unused",
        "fsdp-config-unused",
        "compile-backend-package",
        "tokenizer-files",
        "checkpointing-layers",
        "compile-backend",
        "compile-mode",
        "accelerator-config",
    ],
)
def test_check_refuses_what_train_refuses_with_the_same_line(
    world: World, sets: list[str], fragment: str
) -> None:
    """`recipe check` said ok to recipes that `train` then rejected (or that failed later with a traceback)."""
    check = ["recipe", "check", "--recipe", str(world.recipe), *[a for s in sets for a in ("--set", s)]]
    checked = refuse(world, check, fragment)
    trained = refuse(world, train(world, *sets), fragment)
    assert checked == trained


@pytest.mark.parametrize(
    ("package", "sets", "fragment"),
    [
        ("bitsandbytes", ["training.optim=adamw_bnb_8bit"], "needs a package that is not installed"),
        ("galore_torch", ["training.optim=galore_adamw"], "needs a package that is not installed"),
        ("deepspeed", ["training.deepspeed={root}/ds.json"], "training.deepspeed needs DeepSpeed"),
    ],
    ids=["bitsandbytes", "galore", "deepspeed"],
)
def test_a_key_whose_package_is_missing_is_refused_by_check_and_train(
    world: World, package: str, sets: list[str], fragment: str
) -> None:
    """`recipe check` said ok (deepspeed: a traceback from check itself) and train failed after the model."""
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    (world.root / "ds.json").write_text('{"train_batch_size": "auto"}')
    sets = [s.format(root=world.root) for s in sets]
    check = ["recipe", "check", "--recipe", str(world.recipe), *[a for s in sets for a in ("--set", s)]]
    assert refuse(world, check, fragment) == refuse(world, train(world, *sets), fragment)


def test_check_says_what_train_would_do_with_the_output_dir(world: World) -> None:
    result = CliRunner().invoke(cli, ["recipe", "check", "--recipe", str(world.recipe)])
    assert result.exit_code == 0, result.output
    assert "ok (block_size 32). Training into new output dir" in result.output
    world.out.mkdir()
    (world.out / "notes.txt").write_text("x")
    refuse(world, ["recipe", "check", "--recipe", str(world.recipe)], "not empty", "--overwrite")


# ---------------------------------------------------------------------------------------------------
# The best model and early stopping: refused before any work when clm-runner's checkpoints can't hold it

STEPS = ["training.eval_strategy=steps", "training.eval_steps=10", "training.save_strategy=steps"]


@pytest.mark.parametrize(
    ("sets", "fragments"),
    [
        (["early_stopping.patience=2"], ['eval_strategy is "no"', 'Set eval_strategy = "steps"']),
        (
            ["early_stopping.patience=2", *STEPS, "training.save_steps=15"],
            ["save_steps = 15 and training.eval_steps = 10", "Set training.save_steps = 10"],
        ),
        (["early_stopping.patience=2", *STEPS, "training.save_strategy=no"], ["save_strategy is 'no'"]),
        (["early_stopping.patience=0"], ["at least 1 evaluation; got 0"]),
        (
            ["early_stopping.patience=2", "early_stopping.threshold=inf"],
            ["a finite number, 0 or more", "got inf"],
        ),
        (["early_stopping.threshold=0.1"], ["early_stopping.patience is not set"]),
        (["early_stopping.patiense=2"], ["did you mean early_stopping.patience?"]),
        (["training.load_best_model_at_end=true"], ['eval_strategy is "no"']),
        (
            ["training.load_best_model_at_end=true", *STEPS, "training.save_strategy=best"],
            ["save_strategy is 'best'"],
        ),
        (["training.metric_for_best_model=perplexiti"], ["did you mean 'perplexity'?"]),
        (
            ["training.metric_for_best_model=harbour_perplexity"],
            ["names source 'harbour'", "no [[data.mix]]"],
        ),
    ],
    ids=[
        "no-eval",
        "steps-apart",
        "no-save",
        "patience-0",
        "threshold-inf",
        "no-patience",
        "typo",
        "best-no-eval",
        "best-save",
        "metric",
        "source-metric",
    ],
)
def test_best_model_and_early_stopping_refusals(world: World, sets: list[str], fragments: list[str]) -> None:
    check = ["recipe", "check", "--recipe", str(world.recipe), *[a for s in sets for a in ("--set", s)]]
    assert refuse(world, check, *fragments) == refuse(world, train(world, *sets), *fragments)


# ---------------------------------------------------------------------------------------------------
# [[data.mix]]


def mix_table(train_file: str, **keys: object) -> str:
    lines = [f'train_file = "{train_file}"'] + [
        f"{key} = {value!r}".replace("'", '"') for key, value in keys.items()
    ]
    return "[[data.mix]]\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("data", "tables", "fragments"),
    [
        (
            'train_file = "{root}/train.txt"',
            ["{root}/valid.txt"],
            ["data.train_file is set beside [[data.mix]]"],
        ),
        ("", [("{root}/train.txt", {"weight": -1})], ["weight must be a positive number; got -1"]),
        ("", [("{root}/train.txt", {"weight": "heavy"})], ["data.mix.weight must be a number"]),
        (
            "",
            [("{root}/train.txt", {"weight": 1}), ("{root}/valid.txt", {})],
            ["valid has no weight while others do"],
        ),
        ("", [("{root}/train.txt", {}), ("{root}/train.txt", {})], ["both named 'world'"]),
        ("", [("{root}/absent.txt", {"weight": 1})], ["[[data.mix]] absent:", "absent.txt does not exist"]),
        ("", [("{root}/train.txt", {"wieght": 1})], ["did you mean data.mix.weight?"]),
        ("streaming = true", [("{root}/train.txt", {})], ["with data.streaming is not supported"]),
        ('mix_sampling = "oversampel"', [("{root}/train.txt", {})], ["'undersample' or 'oversample'"]),
        ("mix_seed = -3", [("{root}/train.txt", {"weight": 1})], ["data.mix_seed must be 0 or more; got -3"]),
        (
            'validation_file = "{root}/valid.txt"',
            [("{root}/train.txt", {"validation_file": "{root}/valid.txt"})],
            ["data.validation_file is the validation set every [[data.mix]] source shares"],
        ),
    ],
    ids=[
        "beside-data",
        "negative",
        "type",
        "some-weights",
        "same-name",
        "missing-file",
        "typo",
        "streaming",
        "sampling",
        "negative-seed",
        "two-validations",
    ],
)
def test_mix_refusals(world: World, data: str, tables: list, fragments: list[str]) -> None:
    root = str(world.root)
    written = "".join(
        mix_table(t.format(root=root))
        if isinstance(t, str)
        else mix_table(
            t[0].format(root=root),
            **{k: str(v).format(root=root) if isinstance(v, str) else v for k, v in t[1].items()},
        )
        for t in tables
    )
    recipe = world.root / "mix.toml"
    recipe.write_text(
        recipe_text(world.root, data=data.format(root=root) or "# a mix").replace(
            "[training]", written + "\n[training]"
        ),
        encoding="utf-8",
    )
    check = ["recipe", "check", "--recipe", str(recipe)]
    assert refuse(world, check, *fragments) == refuse(world, train(world, recipe=recipe), *fragments)
