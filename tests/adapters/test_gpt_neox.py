"""GPT-NeoX adapter (parallel and sequential residual), proven against Hugging Face."""

from __future__ import annotations

import pytest
import transformers

from introspect import Inspector
from introspect.testing import (
    assert_checks,
    assert_classes_conformant,
    build_tiny,
    check_block_sums,
    example_inputs,
)


def neox_config(parallel: bool) -> transformers.GPTNeoXConfig:
    return transformers.GPTNeoXConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=64,
        use_parallel_residual=parallel,
        bos_token_id=1,
        eos_token_id=2,
    )


def test_sequential_conformant() -> None:
    # The generic tiny config keeps the default, use_parallel_residual=True.
    assert_classes_conformant(
        neox_config(parallel=False),
        [transformers.GPTNeoXForCausalLM, transformers.GPTNeoXModel],
        expect_adapter="gpt_neox",
    )


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_mlp_norm_reads_what_the_residual_mode_says(parallel: bool) -> None:
    config = neox_config(parallel)
    model = build_tiny(transformers.GPTNeoXForCausalLM, config)
    insp = Inspector(model)
    assert insp.path("block[1].mlp_norm") == "gpt_neox.layers.1.post_attention_layernorm"
    # Parallel: the MLP's norm reads the block input; sequential: the input plus attention.
    relation = "parallel" if parallel else "sequential"
    assert_checks(check_block_sums(model, example_inputs(config), relation=relation))


def test_lm_head_is_the_output_embedding() -> None:
    # embed_out on transformers 4.x, lm_head on 5.x: one locator for both.
    model = build_tiny(transformers.GPTNeoXForCausalLM, neox_config(True))
    insp = Inspector(model)
    assert insp.module("lm_head") is model.get_output_embeddings()
    assert insp.path("final_norm") == "gpt_neox.final_layer_norm"


def test_base_model_paths() -> None:
    insp = Inspector(build_tiny(transformers.GPTNeoXModel, neox_config(True)))
    assert insp.path("final_norm") == "final_layer_norm"
