"""Model summary from config: exact parameter counts, tree shape, ties and FLOPs per token."""

from __future__ import annotations

import resource

import pytest
import torch
from helpers import tiny_gpt2_config
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from clm_runner.errors import ModelError
from clm_runner.models.flops import flops_per_token, forward_flops_per_token
from clm_runner.models.summary import describe_model, module_tree, render_summary


def _tiny_gpt2(**overrides) -> GPT2Config:
    settings = {"vocab_size": 97, "n_positions": 40, "n_layer": 3, "n_head": 4}
    settings.update(overrides)
    return tiny_gpt2_config(**settings)


def _tiny_llama() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _real_model(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_gpt2_124m_total_is_the_published_count_and_tree_is_in_model_terms():
    summary = describe_model(GPT2Config())
    assert summary.total_parameters == 124_439_808
    assert summary.trainable_parameters == 124_439_808

    text = render_summary(summary)
    assert "h = 12 x GPT2Block" in text
    assert "c_attn: Conv1D  weight [768, 2304], bias [2304]" in text
    assert "lm_head: Linear (tied to transformer.wte)" in text
    assert "wte: Embedding  weight [50257, 768]" in text
    assert "total_parameters: 124439808\n" in text
    assert "124,439,808" in text
    # One block: 2 LayerNorms + attention (c_attn, c_proj) + MLP (c_fc, c_proj), weights and biases.
    d = 768
    per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert f"(12 x {per_block:,} per block)" in text
    assert f"{12 * per_block:,}" in text


def test_gpt2_124m_embeddings_and_flops_follow_the_documented_convention():
    config = GPT2Config()
    summary = describe_model(config)
    token_table = config.vocab_size * config.n_embd
    position_table = config.n_positions * config.n_embd
    assert summary.embedding_parameters == token_table + position_table
    # N excludes only the position table: the tied token table is used by the lm_head matmul.
    assert summary.matmul_parameters == summary.total_parameters - position_table
    expected = 6 * summary.matmul_parameters + 12 * config.n_layer * config.n_embd * config.n_positions
    assert summary.seq_len == config.n_positions
    assert summary.flops_per_token == expected
    assert flops_per_token(config, config.n_positions) == expected
    assert forward_flops_per_token(config, config.n_positions) * 3 == expected
    assert f"{expected:,}" in render_summary(summary)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gpt2_total_matches_an_instantiated_model(tied):
    config = _tiny_gpt2(tie_word_embeddings=tied)
    model = _real_model(config)
    unique_total = sum(p.numel() for p in model.parameters())
    summary = describe_model(config)
    assert summary.total_parameters == unique_total
    assert summary.root.num_parameters == unique_total
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    assert summary.tied_parameters == ((("lm_head.weight", "transformer.wte.weight"),) if tied else ())
    lm_head = next(child for child in summary.root.children if child.name == "lm_head")
    assert lm_head.tied_to == ("transformer.wte" if tied else None)
    assert lm_head.num_parameters == (0 if tied else config.vocab_size * config.n_embd)
    rendered = render_summary(summary)
    assert ("(tied to transformer.wte)" in rendered) == tied
    assert f"total_parameters: {unique_total}\n" in rendered


def test_tree_counts_add_up_to_the_total_and_repeats_keep_per_block_counts():
    config = _tiny_gpt2()
    model = _real_model(config)
    tree = module_tree(model)
    transformer = next(child for child in tree.children if child.name == "transformer")
    blocks_list = next(child for child in transformer.children if child.name == "h")
    (block_run,) = blocks_list.children
    assert block_run.repeat == config.n_layer
    assert block_run.class_name == "GPT2Block"
    assert block_run.num_parameters == sum(p.numel() for p in model.transformer.h[0].parameters())
    assert blocks_list.num_parameters == sum(p.numel() for p in model.transformer.h.parameters())

    def children_sum(node):
        own = sum(p.numel for p in node.parameters if p.tied_to is None)
        return own + sum(child.total_parameters for child in node.children)

    def check(node):
        assert node.num_parameters == children_sum(node)
        for child in node.children:
            check(child)

    check(tree)


def test_non_identical_blocks_are_not_merged():
    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 8), torch.nn.Linear(4, 4)]
            )

    tree = module_tree(Stack())
    (layers,) = tree.children
    assert [(child.name, child.repeat) for child in layers.children] == [("0..1", 2), ("2", 1), ("3", 1)]
    assert layers.num_parameters == 2 * 20 + 40 + 20


def test_generic_config_names_work_for_an_untied_llama():
    config = _tiny_llama()
    model = _real_model(config)
    unique_total = sum(p.numel() for p in model.parameters())
    summary = describe_model(config, seq_len=32)
    assert summary.total_parameters == unique_total
    assert summary.embedding_parameters == model.model.embed_tokens.weight.numel()
    # Untied: the input table is a lookup (excluded), lm_head is a matmul (included).
    assert summary.matmul_parameters == unique_total - model.model.embed_tokens.weight.numel()
    attention_width = config.num_attention_heads * config.head_dim
    expected = 6 * summary.matmul_parameters + 12 * config.num_hidden_layers * attention_width * 32
    assert summary.flops_per_token == expected == flops_per_token(config, 32)
    assert "layers = 2 x LlamaDecoderLayer" in render_summary(summary)


def test_meta_build_allocates_nothing_and_bad_seq_len_is_a_user_error():
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = describe_model(GPT2Config(n_layer=48, n_embd=1600, n_head=25))
    assert summary.total_parameters == 1_557_611_200  # GPT-2 XL, as published
    # fp32 weights would need 6.2 GB; the meta device must keep the peak where it was.
    peak_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib
    assert peak_growth_kib < 1_000_000
    with pytest.raises(ModelError, match="positive integer"):
        flops_per_token(_tiny_gpt2(), 0)
