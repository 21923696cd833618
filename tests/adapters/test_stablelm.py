"""StableLM (sequential and parallel residual) and StarCoder2 adapters."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from introspect import Inspector, MissingPartError
from introspect.testing import assert_classes_conformant, build_tiny, example_inputs

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


def stablelm_config(**overrides: Any) -> transformers.StableLmConfig:
    settings: dict[str, Any] = {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    settings.update(overrides)
    return transformers.StableLmConfig(**settings)


def starcoder2_config() -> transformers.Starcoder2Config:
    return transformers.Starcoder2Config(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )


STABLELM = [transformers.StableLmForCausalLM, transformers.StableLmModel]


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_stablelm_conformant(parallel: bool) -> None:
    config = stablelm_config(use_parallel_residual=parallel)
    assert_classes_conformant(config, STABLELM, expect_adapter="stablelm")


@pytest.mark.skipif(
    TRANSFORMERS_4,
    reason="transformers 4.x cannot build qk_layernorm StableLM: its _init_weights zeroes the "
    "bias of the bias-free per-head LayerNorm and fails on None",
)
def test_stablelm_qk_layernorm_conformant() -> None:
    config = stablelm_config(use_parallel_residual=True, qk_layernorm=True)
    assert_classes_conformant(config, STABLELM, expect_adapter="stablelm")


def test_stablelm_parallel_block() -> None:
    config = stablelm_config(use_parallel_residual=True)
    model = build_tiny(transformers.StableLmForCausalLM, config)
    insp = Inspector(model)
    names = ("block[0]", "block[0].attn", "block[0].mlp", "block[0].attn_norm")
    with insp.capture(*names) as cap:
        model(**example_inputs(config))
    assert torch.equal(cap["block[0].mlp"].input, cap["block[0].attn_norm"].output)
    summed = cap["block[0]"].input + cap["block[0].attn"].output + cap["block[0].mlp"].output
    assert torch.allclose(cap["block[0]"].output, summed, atol=1e-6)
    with pytest.raises(MissingPartError, match="use_parallel_residual"):
        insp.module("block[0].mlp_norm")


def test_stablelm_sequential_has_mlp_norm() -> None:
    insp = Inspector(build_tiny(transformers.StableLmForCausalLM, stablelm_config()))
    assert insp.path("block[0].mlp_norm") == "model.layers.0.post_attention_layernorm"


def test_starcoder2_conformant() -> None:
    assert_classes_conformant(
        starcoder2_config(),
        [transformers.Starcoder2ForCausalLM, transformers.Starcoder2Model],
        expect_adapter="starcoder2",
    )


@pytest.mark.parametrize(
    ("model_cls", "config"),
    [
        (transformers.StableLmModel, stablelm_config()),
        (transformers.Starcoder2Model, starcoder2_config()),
    ],
)
def test_base_model_has_no_head(model_cls: type, config: object) -> None:
    insp = Inspector(build_tiny(model_cls, config))
    assert insp.path("final_norm") == "norm"
    with pytest.raises(MissingPartError, match="no lm_head"):
        insp.logits(torch.zeros(1, 3, 32))
