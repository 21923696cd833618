"""Gemma-3n is refused with its reason: its residual stream is 4-D (AltUp).

tests/test_conformance_all.py proves the refusal on every Gemma-3n class; here, that the
reason holds.
"""

from __future__ import annotations

import torch
import transformers

from introspect._plugins import get_registry
from introspect.testing import build_tiny


def gemma3n_config() -> transformers.Gemma3nTextConfig:
    return transformers.Gemma3nTextConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=96,
        vocab_size_per_layer_input=96,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
        altup_num_inputs=4,
        num_kv_shared_layers=0,
        layer_types=["sliding_attention", "full_attention"],
        activation_sparsity_pattern=[0.0, 0.0],
        sliding_window=16,
    )


def test_the_reason_holds_hidden_states_are_4d() -> None:
    model = build_tiny(transformers.Gemma3nForCausalLM, gemma3n_config())
    with torch.no_grad():
        out = model(torch.tensor([[3, 4, 5, 6]]), output_hidden_states=True)
    assert [tuple(h.shape) for h in out.hidden_states] == [(4, 1, 4, 32)] * 3


def test_the_multimodal_model_type_is_refused_too() -> None:
    registry = get_registry()
    assert registry.by_model_type["gemma3n"] == registry.by_model_type["gemma3n_text"] == "gemma3n"
