"""Gemma, Gemma-2 and Gemma-3 (text) adapters: scaled embeddings, sandwich norms, soft-capping."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from decoder_checks import assert_case_conformant, build_case, tiny_inputs

from introspect import Inspector, MissingPartError
from introspect.testing import assert_checks, check_block_sums, check_logit_ops

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
# Soft-capping at 5.0 bends logits of a tiny random model visibly (the default 30.0 would not).
SOFTCAP = {"final_logit_softcapping": 5.0, "sliding_window": 4, "layer_types": LAYER_TYPES}

CASES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "gemma": ("GemmaConfig", {"head_dim": 8}, "GemmaForCausalLM", "GemmaModel"),
    "gemma2": (
        "Gemma2Config",
        {"head_dim": 8, "attn_logit_softcapping": 20.0, **SOFTCAP},
        "Gemma2ForCausalLM",
        "Gemma2Model",
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {"head_dim": 8, **SOFTCAP},
        "Gemma3ForCausalLM",
        "Gemma3TextModel",
    ),
}


def build(model_type: str, head: bool = True) -> tuple[torch.nn.Module, Any]:
    return build_case(CASES[model_type], head)


# A 4-token window that seven tokens cross, and a soft-cap that bends tiny logits (the generic
# tiny configs have a 4096-token window, and no soft-cap on Gemma-3).
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_sliding_window_and_softcap_conformant(model_type: str) -> None:
    assert_case_conformant(CASES[model_type], model_type)


@pytest.mark.parametrize("model_type", sorted(CASES))
@pytest.mark.parametrize("head", [True, False], ids=["head", "base"])
def test_block_input_is_the_scaled_lookup(model_type: str, head: bool) -> None:
    model, cfg = build(model_type, head)
    insp = Inspector(model)
    inputs = tiny_inputs(cfg)
    with torch.no_grad(), insp.capture("embed", "block[0]") as cap:
        model(**inputs)
    embed = insp.module("embed")
    raw = embed.weight[inputs["input_ids"]]
    scale = torch.tensor(cfg.hidden_size**0.5, dtype=raw.dtype)
    hidden0 = cap["block[0]"].input
    assert torch.allclose(hidden0, raw * scale, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(hidden0, raw, atol=1e-2)
    # Where the embedding module scales (5.x, and Gemma-3 on 4.x) it records the scaled lookup;
    # where the model's forward scales (Gemma/Gemma-2 on 4.x) it records the raw lookup.
    expected = hidden0 if hasattr(embed, "embed_scale") else raw
    assert torch.allclose(cap["embed"].output, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_logits_are_soft_capped(model_type: str) -> None:
    model, cfg = build(model_type)
    # A random tiny model's logits stay near 0, where tanh is the identity: scale the (tied)
    # unembedding so that they reach past the cap.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    assert_checks(check_logit_ops(model, tiny_inputs(cfg)))
    insp = Inspector(model)
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        logits = model(**tiny_inputs(cfg)).logits
        uncapped = model.lm_head(insp.finish(cap["block[-1]"].output))
    assert uncapped.abs().max() > 5.0 > logits.abs().max()
    assert torch.allclose(logits, 5.0 * torch.tanh(uncapped / 5.0), atol=1e-5)


def test_gemma_has_no_soft_capping() -> None:
    model, cfg = build("gemma")
    insp = Inspector(model)
    assert insp.adapter.logit_ops == ()
    assert not hasattr(cfg, "final_logit_softcapping")


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_sandwich_norms(model_type: str) -> None:
    model, cfg = build(model_type)
    insp = Inspector(model)
    layer = insp.module("block[1]")
    assert insp.module("block[1].attn_norm") is layer.input_layernorm
    assert insp.module("block[1].post_attn_norm") is layer.post_attention_layernorm
    assert insp.module("block[1].mlp_norm") is layer.pre_feedforward_layernorm
    assert insp.module("block[1].post_mlp_norm") is layer.post_feedforward_layernorm
    # The block adds the post-normed sub-layer outputs, not attn/mlp themselves.
    assert_checks(check_block_sums(model, tiny_inputs(cfg), relation="post_norms"))


def test_gemma_has_no_post_norms() -> None:
    model, cfg = build("gemma")
    insp = Inspector(model)
    assert_checks(check_block_sums(model, tiny_inputs(cfg), relation="sequential"))
    with pytest.raises(Exception, match="post_attn_norm"):
        insp.module("block[0].post_attn_norm")


def test_gemma3_paths_on_both_classes() -> None:
    head, _ = build("gemma3_text")
    base, _ = build("gemma3_text", head=False)
    assert Inspector(head).path("final_norm") == "model.norm"
    assert Inspector(base).path("block[0]") == "layers.0"
    with pytest.raises(MissingPartError, match="no lm_head"):
        Inspector(base).module("lm_head")
