"""MPT adapter: ALiBi blocks whose MLP (``ffn``) adds the residual itself."""

from __future__ import annotations

import torch
import transformers

from introspect import Inspector
from introspect.testing import assert_classes_conformant, build_tiny, example_inputs


def mpt_config(no_bias: bool = True) -> transformers.MptConfig:
    return transformers.MptConfig(
        n_layers=2,
        d_model=32,
        n_heads=2,
        expansion_ratio=2,
        max_seq_len=64,
        vocab_size=64,
        no_bias=no_bias,
        bos_token_id=1,
        eos_token_id=2,
    )


def test_biases_conformant() -> None:
    # The generic tiny config keeps the default, no_bias=True.
    assert_classes_conformant(
        mpt_config(no_bias=False),
        [transformers.MptForCausalLM, transformers.MptModel],
        expect_adapter="mpt",
    )


def test_mlp_record_includes_the_residual() -> None:
    config = mpt_config()
    model = build_tiny(transformers.MptForCausalLM, config)
    insp = Inspector(model)
    assert insp.adapter.residual_in == ("mlp",)
    names = ("block[0]", "block[0].attn", "block[0].mlp", "block[0].mlp_norm")
    with insp.capture(*names) as cap:
        model(**example_inputs(config))
    after_attn = cap["block[0]"].input + cap["block[0].attn"].output
    assert torch.allclose(cap["block[0].mlp_norm"].input, after_attn, atol=1e-6)
    assert torch.equal(cap["block[0].mlp"].args[1], cap["block[0].mlp_norm"].input)
    assert torch.equal(cap["block[0].mlp"].output, cap["block[0]"].output)


def test_base_model_paths() -> None:
    insp = Inspector(build_tiny(transformers.MptModel, mpt_config()))
    assert insp.path("block[1].mlp") == "blocks.1.ffn"
