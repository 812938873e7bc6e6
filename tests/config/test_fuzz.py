"""Fuzzing the recipe reader and `--set`: whatever the input, a recipe or a ClmError, never a traceback."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner
from helpers import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clm_runner.cli import cli
from clm_runner.config.load import load_recipe, parse_override
from clm_runner.config.schema import ALL_SECTIONS, SECTIONS
from clm_runner.config.types import training_argument_types
from clm_runner.errors import ClmError

SMOKE_TEXT = (REPO / "recipes" / "smoke.toml").read_text(encoding="utf-8")

# How many examples, and whether they are drawn at random, come from the profile (tests/conftest.py):
# `make test` runs a derandomized one (a red CI is reproducible), `make fuzz` a longer exploring one.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECTION_NAMES = st.sampled_from([*ALL_SECTIONS, "modle", "trainer", "", "model.x", "Data"])
# Real keys most of the time (they reach the type checks and cross-field rules), some near misses.
KEYS = st.sampled_from(
    sorted(
        {f.name for cls in SECTIONS.values() for f in __import__("dataclasses").fields(cls)}
        | set(list(training_argument_types())[:60])
        | {"output_dir", "max_steps", "blok_size", "learnig_rate", "", "token", "trust_remote_code"}
    )
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["gpt2", "auto", "concat", "run_clm", "replace", "steps", "epoch", "no", "float16", "hf_x"]
    ),
    st.dates(),
    st.datetimes(),
    st.times(),
)
VALUES = st.recursive(
    SCALARS.filter(lambda v: v is not None),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
TABLES = st.dictionaries(SECTION_NAMES, st.dictionaries(KEYS, VALUES, max_size=6), max_size=5)


def _toml_text(tables: dict) -> str | None:
    try:
        return tomli_w.dumps(tables)
    except (TypeError, ValueError):  # a value TOML cannot write (e.g. a time with tzinfo): skip the example
        return None


def _load(text: str, overrides: list[str] = ()) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_recipe(path, overrides)
        except ClmError as exc:
            assert str(exc).strip(), "an error must say something"


@FUZZ
@given(TABLES)
def test_structured_recipes_load_or_raise_clm_error(tables: dict) -> None:
    text = _toml_text(tables)
    if text is not None:
        _load(text)


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_loads_or_raises_clm_error(text: str) -> None:
    _load(text.encode("utf-8", "replace").decode("utf-8"))


@FUZZ
@given(st.data())
def test_mutated_smoke_recipe_loads_or_raises_clm_error(data: st.DataObject) -> None:
    """A real recipe with a few characters inserted, deleted or replaced: the typos people make."""
    text = SMOKE_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 3))
        insert = data.draw(st.text(alphabet="[]{}=\"'.,#\n 0123456789abcxyz-_+e", max_size=3))
        text = text[:at] + insert + text[at + cut :]
    _load(text)


# Well-typed values for real keys: they pass the type checks and reach the range and cross-field rules. Each
# strategy comes with its oracle: the key's valid values, written down here independently of the code that
# checks them (on the smoke recipe, where no other key interferes), so a drawn value is known to be in range or
# out of it.
def _whole_or_ratio(value: float) -> bool:
    return value >= 0 and (value < 1 or value.is_integer())


TYPED_RANGES = {
    "data.block_size": (st.integers(-2, 256), lambda v: v >= 1),
    "data.max_train_samples": (st.integers(0, 10**6), lambda v: v >= 1),
    "data.validation_split_percentage": (st.integers(-1, 101), lambda v: 1 <= v <= 99),
    "data.validation_split_seed": (st.integers(-3, 2**40), lambda v: v >= 0),
    "data.mix_seed": (st.integers(-3, 2**40), lambda v: v >= 0),
    "data.grouping": (st.sampled_from(["concat", "run_clm", "lines"]), lambda v: v in ("concat", "run_clm")),
    "data.keep_linebreaks": (st.booleans(), lambda v: True),
    "data.text_column": (st.text(min_size=1, max_size=8), lambda v: True),
    "training.learning_rate": (st.floats(-1.0, 1.0), lambda v: v >= 0),
    "training.max_steps": (st.integers(-2, 10**6), lambda v: v == -1 or v >= 1),
    "training.seed": (st.integers(-1, 2**32), lambda v: 0 <= v <= 2**32 - 1),
    "training.warmup_steps": (st.floats(-1, 3), _whole_or_ratio),
    "training.adam_beta1": (st.floats(-0.5, 1.5), lambda v: 0 <= v < 1),
    "training.eval_strategy": (st.sampled_from(["no", "steps", "epoch", "epochs"]), lambda v: v != "epochs"),
    "training.lr_scheduler_type": (
        st.sampled_from(["linear", "cosine", "constant", "cosin"]),
        lambda v: v != "cosin",
    ),
    "training.per_device_train_batch_size": (st.integers(-1, 64), lambda v: v >= 1),
    "training.gradient_accumulation_steps": (st.integers(-1, 8), lambda v: v >= 1),
    "training.save_total_limit": (st.integers(-1, 8), lambda v: v >= 1),
    "training.num_train_epochs": (st.floats(-1, 5), lambda v: v > 0),
    "model.model_revision": (st.text(alphabet="abcdef0123456789-", min_size=1, max_size=12), lambda v: True),
    "eval.stride": (st.integers(-1, 512), lambda v: v >= 1),
    "eval.context": (st.integers(-1, 512), lambda v: v >= 1),
}
TYPED = {key: strategy for key, (strategy, _) in TYPED_RANGES.items()}
BOUNDARIES = {
    "data.block_size": [0, 1],
    "data.max_train_samples": [0, 1],
    "data.validation_split_percentage": [0, 1, 99, 100],
    "data.validation_split_seed": [-1, 0],
    "data.mix_seed": [-1, 0],
    "training.learning_rate": [-1e-12, 0.0],
    "training.max_steps": [-2, -1, 0, 1],
    "training.seed": [-1, 0, 2**32 - 1, 2**32],
    "training.warmup_steps": [-1e-9, 0.0, 0.999, 1.0, 1.5, 2.0],
    "training.adam_beta1": [-1e-9, 0.0, 0.999999, 1.0],
    "training.per_device_train_batch_size": [0, 1],
    "training.gradient_accumulation_steps": [0, 1],
    "training.save_total_limit": [0, 1],
    "training.num_train_epochs": [0.0, 1e-9],
    "eval.stride": [0, 1],
    "eval.context": [0, 1],
}
"""The last value accepted and the first refused of each ranged key, drawn every time (a random draw may miss
them)."""
TYPED_OVERRIDES = st.sampled_from(sorted(TYPED)).flatmap(
    lambda key: TYPED[key].map(lambda value: f"{key}={_toml_value(value) or value}")
)
OVERRIDES = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda section, key, value: f"{section}.{key}={value}",
        SECTION_NAMES,
        KEYS,
        st.one_of(st.text(max_size=20), VALUES.map(lambda v: _toml_value(v) or "x")),
    ),
    TYPED_OVERRIDES,
)


def _toml_value(value: object) -> str | None:
    """A TOML value as written after `=` on one line (inline tables and arrays)."""
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {_toml_value(v) or '0'}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) or "0" for v in value) + "]"
    text = _toml_text({"v": value})
    return text.split("=", 1)[1].strip() if text else None


@FUZZ
@given(st.lists(OVERRIDES, max_size=4))
def test_set_overrides_load_or_raise_clm_error(overrides: list[str]) -> None:
    _load(SMOKE_TEXT, overrides)


def check_typed(drawn: tuple) -> None:
    """Each drawn value is known to be in range or not: out-of-range ones are refused naming their key, a
    recipe whose values are all in range loads and holds them."""
    overrides = [f"{key}={_toml_value(value) or value}" for key, value in drawn]
    out_of_range = [key for key, value in drawn if not TYPED_RANGES[key][1](value)]
    try:
        recipe = load_recipe(REPO / "recipes" / "smoke.toml", overrides)
    except ClmError as exc:
        assert out_of_range, (overrides, str(exc))
        assert any(key in str(exc) for key in out_of_range), str(exc)
        return
    assert not out_of_range, (overrides, "accepted")
    for key, value in drawn:
        section, _, name = key.partition(".")
        held = recipe.training[name] if section == "training" else getattr(getattr(recipe, section), name)
        assert held == value


@FUZZ
@given(
    st.lists(st.sampled_from(sorted(TYPED_RANGES)), min_size=1, max_size=3, unique=True).flatmap(
        lambda keys: st.tuples(*[TYPED_RANGES[key][0].map(lambda v, k=key: (k, v)) for key in keys])
    )
)
def test_typed_overrides_are_refused_exactly_when_out_of_range(drawn: tuple) -> None:
    check_typed(drawn)


@pytest.mark.parametrize(
    ("key", "value"), [(key, value) for key, values in BOUNDARIES.items() for value in values], ids=str
)
def test_typed_overrides_at_their_boundaries(key: str, value: object) -> None:
    check_typed(((key, value),))


@FUZZ
@given(OVERRIDES)
def test_parse_override_returns_or_raises_clm_error(item: str) -> None:
    try:
        section, key, _ = parse_override(item)
    except ClmError:
        return
    assert section in ALL_SECTIONS and key


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(TABLES.map(_toml_text), st.text(max_size=200)), st.lists(OVERRIDES, max_size=3))
def test_cli_never_shows_a_traceback(text: str | None, overrides: list[str]) -> None:
    if text is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.toml"
        path.write_text(text.encode("utf-8", "replace").decode("utf-8"), encoding="utf-8")
        sets = [a for o in overrides for a in ("--set", o)]
        for command in (["recipe", "check"], ["recipe", "show"]):
            result = CliRunner().invoke(cli, [*command, "--recipe", str(path), *sets])
            assert result.exit_code in (0, 2), (result.output, result.exception)
            assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
            assert "Traceback" not in result.output
            if result.exit_code == 2:
                assert sum(line.startswith("error:") for line in result.output.splitlines()) == 1


@pytest.mark.parametrize("depth", [2000, 20000])
def test_deep_nesting_is_a_clear_error(depth: int, tmp_path: Path) -> None:
    """tomllib recurses once per nesting level: a RecursionError used to escape as a traceback."""
    nested = "[" * depth + "]" * depth
    path = tmp_path / "deep.toml"
    path.write_text(f"[training]\nx = {nested}\n")
    with pytest.raises(ClmError, match="too deeply"):
        load_recipe(path)
    with pytest.raises(ClmError, match="too deeply"):
        parse_override(f"training.x={nested}")


def test_the_fuzz_strategies_reach_valid_recipes() -> None:
    """A fuzzer whose draws all fail tests only the error paths: enough drawn overrides must load."""
    outcomes = {"valid": 0, "refused": 0}

    @settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(OVERRIDES, min_size=1, max_size=3))
    def draw(overrides: list[str]) -> None:
        try:
            recipe = load_recipe(REPO / "recipes" / "smoke.toml", overrides)
        except ClmError:
            outcomes["refused"] += 1
            return
        outcomes["valid"] += 1
        assert not math.isnan(recipe.training["learning_rate"])

    draw()
    assert outcomes["valid"] >= 30, outcomes  # the valid side of the type checks is exercised too
    assert outcomes["refused"] >= 30, outcomes
