"""OLMo, OLMo-2 and OLMoE adapters, proven against Hugging Face on tiny random models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from decoder_checks import classes, config, tiny_inputs

from introspect import Inspector, MissingPartError
from introspect.testing import assert_checks, build_tiny, check_block_sums

CASES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "olmo": ("OlmoConfig", {}, "OlmoForCausalLM", "OlmoModel"),
    "olmo2": ("Olmo2Config", {}, "Olmo2ForCausalLM", "Olmo2Model"),
    "olmoe": (
        "OlmoeConfig",
        {"num_experts": 4, "num_experts_per_tok": 2},
        "OlmoeForCausalLM",
        "OlmoeModel",
    ),
}


def build(model_type: str) -> tuple[torch.nn.Module, Any]:
    config_class, overrides, head_class, _ = CASES[model_type]
    cfg = config(config_class, **overrides)
    (cls,) = classes(head_class)
    return build_tiny(cls, cfg), cfg


@pytest.mark.parametrize("model_type", ["olmo", "olmoe"])
def test_pre_norm_blocks(model_type: str) -> None:
    model, cfg = build(model_type)
    insp = Inspector(model)
    assert insp.module("block[0].attn_norm") is model.model.layers[0].input_layernorm
    assert_checks(check_block_sums(model, tiny_inputs(cfg), relation="sequential"))


def test_olmo2_norms_follow_the_sub_layers() -> None:
    model, cfg = build("olmo2")
    insp = Inspector(model)
    inputs = tiny_inputs(cfg)
    assert_checks(check_block_sums(model, inputs, relation="post_norms"))
    with torch.no_grad(), insp.capture("block[1]", "block[1].attn") as cap:
        model(**inputs)
    # No pre-norm: attention sees the block's input itself.
    assert torch.equal(cap["block[1].attn"].input, cap["block[1]"].input)
    for part in ("attn_norm", "mlp_norm"):
        with pytest.raises(MissingPartError, match="normalises each sub-layer's output"):
            insp.module(f"block[1].{part}")


def test_olmoe_router_is_the_moe_gate() -> None:
    model, _ = build("olmoe")
    insp = Inspector(model)
    moe = insp.module("block[2].mlp")
    assert insp.module("block[2].router") is moe.gate
    assert hasattr(moe, "experts")
