"""Cohere and Cohere2 adapter: parallel attention + MLP, logits scaled by ``logit_scale``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from decoder_checks import assert_head_and_base_conformant, classes, config, tiny_inputs

from introspect import Inspector, MissingPartError
from introspect.testing import assert_checks, build_tiny, check_block_sums, check_logit_ops

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

# logit_scale 0.5 (Cohere's default is 0.0625): any value other than 1 must reach the logits.
CASES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "cohere": ("CohereConfig", {"logit_scale": 0.5}, "CohereForCausalLM", "CohereModel"),
    "cohere2": (
        "Cohere2Config",
        {"logit_scale": 0.5, "sliding_window": 4, "layer_types": LAYER_TYPES},
        "Cohere2ForCausalLM",
        "Cohere2Model",
    ),
}


def build(model_type: str) -> tuple[torch.nn.Module, Any]:
    config_class, overrides, head_class, _ = CASES[model_type]
    cfg = config(config_class, **overrides)
    (cls,) = classes(head_class)
    return build_tiny(cls, cfg), cfg


def test_cohere2_sliding_window_conformant() -> None:
    # A 4-token window that seven tokens cross (the generic tiny config's window is 4096).
    config_class, overrides, head, base = CASES["cohere2"]
    assert_head_and_base_conformant(config(config_class, **overrides), head, base, "cohere")


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_logits_are_scaled(model_type: str) -> None:
    model, cfg = build(model_type)
    assert_checks(check_logit_ops(model, tiny_inputs(cfg)))
    insp = Inspector(model)
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        logits = model(**tiny_inputs(cfg)).logits
        unscaled = model.lm_head(insp.finish(cap["block[-1]"].output))
    assert torch.allclose(logits, 0.5 * unscaled, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_attention_and_mlp_run_in_parallel(model_type: str) -> None:
    model, cfg = build(model_type)
    insp = Inspector(model)
    inputs = tiny_inputs(cfg)
    assert_checks(check_block_sums(model, inputs, relation="parallel"))
    with torch.no_grad(), insp.capture("block[1].attn_norm", "block[1].mlp") as cap:
        model(**inputs)
    assert cap["block[1].mlp"].input is cap["block[1].attn_norm"].output
    with pytest.raises(MissingPartError, match="in parallel"):
        insp.module("block[1].mlp_norm")
