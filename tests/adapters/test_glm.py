"""GLM-4 adapter: the Llama layout with a norm after attention and after the MLP."""

from __future__ import annotations

from typing import Any

import torch
from decoder_checks import classes, config, tiny_inputs

from introspect import Inspector
from introspect.testing import assert_checks, build_tiny, check_block_sums

GLM4: dict[str, Any] = {"head_dim": 8, "partial_rotary_factor": 0.5}


def build() -> tuple[torch.nn.Module, Any]:
    cfg = config("Glm4Config", **GLM4)
    (cls,) = classes("Glm4ForCausalLM")
    return build_tiny(cls, cfg), cfg


def test_norms_around_each_sub_layer() -> None:
    model, cfg = build()
    insp = Inspector(model)
    layer = model.model.layers[1]
    assert insp.module("block[1].attn_norm") is layer.input_layernorm
    assert insp.module("block[1].post_attn_norm") is layer.post_self_attn_layernorm
    assert insp.module("block[1].mlp_norm") is layer.post_attention_layernorm
    assert insp.module("block[1].post_mlp_norm") is layer.post_mlp_layernorm
    inputs = tiny_inputs(cfg)
    assert_checks(check_block_sums(model, inputs, relation="post_norms"))
    with torch.no_grad(), insp.capture("block[1].mlp_norm", "block[1].mlp") as cap:
        model(**inputs)
    assert cap["block[1].mlp"].input is cap["block[1].mlp_norm"].output
