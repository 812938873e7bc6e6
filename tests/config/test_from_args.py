"""`clm-runner recipe from-args`: run_clm.py's flags (and its JSON file) become a recipe, field by field.

The oracle is written by hand per command line in tests/run_clm_reference.py: each flag and the recipe key and
value it must give. The converted recipe is read back as `train` reads it (load_recipe), and every key it sets
must be one of those, or one of the keys pinned to run_clm's choice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO
from run_clm_reference import (
    CommandLine,
    as_json_arguments,
    local_files_job,
    non_default_keys,
    readme_job,
    streaming_job,
)

from clm_runner.cli import main
from clm_runner.config.from_run_clm import convert_run_clm_args
from clm_runner.config.load import load_recipe
from clm_runner.config.schema import tomllib


def jobs(root: Path) -> dict[str, CommandLine]:
    files = {"train": str(root / "train.txt"), "validation": str(root / "validation.txt")}
    return {
        "readme": readme_job(),
        "local-512": local_files_job("models/tiny", files["train"], files["validation"], "runs/local"),
        "streaming": streaming_job("models/tiny", files["train"], files["validation"], "runs/stream"),
    }


def converted_recipe(tmp_path: Path, argv: list[str], *options: str):
    path = tmp_path / "converted.toml"
    assert main(["recipe", "from-args", "--output", str(path), *options, "--", *argv]) == 0
    return path, load_recipe(path)


@pytest.mark.parametrize("name", ["readme", "local-512", "streaming"])
def test_each_flag_becomes_its_recipe_key_and_run_clms_choices_are_pinned(tmp_path: Path, name: str) -> None:
    job = jobs(tmp_path)[name]
    path, recipe = converted_recipe(tmp_path, job.argv)
    assert non_default_keys(recipe) == {**job.expected, **job.pinned}
    text = path.read_text()
    for _, key in job.pinned:  # each pinned key says why, above it
        lines = text.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        assert "run_clm's choice" in "\n".join(lines[max(0, at - 3) : at]) or key == "fp16", key
    run_line = next(line for line in text.splitlines() if line.startswith("#   clm-runner train"))
    assert run_line.endswith(" ".join(("--recipe", str(path), *job.run_flags)))


@pytest.mark.parametrize("name", ["readme", "local-512", "streaming"])
def test_clm_runner_defaults_pins_nothing(tmp_path: Path, name: str) -> None:
    job = jobs(tmp_path)[name]
    _, recipe = converted_recipe(tmp_path, job.argv, "--clm-runner-defaults")
    assert non_default_keys(recipe) == job.expected


def test_on_a_gpu_the_pinned_recipe_gets_no_device_default_but_run_clms() -> None:
    """The pins are what keeps a converted job run_clm's on a GPU: bf16, TF32, torch.compile and dataloader
    workers would otherwise be added there (clm_runner.train.device)."""
    from clm_runner.train.device import DeviceInfo, device_defaults

    h100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 8, True, (9, 0), True)
    pinned = convert_run_clm_args(readme_job().argv).recipe["training"]
    # Pinned memory is TrainingArguments' default, so run_clm has it too.
    assert device_defaults(pinned, h100) == {"dataloader_pin_memory": True}
    chosen = device_defaults(
        convert_run_clm_args(readme_job().argv, clm_runner_defaults=True).recipe["training"], h100
    )
    assert {"bf16", "tf32", "torch_compile", "dataloader_num_workers"} <= chosen.keys()


@pytest.mark.parametrize("name", ["readme", "local-512", "streaming"])
def test_the_json_file_gives_the_same_recipe_as_the_flags(tmp_path: Path, name: str) -> None:
    """run_clm.py reads `python run_clm.py args.json` with HfArgumentParser.parse_json_file: JSON types."""
    job = jobs(tmp_path)[name]
    args = tmp_path / "args.json"
    args.write_text(json.dumps(as_json_arguments(job.argv)))
    from_flags = convert_run_clm_args(job.argv)
    from_json = convert_run_clm_args([str(args)])
    assert from_json.recipe == from_flags.recipe
    assert tomllib.loads(from_json.text) == tomllib.loads(from_flags.text)
    body = [line for line in from_flags.text.splitlines() if not line.startswith("#   ")]
    assert [line for line in from_json.text.splitlines() if not line.startswith("#   ")] == body


def test_a_json_null_is_the_fields_default(tmp_path: Path, capsys) -> None:
    """parse_json_file takes null as None: where that is the field's default it is as if the key were absent;
    elsewhere run_clm would train with None, so it is refused in one line naming the key."""
    job = jobs(tmp_path)["readme"]
    given = as_json_arguments(job.argv)
    args = tmp_path / "args.json"
    args.write_text(json.dumps({**given, "max_train_samples": None, "config_overrides": None}))
    assert convert_run_clm_args([str(args)]).recipe == convert_run_clm_args(job.argv).recipe
    args.write_text(json.dumps({**given, "learning_rate": None}))
    assert main(["recipe", "from-args", str(args)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "learning_rate" in err and "null" in err, err


def test_run_clms_flag_syntax_is_its_parsers(tmp_path: Path) -> None:
    """HfArgumentParser's forms: --flag=value, dashes for underscores, bools with and without a value,
    --no_x for a flag that defaults to true, and a prefix of a flag (argparse's abbreviations)."""
    argv = [
        "--model_name_or_path=m", "--dataset-name", "d", "--do_train", "--do_eval", "false",
        "--no_use_fast_tokenizer", "--streaming=True", "--max_steps", "3", "--learning_rat", "0.5",
        "--output_dir", "out",
    ]  # fmt: skip
    recipe = convert_run_clm_args(argv).recipe
    assert recipe["model"] == {"model_name_or_path": "m", "use_fast_tokenizer": False}
    assert recipe["data"]["dataset_name"] == "d" and recipe["data"]["streaming"] is True
    assert recipe["training"]["learning_rate"] == 0.5 and recipe["training"]["max_steps"] == 3
    # run_clm without an eval_strategy evaluates only with --do_eval: pinned off.
    assert recipe["training"]["do_eval"] is False


def test_transformers_4_flags_are_renamed(tmp_path: Path) -> None:
    argv = [
        "--model_name_or_path", "m", "--dataset_name", "d", "--do_train", "--output_dir", "out",
        "--no_cuda", "--per_gpu_train_batch_size", "3", "--adafactor", "--logging_dir", "tb logs",
        "--low_cpu_mem_usage", "--evaluation_strategy", "epoch", "--save_strategy", "epoch",
    ]  # fmt: skip
    converted = convert_run_clm_args(argv)
    training = converted.recipe["training"]
    assert training["use_cpu"] is True and training["per_device_train_batch_size"] == 3
    assert training["optim"] == "adafactor" and training["eval_strategy"] == "epoch"
    assert (
        'fsdp_config = { transformer_layer_cls_to_wrap = ["GPT2Block"] }  # --fsdp_config'
        in convert_run_clm_args(
            [
                *argv,
                "--fsdp",
                "full_shard auto_wrap",
                "--fsdp_config",
                '{"transformer_layer_cls_to_wrap": ["GPT2Block"]}',
            ]
        ).text
    )
    assert "do_eval" not in training  # --evaluation_strategy evaluates: clm-runner's default does too
    assert "#   TENSORBOARD_LOGGING_DIR='tb logs' clm-runner train --recipe RECIPE.toml" in converted.text
    assert "--low_cpu_mem_usage: transformers 5 always loads" in converted.text


def test_without_do_eval_run_clm_does_not_evaluate_and_neither_does_the_recipe() -> None:
    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--do_train", "--output_dir", "o"]
    assert convert_run_clm_args(base).recipe["training"]["do_eval"] is False
    assert "do_eval" not in convert_run_clm_args([*base, "--eval_strategy", "epoch"]).recipe["training"]
    assert "do_eval" not in convert_run_clm_args(base, clm_runner_defaults=True).recipe["training"]


@pytest.mark.parametrize(
    ("flags", "tf32"),
    [
        ([], False),
        (["--torch_compile"], None),
        (["--torch_compile", "--fp16"], False),
        (["--tf32", "true"], True),
    ],
)
def test_tf32_is_pinned_off_unless_training_arguments_turns_it_on(flags: list[str], tf32) -> None:
    """TrainingArguments turns TF32 on by itself for --torch_compile (unless fp16 alone): pinning it off there
    would not be run_clm's job."""
    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--do_train", "--output_dir", "o"]
    assert convert_run_clm_args([*base, *flags]).recipe["training"].get("tf32") is tf32


def test_a_negative_max_grad_norm_turns_clipping_off_as_in_run_clm() -> None:
    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--do_train", "--output_dir", "o"]
    assert convert_run_clm_args([*base, "--max_grad_norm", "-1"]).recipe["training"]["max_grad_norm"] == 0.0


def test_warmup_ratio_yields_to_warmup_steps_as_in_transformers_4() -> None:
    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--do_train", "--output_dir", "o"]
    both = convert_run_clm_args([*base, "--warmup_ratio", "0.2", "--warmup_steps", "30"])
    assert both.recipe["training"]["warmup_steps"] == 30.0
    assert "--warmup_ratio is overridden by --warmup_steps" in both.text


def test_run_clm_without_do_train_only_evaluates() -> None:
    converted = convert_run_clm_args(
        ["--model_name_or_path", "m", "--dataset_name", "d", "--do_eval", "--output_dir", "o"]
    )
    assert converted.command == "eval"
    assert "#   clm-runner eval --recipe RECIPE.toml -o o/eval_results.json" in converted.text


def test_a_launcher_and_script_before_the_flags(tmp_path: Path) -> None:
    job = jobs(tmp_path)["readme"]
    plain = convert_run_clm_args(job.argv)
    prefixed = convert_run_clm_args(["python", "examples/pytorch/language-modeling/run_clm.py", *job.argv])
    assert prefixed.recipe == plain.recipe
    launched = convert_run_clm_args(["torchrun", "--nproc_per_node", "8", "run_clm.py", *job.argv])
    assert "#   torchrun --nproc_per_node 8 -m clm_runner train --recipe RECIPE.toml" in launched.text


def test_tokens_are_never_written(tmp_path: Path) -> None:
    secret = "hf_" + "a" * 30
    converted = convert_run_clm_args(
        [
            "--model_name_or_path",
            "m",
            "--dataset_name",
            "d",
            "--do_train",
            "--output_dir",
            "o",
            "--token",
            secret,
        ]
    )
    assert secret not in converted.text and "token" not in converted.recipe["model"]
    assert "--token was given and is not written" in converted.text


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--do_predict"], ["--do_predict has no clm-runner equivalent", "clm-runner eval --split test"]),
        (["--torch_dtype", "bfloat16"], ["--torch_dtype", "use --dtype bfloat16", "model.dtype"]),
        (["--learnig_rate", "1e-4"], ["--learnig_rate is not an argument of run_clm.py", "--learning_rate?"]),
        (["--fp16_backend", "amp"], ["--fp16_backend", "transformers 5 dropped", "torch.amp"]),
        (["--save_safetensors", "False"], ["--save_safetensors False", "always saves safetensors"]),
        (["--num_train_epochs", "three"], ["argument --num_train_epochs", "invalid float value"]),
        (["--dtype", "float64"], ["argument --dtype", "invalid choice"]),
        (["--warmup_ratio", "1.0"], ["--warmup_ratio 1.0", "below 1"]),
        (["stray"], ["takes no argument 'stray'"]),
        (["--report_to", "tensorboard", "wandb"], ["no argument 'wandb'", "--report_to takes one value"]),
        (["-o", "x.toml"], ["-o is clm-runner's option", "before `--`"]),
        (["--prediction_loss_only"], ["--prediction_loss_only has no clm-runner equivalent"]),
    ],
    ids=lambda value: value[0] if isinstance(value, list) and value and value[0].startswith("-") else None,
)
def test_flags_without_an_equivalent_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "never.toml"
    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--do_train", "--output_dir", "o"]
    assert main(["recipe", "from-args", "--output", str(out), "--", *base, *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({"model_name_or_path": "m", "warmup_ratioo": 0.1}, "--warmup_ratioo is not an argument"),
        ([1, 2], "one object of name: value pairs"),
    ],
)
def test_a_json_file_with_what_run_clm_refuses(tmp_path: Path, capsys, content, fragment: str) -> None:
    args = tmp_path / "args.json"
    args.write_text(json.dumps(content))
    assert main(["recipe", "from-args", str(args)]) == 2
    assert fragment in capsys.readouterr().err


