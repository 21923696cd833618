"""Granite and GraniteMoE adapters: multipliers outside the modules, logits / logits_scaling."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from decoder_checks import assert_case_conformant, build_case, tiny_inputs

from introspect import Inspector
from introspect.testing import assert_checks, check_block_sums, check_logit_ops

# Granite's defaults are all 1.0, which would hide every multiplier: use values that matter.
MULTIPLIERS = {
    "embedding_multiplier": 3.0,
    "residual_multiplier": 0.5,
    "attention_multiplier": 0.3,
    "logits_scaling": 4.0,
}

CASES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "granite": ("GraniteConfig", MULTIPLIERS, "GraniteForCausalLM", "GraniteModel"),
    "granitemoe": (
        "GraniteMoeConfig",
        {**MULTIPLIERS, "num_local_experts": 4, "num_experts_per_tok": 2},
        "GraniteMoeForCausalLM",
        "GraniteMoeModel",
    ),
}


def build(model_type: str, head: bool = True) -> tuple[torch.nn.Module, Any]:
    return build_case(CASES[model_type], head)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_multipliers_conformant(model_type: str) -> None:
    # The generic tiny configs keep Granite's defaults of 1.0, which hide every multiplier.
    assert_case_conformant(CASES[model_type], model_type)


@pytest.mark.parametrize("model_type", sorted(CASES))
@pytest.mark.parametrize("head", [True, False], ids=["head", "base"])
def test_hidden_state_zero_is_not_the_embedding_output(model_type: str, head: bool) -> None:
    model, cfg = build(model_type, head)
    insp = Inspector(model)
    inputs = tiny_inputs(cfg)
    with torch.no_grad():
        hidden = insp.hidden_states(**inputs)
        with insp.capture("embed") as cap:
            model(**inputs)
    lookup = cap["embed"].output
    assert str(insp.hidden_state_locator(0)) == "block[0].input"
    assert torch.allclose(lookup, insp.module("embed").weight[inputs["input_ids"]])
    assert not torch.allclose(hidden[0], lookup, atol=1e-2)
    assert torch.allclose(hidden[0], 3.0 * lookup, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_logits_are_divided_by_logits_scaling(model_type: str) -> None:
    model, cfg = build(model_type)
    assert_checks(check_logit_ops(model, tiny_inputs(cfg)))
    insp = Inspector(model)
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        logits = model(**tiny_inputs(cfg)).logits
        unscaled = model.lm_head(insp.finish(cap["block[-1]"].output))
    assert torch.allclose(logits, unscaled / 4.0, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_sub_layers_are_scaled_by_residual_multiplier(model_type: str) -> None:
    model, cfg = build(model_type)
    checks = check_block_sums(model, tiny_inputs(cfg), relation="sequential", scale=0.5)
    assert_checks(checks)


def test_granitemoe_mlp_is_block_sparse_moe() -> None:
    model, _ = build("granitemoe")
    insp = Inspector(model)
    assert insp.path("block[1].mlp") == "model.layers.1.block_sparse_moe"
    assert insp.module("block[1].router") is model.model.layers[1].block_sparse_moe.router
