"""BitNet: the Llama layout with a norm between the heads and ``o_proj``, proven head by head.

BitNet's attention RMS-normalises the heads' concatenated output (``attn_sub_norm``) before
``o_proj``: ``z`` is read before that norm, where it is each head's mix of values, and each
head's ``result`` is its slice of the normed concatenation through ``o_proj``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from introspect import Inspector
from introspect.testing import assert_checks, build_tiny, check_heads, example_inputs, tiny_config


def _bitnet() -> tuple[Any, dict[str, Any]]:
    if "bitnet" not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no bitnet")
    config = tiny_config("bitnet")
    config._attn_implementation = "eager"
    return build_tiny(transformers.BitNetForCausalLM, config), example_inputs(config)


def test_bitnet_head_layout_is_proven() -> None:
    model, inputs = _bitnet()
    insp = Inspector(model)
    assert insp.adapter.name == "bitnet"
    checks = assert_checks(check_heads(model, inputs), "bitnet heads")
    assert any(c.name == "block[1].attn.pattern == output_attentions" for c in checks)
    assert any(c.name == "block[1].attn.z == pattern · v" for c in checks)


def test_bitnet_z_is_read_before_the_sub_norm() -> None:
    model, inputs = _bitnet()
    insp = Inspector(model)
    attn = model.model.layers[1].self_attn
    seen: dict[str, torch.Tensor] = {}
    handles = [
        attn.attn_sub_norm.register_forward_pre_hook(lambda m, a: seen.update(norm_in=a[0])),
        attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(o_in=a[0])),
    ]
    try:
        with torch.no_grad(), insp.capture("block[1].attn.z", "block[1].attn.result") as cap:
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    z = cap["block[1].attn.z"].output
    assert torch.equal(z.flatten(-2), seen["norm_in"])
    assert not torch.allclose(z.flatten(-2), seen["o_in"])
    # Each head's result is its slice of the normed concatenation through o_proj.
    heads = insp.num_heads
    normed = seen["o_in"].unflatten(-1, (heads, -1))
    weight = attn.o_proj.weight.view(attn.o_proj.weight.shape[0], heads, -1)
    by_hand = torch.einsum("bshd,ohd->bsho", normed, weight)
    assert torch.allclose(cap["block[1].attn.result"].output, by_hand, atol=1e-6)


def test_bitnet_head_attribution_sums_to_the_logit() -> None:
    model, inputs = _bitnet()
    insp = Inspector(model)
    dla = insp.direct_logit_attribution(inputs, token=3, per_head=True)
    with torch.no_grad():
        logit = model(**inputs).logits[:, -1, 3]
    assert any(".head[" in label for label in dla.labels)
    assert torch.allclose(dla.values.sum(dim=-1).to(logit.dtype), logit, atol=1e-4)
