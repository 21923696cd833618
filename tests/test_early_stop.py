"""``capture(..., stop=True)``: values equal the full run, nothing after the last target runs,
and the model's hooks are as they were."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _support.models import hook_state
from torch import nn

from introspect import Inspector


def _forward_state(model: nn.Module) -> dict[str, Any]:
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


class Counter:
    """Counts calls of modules, by path (its hooks are removed by ``close``)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.calls = dict.fromkeys(modules, 0)
        self.handles = [
            module.register_forward_pre_hook(self._count(name)) for name, module in modules.items()
        ]

    def _count(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.calls[name] += 1

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(
    "locators",
    [["block[1]"], ["block[0]", "block[1].mlp"], ["block[1].attn"], ["embed", "block[0]"]],
)
def test_early_stop_values_equal_the_full_run(
    lm: nn.Module, inputs: dict[str, torch.Tensor], locators: list[str]
) -> None:
    insp = Inspector(lm)
    with torch.no_grad():
        with insp.capture(*locators) as full:
            lm(**inputs)
        with insp.capture(*locators, stop=True) as early:
            lm(**inputs)
    assert early.stopped and not full.stopped
    for loc in locators:
        assert torch.equal(early[loc].output, full[loc].output)
        assert torch.equal(early[loc].input, full[loc].input)


def test_nothing_after_the_last_target_runs(lm: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    insp = Inspector(lm)
    watched = {
        "block[1]": insp.module("block[1]"),
        "block[2]": insp.module("block[2]"),
        "block[1].mlp": insp.module("block[1].mlp"),
        "final_norm": insp.module("final_norm"),
        "lm_head": insp.module("lm_head"),
    }
    counter = Counter(watched)
    try:
        with torch.no_grad(), insp.capture("block[1].attn", stop=True) as cap:
            lm(**inputs)
            raise AssertionError("the forward should have stopped")  # pragma: no cover
    finally:
        counter.close()
    assert cap.stopped and cap["block[1].attn"].output.shape == (2, 6, 64)
    # block[1] started (its attention ran inside it); its MLP and everything after did not.
    assert counter.calls == {
        "block[1]": 1,
        "block[2]": 0,
        "block[1].mlp": 0,
        "final_norm": 0,
        "lm_head": 0,
    }


def test_input_only_stop_does_not_run_the_block(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm)
    counter = Counter({"block[2].mlp": insp.module("block[2].mlp")})
    try:
        with torch.no_grad():
            with insp.capture("block[2].input", stop=True) as cap:
                lm(**inputs)
            full = insp.hidden_states(**inputs)
    finally:
        counter.close()
    assert counter.calls == {"block[2].mlp": 1}  # only the hidden_states run reached it
    assert torch.equal(cap["block[2].input"].input, full[2])


def test_hooks_are_clean_after_early_stop(lm: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        lm(**inputs, output_hidden_states=True)  # let transformers 5.x install its own hooks
    insp = Inspector(lm)
    hooks, forwards = hook_state(lm), _forward_state(lm)
    with torch.no_grad(), insp.steer("block[0]", torch.ones(64)):
        with insp.capture("block[1]", stop=True) as cap:
            lm(**inputs)
        with insp.capture("block[1]") as full:
            lm(**inputs)
    assert torch.equal(cap["block[1]"].output, full["block[1]"].output)
    assert hook_state(lm) == hooks and _forward_state(lm) == forwards


def test_early_stop_with_generate_stops_after_the_prompt(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm)
    with torch.no_grad(), insp.capture("block[0]", stop=True) as cap:
        lm.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert cap.stopped and len(cap["block[0]"].steps) == 1