def test_nothing_to_do_and_an_existing_output_are_refused(tmp_path: Path, capsys) -> None:
    assert main(["recipe", "from-args", "--", "--model_name_or_path", "m", "--dataset_name", "d"]) == 2
    assert "Without --do_train and --do_eval" in capsys.readouterr().err
    existing = tmp_path / "mine.toml"
    existing.write_text("keep me")
    job = readme_job()
    assert main(["recipe", "from-args", "--output", str(existing), "--", *job.argv]) == 2
    assert "exists" in capsys.readouterr().err and existing.read_text() == "keep me"


def test_readme_shows_the_readme_jobs_recipe_as_the_converter_writes_it() -> None:
    """README's "Coming from run_clm.py" puts run_clm's README command beside its recipe: the recipe must be
    what `recipe from-args` prints for that command today."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Coming from run_clm.py") :]
    command = section[
        section.index("```bash") + len("```bash") : section.index("```\n", section.index("```bash"))
    ]
    toml_start = section.index("```toml") + len("```toml\n")
    shown = section[toml_start : section.index("```", toml_start)]
    import shlex

    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["python", "run_clm.py"]
    assert argv[2:] == readme_job().argv
    assert shown == convert_run_clm_args(argv[2:], recipe_path="gpt2-wikitext-run-clm.toml").text
