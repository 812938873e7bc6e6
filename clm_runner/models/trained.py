"""Loading what `train` saved (a run dir or a checkpoint): a full model, or an adapter put back on its base."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clm_runner.errors import ModelError
from clm_runner.models.hub import hub_errors
from clm_runner.models.loading import mark_causal_loss, require_tokenizer_files, torch_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_trained(
    path: str | Path, *, dtype: Any = None, overrides: Sequence[str] = ()
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model and tokenizer saved by `train` (a run dir or one of its checkpoints), never from the Hub.

    An adapter run's dir holds the adapter only: it is put back on its base model (clm_runner.models.adapters),
    which `overrides` (`--set model.model_name_or_path=DIR`) can point at a local copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clm_runner.models.adapter_runs import base_model_config, is_adapter_dir, load_adapter_run
    from clm_runner.models.adapters import ADAPTER_CONFIG

    directory = Path(path)
    if not directory.is_dir():
        raise ModelError(
            f"{directory}: no such directory. Pass a run's output_dir or one of its checkpoint-N directories."
        )
    adapter = is_adapter_dir(directory)
    if not adapter and not (directory / "config.json").exists():
        raise ModelError(
            f"{directory} holds no saved model (no config.json or {ADAPTER_CONFIG}). Pass a run's output_dir "
            "or one of its checkpoint-N directories."
        )
    fix = "Pass a run's output_dir or a checkpoint directory"
    require_tokenizer_files(
        directory, "The model directory", f"{fix} (they hold the tokenizer the run trained with)"
    )
    with hub_errors("tokenizer", str(directory), fix=fix):
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if adapter:
        base, four_bit = base_model_config(
            directory, [o for o in overrides if o.strip().startswith("model.")]
        )
        return mark_causal_loss(load_adapter_run(directory, base, dtype=dtype, four_bit=four_bit)), tokenizer
    with hub_errors("model", str(directory), fix=fix):
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_dtype(dtype), local_files_only=True, use_safetensors=True
        )
    return mark_causal_loss(model), tokenizer
