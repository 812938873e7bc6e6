"""FLOPs per token of a causal LM, from its config alone (the numerator of MFU), with or without adapters."""

from __future__ import annotations

from typing import Any

from torch import nn

from clm_runner.errors import ModelError
from clm_runner.models.loading import build_meta_model


def embedding_parameter_count(model: nn.Module) -> int:
    """Parameters of every nn.Embedding (token and learned position tables), tied tensors counted once."""
    seen: set[int] = set()
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            for parameter in module.parameters(recurse=False):
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    count += parameter.numel()
    return count


def matmul_parameter_count(model: nn.Module) -> int:
    """N for the FLOPs formula: all unique parameters except those only used as embedding lookups.

    Convention of nanoGPT's `estimate_mfu` / `get_num_params(non_embedding=True)` (after PaLM, Chowdhery
    et al. 2022, appendix B): a table lookup costs no multiply-adds, so position embeddings are excluded,
    but a token embedding tied to the output head is included because the head multiplies by it once per
    token. Generalised here to untied models: an input embedding table is excluded and the separate
    output head counts like any other Linear. For GPT-2 124M: 124,439,808 - 786,432 (wpe) = 123,653,376.
    Biases and norm weights stay in N (about 0.1% of GPT-2 124M; nanoGPT keeps them too).
    """
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    used_by_head = (
        {id(p) for p in output_embeddings.parameters(recurse=False)}
        if output_embeddings is not None
        else set()
    )
    lookup_only = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            for parameter in module.parameters(recurse=False):
                if id(parameter) not in seen and id(parameter) not in used_by_head:
                    seen.add(id(parameter))
                    lookup_only += parameter.numel()
    total = sum(p.numel() for _, p in model.named_parameters())
    return total - lookup_only


def _attention_shape(config: Any) -> tuple[int, int]:
    """(num_layers, attention width H*Q) read from the standard config names (GPT-2 aliases them)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        num_layers = int(text_config.num_hidden_layers)
        hidden_size = int(text_config.hidden_size)
    except AttributeError as error:
        raise ModelError(
            f"config of type {type(config).__name__!r} has no num_hidden_layers/hidden_size; "
            "FLOPs per token can only be computed for transformer decoder configs"
        ) from error
    num_heads = getattr(text_config, "num_attention_heads", None)
    head_dim = getattr(text_config, "head_dim", None)
    # Some models (e.g. Gemma) decouple head_dim from hidden_size / num_heads; PaLM's term is L*H*Q*T.
    attention_width = int(num_heads) * int(head_dim) if num_heads and head_dim else hidden_size
    return num_layers, attention_width


def _flops_from_counts(
    matmul_parameters: int, num_layers: int, attention_width: int, seq_len: int, adapter_parameters: int = 0
) -> int:
    # 6N: forward 2 FLOPs per multiply-add per parameter, backward twice that. 12*L*d*T: QK^T and
    # attention*V over a context of T, forward+backward, no discount for the causal mask (PaLM, nanoGPT).
    # With adapters (N_a of the N) the frozen base needs no weight gradients: its backward is the 2N_base of
    # the activation gradients only, so 4*N_base + 6*N_a.
    attention = 12 * num_layers * attention_width * seq_len
    if not adapter_parameters:
        return 6 * matmul_parameters + attention
    frozen = matmul_parameters - adapter_parameters
    return 4 * frozen + 6 * adapter_parameters + attention


def _forward_flops(matmul_parameters: int, num_layers: int, attention_width: int, seq_len: int) -> int:
    return 2 * matmul_parameters + 4 * num_layers * attention_width * seq_len


def _require_positive_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ModelError(f"sequence length must be a positive integer, got {seq_len!r}")


def flops_per_token(config: Any, seq_len: int, adapter: Any = None) -> int:
    """Training model FLOPs per token (forward + backward): 6*N + 12*L*d*T.

    N = `matmul_parameter_count`: every parameter except embedding tables used only as lookups (for
    tied GPT-2: all parameters minus position embeddings, the nanoGPT/PaLM convention). L = number of
    transformer blocks, d = attention width (num_heads * head_dim, which is hidden_size for GPT-2),
    T = `seq_len`, the context length the tokens are trained at. Recomputation (gradient
    checkpointing) is not counted: this is *model* FLOPs, the numerator of MFU.

    `adapter` (a clm_runner.models.adapters.AdapterPlan): N_a adapter parameters train on a frozen base of
    N parameters, 4*N + 6*N_a + 12*L*d*T (no weight gradients for the base).
    """
    _require_positive_seq_len(seq_len)
    num_layers, attention_width = _attention_shape(config)
    adapter_parameters = adapter.trainable_parameters if adapter is not None else 0
    matmul = matmul_parameter_count(build_meta_model(config)) + adapter_parameters
    return _flops_from_counts(matmul, num_layers, attention_width, seq_len, adapter_parameters)


def forward_flops_per_token(config: Any, seq_len: int) -> int:
    """Forward-only model FLOPs per token, 2*N + 4*L*d*T: exactly one third of `flops_per_token`."""
    num_layers, attention_width = _attention_shape(config)
    return _forward_flops(
        matmul_parameter_count(build_meta_model(config)), num_layers, attention_width, seq_len
    )
