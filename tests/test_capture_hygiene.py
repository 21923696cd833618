"""After any capture, on any exit path, every module's hook dictionaries are as they were."""

from __future__ import annotations

import pytest
import torch
from _support.models import hook_state
from torch import nn

from introspect import Inspector


class Boom(Exception):
    pass


def _raise_in(module: nn.Module, exc: BaseException) -> object:
    def hook(mod: nn.Module, args: tuple[object, ...]) -> None:
        raise exc

    return module.register_forward_pre_hook(hook)


def _warm_up(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    # transformers 5.x installs its own output-recording hooks on first use: let it, first.
    with torch.no_grad():
        model(**inputs, output_hidden_states=True)


@pytest.mark.parametrize("exc", [Boom("inside the forward"), KeyboardInterrupt()])
def test_hooks_removed_when_forward_raises(
    lm: nn.Module, inputs: dict[str, torch.Tensor], exc: BaseException
) -> None:
    _warm_up(lm, inputs)
    insp = Inspector(lm)
    handle = _raise_in(insp.module("block[1]"), exc)
    before = hook_state(lm)
    with pytest.raises(type(exc)), insp.capture("embed", "block[:]", "final_norm", "lm_head"):
        lm(**inputs)
    assert hook_state(lm) == before
    handle.remove()  # type: ignore[attr-defined]


def test_hooks_removed_after_normal_and_early_stop(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    _warm_up(lm, inputs)
    insp = Inspector(lm)
    before = hook_state(lm)
    with torch.no_grad(), insp.capture("block[0]", "block[-1].mlp"):
        lm(**inputs)
    assert hook_state(lm) == before
    with torch.no_grad(), insp.capture("block[1]", stop=True) as cap:
        lm(**inputs)
    assert cap.stopped
    assert hook_state(lm) == before
    insp.hidden_states(**inputs, indices=[1])
    assert hook_state(lm) == before


def test_hf_outputs_unchanged_after_early_stop(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm)
    with torch.no_grad():
        before = lm(**inputs, output_hidden_states=True)
        with insp.capture("block[0]", stop=True):
            lm(**inputs)
        after = lm(**inputs, output_hidden_states=True)
    assert torch.equal(before.logits, after.logits)
    assert all(
        torch.equal(a, b) for a, b in zip(before.hidden_states, after.hidden_states, strict=True)
    )


def test_bad_locator_leaves_no_hook(lm: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    insp = Inspector(lm)
    before = hook_state(lm)
    with pytest.raises(ValueError):
        insp.capture("block[0]", "block[99]")
    assert hook_state(lm) == before


def test_capture_cannot_be_entered_twice(lm: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    insp = Inspector(lm)
    before = hook_state(lm)
    cap = insp.capture("block[0]")
    with cap, pytest.raises(Exception, match="already active"), cap:
        pass
    assert hook_state(lm) == before


def test_two_inspectors_are_independent(inputs: dict[str, torch.Tensor]) -> None:
    from _support.models import gpt2_config, llama_config
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    from introspect.testing import build_tiny

    a = build_tiny(GPT2LMHeadModel, gpt2_config())
    b = build_tiny(LlamaForCausalLM, llama_config())
    ia, ib = Inspector(a), Inspector(b)
    with torch.no_grad(), ia.capture("block[0]") as ca, ib.capture("block[0]") as cb:
        a(**inputs)
    assert "block[0]" in ca and "block[0]" not in cb
