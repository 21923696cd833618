"""Head layouts detection learns: grouped key/value heads a module states (DBRX) and hybrids.

Detection proves a head layout with ``check_heads`` before it keeps one. DBRX keeps its
key/value head count in a nested config (``attn_config.kv_n_heads``) and on its attention
module (``num_key_value_heads``); the registered layouts behind an ``out_proj`` read none, so
each is also tried reading the count from the module. Hybrids (Jamba's Mamba blocks, LFM2's
convolution blocks, RecurrentGemma's recurrent blocks among attention blocks) get a layout
for their attention blocks; the other blocks refuse head locators, saying why.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from introspect import Inspector, MissingPartError, detect_adapter
from introspect.testing import assert_checks, build_tiny, check_heads, example_inputs, tiny_config

T = transformers
V4 = int(T.__version__.split(".")[0]) < 5


def _eager(config: Any) -> Any:
    config._attn_implementation = "eager"  # patterns need the attention weights
    return config


# -- DBRX -------------------------------------------------------------------------------------


def _dbrx() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers.models.dbrx.configuration_dbrx import DbrxAttentionConfig

    # Built by hand: tiny_config("dbrx") does not build on either version (its attention
    # config keeps rope_theta on 4.57 only, and 5.25 reads it there all the same); clip_qkv
    # is set because 5.25 clamps with it unconditionally (None fails).
    attn = DbrxAttentionConfig(kv_n_heads=2, clip_qkv=8.0)
    if getattr(attn, "rope_theta", None) is None:
        attn.rope_theta = 10000.0
    config = T.DbrxConfig(
        n_layers=2,
        d_model=64,
        n_heads=4,
        vocab_size=128,
        max_seq_len=64,
        attn_config=attn,
        ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    )
    return build_tiny(T.DbrxForCausalLM, _eager(config)), example_inputs(config)


def test_dbrx_grouped_kv_heads_are_learned_and_proven() -> None:
    model, inputs = _dbrx()
    spec = detect_adapter(model)
    head = spec.heads["attn"]
    assert head.kv_heads_attr == "num_key_value_heads"
    checks = assert_checks(check_heads(model, inputs, adapter=spec), "dbrx heads")
    assert any(c.name == "block[1].attn.pattern == output_attentions" for c in checks)
    insp = Inspector(model, adapter=spec)
    assert (insp.num_heads, insp.num_kv_heads, insp.head_dim) == (4, 2, 16)
    with torch.no_grad(), insp.capture("block[1].attn.k", "block[1].attn.pattern") as cap:
        model(**inputs)
    with torch.no_grad():
        theirs = model(**inputs, output_attentions=True).attentions[1]
    assert cap["block[1].attn.k"].output.shape[2] == 2
    assert torch.allclose(cap["block[1].attn.pattern"].output, theirs, atol=1e-6)


# -- hybrids ----------------------------------------------------------------------------------

# Tiny hybrids with attention and other blocks interleaved (the generic shrink keeps the
# first layers, which are all Mamba in Jamba's and all recurrent in RecurrentGemma's default).
HYBRIDS: dict[str, dict[str, Any]] = {
    "jamba": {"num_hidden_layers": 4, "attn_layer_offset": 1, "attn_layer_period": 2},
    "lfm2": {
        "num_hidden_layers": 4,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
    },
    "qwen3_next": {},  # linear, linear, full, full
    "recurrent_gemma": {"num_hidden_layers": 3},  # recurrent, recurrent, attention
}
ATTENTION_BLOCKS = {"jamba": [1, 3], "lfm2": [1, 3], "qwen3_next": [2, 3], "recurrent_gemma": [2]}


def _hybrid(model_type: str) -> tuple[nn.Module, dict[str, Any]]:
    if model_type not in T.CONFIG_MAPPING:
        pytest.skip(f"transformers {T.__version__} has no {model_type}")
    config = _eager(tiny_config(model_type, **HYBRIDS[model_type]))
    model = build_tiny(T.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], config)
    return model, {**example_inputs(config), "use_cache": False}


@pytest.mark.parametrize(
    ("model_type", "kind"),
    [("jamba", "mamba (JambaMambaMixer)"), ("lfm2", "conv (Lfm2ShortConv)")],
)
def test_hybrid_blocks_without_attention_refuse_heads_with_the_reason(
    model_type: str, kind: str
) -> None:
    model, _ = _hybrid(model_type)
    spec = detect_adapter(model)
    insp = Inspector(model, adapter=spec)
    block = type(model.base_model.layers[0]).__name__
    reason = (
        rf"block\[0\] of this {model_type} model is a {block}: it mixes the sequence with "
        rf"{re.escape(kind)}, not with attention, so it has no attention heads"
    )
    for site in ("pattern", "q", "z", "result", "o"):
        with pytest.raises(MissingPartError, match=reason):
            insp.capture(f"block[0].attn.{site}")
    with pytest.raises(MissingPartError, match=reason):
        insp.module("block[0].attn")
    # The attention blocks have their attention module.
    for i in ATTENTION_BLOCKS[model_type]:
        assert insp.module(f"block[{i}].attn") is model.base_model.layers[i].self_attn


@pytest.mark.parametrize("model_type", ["jamba", "lfm2", "recurrent_gemma"])
def test_hybrid_attention_blocks_have_proven_heads(model_type: str) -> None:
    model, inputs = _hybrid(model_type)
    if model_type == "recurrent_gemma" and V4:
        pytest.skip(
            "RecurrentGemma on transformers 4.x computes attention inline with torch's "
            "scaled_dot_product_attention and returns no output_attentions: no pattern to "
            "prove a layout against"
        )
    spec = detect_adapter(model)
    assert "attn" in spec.heads
    assert_checks(check_heads(model, inputs, adapter=spec), f"{model_type} heads")
    insp = Inspector(model, adapter=spec)
    attention = ATTENTION_BLOCKS[model_type]
    names = [f"block[{i}].attn.pattern" for i in attention]
    with torch.no_grad(), insp.capture(*names) as cap:
        model(**inputs)
    with torch.no_grad():
        theirs = model(**inputs, output_attentions=True).attentions
    # Hugging Face lists the attention blocks only, in order.
    assert len(theirs) == len(attention)
    for name, reference in zip(names, theirs, strict=True):
        assert torch.allclose(cap[name].output, reference, atol=1e-6), name
    others = [i for i in range(len(model.base_model.layers)) if i not in attention]
    for i in others:
        with pytest.raises(MissingPartError, match=rf"block\[{i}\].*no attention heads"):
            insp.capture(f"block[{i}].attn.pattern")


def test_recurrent_gemma_recurrent_blocks_refuse_heads_with_the_reason() -> None:
    model, _ = _hybrid("recurrent_gemma")
    if V4:
        pytest.skip("RecurrentGemma's attention has no provable layout on transformers 4.x")
    insp = Inspector(model, adapter=detect_adapter(model))
    # Both kinds of block hold their mixer at temporal_block: the recurrent one has no o_proj.
    with pytest.raises(
        MissingPartError,
        match=r"block\[0\] of this recurrent_gemma model holds a RecurrentGemmaRecurrentBlock "
        r"at attn, not the attention its head layout describes \(no o_proj\): it mixes the "
        r"sequence without attention heads",
    ):
        insp.capture("block[0].attn.z")


def test_qwen3_next_names_each_blocks_mixer_and_proves_no_gated_heads() -> None:
    model, _ = _hybrid("qwen3_next")
    spec = detect_adapter(model)
    insp = Inspector(model, adapter=spec)
    layers = model.base_model.layers
    # Every block's attention part resolves: linear attention or full attention.
    assert insp.module("block[0].attn") is layers[0].linear_attn
    assert insp.module("block[2].attn") is layers[2].self_attn
    # Its full attention gates the heads' output (sigmoid of a query-side gate) before
    # o_proj, inline: no module's input is each head's mix of values, so no registered layout
    # is proven and head locators are refused.
    assert spec.heads == {}
    with pytest.raises(MissingPartError, match="does not guess head layouts"):
        insp.capture("block[2].attn.pattern")


def test_an_attention_class_naming_moe_is_not_taken_for_the_mlp() -> None:
    # Ernie4_5_MoeAttention matches the MLP class vocabulary ("Moe") and comes first in the
    # block: the attention vocabulary rules it out, so block[i].mlp is the MoE block.
    if "ernie4_5_moe" not in T.CONFIG_MAPPING:
        pytest.skip(f"transformers {T.__version__} has no ernie4_5_moe")
    config = tiny_config("ernie4_5_moe")
    model = build_tiny(T.Ernie4_5_MoeForCausalLM, config)
    spec = detect_adapter(model)
    assert (spec.attn, spec.mlp) == ("self_attn", "mlp")
    insp = Inspector(model, adapter=spec)
    assert insp.module("block[1].mlp") is model.model.layers[1].mlp


def test_head_counts_of_a_hybrid_come_from_its_attention_blocks() -> None:
    model, _ = _hybrid("jamba")
    insp = Inspector(model, adapter=detect_adapter(model))
    with pytest.raises(MissingPartError):
        insp.capture("block[0].attn.z")  # block 0 of this Jamba is a Mamba block
    config = model.config
    assert insp.num_heads == config.num_attention_heads
    assert insp.num_kv_heads == config.num_key_value_heads
