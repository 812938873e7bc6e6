"""Recipe parsing, validation, --set overrides and rendering."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import REPO

from clm_runner.config.load import build_recipe, load_recipe, parse_override
from clm_runner.config.render import render_toml, resolved_dict
from clm_runner.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

MINIMAL = """
[model]
model_type = "gpt2"
tokenizer_name = "tok"

[data]
train_file = "train.txt"

[training]
output_dir = "out"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.output_dir.name


def test_defaults_match_run_clm(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.model.model_revision == "main"
    assert recipe.model.use_fast_tokenizer is True
    assert recipe.model.trust_remote_code is False
    assert recipe.data.validation_split_percentage == 5
    assert recipe.data.keep_linebreaks is True
    assert recipe.data.block_size is None
    assert dict(recipe.training) == {"output_dir": "out"}


def test_set_overrides_recipe_values_and_reads_toml_values(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(tmp_path, MINIMAL),
        [
            "data.block_size=64",
            "training.learning_rate=1e-4",
            'training.report_to=["tensorboard"]',
            "data.text_column=body",
            "training.output_dir=elsewhere",
        ],
    )
    assert recipe.data.block_size == 64
    assert recipe.training["learning_rate"] == 1e-4  # "1e-4" parses to the same double as the literal
    assert recipe.training["report_to"] == ["tensorboard"]
    assert recipe.data.text_column == "body"  # not valid TOML: taken as a bare string
    assert recipe.training["output_dir"] == "elsewhere"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("data.block_size=128", ("data", "block_size", 128)),
        ("data.streaming=true", ("data", "streaming", True)),
        ("training.warmup_steps=0.1", ("training", "warmup_steps", 0.1)),
        ("model.model_name_or_path=gpt2", ("model", "model_name_or_path", "gpt2")),
        ('model.model_name_or_path="a=b"', ("model", "model_name_or_path", "a=b")),
        ("model.config_overrides=n_layer=2,n_head=2", ("model", "config_overrides", "n_layer=2,n_head=2")),
    ],
)
def test_parse_override(item: str, expected: tuple) -> None:
    assert parse_override(item) == expected


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("noequals", "expected section.key=value"),
        ("block_size=3", "must be section.key"),
        ("dta.block_size=3", "did you mean data?"),
    ],
)
def test_malformed_override(item: str, fragment: str) -> None:
    with pytest.raises(RecipeError, match=fragment):
        parse_override(item)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("data.blok_size=3", "unknown key data.blok_size: did you mean data.block_size?"),
        ("training.learnig_rate=3", "did you mean training.learning_rate?"),
        ('data.block_size="big"', "data.block_size must be an integer"),
        ("data.block_size=0", "data.block_size must be a positive"),
        ("data.block_size=-4", "data.block_size must be a positive"),
        ('training.num_train_epochs="three"', "training.num_train_epochs must be a number"),
        ("data.streaming=1", "data.streaming must be true or false"),
        ('data.grouping="lines"', "data.grouping must be 'concat' or 'run_clm'"),
        ('model.dtype="int8"', "model.dtype must be"),
        ("model.config_name=some-config", "Can't use model.config_overrides"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, extra: str, fragment: str) -> None:
    text = MINIMAL.replace('model_type = "gpt2"', 'model_type = "gpt2"\nconfig_overrides = "n_layer=2"')
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), [extra])
    assert fragment in str(info.value)


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"unknown section \[trainig\]: did you mean training\?"):
        load_recipe(write(tmp_path, MINIMAL + "\n[trainig]\nx = 1\n"))


