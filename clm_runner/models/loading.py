"""Loading the config, tokenizer and model a recipe names: hub id, local directory or from scratch."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clm_runner.config.schema import ModelConfig
from clm_runner.errors import ModelError, RecipeError
from clm_runner.models.hub import hub_errors, prepare_hub_access

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

LOCAL_FIX = "Point model.model_name_or_path (or model.tokenizer_name / config_name) at a local directory"


def _hub_kwargs(model: ModelConfig) -> dict[str, Any]:
    return {
        "cache_dir": model.cache_dir,
        "revision": model.model_revision,
        "token": model.token,
        "trust_remote_code": model.trust_remote_code,
    }


def warn_remote_code(model: ModelConfig) -> None:
    if model.trust_remote_code:
        logger.warning(
            "model.trust_remote_code = true: code shipped with the model will run on this machine. "
            "Only do this for repositories whose code you have read."
        )


MODEL_SOURCE_KEYS = ("model_name_or_path", "config_name", "tokenizer_name")


def check_model_sources(model: ModelConfig) -> None:
    """A local path the recipe names must exist: say "no such directory", not a hub repo-id error."""
    from clm_runner.models.hub import is_valid_repo_id

    for key in MODEL_SOURCE_KEYS:
        name = getattr(model, key)
        if name is None:
            continue
        path = Path(name).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ModelError(
                    f"model.{key} = {name!r} is a file; point it at the directory that holds it (or a hub id)."
                )
            continue
        if not is_valid_repo_id(name):
            raise ModelError(
                f"model.{key} = {name!r}: no such directory ({path.resolve()}). Fix the path (relative paths "
                "are taken from the directory you run in), or give a hub id such as 'openai-community/gpt2'."
            )


def build_meta_model(config: Any) -> torch.nn.Module:
    """Instantiate the causal LM for `config` on the meta device: shapes only, no memory, no download."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as error:
        raise ModelError(
            f"cannot build a causal language model from config of type {type(config).__name__!r}: {error}; "
            "use a decoder-only model (model_type such as gpt2, llama, qwen2)"
        ) from error


def load_config(model: ModelConfig) -> PretrainedConfig:
    """run_clm's order: config_name, else model_name_or_path, else model_type with config_overrides."""
    from transformers import CONFIG_MAPPING, AutoConfig

    source = model.config_name or model.model_name_or_path
    if source:
        prepare_hub_access([source])
        with hub_errors("config", source, fix=LOCAL_FIX):
            return AutoConfig.from_pretrained(source, **_hub_kwargs(model))
    if model.model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model.model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise RecipeError(
            f"model.model_type {model.model_type!r} is not a model type transformers knows.{hint}"
        )
    config = CONFIG_MAPPING[model.model_type]()
    if model.config_overrides:
        try:
            config.update_from_string(model.config_overrides)
        except ValueError as exc:
            raise RecipeError(
                f"model.config_overrides {model.config_overrides!r}: {exc}. "
                f"Use comma-separated key=value pairs of the {type(config).__name__}."
            ) from None
    return config


TOKENIZER_FILE_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "*.model", "*.tiktoken")
"""What a directory holding a tokenizer holds (tokenizer.json, tokenizer_config.json, vocab.json, spiece.model, ...)."""


def require_tokenizer_files(directory: Path, what: str, fix: str) -> None:
    """A local directory without tokenizer files: transformers builds an empty tokenizer from its config.json
    alone (every text becomes no token), so it is refused here."""
    if directory.is_dir() and not any(
        f.is_file() for p in TOKENIZER_FILE_PATTERNS for f in directory.glob(p)
    ):
        raise ModelError(
            f"{what} {directory} holds no tokenizer (tokenizer.json, tokenizer_config.json, vocab.json, ...). {fix}."
        )


