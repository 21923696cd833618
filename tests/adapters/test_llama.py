"""Llama-layout adapters (Llama, Mistral, Qwen2, Qwen3, Phi-3), proven against Hugging Face."""

from __future__ import annotations

from typing import Any

import pytest
from decoder_checks import assert_head_and_base_conformant, classes, config, tiny_inputs
from introspect.adapters.llama import LLAMA, derive
from pydantic import ValidationError

from introspect import Inspector
from introspect.testing import assert_checks, build_tiny, check_block_sums

CASES: dict[str, tuple[str, dict[str, Any], str, str, str]] = {
    "llama": ("LlamaConfig", {}, "LlamaForCausalLM", "LlamaModel", "llama"),
    "mistral": (
        "MistralConfig",
        {"sliding_window": 4},
        "MistralForCausalLM",
        "MistralModel",
        "llama",
    ),
    "qwen2": ("Qwen2Config", {}, "Qwen2ForCausalLM", "Qwen2Model", "llama"),
    "qwen3": ("Qwen3Config", {"head_dim": 8}, "Qwen3ForCausalLM", "Qwen3Model", "llama"),
    "phi3": ("Phi3Config", {}, "Phi3ForCausalLM", "Phi3Model", "phi3"),
}


def test_mistral_sliding_window_conformant() -> None:
    # A 4-token window that seven tokens cross (the generic tiny config's window is 4096).
    config_class, overrides, head, base, adapter = CASES["mistral"]
    assert_head_and_base_conformant(config(config_class, **overrides), head, base, adapter)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_block_is_input_plus_attn_plus_mlp(model_type: str) -> None:
    config_class, overrides, head, _, _ = CASES[model_type]
    cfg = config(config_class, **overrides)
    (cls,) = classes(head)
    model = build_tiny(cls, cfg)
    assert_checks(check_block_sums(model, tiny_inputs(cfg), relation="sequential"))


def test_parts_name_the_llama_norms() -> None:
    cfg = config("LlamaConfig")
    (cls,) = classes("LlamaModel")
    insp = Inspector(build_tiny(cls, cfg))
    assert insp.path("block[1].attn_norm") == "layers.1.input_layernorm"
    assert insp.path("block[-1].mlp_norm") == "layers.2.post_attention_layernorm"


def test_derive_validates_the_changes() -> None:
    assert derive(LLAMA, name="sibling").parts == LLAMA.parts
    with pytest.raises(ValidationError, match="final_nrom"):
        derive(LLAMA, name="sibling", final_nrom="norm")
    with pytest.raises(ValidationError, match="dotted module path"):
        derive(LLAMA, name="sibling", blocks="model/layers")
