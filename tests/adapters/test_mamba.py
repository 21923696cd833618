"""Mamba, FalconMamba, Mamba2: no embedding entry in hidden_states, a final RMSNorm."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from _support.models import mamba2_config
from packaging.version import Version

from introspect import Inspector, MissingPartError
from introspect.testing import assert_classes_conformant, build_tiny, example_inputs


def mamba_config() -> transformers.MambaConfig:
    return transformers.MambaConfig(
        num_hidden_layers=3, hidden_size=32, state_size=8, expand=2, conv_kernel=4, vocab_size=96
    )


def falcon_mamba_config() -> transformers.FalconMambaConfig:
    return transformers.FalconMambaConfig(
        num_hidden_layers=2, hidden_size=32, state_size=8, expand=2, conv_kernel=4, vocab_size=96
    )


FAMILIES: dict[str, tuple[Any, type, type, str]] = {
    "mamba": (mamba_config, transformers.MambaForCausalLM, transformers.MambaModel, "mamba"),
    "falcon_mamba": (
        falcon_mamba_config,
        transformers.FalconMambaForCausalLM,
        transformers.FalconMambaModel,
        "mamba",
    ),
    "mamba2": (mamba2_config, transformers.Mamba2ForCausalLM, transformers.Mamba2Model, "mamba2"),
}


def test_mamba2_chunked_scan_conformant() -> None:
    # chunk_size=4 splits seven tokens into chunks (the generic tiny config's chunk is 256).
    config_fn, head_cls, base_cls, adapter = FAMILIES["mamba2"]
    assert_classes_conformant(config_fn(), [head_cls, base_cls], expect_adapter=adapter)


def _has_embedding_entry(family: str) -> bool:
    """Measured, not read from the adapter: Mamba2's hidden_states gained the embedding
    output as entry 0 in transformers 5.25; Mamba and FalconMamba have none on any version."""
    return family == "mamba2" and Version(transformers.__version__) >= Version("5.25.0.dev0")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_states_layout_on_this_transformers(family: str) -> None:
    config_fn, head_cls, _, _ = FAMILIES[family]
    config = config_fn()
    model = build_tiny(head_cls, config)
    insp = Inspector(model)
    n = insp.num_blocks
    inputs = example_inputs(config)
    locs = [f"block[{i}]" for i in range(n)]
    with torch.no_grad(), insp.capture("embed", *locs, "final_norm") as cap:
        out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == n + 1 == insp.num_hidden_states()
    # Block 0 reads the raw lookup.
    assert torch.equal(cap["block[0]"].input, cap["embed"].output)
    if _has_embedding_entry(family):
        assert torch.equal(hidden[0], cap["embed"].output)
        assert str(insp.hidden_state_locator(0)) == "block[0].input"
        for i in range(1, n):
            assert torch.equal(hidden[i], cap[f"block[{i - 1}]"].output)
            assert str(insp.hidden_state_locator(i)) == f"block[{i - 1}]"
        assert torch.equal(hidden[-1], cap["final_norm"].output)
        return
    for i in range(n):
        assert torch.equal(hidden[i], cap[f"block[{i}]"].output)
        assert str(insp.hidden_state_locator(i)) == f"block[{i}]"
    assert torch.equal(hidden[-1], cap["final_norm"].output)
    assert str(insp.hidden_state_locator(-1)) == "final_norm"
    # The raw lookup is not among the hidden states.
    assert not torch.equal(hidden[0], cap["embed"].output)


def test_mamba2_layout_is_data_per_version() -> None:
    from introspect import get_registry

    spec = get_registry().specs["mamba2"]
    assert spec.on_transformers("5.24.0").hidden_states_start == "block_output"
    assert spec.on_transformers("4.57.6").hidden_states_start == "block_output"
    assert spec.on_transformers("5.25.0").hidden_states_start == "block_input"
    assert get_registry().specs["mamba"].on_transformers("5.25.0").hidden_states_start == (
        "block_output"
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mixer_is_addressable_and_attn_mlp_say_why_not(family: str) -> None:
    config_fn, _, base_cls, _ = FAMILIES[family]
    model = build_tiny(base_cls, config_fn())
    insp = Inspector(model)
    assert insp.module("block[1].mixer") is model.layers[1].mixer
    assert insp.module("block[1].norm") is model.layers[1].norm
    with pytest.raises(MissingPartError, match=r"no attention.*block\[i\]\.mixer"):
        insp.module("block[0].attn")
    with pytest.raises(MissingPartError, match="no MLP"):
        insp.module("block[0].mlp")


def test_bfloat16_logits_cast_the_float32_stream_to_the_head_dtype() -> None:
    # residual_in_fp32 keeps the stream in float32; HF casts it to lm_head's dtype.
    config = mamba_config()
    model = build_tiny(transformers.MambaForCausalLM, config).to(torch.bfloat16)
    insp = Inspector(model)
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        out = model(**example_inputs(config))
    assert cap["block[-1]"].output.dtype == torch.float32
    ours = insp.logits(cap["block[-1]"].output)
    assert torch.allclose(ours.float(), out.logits.float(), atol=1e-2, rtol=1e-2)
