"""T5: encoder and decoder stacks, the scaled tied head, the encoder-only model."""

from __future__ import annotations

import pytest
import torch
import transformers

from introspect import Inspector, LocatorError
from introspect.testing import (
    assert_checks,
    assert_classes_conformant,
    build_tiny,
    check_logit_ops,
    example_inputs,
)


def t5_config(**overrides: object) -> transformers.T5Config:
    settings: dict[str, object] = {
        "num_layers": 2,
        "num_decoder_layers": 3,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_heads": 4,
        "vocab_size": 96,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }
    settings.update(overrides)
    return transformers.T5Config(**settings)


VARIANTS = {
    "t5": {},
    # T5 v1.1: gated-GELU feed-forward and no scaling before the head.
    "t5_v1_1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
}


def test_v1_1_conformant() -> None:
    # The generic tiny config is the original T5 (ReLU feed-forward, tied and scaled head).
    config = t5_config(**VARIANTS["t5_v1_1"])
    assert_classes_conformant(
        config,
        [transformers.T5ForConditionalGeneration, transformers.T5Model],
        expect_adapter="t5",
    )
    assert_classes_conformant(config, [transformers.T5EncoderModel], expect_adapter="t5-encoder")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_head_scaling_follows_the_config(variant: str) -> None:
    config = t5_config(**VARIANTS[variant])
    model = build_tiny(transformers.T5ForConditionalGeneration, config)
    insp = Inspector(model)
    hidden = torch.randn(1, 3, 32)
    normed = model.decoder.final_layer_norm(hidden)
    scaled = variant == "t5"
    expected = model.lm_head(normed * 32**-0.5 if scaled else normed)
    assert torch.allclose(insp.logits(hidden), expected, atol=1e-6)
    if scaled:
        assert_checks(check_logit_ops(model, example_inputs(config)))


def test_locators_name_each_stack() -> None:
    model = build_tiny(transformers.T5ForConditionalGeneration, t5_config())
    insp = Inspector(model)
    assert insp.num_blocks == 3
    assert insp.num_blocks_in("encoder") == 2
    assert insp.module("block[-1]") is model.decoder.block[2]
    assert insp.module("decoder.block[0]") is model.decoder.block[0]
    assert insp.module("encoder.block[-1]") is model.encoder.block[1]
    assert insp.module("encoder.final_norm") is model.encoder.final_layer_norm
    assert insp.module("decoder.final_norm") is model.decoder.final_layer_norm
    assert insp.module("encoder.block[0].mlp") is model.encoder.block[0].layer[1].DenseReluDense
    assert insp.module("decoder.block[0].mlp") is model.decoder.block[0].layer[2].DenseReluDense
    assert insp.module("block[1].cross_attn") is model.decoder.block[1].layer[1].EncDecAttention
    assert insp.module("encoder.embed") is model.encoder.embed_tokens
    assert insp.module("decoder.embed") is model.decoder.embed_tokens
    assert insp.path("lm_head") == "lm_head"
    assert str(insp.hidden_state_locator(-1, stack="encoder")) == "encoder.final_norm"
    assert str(insp.hidden_state_locator(0)) == "block[0].input"
    with pytest.raises(LocatorError, match=r"out of range.*2 encoder blocks"):
        insp.module("encoder.block[2]")
    with pytest.raises(LocatorError, match="unknown block part 'cross_attn'"):
        insp.module("encoder.block[0].cross_attn")


def test_each_stack_records_its_own_embedding_call() -> None:
    # On transformers 4.x both stacks call the one `shared` module.
    config = t5_config()
    model = build_tiny(transformers.T5ForConditionalGeneration, config)
    insp = Inspector(model)
    inputs = example_inputs(config)
    with torch.no_grad(), insp.capture("encoder.embed", "decoder.embed") as cap:
        model(**inputs)
    assert torch.equal(cap["encoder.embed"].output, model.shared(inputs["input_ids"]))
    assert torch.equal(cap["decoder.embed"].output, model.shared(inputs["decoder_input_ids"]))
    assert len(cap["decoder.embed"].steps) == 1


def test_hidden_states_of_each_stack_equal_hugging_face() -> None:
    config = t5_config()
    model = build_tiny(transformers.T5Model, config)
    insp = Inspector(model)
    inputs = example_inputs(config)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        encoder = insp.hidden_states(**inputs, stack="encoder")
        decoder = insp.hidden_states(**inputs, stack="decoder", indices=[0, -1])
    assert len(encoder) == 3
    assert all(torch.equal(a, b) for a, b in zip(encoder, out.encoder_hidden_states, strict=True))
    assert torch.equal(decoder[0], out.decoder_hidden_states[0])
    assert torch.equal(decoder[1], out.decoder_hidden_states[-1])


def test_sub_layers_add_the_residual() -> None:
    config = t5_config()
    model = build_tiny(transformers.T5ForConditionalGeneration, config)
    insp = Inspector(model)
    parts = ("encoder.block[0]", "encoder.block[0].attn", "encoder.block[0].attn_layer")
    with torch.no_grad(), insp.capture(*parts) as cap:
        model(**example_inputs(config))
    block_in = cap["encoder.block[0]"].input
    attn = cap["encoder.block[0].attn"].output
    assert torch.allclose(cap["encoder.block[0].attn_layer"].output, block_in + attn, atol=1e-6)


def test_encoder_model_has_only_the_encoder_stack() -> None:
    model = build_tiny(transformers.T5EncoderModel, t5_config())
    insp = Inspector(model)
    assert insp.adapter.name == "t5-encoder"
    assert insp.module("block[0]") is model.encoder.block[0]
    assert insp.module("encoder.block[0]") is model.encoder.block[0]
    assert insp.module("final_norm") is model.encoder.final_layer_norm
    with pytest.raises(LocatorError, match="no stack named 'decoder'"):
        insp.module("decoder.block[0]")
    assert "decoder_input_ids" not in example_inputs(t5_config(), model=model)


def test_generate_records_the_encoder_once_and_the_decoder_per_step() -> None:
    # Equal depths: transformers sizes the decoder's cache by num_layers.
    config = t5_config(num_decoder_layers=2)
    model = build_tiny(transformers.T5ForConditionalGeneration, config)
    insp = Inspector(model)
    inputs = example_inputs(config, model=model)
    inputs.pop("decoder_input_ids")
    with torch.no_grad(), insp.capture("encoder.embed", "decoder.embed") as cap:
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert len(cap["encoder.embed"].steps) == 1
    steps = cap["decoder.embed"].steps
    assert len(steps) == 3
    for k, step in enumerate(steps):
        assert torch.equal(step.output, model.shared(out[:, k : k + 1]))
