"""GPT-Neo and GPT-BigCode adapters, proven against Hugging Face on tiny random models."""

from __future__ import annotations

import pytest
import torch
import transformers

from introspect import Inspector
from introspect.testing import assert_classes_conformant, build_tiny, example_inputs


def neo_config() -> transformers.GPTNeoConfig:
    return transformers.GPTNeoConfig(
        num_layers=2,
        hidden_size=32,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        vocab_size=64,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )


def bigcode_config(multi_query: bool = True) -> transformers.GPTBigCodeConfig:
    return transformers.GPTBigCodeConfig(
        n_layer=3,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=64,
        multi_query=multi_query,
        bos_token_id=1,
        eos_token_id=2,
    )


def test_gpt_neo_local_window_conformant() -> None:
    # A 4-token local window that seven tokens cross (the generic tiny config's is 256).
    assert_classes_conformant(
        neo_config(),
        [transformers.GPTNeoForCausalLM, transformers.GPTNeoModel],
        expect_adapter="gpt_neo",
    )


def test_gpt_bigcode_multi_head_conformant() -> None:
    # The generic tiny config keeps the default, multi_query=True.
    assert_classes_conformant(
        bigcode_config(multi_query=False),
        [transformers.GPTBigCodeForCausalLM, transformers.GPTBigCodeModel],
        expect_adapter="gpt_bigcode",
    )


@pytest.mark.parametrize(
    ("model_cls", "config"),
    [
        (transformers.GPTNeoForCausalLM, neo_config()),
        (transformers.GPTBigCodeForCausalLM, bigcode_config()),
    ],
)
def test_first_hidden_state_adds_positions(model_cls: type, config: object) -> None:
    model = build_tiny(model_cls, config)
    insp = Inspector(model)
    with insp.capture("embed", "pos_embed", "block[0]") as cap:
        model(**example_inputs(config))
    expected = cap["embed"].output + cap["pos_embed"].output
    assert torch.allclose(cap["block[0]"].input, expected, atol=1e-6)
    assert insp.path("pos_embed") == "transformer.wpe"


@pytest.mark.parametrize(
    ("model_cls", "config"),
    [(transformers.GPTNeoModel, neo_config()), (transformers.GPTBigCodeModel, bigcode_config())],
)
def test_base_model_paths(model_cls: type, config: object) -> None:
    assert Inspector(build_tiny(model_cls, config)).path("final_norm") == "ln_f"
