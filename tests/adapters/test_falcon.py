"""Falcon adapter: new decoder architecture, parallel attention, sequential with ALiBi."""

from __future__ import annotations

from typing import Any

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


def falcon_config(**overrides: Any) -> transformers.FalconConfig:
    settings: dict[str, Any] = {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "vocab_size": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    settings.update(overrides)
    return transformers.FalconConfig(**settings)


VARIANTS = {
    # Falcon-40B/180B: grouped KV heads, parallel sub-layers with a norm each.
    "new_decoder": falcon_config(new_decoder_architecture=True, num_kv_heads=2),
    # Falcon2-11B: new decoder architecture with one shared norm.
    "new_decoder_one_norm": falcon_config(
        new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1
    ),
    # Falcon-7B: multi-query attention, parallel sub-layers sharing input_layernorm.
    "parallel_attn": falcon_config(
        new_decoder_architecture=False, parallel_attn=True, multi_query=True
    ),
    # Falcon-RW: sequential sub-layers, ALiBi positions, biases.
    "sequential_alibi": falcon_config(
        new_decoder_architecture=False,
        parallel_attn=False,
        alibi=True,
        multi_query=False,
        bias=True,
    ),
}

NORMS = {
    "new_decoder": ("ln_attn", "ln_mlp"),
    "new_decoder_one_norm": ("input_layernorm", None),
    "parallel_attn": ("input_layernorm", None),
    "sequential_alibi": ("input_layernorm", "post_attention_layernorm"),
}


# parallel_attn is FalconConfig's default, which tests/test_conformance_all.py proves.
@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"parallel_attn"}))
def test_conformant(variant: str) -> None:
    assert_classes_conformant(
        VARIANTS[variant],
        [transformers.FalconForCausalLM, transformers.FalconModel],
        expect_adapter="falcon",
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_norms_name_what_feeds_each_sub_layer(variant: str) -> None:
    config = VARIANTS[variant]
    model = build_tiny(transformers.FalconForCausalLM, config)
    insp = Inspector(model)
    attn_norm, mlp_norm = NORMS[variant]
    assert insp.path("block[0].attn_norm") == f"transformer.h.0.{attn_norm}"
    names = ["block[0]", "block[0].attn", "block[0].mlp", "block[0].attn_norm"]
    if mlp_norm is None:
        with pytest.raises(MissingPartError, match="parallel on one norm"):
            insp.module("block[0].mlp_norm")
    else:
        assert insp.path("block[0].mlp_norm") == f"transformer.h.0.{mlp_norm}"
        names.append("block[0].mlp_norm")
    with insp.capture(*names) as cap:
        model(**example_inputs(config))
    block_in = cap["block[0]"].input
    mlp_out = cap["block[0].mlp"].output
    assert torch.equal(cap["block[0].attn"].input, cap["block[0].attn_norm"].output)
    feeds_mlp = cap["block[0].mlp_norm" if mlp_norm else "block[0].attn_norm"].output
    assert torch.equal(cap["block[0].mlp"].input, feeds_mlp)
    if variant != "sequential_alibi":
        assert torch.equal(cap["block[0].attn_norm"].input, block_in)
    # Parallel blocks add attention into the MLP's output in place: the record is a copy.
    with torch.no_grad():
        assert torch.equal(mlp_out, model.transformer.h[0].mlp(feeds_mlp))
    relation = "sequential" if variant == "sequential_alibi" else "parallel"
    assert_checks(check_block_sums(model, example_inputs(config), relation=relation))
