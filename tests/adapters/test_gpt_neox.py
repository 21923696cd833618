"""GPT-NeoX adapter (parallel and sequential residual), proven against Hugging Face."""

from __future__ import annotations

import pytest
import torch
import transformers

from introspect import Inspector, MissingPartError
from introspect.testing import assert_classes_conformant, build_tiny, example_inputs


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


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_conformant(parallel: bool) -> None:
    assert_classes_conformant(
        neox_config(parallel),
        [transformers.GPTNeoXForCausalLM, transformers.GPTNeoXModel],
        expect_adapter="gpt_neox",
    )


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_mlp_norm_reads_what_the_residual_mode_says(parallel: bool) -> None:
    config = neox_config(parallel)
    model = build_tiny(transformers.GPTNeoXForCausalLM, config)
    insp = Inspector(model)
    names = ("block[1]", "block[1].attn", "block[1].mlp", "block[1].mlp_norm")
    with insp.capture(*names) as cap:
        model(**example_inputs(config))
    block_in, attn_out = cap["block[1]"].input, cap["block[1].attn"].output
    mlp_out = cap["block[1].mlp"].output
    # Parallel: the MLP's norm reads the block input; sequential: the input plus attention.
    mlp_norm_in = block_in if parallel else block_in + attn_out
    assert torch.allclose(cap["block[1].mlp_norm"].input, mlp_norm_in, atol=1e-6)
    assert torch.allclose(cap["block[1]"].output, block_in + attn_out + mlp_out, atol=1e-6)


def test_lm_head_is_the_output_embedding() -> None:
    # embed_out on transformers 4.x, lm_head on 5.x: one locator for both.
    model = build_tiny(transformers.GPTNeoXForCausalLM, neox_config(True))
    insp = Inspector(model)
    assert insp.module("lm_head") is model.get_output_embeddings()
    assert insp.path("final_norm") == "gpt_neox.final_layer_norm"


def test_base_model_has_no_head() -> None:
    insp = Inspector(build_tiny(transformers.GPTNeoXModel, neox_config(True)))
    with pytest.raises(MissingPartError, match="no lm_head"):
        insp.logits(torch.zeros(1, 3, 32))
