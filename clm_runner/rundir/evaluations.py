"""evaluations.json: how each metrics file of a run was computed, since the metrics files hold numbers only.

run_clm's readers `float()` every value of train_results.json, eval_results.json and all_results.json (and
`mlflow.log_metrics` takes only numbers), so a description ("method": "blocks", "split": "validation", the
model, the data) never goes into them. It goes here, one entry per metrics file, by its path in the run dir:

    {"eval_results.json": {"by": "clm-runner train", "split": "validation", "method": "blocks", ...},
     "evals/test_blocks1024.json": {"by": "clm-runner eval", "split": "test", ...}}
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clm_runner.config.schema import Recipe
from clm_runner.rundir.files import read_json, write_json_atomic

EVALUATIONS_FILE = "evaluations.json"


def is_number(value: Any) -> bool:
    """What `float()` and `mlflow.log_metrics` take without complaint: an int or a float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_numbers(metrics: Mapping[str, Any], what: str) -> None:
    """A metrics file holds numbers only: anything else is a bug in clm-runner, caught before it is written."""
    wrong = {key: value for key, value in metrics.items() if not is_number(value)}
    if wrong:
        raise ValueError(f"{what} must hold numbers only (run_clm's readers float() each value); got {wrong}")


def numbers_of(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    """The numeric entries of a metrics dict (files written by clm-runner before 0.3 also held descriptions)."""
    return {key: value for key, value in metrics.items() if is_number(value)}


def describe_data(recipe: Recipe) -> str:
    """The data an evaluation read, in a few words: the mix's sources, the hub dataset or the files."""
    data = recipe.data
    if data.mix:
        return " + ".join(source.label for source in data.mix)
    if data.dataset_name:
        return " ".join(x for x in (data.dataset_name, data.dataset_config_name) if x)
    files = [data.train_file, data.validation_file, data.test_file]
    return ", ".join(str(f) for f in files if f)


def describe_recipe_data(recipe: Recipe, *, limit: str = "max_eval_samples") -> dict[str, Any]:
    """What of the recipe's [data] decides which blocks were scored. `limit`: the key that cut the split
    (max_train_samples for the train split's blocks, max_eval_samples otherwise)."""
    data = recipe.data
    return {
        "data": describe_data(recipe),
        "grouping": data.grouping,
        limit: getattr(data, limit),
        "streaming": data.streaming,
    }


def record_evaluation(run_dir: Path, metrics_file: Path, description: Mapping[str, Any]) -> None:
    """Say in the run's evaluations.json how `metrics_file` (a file inside `run_dir`) was computed."""
    path = run_dir / EVALUATIONS_FILE
    try:
        recorded = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):  # a damaged description is replaced; the metrics themselves are intact
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    entry = {key: _plain(value) for key, value in description.items() if value is not None}
    entry["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    recorded[metrics_file.relative_to(run_dir).as_posix()] = entry
    write_json_atomic(path, recorded)


def read_evaluations(run_dir: Path) -> dict[str, Any]:
    path = run_dir / EVALUATIONS_FILE
    try:
        recorded = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value
