"""Sample text from a trained run's model directory: the `clm-runner generate` command."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clm_runner.errors import ClmError, RecipeError


class GenerationOptionError(ClmError):
    """A generation option (temperature, top-p, top-k, lengths, sample count) is out of range."""


def validate_generation_options(
    *, max_new_tokens: int, temperature: float, top_p: float, top_k: int, num_samples: int
) -> None:
    """Raise GenerationOptionError naming the first option outside its valid range."""
    if not temperature >= 0:  # also rejects NaN
        raise GenerationOptionError(
            f"temperature must be >= 0, got {temperature}; use 0 for greedy decoding, 1 for plain sampling"
        )
    if not 0 < top_p <= 1:
        raise GenerationOptionError(
            f"top_p must be in (0, 1], got {top_p}; use 1 to disable nucleus sampling"
        )
    if top_k < 0:
        raise GenerationOptionError(f"top_k must be >= 0, got {top_k}; use 0 to disable top-k filtering")
    if max_new_tokens < 1:
        raise GenerationOptionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise GenerationOptionError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples > 1 and temperature == 0:
        raise GenerationOptionError(
            f"num_samples={num_samples} with temperature 0: greedy decoding has one answer; "
            "set a temperature > 0 to draw several samples"
        )


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise GenerationOptionError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from error


def _dtype_for(device: torch.device) -> torch.dtype:
    # bf16 halves memory on GPUs that support it without fp16's overflow risk; CPUs get fp32 for speed.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_for_generation(
    model_dir: str | Path, device: torch.device, overrides: Sequence[str] = ()
) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode on `device`) from a local directory; never contacts the Hub.

    An adapter run is put back on its base model; `overrides` (`model.model_name_or_path=DIR`) can point
    at a local copy of that base.
    """
    from clm_runner.models.adapter_runs import is_adapter_dir
    from clm_runner.models.trained import load_trained

    if overrides and not is_adapter_dir(model_dir):
        raise RecipeError(
            f"--set: {model_dir} is a full model, loaded from its own files; --set only points an adapter run at "
            "its base model. Remove --set."
        )
    unused = [item for item in overrides if not item.strip().startswith("model.")]
    if unused:
        raise RecipeError(
            f"--set {unused[0]}: generate reads only model.* keys (where an adapter run's base model is). Remove it."
        )
    model, tokenizer = load_trained(model_dir, dtype=_dtype_for(device), overrides=overrides)
    return tokenizer, model.to(device).eval()


def _continuations(tokenizer: Any, prompt: str, prompt_ids: list[int], sequences: torch.Tensor) -> list[str]:
    """The user's prompt followed by the decoded text each sequence adds after it.

    decode(encode(prompt)) need not equal the prompt: normalizers lowercase or NFKC-fold, unseen
    characters become [UNK] (then skipped as special), whitespace gets cleaned up, SentencePiece drops
    a leading space. So the continuation is what decoding the full sequence adds after the decoded
    prompt (decoding new tokens alone would lose a SentencePiece word-boundary space), and the prompt
    is returned verbatim in front of it. If the full decode does not begin with the decoded prompt
    (a normalizer acting across the boundary), the new tokens are decoded alone instead.
    """
    decoded_prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    texts = []
    for sequence in sequences.tolist():
        full = tokenizer.decode(sequence, skip_special_tokens=True)
        if full.startswith(decoded_prompt):
            continuation = full[len(decoded_prompt) :]
        else:
            continuation = tokenizer.decode(sequence[len(prompt_ids) :], skip_special_tokens=True)
        texts.append(prompt + continuation)
    return texts


def generate_text(
    model_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    seed: int | None = None,
    num_samples: int = 1,
    device: str | torch.device | None = None,
    overrides: Sequence[str] = (),
) -> list[str]:
    """`num_samples` texts, each the prompt verbatim plus up to `max_new_tokens` generated tokens.

    temperature 0 decodes greedily (deterministic); otherwise samples with temperature, top_p (1 = off)
    and top_k (0 = off). A fixed `seed` makes sampling repeatable on the same device and library versions
    and leaves the caller's random state untouched.
    """
    validate_generation_options(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_samples=num_samples,
    )
    resolved_device = _resolve_device(device)
    tokenizer, model = load_for_generation(model_dir, resolved_device, overrides)

    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not prompt_ids:
        if tokenizer.bos_token_id is None:
            raise GenerationOptionError(
                "the prompt is empty and the tokenizer has no BOS token; give a prompt"
            )
        prompt_ids = [tokenizer.bos_token_id]
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions is not None and len(prompt_ids) + max_new_tokens > max_positions:
        raise GenerationOptionError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {max_positions} tokens; shorten the prompt or lower --max-new-tokens"
        )

    do_sample = temperature > 0
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k, num_return_sequences=num_samples)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    input_ids = torch.tensor([prompt_ids], device=resolved_device)
    seeded: contextlib.AbstractContextManager = contextlib.nullcontext()
    if seed is not None:
        # Fork so the seed governs this call only; without a seed each call must draw fresh randomness.
        cuda_devices = [resolved_device.index or 0] if resolved_device.type == "cuda" else []
        seeded = torch.random.fork_rng(devices=cuda_devices)
    with seeded, torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pad_token_id=pad_token_id,
            **options,
        )
    return _continuations(tokenizer, prompt, prompt_ids, sequences)
