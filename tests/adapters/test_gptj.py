"""GPT-J and CodeGen adapters, proven against Hugging Face on tiny random models."""

from __future__ import annotations

import pytest
import torch
import transformers

from introspect import Inspector, MissingPartError
from introspect.testing import assert_checks, build_tiny, check_block_sums, example_inputs


def gptj_config() -> transformers.GPTJConfig:
    return transformers.GPTJConfig(
        n_layer=2,
        n_embd=32,
        n_head=2,
        rotary_dim=8,
        vocab_size=64,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )


def codegen_config() -> transformers.CodeGenConfig:
    # CodeGen's attention splits heads into 4 groups (mp_num=4 on transformers 4.x), so
    # n_head must be a multiple of 4.
    return transformers.CodeGenConfig(
        n_layer=2,
        n_embd=32,
        n_head=4,
        rotary_dim=4,
        vocab_size=64,
        n_positions=64,
        n_ctx=64,
        bos_token_id=1,
        eos_token_id=2,
    )


CASES = [
    ("gptj", gptj_config(), transformers.GPTJForCausalLM, transformers.GPTJModel),
    ("codegen", codegen_config(), transformers.CodeGenForCausalLM, transformers.CodeGenModel),
]


@pytest.mark.parametrize(("name", "config", "head_cls", "base_cls"), CASES)
def test_parallel_block(name: str, config: object, head_cls: type, base_cls: type) -> None:
    model = build_tiny(head_cls, config)
    insp = Inspector(model)
    with insp.capture("block[0]", "block[0].attn", "block[0].mlp", "block[0].attn_norm") as cap:
        model(**example_inputs(config))
    # One norm feeds both sub-layers, and the block adds both to its input.
    assert torch.equal(cap["block[0].attn"].input, cap["block[0].attn_norm"].output)
    assert_checks(check_block_sums(model, example_inputs(config), relation="parallel"))
    with pytest.raises(MissingPartError, match="parallel"):
        insp.module("block[0].mlp_norm")


@pytest.mark.parametrize(("name", "config", "head_cls", "base_cls"), CASES)
def test_base_model_paths(name: str, config: object, head_cls: type, base_cls: type) -> None:
    assert Inspector(build_tiny(base_cls, config)).path("block[-1].attn") == "h.1.attn"
