"""Phi adapter: parallel attention and MLP on one LayerNorm, ``final_layernorm``."""

from __future__ import annotations

import pytest
import torch
import transformers

from introspect import Inspector, MissingPartError
from introspect.testing import (
    assert_checks,
    assert_classes_conformant,
    build_tiny,
    check_block_sums,
    example_inputs,
)


def phi_config(qk_layernorm: bool = False) -> transformers.PhiConfig:
    return transformers.PhiConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
        partial_rotary_factor=0.5,
        qk_layernorm=qk_layernorm,
        bos_token_id=1,
        eos_token_id=2,
    )


def test_qk_layernorm_conformant() -> None:
    # The generic tiny config keeps the default, qk_layernorm=False.
    assert_classes_conformant(
        phi_config(qk_layernorm=True),
        [transformers.PhiForCausalLM, transformers.PhiModel],
        expect_adapter="phi",
    )


def test_parallel_block() -> None:
    config = phi_config()
    model = build_tiny(transformers.PhiForCausalLM, config)
    insp = Inspector(model)
    names = ("block[1]", "block[1].attn", "block[1].mlp", "block[1].attn_norm")
    with insp.capture(*names) as cap:
        model(**example_inputs(config))
    assert torch.equal(cap["block[1].attn"].input, cap["block[1].attn_norm"].output)
    assert_checks(check_block_sums(model, example_inputs(config), relation="parallel"))
    with pytest.raises(MissingPartError, match="parallel"):
        insp.module("block[1].mlp_norm")
    assert insp.path("final_norm") == "model.final_layernorm"
