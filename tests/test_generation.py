"""Captures and interventions during ``generate`` with a KV cache: one record per step, equal to
Hugging Face's own per-step hidden states; edits apply at every step."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
from _support.models import hook_state
from torch import nn

from introspect import Inspector

NEW_TOKENS = 4


def _generate(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: object) -> object:
    return model.generate(  # type: ignore[operator]
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs
    )


def test_every_step_of_every_block_equals_generate_hidden_states(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm)
    n = insp.num_hidden_states()
    locs = [insp.hidden_state_locator(i) for i in range(n)]
    with torch.no_grad(), insp.capture(*locs, "block[-1]") as cap:
        out = _generate(lm, inputs, output_hidden_states=True, return_dict_in_generate=True)
    theirs = out.hidden_states  # type: ignore[attr-defined]
    assert len(theirs) == NEW_TOKENS
    prompt = inputs["input_ids"].shape[1]
    for step, entries in enumerate(theirs):
        assert len(entries) == n
        for i, loc in enumerate(locs):
            rec = cap[str(loc.with_side("output"))].steps[step]
            ours = rec.input if loc.side == "input" else rec.output
            assert ours.shape == (2, prompt if step == 0 else 1, 64)
            assert torch.allclose(ours, entries[i], atol=1e-5), f"step {step}, {loc}"
        # The last block's own output, through the final norm, is the last entry.
        last = cap["block[-1]"].steps[step].output
        assert torch.allclose(insp.finish(last), entries[-1], atol=1e-5)
    # The contract spelling: one Record per step, reachable with a negative index too.
    assert len(cap["block[-1]"].steps) == NEW_TOKENS
    assert cap["block[-1]"] is cap[f"block[{insp.num_blocks - 1}]"]


def test_one_tensor_over_all_positions(lm: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    insp = Inspector(lm)
    with torch.no_grad():
        with insp.capture("block[1]", "block[2].input") as cap:
            sequences = _generate(lm, inputs)
        with insp.capture("block[1]", "block[2].input") as full:
            lm(input_ids=sequences[:, :-1])  # type: ignore[index]
        with insp.capture("block[1]", positions="last") as last:
            _generate(lm, inputs)
    prompt = inputs["input_ids"].shape[1]
    joined = cap.concat("block[1]")
    assert joined.shape == (2, prompt + NEW_TOKENS - 1, 64)
    assert torch.allclose(joined, full["block[1]"].output, atol=1e-5)
    assert torch.allclose(cap.concat("block[2].input"), full["block[2]"].input, atol=1e-5)
    assert [tuple(t.shape) for t in cap.steps("block[1]")] == [(2, prompt, 64)] + [(2, 1, 64)] * 3
    # Keeping only each step's last token gives one row per generated token.
    assert torch.allclose(last.concat("block[1]"), joined[:, prompt - 1 :], atol=1e-6)


def _greedy(
    model: nn.Module,
    ids: torch.Tensor,
    edit: Callable[[int, int], AbstractContextManager[object]],
) -> torch.Tensor:
    """Greedy decoding without a cache: every step recomputes the whole sequence."""
    prompt = ids.shape[1]
    for _ in range(NEW_TOKENS):
        with torch.no_grad(), edit(prompt, ids.shape[1]):
            logits = model(input_ids=ids).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("where", ["everywhere", "prompt position", "last"])
def test_steering_a_generation_equals_steering_every_full_forward(
    lm: nn.Module, inputs: dict[str, torch.Tensor], where: str
) -> None:
    insp = Inspector(lm)
    ids = inputs["input_ids"]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 3
    # What the cached generation does, written as positions of the whole sequence: "last"
    # steers the prompt's last token and then every new token as it is fed back.
    cached = {"everywhere": None, "prompt position": [2], "last": "last"}[where]

    def full(prompt: int, length: int) -> AbstractContextManager[object]:
        positions = {
            "everywhere": None,
            "prompt position": [2],
            "last": list(range(prompt - 1, length)),
        }[where]
        return insp.steer("block[1]", vector, positions=positions)

    scores = {"output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        plain = _generate(lm, {"input_ids": ids}, **scores)
        with insp.steer("block[1]", vector, positions=cached):
            steered = _generate(lm, {"input_ids": ids}, **scores)
    by_hand = _greedy(lm, ids, full)
    assert torch.equal(steered.sequences, by_hand)  # type: ignore[attr-defined]
    # The steering changed the prediction at every step (tiny models may keep the argmax).
    for a, b in zip(steered.scores, plain.scores, strict=True):  # type: ignore[attr-defined]
        assert not torch.allclose(a, b, atol=1e-4)


def test_generation_with_edits_and_captures_leaves_the_model_as_it_was(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    with torch.no_grad():
        lm(**inputs, output_hidden_states=True)
        reference = _generate(lm, inputs)
    insp = Inspector(lm)
    hooks = hook_state(lm)
    forwards = {name: m.__dict__.get("forward") for name, m in lm.named_modules()}
    with (
        torch.no_grad(),
        insp.ablate("block[0].mlp"),
        insp.steer("block[2].input", torch.ones(64)),
        insp.capture("block[:]") as cap,
    ):
        out = _generate(lm, inputs, output_hidden_states=True, return_dict_in_generate=True)
    # The edit is visible in Hugging Face's own per-step hidden states at every step.
    for step, entries in enumerate(out.hidden_states):  # type: ignore[attr-defined]
        assert torch.allclose(entries[2], cap["block[1]"].steps[step].output, atol=1e-6)
        assert cap["block[2]"].steps[step].edits == ("block[2].input: steer(scale=1)",)
    assert hook_state(lm) == hooks
    assert {name: m.__dict__.get("forward") for name, m in lm.named_modules()} == forwards
    with torch.no_grad():
        assert torch.equal(_generate(lm, inputs), reference)  # type: ignore[arg-type]
