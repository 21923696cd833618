"""OPT adapter: pre-LN, projected (word_embed_proj_dim != hidden_size) and post-LN configs."""

from __future__ import annotations

import pytest
import torch
import transformers

from introspect import Inspector, MissingPartError
from introspect.testing import assert_classes_conformant, build_tiny, example_inputs

HIDDEN = 32
PROJ = 16


def opt_config(proj_dim: int = HIDDEN, pre_ln: bool = True) -> transformers.OPTConfig:
    return transformers.OPTConfig(
        num_hidden_layers=2,
        hidden_size=HIDDEN,
        ffn_dim=64,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        word_embed_proj_dim=proj_dim,
        do_layer_norm_before=pre_ln,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )


VARIANTS = {
    "pre_ln": opt_config(),
    "projected": opt_config(proj_dim=PROJ),
    "post_ln": opt_config(pre_ln=False),
    "post_ln_projected": opt_config(proj_dim=PROJ, pre_ln=False),
}


# pre_ln is the generic tiny config (word_embed_proj_dim shrinks with hidden_size), proven by
# tests/test_conformance_all.py.
@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"pre_ln"}))
def test_conformant(variant: str) -> None:
    assert_classes_conformant(
        VARIANTS[variant],
        [transformers.OPTForCausalLM, transformers.OPTModel],
        expect_adapter="opt",
    )


@pytest.mark.parametrize("model_cls", [transformers.OPTForCausalLM, transformers.OPTModel])
def test_project_out_narrows_the_last_hidden_state(model_cls: type) -> None:
    config = VARIANTS["projected"]
    model = build_tiny(model_cls, config)
    insp = Inspector(model)
    hidden = insp.hidden_states(**example_inputs(config))
    assert [h.shape[-1] for h in hidden] == [HIDDEN, HIDDEN, PROJ]
    assert str(insp.hidden_state_locator(-1)) == "project_out"
    assert str(insp.hidden_state_locator(1)) == "block[0]"
    with insp.capture("embed", "project_in", "pos_embed", "block[0]") as cap:
        model(**example_inputs(config))
    assert cap["embed"].output.shape[-1] == PROJ
    expected_first = cap["project_in"].output + cap["pos_embed"].output
    assert torch.allclose(cap["block[0]"].input, expected_first, atol=1e-6)


def test_no_projection_is_a_missing_part_with_a_reason() -> None:
    insp = Inspector(build_tiny(transformers.OPTForCausalLM, VARIANTS["pre_ln"]))
    assert str(insp.hidden_state_locator(-1)) == "final_norm"
    assert insp.path("final_norm") == "model.decoder.final_layer_norm"
    with pytest.raises(MissingPartError, match="word_embed_proj_dim == hidden_size"):
        insp.module("project_out")


@pytest.mark.parametrize("proj_dim", [HIDDEN, PROJ], ids=["plain", "projected"])
def test_post_ln_has_no_final_norm(proj_dim: int) -> None:
    config = opt_config(proj_dim=proj_dim, pre_ln=False)
    model = build_tiny(transformers.OPTForCausalLM, config)
    insp = Inspector(model)
    with pytest.raises(MissingPartError, match="post-LN"):
        insp.module("final_norm")
    last = "project_out" if proj_dim != HIDDEN else "block[1]"
    assert str(insp.hidden_state_locator(-1)) == last
    # With no norm, the final-norm step is the identity.
    h = torch.randn(1, 3, HIDDEN)
    assert torch.equal(insp.apply_final_norm(h), h)
    with torch.no_grad():
        theirs = model(**example_inputs(config), output_hidden_states=True).hidden_states
        with insp.capture("block[-1]") as cap:
            model(**example_inputs(config))
    raw = cap["block[-1]"].output
    expected = model.model.decoder.project_out(raw) if proj_dim != HIDDEN else raw
    assert torch.allclose(theirs[-1], expected, atol=1e-6)


def test_mlp_is_inline() -> None:
    insp = Inspector(build_tiny(transformers.OPTForCausalLM, VARIANTS["pre_ln"]))
    with pytest.raises(MissingPartError, match="fc1"):
        insp.module("block[0].mlp")
    assert insp.path("block[0].fc2") == "model.decoder.layers.0.fc2"


def test_base_model_paths() -> None:
    insp = Inspector(build_tiny(transformers.OPTModel, VARIANTS["projected"]))
    assert insp.path("project_out") == "decoder.project_out"
