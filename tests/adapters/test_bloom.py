"""BLOOM adapter: embedding LayerNorm, and attention/MLP that add the residual themselves."""

from __future__ import annotations

from typing import Any

import torch
import transformers

from introspect import Inspector
from introspect.testing import assert_classes_conformant, build_tiny, example_inputs


def bloom_config(post_layernorm_residual: bool = False) -> transformers.BloomConfig:
    return transformers.BloomConfig(
        n_layer=2,
        hidden_size=32,
        n_head=2,
        vocab_size=64,
        apply_residual_connection_post_layernorm=post_layernorm_residual,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def test_residual_after_layernorm_conformant() -> None:
    # The generic tiny config keeps apply_residual_connection_post_layernorm=False.
    assert_classes_conformant(
        bloom_config(post_layernorm_residual=True),
        [transformers.BloomForCausalLM, transformers.BloomModel],
        expect_adapter="bloom",
    )


def test_first_hidden_state_is_the_embedding_norm() -> None:
    config = bloom_config()
    model = build_tiny(transformers.BloomForCausalLM, config)
    insp = Inspector(model)
    hidden = insp.hidden_states(**example_inputs(config), indices=[0])[0]
    with insp.capture("embed", "embed_norm") as cap:
        model(**example_inputs(config))
    assert torch.equal(cap["embed_norm"].input, cap["embed"].output)
    assert torch.equal(hidden, cap["embed_norm"].output)
    assert not torch.allclose(hidden, cap["embed"].output)
    assert insp.path("embed_norm") == "transformer.word_embeddings_layernorm"


def test_attention_and_mlp_records_include_the_residual() -> None:
    config = bloom_config()
    model = build_tiny(transformers.BloomForCausalLM, config)
    insp = Inspector(model)
    assert set(insp.adapter.residual_in) == {"attn", "mlp"}
    dense: dict[str, Any] = {}
    handle = model.transformer.h[0].self_attention.dense.register_forward_hook(
        lambda _m, _a, out: dense.setdefault("out", out)
    )
    try:
        with insp.capture("block[0]", "block[0].attn", "block[0].mlp") as cap:
            model(**example_inputs(config))
    finally:
        handle.remove()
    block_in = cap["block[0]"].input
    attn_out = cap["block[0].attn"].output
    # attn returns residual + attention(x): the record is the residual stream after attention.
    assert torch.allclose(attn_out, block_in + dense["out"], atol=1e-6)
    # The residual is passed as the second argument of both sub-layers.
    assert torch.equal(cap["block[0].attn"].args[1], block_in)
    assert torch.equal(cap["block[0].mlp"].args[1], attn_out)
    assert torch.equal(cap["block[0].mlp"].output, cap["block[0]"].output)


def test_base_model_paths() -> None:
    insp = Inspector(build_tiny(transformers.BloomModel, bloom_config()))
    assert insp.path("embed_norm") == "word_embeddings_layernorm"
