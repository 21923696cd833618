"""DeepSeek-V2 and DeepSeek-V3 adapter: latent attention, dense first blocks, then sparse MoE."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from decoder_checks import assert_head_and_base_conformant, classes, config, tiny_inputs

from introspect import Inspector, MissingPartError
from introspect.testing import assert_checks, build_tiny, check_block_sums

# Multi-head latent attention: q and kv go through low ranks (24, 16); the rotary part of a
# head (8) is split from the rest (8). first_k_dense_replace=1 makes block 0 dense.
LATENT_MOE: dict[str, Any] = {
    "num_key_value_heads": 4,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 24,
    "first_k_dense_replace": 1,
    "n_group": 2,
    "topk_group": 1,
}

CASES: dict[str, tuple[str, str, str]] = {
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", "DeepseekV2Model"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3Model"),
}


def build(model_type: str) -> tuple[torch.nn.Module, Any]:
    config_class, head_class, _ = CASES[model_type]
    cfg = config(config_class, **LATENT_MOE)
    (cls,) = classes(head_class)
    return build_tiny(cls, cfg), cfg


# The generic tiny configs leave DeepSeek-V2's routing ungrouped and its blocks all sparse.
@pytest.mark.parametrize("model_type", sorted(CASES))
def test_grouped_routing_conformant(model_type: str) -> None:
    config_class, head, base = CASES[model_type]
    assert_head_and_base_conformant(config(config_class, **LATENT_MOE), head, base, "deepseek")


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_dense_then_sparse_blocks(model_type: str) -> None:
    model, cfg = build(model_type)
    insp = Inspector(model)
    dense = insp.module("block[0].mlp")
    assert not hasattr(dense, "experts")
    for part in ("router", "shared_experts"):
        with pytest.raises(MissingPartError, match="first_k_dense_replace"):
            insp.module(f"block[0].{part}")
    for i in (1, 2):
        moe = insp.module(f"block[{i}].mlp")
        assert hasattr(moe, "experts")
        assert insp.module(f"block[{i}].router") is moe.gate
        assert insp.module(f"block[{i}].shared_experts") is moe.shared_experts
    assert_checks(check_block_sums(model, tiny_inputs(cfg), relation="sequential"))
