"""Captures and edits are scoped to the thread that entered them; a changed model is an error.

Regression tests for defects 10 (threads) and 6 (stale modules of captures and edits built
before the model changed).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import torch
from _support.models import gpt2_config, llama_config
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from introspect import Inspector
from introspect._errors import CaptureError, InterventionError


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(gpt2_config(3)).eval()
    return LlamaForCausalLM(llama_config(3)).eval()


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__)
        for m in model.modules()
    )


def _run_in_thread(fn: Any) -> Any:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=120)
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_early_stop_in_one_thread_leaves_another_threads_forward_alone(family: str) -> None:
    model = _model(family)
    insp = Inspector(model)
    mine, theirs = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = model(theirs).logits
        with insp.capture("block[0]", stop=True) as cap:
            other = _run_in_thread(lambda: model(theirs).logits)
            model(mine)
    assert torch.equal(other, expected)
    rec = cap["block[0]"]
    assert rec.output.shape[1] == 4 and len(rec.steps) == 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_steering_in_one_thread_does_not_steer_another(family: str) -> None:
    model = _model(family)
    insp = Inspector(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = model(ids).logits
        with insp.steer("block[1]", torch.full((64,), 3.0)):
            other = _run_in_thread(lambda: model(ids).logits)
            steered = model(ids).logits
    assert torch.equal(other, plain)
    assert not torch.allclose(steered, plain)


def test_threads_entering_and_leaving_edits_of_one_block_are_safe() -> None:
    model = _model("gpt2")
    insp = Inspector(model)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True).hidden_states[1]
    baseline = _hooks(model)
    vectors = [torch.full((64,), float(i + 1)) for i in range(4)]
    start = threading.Barrier(len(vectors))
    errors: list[BaseException] = []

    def work(vector: torch.Tensor) -> None:
        try:
            start.wait()
            for _ in range(25):
                with insp.steer("block[0]", vector), torch.no_grad():
                    got = model(ids, output_hidden_states=True).hidden_states[1]
                # Only this thread's own vector, whatever the others hold at the same time.
                assert torch.allclose(got - plain, vector.expand_as(plain), atol=1e-5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(v,)) for v in vectors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    assert _hooks(model) == baseline


def test_captures_in_two_threads_record_their_own_forwards() -> None:
    model = _model("llama")
    insp = Inspector(model)
    ready = threading.Barrier(2)

    def capture(ids: torch.Tensor) -> torch.Tensor:
        with insp.capture("block[-1]") as cap, torch.no_grad():
            ready.wait()
            model(ids)
            ready.wait()
        return cap["block[-1]"].output

    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6, 7, 8]])
    other: dict[str, torch.Tensor] = {}
    thread = threading.Thread(target=lambda: other.setdefault("b", capture(b)))
    thread.start()
    mine = capture(a)
    thread.join(timeout=120)
    with torch.no_grad(), insp.capture("block[-1]") as ref_a:
        model(a)
    with torch.no_grad(), insp.capture("block[-1]") as ref_b:
        model(b)
    assert torch.equal(mine, ref_a["block[-1]"].output)
    assert torch.equal(other["b"], ref_b["block[-1]"].output)


# -- the model changes after a capture or edit was built ---------------------------------------


def _replace_block(model: nn.Module, index: int) -> nn.Module:
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    blocks[index] = copy.deepcopy(blocks[index])
    return blocks[index]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_edit_built_before_the_model_changed_refuses_to_enter(family: str) -> None:
    model = _model(family)
    insp = Inspector(model)
    steer = insp.steer("block[1]", torch.ones(64))
    ablate = insp.ablate("block[1].mlp")
    _replace_block(model, 1)
    baseline = _hooks(model)
    for edit in (steer, ablate):
        with pytest.raises(InterventionError, match="model changed since this intervention"):
            edit.__enter__()
    assert _hooks(model) == baseline
    with insp.steer("block[1]", torch.ones(64)):  # built now: the new block
        pass


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_capture_built_before_the_model_changed_refuses_to_enter(family: str) -> None:
    model = _model(family)
    insp = Inspector(model)
    cap = insp.capture("block[0]", "block[2].attn")
    _replace_block(model, 2)
    with pytest.raises(CaptureError, match=r"block\[2\]\.attn is no longer where"):
        cap.__enter__()
    assert _hooks(model) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_replacing_a_block_while_an_edit_is_active_fails_the_next_forward(family: str) -> None:
    model = _model(family)
    insp = Inspector(model)
    ids = torch.tensor([[1, 2, 3]])
    with insp.steer("block[0]", torch.ones(64)), torch.no_grad():
        model(ids)
        _replace_block(model, 0)
        with pytest.raises(InterventionError, match="model changed"):
            model(ids)
    with insp.capture("block[0]") as cap, torch.no_grad():
        _replace_block(model, 0)
        with pytest.raises(CaptureError, match="model changed"):
            model(ids)
    assert "block[0]" not in cap


def test_an_edit_on_a_compiled_model_is_refused_unless_run_eagerly() -> None:
    model = _model("gpt2")
    insp = Inspector(model)
    model.compile()
    with pytest.raises(InterventionError, match=r"compiled with model\.compile\(\)"):
        insp.steer("block[0]", torch.ones(64)).__enter__()
    assert _hooks(model) == 0
    ids = torch.tensor([[1, 2, 3]])
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        plain = model(ids, output_hidden_states=True).hidden_states[1]
        with insp.steer("block[0]", torch.ones(64)):
            steered = model(ids, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(steered - plain, torch.ones_like(plain), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_repeated_capture_follows_the_model_as_it_is_now(family: str) -> None:
    """Captures of the same locators reuse their resolution only while the model holds it."""
    model = _model(family)
    insp = Inspector(model)
    blocks = insp.view.resolver.blocks(None)
    ids = torch.tensor([[5, 17, 42, 9]])
    for _ in range(2):  # the second capture reuses the first one's resolution
        with torch.no_grad(), insp.capture("block[-1]") as cap:
            model(ids, use_cache=False)
        assert cap.targets[0].module is blocks[-1]
    # A block added at the end: block[-1] is the new block (not run: the model's config does not
    # know it), and again the old last block once it is removed.
    last = blocks[-1]
    blocks.append(copy.deepcopy(last))
    assert insp.capture("block[-1]").targets[0].module is blocks[-1] is not last
    assert insp.num_blocks == len(blocks)
    del blocks[-1]
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        model(ids, use_cache=False)
    assert cap.targets[0].module is last and "block[-1]" in cap
    # An MLP replaced: the capture records the new one (not an error: it was built now).
    for _ in range(2):
        with torch.no_grad(), insp.capture("block[0].mlp") as cap:
            before = model(ids, use_cache=False).logits
    blocks[0].mlp = copy.deepcopy(blocks[0].mlp)
    with torch.no_grad(), insp.capture("block[0].mlp") as cap:
        after = model(ids, use_cache=False).logits
    assert cap.targets[0].module is blocks[0].mlp and "block[0].mlp" in cap
    assert torch.equal(before, after)
    # stop= resolves its own targets (with stop, block[0].input needs no output).
    with torch.no_grad(), insp.capture("block[0].input", stop=True) as cap:
        model(ids, use_cache=False)
    assert cap.stopped and not cap.targets[0].needs_output
    with torch.no_grad(), insp.capture("block[0].input") as cap:
        model(ids, use_cache=False)
    assert cap.targets[0].needs_output
    # The whole base model replaced: captures resolve in the new one.
    prefix = model.base_model_prefix
    setattr(model, prefix, copy.deepcopy(getattr(model, prefix)))
    new_blocks = insp.view.resolver.blocks(None)
    assert new_blocks is not blocks
    with torch.no_grad(), insp.capture("block[0]") as cap:
        model(ids, use_cache=False)
    assert cap.targets[0].module is new_blocks[0] and "block[0]" in cap
    assert insp.view.base is getattr(model, prefix)
