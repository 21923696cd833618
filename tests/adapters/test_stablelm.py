"""StableLM (sequential and parallel residual) and StarCoder2 adapters."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from introspect import Inspector, MissingPartError
from introspect.testing import (
    assert_checks,
    assert_classes_conformant,
    build_tiny,
    check_block_sums,
    example_inputs,
)

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


def test_stablelm_parallel_conformant() -> None:
    # The generic tiny config keeps the default, use_parallel_residual=False.
    config = stablelm_config(use_parallel_residual=True)
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
    assert torch.equal(cap["block[0].attn"].input, cap["block[0].attn_norm"].output)
    assert_checks(check_block_sums(model, example_inputs(config), relation="parallel"))
    with pytest.raises(MissingPartError, match="use_parallel_residual"):
        insp.module("block[0].mlp_norm")


def test_stablelm_sequential_has_mlp_norm() -> None:
    config = stablelm_config()
    model = build_tiny(transformers.StableLmForCausalLM, config)
    assert Inspector(model).path("block[0].mlp_norm") == "model.layers.0.post_attention_layernorm"
    assert_checks(check_block_sums(model, example_inputs(config), relation="sequential"))


@pytest.mark.parametrize(
    ("model_cls", "config"),
    [
        (transformers.StableLmModel, stablelm_config()),
        (transformers.Starcoder2Model, starcoder2_config()),
    ],
)
def test_base_model_paths(model_cls: type, config: object) -> None:
    assert Inspector(build_tiny(model_cls, config)).path("final_norm") == "norm"