def load_tokenizer(model: ModelConfig, source: str | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    source = source or model.tokenizer_name or model.model_name_or_path
    if source is None:  # the recipe validation already demands one; kept for code that builds recipes itself
        raise RecipeError(
            "Set model.tokenizer_name: a new model needs a tokenizer from a directory or the Hub."
        )
    prepare_hub_access([source])
    kwargs = _hub_kwargs(model)
    if source != model.model_name_or_path and source != model.tokenizer_name:
        kwargs.pop("revision")
    key = "model.tokenizer_name" if source == model.tokenizer_name else "model.model_name_or_path"
    require_tokenizer_files(
        Path(source), key, "Point model.tokenizer_name at a tokenizer's directory or hub id"
    )
    with hub_errors("tokenizer", source, fix=LOCAL_FIX):
        return AutoTokenizer.from_pretrained(source, use_fast=model.use_fast_tokenizer, **kwargs)


def torch_dtype(name: Any) -> torch.dtype | str:
    """The dtype to load weights in. transformers 5 defaults to "auto"; we pass float32 unless told."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return "auto"
    return getattr(torch, name) if name else torch.float32


def quantization_config() -> Any:
    """QLoRA's base: 4-bit NF4 with double quantization, computing in bf16 where the GPU has it."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def load_model(
    model: ModelConfig,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    resuming: bool = False,
    dtype: Any = None,
    quantize_4bit: bool = False,
) -> PreTrainedModel:
    """Pretrained weights when model_name_or_path is set, else a fresh model from `config`.

    `resuming`: the weights will come from a checkpoint; the model built here only gives them a shape.
    `dtype` overrides model.dtype; `quantize_4bit` loads the weights in 4-bit (QLoRA's frozen base).
    """
    from transformers import AutoModelForCausalLM

    warn_remote_code(model)
    dtype = torch_dtype(dtype if dtype is not None else model.dtype)
    if model.model_name_or_path:
        prepare_hub_access([model.model_name_or_path])
        extra: dict[str, Any] = {}
        if quantize_4bit:
            extra["quantization_config"] = quantization_config()
        with hub_errors("model", model.model_name_or_path, fix=LOCAL_FIX):
            loaded = AutoModelForCausalLM.from_pretrained(
                model.model_name_or_path,
                config=config,
                dtype=dtype,
                use_safetensors=True,  # never unpickle weights: .bin files are refused
                **_hub_kwargs(model),
                **extra,
            )
    else:
        try:
            loaded = AutoModelForCausalLM.from_config(
                config, trust_remote_code=model.trust_remote_code, dtype=dtype
            )
        except ValueError as exc:
            raise ModelError(f"Can't build a causal LM from model_type {model.model_type!r}: {exc}") from None
        n_params = sum({p.data_ptr(): p.numel() for p in loaded.parameters()}.values())
        if resuming:
            logger.info(
                "Resuming a %s of %s parameters: its weights come from the checkpoint.",
                config.model_type,
                f"{n_params:,}",
            )
        else:
            logger.info("Training a new %s from scratch: %s parameters", config.model_type, f"{n_params:,}")
    if tokenizer is not None:
        resize_embeddings(loaded, len(tokenizer))
    return mark_causal_loss(loaded)


def mark_causal_loss(model: PreTrainedModel) -> PreTrainedModel:
    """Tell the Trainer that this model's loss shifts labels.

    transformers 5 infers it from the class name: GPT2LMHeadModel matches no loss type, so the Trainer
    counts every label of a block (T) instead of the T - 1 predicted ones as `num_items_in_batch`,
    and reports (and trains on) the loss scaled by (T - 1) / T. Every model here is loaded as a
    causal LM, so the causal loss type is right for all of them.
    """
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def resize_embeddings(model: PreTrainedModel, vocab_size: int) -> None:
    """Grow the embeddings only when the tokenizer has more tokens than rows, as run_clm does."""
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size > rows:
        logger.warning("Resizing token embeddings from %d to %d rows to fit the tokenizer.", rows, vocab_size)
        model.resize_token_embeddings(vocab_size)