def test_cross_field_rules() -> None:
    base = {"training": {"output_dir": "o"}}
    with pytest.raises(RecipeError, match="No data given"):
        build_recipe({**base, "model": {"model_name_or_path": "m"}})
    with pytest.raises(RecipeError, match="No model given"):
        build_recipe({**base, "data": {"train_file": "t.txt"}})
    with pytest.raises(RecipeError, match="needs a tokenizer"):
        build_recipe({**base, "model": {"model_type": "gpt2"}, "data": {"train_file": "t.txt"}})
    with pytest.raises(RecipeError, match="Choose one"):
        build_recipe(
            {**base, "model": {"model_name_or_path": "m"}, "data": {"dataset_name": "d", "train_file": "t"}}
        )
    with pytest.raises(RecipeError, match="training.max_steps"):
        build_recipe(
            {**base, "model": {"model_name_or_path": "m"}, "data": {"dataset_name": "d", "streaming": True}}
        )
    with pytest.raises(RecipeError, match="training.output_dir is not set"):
        build_recipe({"model": {"model_name_or_path": "m"}, "data": {"dataset_name": "d"}})


def test_missing_file_and_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="Recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match=r"not valid TOML.*line 3"):
        load_recipe(write(tmp_path, "[model]\nmodel_type = 'gpt2'\nbroken = \n"))


def test_show_output_is_a_valid_recipe_with_every_default(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), ["model.token=hf_secret"])
    text = render_toml(resolved_dict(recipe))
    assert "hf_secret" not in text
    parsed = tomllib.loads(text)
    assert parsed["data"]["validation_split_percentage"] == 5
    assert parsed["training"]["learning_rate"] == 5e-5  # a TrainingArguments default, written and read back
    assert "# block_size = (unset)" in text
    # The rendered recipe loads again to the same values.
    again = load_recipe(write(tmp_path, text))
    assert again.data == recipe.data
    assert again.training["learning_rate"] == 5e-5


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("model.model_revision=2024-01-01", "2024-01-01"),  # TOML would read a date
        ("model.model_revision=1234567", "1234567"),  # an all-digit commit: TOML would read an integer
        ("model.model_revision=inf", "inf"),  # TOML would read a float
        ("model.model_revision=true", "true"),
        ('model.model_revision="v1"', "v1"),  # a quoted TOML string is still read as TOML
        ("data.text_column=1e5", "1e5"),
    ],
)
def test_set_takes_the_text_of_a_string_key_as_the_string(tmp_path: Path, item: str, expected: str) -> None:
    section, key, value = parse_override(item)
    assert value == expected
    recipe = load_recipe(write(tmp_path, MINIMAL), [item])
    assert getattr(getattr(recipe, section), key) == expected


def test_set_keeps_other_types_a_string_key_also_takes(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(tmp_path, MINIMAL), ['data.train_file=["a.txt", "b.txt"]', "training.fsdp=true"]
    )
    assert recipe.data.train_file == ["a.txt", "b.txt"] and recipe.training["fsdp"] is True


def test_an_empty_set_value_unsets_the_key(tmp_path: Path) -> None:
    text = MINIMAL.replace('train_file = "train.txt"', 'train_file = "train.txt"\nvalidation_file = "v.txt"')
    assert load_recipe(write(tmp_path, text)).data.validation_file == "v.txt"
    recipe = load_recipe(write(tmp_path, text), ["data.validation_file="])
    assert recipe.data.validation_file is None  # back to the default: carve validation from train
    assert load_recipe(write(tmp_path, text), ['data.text_column=""']).data.text_column == ""


def test_an_empty_set_leaves_an_absent_section_absent(tmp_path: Path) -> None:
    """Unsetting a key of a section the recipe lacks changes nothing: `--set adapter.r=` on a full fine-tune
    used to plan LoRA (an empty [adapter] is LoRA with PEFT's defaults), and `--set early_stopping.patience=`
    turned early stopping on (and failed for the missing patience)."""
    path = write(tmp_path, MINIMAL.replace('model_type = "gpt2"', 'model_name_or_path = "base"'))
    plain = load_recipe(path)
    for item in ("adapter.r=", "adapter.target_modules=", "early_stopping.patience=", "data.mix="):
        recipe = load_recipe(path, [item])
        assert recipe.adapter is None and recipe.early_stopping is None and recipe.data.mix == (), item
        assert recipe.to_dict() == plain.to_dict(), item
    with_adapter = write(tmp_path, path.read_text() + "\n[adapter]\nr = 16\n")
    recipe = load_recipe(with_adapter, ["adapter.r="])  # a section the recipe has stays, its key unset
    assert recipe.adapter is not None and "r" not in recipe.adapter.lora


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("data.blok_size=", "unknown key data.blok_size: did you mean data.block_size?"),
        ("adapter.rank=", "unknown key adapter.rank: did you mean adapter.r?"),
        (
            "early_stopping.patiense=",
            "unknown key early_stopping.patiense: did you mean early_stopping.patience?",
        ),
        ("training.learnig_rate=", "unknown key training.learnig_rate: did you mean training.learning_rate?"),
    ],
)
def test_an_empty_set_of_an_unknown_key_is_refused(tmp_path: Path, item: str, message: str) -> None:
    """An unset typo used to pass silently (there was nothing to remove), with or without the section."""
    with pytest.raises(RecipeError, match=message.replace("?", r"\?").replace(".", r"\.")):
        load_recipe(write(tmp_path, MINIMAL), [item])


