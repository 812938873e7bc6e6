"""Recipe parsing, validation, --set overrides and rendering."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clm_runner.errors import RecipeError
from clm_runner.recipe import (
    build_recipe,
    load_recipe,
    parse_override,
    render_toml,
    resolved_dict,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
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
    assert recipe.training["learning_rate"] == pytest.approx(1e-4)
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
    assert parsed["training"]["learning_rate"] == pytest.approx(5e-5)  # a TrainingArguments default
    assert "# block_size = (unset)" in text
    # The rendered recipe loads again to the same values.
    again = load_recipe(write(tmp_path, text))
    assert again.data == recipe.data
    assert again.training["learning_rate"] == pytest.approx(5e-5)


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    a = load_recipe(write(tmp_path, MINIMAL))
    b = load_recipe(write(tmp_path, MINIMAL), ["training.seed=7"])
    assert a.fingerprint() == load_recipe(write(tmp_path, MINIMAL)).fingerprint()
    assert a.fingerprint() != b.fingerprint()
