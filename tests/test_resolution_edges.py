"""Locators always name what the model holds now, and a malformed one is refused every time.

Regression tests for defects 6 (stale modules after the model changes), 12 (a malformed
locator accepted or refused depending on history) and 16 (locator edge errors).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _support.models import gpt2_config, llama_config
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from introspect import Inspector, Locator
from introspect._errors import IntrospectError, LocatorError


def _gpt2(layers: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config(layers)).eval()


IDS = torch.tensor([[3, 1, 4, 1, 5]])


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__)
        for m in model.modules()
    )


# -- defect 6: the model changes after the Inspector was built --------------------------------


def test_replaced_block_is_the_one_steered_and_captured() -> None:
    model = _gpt2()
    insp = Inspector(model)
    with insp.capture("block[0]") as cap:  # fills the resolution caches
        model(IDS)
    torch.manual_seed(1)
    new_block = copy.deepcopy(model.transformer.h[0])
    for p in new_block.parameters():
        p.data.normal_(0, 0.1)
    model.transformer.h[0] = new_block
    assert insp.module("block[0]") is new_block

    with insp.capture("block[0]") as cap:
        model(IDS)
    ref = new_block(cap["block[0]"].input)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert torch.allclose(cap["block[0]"].output, ref, atol=1e-6)

    vector = torch.full((64,), 0.5)
    plain = model(IDS, output_hidden_states=True).hidden_states[1]
    hooks = _hooks(model)  # transformers 5.x adds its own on first use
    with insp.steer("block[0]", vector):
        steered = model(IDS, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(steered - plain, vector.expand_as(plain), atol=1e-5)
    assert _hooks(model) == hooks


def test_deleted_block_resolves_against_the_new_count() -> None:
    model = _gpt2(4)
    insp = Inspector(model)
    assert insp.path("block[-1]") == "transformer.h.3"
    del model.transformer.h[3]
    assert insp.num_blocks == 3
    assert insp.path("block[-1]") == "transformer.h.2"
    with pytest.raises(LocatorError, match=r"3 blocks: use -3\.\.2"):
        insp.module("block[3]")


def test_replaced_module_list_is_seen() -> None:
    model = _gpt2(4)
    insp = Inspector(model)
    assert insp.num_blocks == 4
    model.transformer.h = nn.ModuleList(list(model.transformer.h)[:2])
    model.config.n_layer = 2
    assert insp.num_blocks == 2
    ours = insp.hidden_states(input_ids=IDS)
    theirs = model(IDS, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_replaced_sub_module_is_seen() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(2)).eval()
    insp = Inspector(model)
    old = insp.module("block[1].mlp")
    model.model.layers[1].mlp = copy.deepcopy(old)
    assert insp.module("block[1].mlp") is model.model.layers[1].mlp is not old
    with insp.ablate("block[1].mlp"), insp.capture("block[1].mlp") as cap:
        model(IDS)
    assert cap["block[1].mlp"].output.abs().max().item() == 0.0


def test_removed_block_list_is_a_clear_error() -> None:
    model = _gpt2(2)
    insp = Inspector(model)
    del model.transformer.h
    with pytest.raises(IntrospectError, match="changed since it was inspected"):
        insp.module("block[0]")


# -- defect 12: one text, one locator -----------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["block[1].mlp.input.output", "block[1].input.mlp", "block[0].output.output"]
)
def test_side_inside_a_locator_is_refused_whatever_came_before(text: str) -> None:
    model = _gpt2(2)
    insp = Inspector(model)
    with pytest.raises(LocatorError):
        insp.steer(text, torch.ones(64))
    with insp.capture("block[1].mlp.input", "block[1].mlp") as cap:
        model(IDS)
    assert "block[1].mlp.input" in cap
    with pytest.raises(LocatorError):
        insp.steer(text, torch.ones(64))
    with pytest.raises(LocatorError):
        insp.capture(text)
    assert _hooks(model) == 0


_names = st.sampled_from(["attn", "mlp", "attn_norm"])
_locators = st.builds(
    lambda stack, kind, index, sl, sub, side: (
        (f"{stack}." if stack else "")
        + (
            f"block[{index}]"
            if kind == "index"
            else f"block[{sl[0] if sl[0] is not None else ''}:{sl[1] if sl[1] is not None else ''}]"
            if kind == "slice"
            else "final_norm"
        )
        + (f".{sub}" if sub and kind != "name" else "")
        + (f".{side}" if side else "")
    ),
    st.sampled_from([None, "encoder", "decoder"]),
    st.sampled_from(["index", "slice", "name"]),
    st.integers(-50, 50),
    st.tuples(st.none() | st.integers(-9, 9), st.none() | st.integers(-9, 9)),
    st.none() | _names,
    st.sampled_from([None, "input", "output"]),
)


@given(_locators, _locators)
@settings(max_examples=300, deadline=None)
def test_distinct_locators_print_distinctly(a: str, b: str) -> None:
    la, lb = Locator.parse(a), Locator.parse(b)
    assert Locator.parse(str(la)) == la
    assert (str(la) == str(lb)) == (la == lb)


# -- defect 16: locator edge errors -------------------------------------------------------------


def test_huge_index_is_a_locator_error() -> None:
    insp = Inspector(_gpt2(2))
    with pytest.raises(LocatorError, match="out of range for any model"):
        insp.locator("block[" + "9" * 5000 + "]")
    with pytest.raises(LocatorError, match="out of range for any model"):
        insp.locator("block[:" + "9" * 5000 + "]")


@pytest.mark.parametrize("bad", [["block[0]"], {"block": 0}, 3, None])
def test_a_non_string_locator_is_a_locator_error(bad: object) -> None:
    model = _gpt2(2)
    insp = Inspector(model)
    with pytest.raises(LocatorError, match="a locator must be a string"):
        insp.locator(bad)  # type: ignore[arg-type]
    with pytest.raises(LocatorError, match="a locator must be a string"):
        insp.capture(bad)  # type: ignore[arg-type]
    with pytest.raises(LocatorError, match="a locator must be a string"):
        insp.steer(bad, torch.ones(64))  # type: ignore[arg-type]
    assert _hooks(model) == 0


@pytest.mark.parametrize("text", ["block[5:]", "block[3:1]", "block[-9:-8]"])
def test_an_empty_slice_is_an_error_everywhere(text: str) -> None:
    model = _gpt2(4)
    insp = Inspector(model)
    with pytest.raises(LocatorError, match="selects no block"):
        insp.capture(text)
    with pytest.raises(LocatorError, match="selects no block"):
        insp.steer(text, torch.ones(64))
    with pytest.raises(LocatorError, match="selects no block"):
        insp.modules(text)
    assert _hooks(model) == 0
