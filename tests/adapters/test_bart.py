"""BART: encoder and decoder stacks, post-LN, final_logits_bias, the decoder-only class."""

from __future__ import annotations

import pytest
import torch
import transformers

from introspect import Inspector, LocatorError, MissingPartError
from introspect.testing import (
    assert_checks,
    assert_classes_conformant,
    build_tiny,
    check_logit_ops,
    example_inputs,
)


def bart_config(decoder_layers: int = 3, scale_embedding: bool = True) -> transformers.BartConfig:
    return transformers.BartConfig(
        encoder_layers=2,
        decoder_layers=decoder_layers,
        d_model=32,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=96,
        max_position_embeddings=64,
        scale_embedding=scale_embedding,
    )


def test_scaled_embedding_conformant() -> None:
    # The generic tiny config keeps BART's default, scale_embedding=False.
    assert_classes_conformant(
        bart_config(scale_embedding=True),
        [transformers.BartForConditionalGeneration, transformers.BartModel],
        expect_adapter="bart",
    )


def test_final_logits_bias_is_added_after_the_head() -> None:
    config = bart_config()
    model = build_tiny(transformers.BartForConditionalGeneration, config)
    # The buffer starts at zero (and perturb() leaves buffers alone): make it matter.
    with torch.no_grad():
        model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape))
    assert_checks(check_logit_ops(model, example_inputs(config)))
    insp = Inspector(model)
    hidden = torch.randn(1, 3, 32)
    expected = model.lm_head(hidden) + model.final_logits_bias
    assert torch.allclose(insp.logits(hidden), expected, atol=1e-6)


def test_decoder_only_class() -> None:
    # Equal stack depths: transformers 5.x sizes BartForCausalLM's cache by encoder_layers.
    model = build_tiny(transformers.BartForCausalLM, bart_config(decoder_layers=2))
    insp = Inspector(model)
    assert insp.module("block[-1]") is model.model.decoder.layers[1]
    with pytest.raises(LocatorError, match="no stack named 'encoder'"):
        insp.module("encoder.block[0]")


def test_locators_name_each_stack() -> None:
    model = build_tiny(transformers.BartForConditionalGeneration, bart_config())
    insp = Inspector(model)
    encoder, decoder = model.model.encoder, model.model.decoder
    assert (insp.num_blocks, insp.num_blocks_in("encoder")) == (3, 2)
    assert insp.module("encoder.block[1]") is encoder.layers[1]
    assert insp.module("decoder.block[-1]") is decoder.layers[2]
    assert insp.module("block[0].cross_attn") is decoder.layers[0].encoder_attn
    assert insp.module("encoder.embed") is encoder.embed_tokens
    assert insp.module("encoder.embed_norm") is encoder.layernorm_embedding
    assert insp.path("decoder.pos_embed") == "model.decoder.embed_positions"
    for stack in ("encoder", "decoder"):
        with pytest.raises(MissingPartError, match="post-LN"):
            insp.module(f"{stack}.final_norm")
        with pytest.raises(MissingPartError, match=r"fc1 / block\[i\]\.fc2"):
            insp.module(f"{stack}.block[0].mlp")
    assert str(insp.hidden_state_locator(-1, stack="encoder")) == "encoder.block[1]"


def test_hidden_state_zero_is_the_normed_scaled_embedding_sum() -> None:
    config = bart_config()
    model = build_tiny(transformers.BartModel, config)
    insp = Inspector(model)
    inputs = example_inputs(config)
    locs = ("encoder.embed", "encoder.pos_embed", "encoder.embed_norm")
    with torch.no_grad(), insp.capture(*locs) as cap:
        out = model(**inputs, output_hidden_states=True)
    lookup = model.encoder.embed_tokens.weight[inputs["input_ids"]] * 32**0.5
    assert torch.allclose(cap["encoder.embed"].output, lookup, atol=1e-5)
    total = cap["encoder.embed"].output + cap["encoder.pos_embed"].output
    assert torch.allclose(cap["encoder.embed_norm"].input, total, atol=1e-6)
    assert torch.equal(cap["encoder.embed_norm"].output, out.encoder_hidden_states[0])
