"""Sparse-MoE adapters with the Llama layout (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from decoder_checks import assert_case_conformant, build_case, tiny_inputs

from introspect import Inspector, MissingPartError
from introspect.testing import assert_checks, check_block_sums

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

CASES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "mixtral": (
        "MixtralConfig",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4},
        "MixtralForCausalLM",
        "MixtralModel",
    ),
    # decoder_sparse_step=2: only block 1 is sparse, blocks 0 and 2 have a dense MLP.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 40,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [],
        },
        "Qwen2MoeForCausalLM",
        "Qwen2MoeModel",
    ),
    # mlp_only_layers=[2]: blocks 0 and 1 are sparse, block 2 is dense.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [2],
        },
        "Qwen3MoeForCausalLM",
        "Qwen3MoeModel",
    ),
    "gpt_oss": (
        "GptOssConfig",
        {
            "head_dim": 8,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 4,
            "layer_types": LAYER_TYPES,
        },
        "GptOssForCausalLM",
        "GptOssModel",
    ),
}

# Which blocks are sparse in each config above, and the router's attribute in the MoE module.
SPARSE = {"mixtral": [0, 1, 2], "qwen2_moe": [1], "qwen3_moe": [0, 1], "gpt_oss": [0, 1, 2]}
ROUTER = {"mixtral": "gate", "qwen2_moe": "gate", "qwen3_moe": "gate", "gpt_oss": "router"}


def build(model_type: str, head: bool = True) -> tuple[torch.nn.Module, Any]:
    return build_case(CASES[model_type], head)


# Sliding windows that seven tokens cross and dense blocks among sparse ones: the generic tiny
# configs have neither.
@pytest.mark.parametrize("model_type", sorted(CASES))
def test_windowed_and_mixed_dense_conformant(model_type: str) -> None:
    assert_case_conformant(CASES[model_type], model_type)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_mlp_is_the_sparse_moe_module(model_type: str) -> None:
    model, cfg = build(model_type)
    insp = Inspector(model)
    for i in range(insp.num_blocks):
        mlp = insp.module(f"block[{i}].mlp")
        if i in SPARSE[model_type]:
            router = insp.module(f"block[{i}].router")
            assert getattr(mlp, ROUTER[model_type]) is router
            assert hasattr(mlp, "experts")
        else:
            assert not hasattr(mlp, "experts")
            with pytest.raises(MissingPartError, match="dense"):
                insp.module(f"block[{i}].router")
    # The whole sparse-MoE output (routed mix plus any shared expert) is what the block adds.
    assert_checks(check_block_sums(model, tiny_inputs(cfg), relation="sequential"))


def test_qwen2_moe_shared_expert_only_on_sparse_blocks() -> None:
    model, _ = build("qwen2_moe")
    insp = Inspector(model)
    assert insp.module("block[1].shared_experts") is model.model.layers[1].mlp.shared_expert
    with pytest.raises(MissingPartError, match="dense"):
        insp.module("block[0].shared_experts")
    with pytest.raises(MissingPartError, match="no shared expert"):
        Inspector(build("qwen3_moe")[0]).module("block[0].shared_experts")


def test_router_records_expert_logits() -> None:
    model, cfg = build("mixtral")
    insp = Inspector(model)
    inputs = tiny_inputs(cfg)
    with torch.no_grad(), insp.capture("block[0].router") as cap:
        model(**inputs)
    scores = cap["block[0].router"].output
    tokens = inputs["input_ids"].numel()
    assert scores.shape == (tokens, 4)
