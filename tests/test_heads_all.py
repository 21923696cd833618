"""Every built-in adapter's head layout, proven on every case of ``test_conformance_all``.

For each (adapter, model type, class) the tiny model runs with left- and right-padded batches
and :func:`introspect.testing.check_heads` proves, block by block and for every attention part
with a head layout: ``pattern`` equals Hugging Face's ``output_attentions``; the pattern
recomputed from the captured ``q``/``k`` equals it, and so does ``softmax(scores)``; ``scores``
equal those recomputed; ``q == rotary(q_pre)`` and ``k == rotary(k_pre)`` with the model's own
rotary function (``q_pre == q`` where none runs); ``result`` sums to the output projection;
``o(z)`` reproduces it; a head ablation equals the hand computation. An adapter with attention
must state a head layout (or why it has none); an attention-free one refuses head locators.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _support.registry_cases import CASES, SPECS, Built

from introspect import Inspector, MissingPartError
from introspect.testing import assert_checks, build_tiny, check_heads


def _padded(inputs: dict[str, Any], side: str) -> dict[str, Any]:
    out = dict(inputs)
    mask = inputs["attention_mask"].clone()
    if side == "left":
        mask[0, :2] = 0
    else:
        mask[0, -2:] = 0
    out["attention_mask"] = mask
    return out


HEAD_CASES = [c for c in CASES if SPECS[c.adapter].unsupported is None]


@pytest.mark.parametrize("case", HEAD_CASES, ids=[c.id for c in HEAD_CASES])
def test_heads(case: Any, built: Callable[[Any], Built]) -> None:
    spec = SPECS[case.adapter]
    found = built(case)
    if spec.attn is None or not spec.heads:
        insp = Inspector(found.model)
        with pytest.raises(MissingPartError):
            insp.capture("block[0].attn.z")
        return
    model = found.model
    insp = Inspector(model)
    why = insp._resolver.head_tap(insp.locator(f"{_first_block(spec)}.attn")).why_not("pattern")
    if why is not None and "attn_implementation='eager'" in why:
        # transformers 4.x chose an sdpa class at load: q, k and v are read as loaded, the
        # pattern needs the model loaded eager (and then every check runs).
        names = [f"{_first_block(spec)}.attn.{s}" for s in "qkv"]
        with torch.no_grad(), insp.capture(*names) as cap:
            model(**found.inputs)
        assert cap[names[0]].output.shape[2] == insp.num_heads_in(spec.stack_name)
        model = _eager_copy(case, model)
    for side in ("left", "right"):
        checks = check_heads(model, _padded(found.inputs, side))
        assert checks, "no head checks ran"
        assert_checks(checks, f"{case.id} heads ({side} padding)")


def _first_block(spec: Any) -> str:
    return f"{spec.stack_name}.block[0]" if spec.stack_name else "block[0]"


def _eager_copy(case: Any, model: Any) -> Any:
    config = copy.deepcopy(model.config)  # the model is shared by the whole run: leave it be
    config._attn_implementation = "eager"
    fresh = build_tiny(type(model), config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_every_attention_adapter_states_heads() -> None:
    lacking = [
        name
        for name, spec in SPECS.items()
        if spec.unsupported is None
        and spec.attn is not None
        and not spec.heads
        and "heads" not in spec.missing
    ]
    assert not lacking, f"adapters with attention but no head layout: {lacking}"


def test_attention_free_refuses_with_reason() -> None:
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(
        MambaConfig(num_hidden_layers=2, hidden_size=32, vocab_size=64, state_size=4)
    ).eval()
    insp = Inspector(model)
    with pytest.raises(MissingPartError, match=r"block\[0\].attn"):
        insp.capture("block[0].attn.pattern")
    with torch.no_grad():
        model(torch.tensor([[1, 2]]))