def test_an_errant_set_is_reported_against_the_set_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, ["data.block_size=-3", "training.seed=1"])
    message = str(caught.value)
    assert not message.startswith(str(path)) and message.endswith("(from --set data.block_size=-3)")
    broken = write(
        tmp_path, MINIMAL.replace('train_file = "train.txt"', 'train_file = "train.txt"\nblock_size = 0')
    )
    with pytest.raises(RecipeError, match=rf"^{broken}: data.block_size must be a positive"):
        load_recipe(broken, ["training.seed=1"])


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("training.eval_strategy=[]", "training.eval_strategy = '[]' is not one of 'no', 'steps', 'epoch'"),
        ("training.eval_strategy=epochs", "did you mean 'epoch'?"),
        ("training.lr_scheduler_type=cosin", "did you mean 'cosine'?"),
        ("training.optim=adamw_tourch", "did you mean 'adamw_torch'?"),
        ("training.per_device_train_batch_size=0", "at least 1 block"),
        ("training.gradient_accumulation_steps=0", "at least 1"),
        ("training.adam_beta1=1.0", "in [0, 1)"),
        ("training.learning_rate=-1e-3", "0 or more"),
        ("training.learning_rate=nan", "0 or more"),
        ("training.seed=-1", "between 0 and 2**32 - 1"),
        ("training.max_steps=0", "more than 0, or -1"),
        ("training.warmup_steps=2.5", "must be whole"),
        ("training.num_train_epochs=0", "more than 0"),
        ("training.report_to=wandb", "not installed"),
        ("training.report_to=tensorbord", "did you mean 'tensorboard'?"),
        ("training.metric_for_best_model=bleu", "not a metric clm-runner's evaluation logs"),
        ("training.dataloader_num_workers=-1", "0 or more"),
        ("training.log_level=verbose", "is not one of"),
        ("training.overwrite_output_dir=true", "pass --overwrite"),
        ("training.warmup_ratio=0.1", "warmup_steps with a value below 1"),
        ("training.do_train=false", "always trains"),
        ("training.do_eval=false", "contradicts training.eval_strategy"),
    ],
)
def test_values_that_would_fail_after_the_model_is_built_are_refused_first(
    tmp_path: Path, item: str, fragment: str
) -> None:
    text = MINIMAL.replace('output_dir = "out"', 'output_dir = "out"\neval_strategy = "epoch"')
    if item.startswith("training.eval_strategy"):
        text = MINIMAL
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, text), [item])
    assert fragment in str(caught.value)


def test_do_eval_false_without_periodic_evaluation_is_honoured(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), ["training.do_eval=false"])
    assert recipe.training["do_eval"] is False


def test_fuzzed_enum_values_of_any_type_are_recipe_errors(tmp_path: Path) -> None:
    """The fuzzer once found `eval_strategy = []` escaping as TypeError: unhashable type."""
    for value in ("[]", "{}", "[1, 2]", "{a = 1}", "1.5", "true"):
        path = write(
            tmp_path, MINIMAL.replace('output_dir = "out"', f'output_dir = "out"\neval_strategy = {value}')
        )
        with pytest.raises(RecipeError, match="training.eval_strategy"):
            load_recipe(path)
