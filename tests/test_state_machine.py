"""A stateful property test of captures and edits against a reference made of plain hooks.

Hypothesis stacks random captures and edits (steer, scale, ablate, patch) on random locators
and positions, runs forwards and greedy generations, injects exceptions, and replaces blocks of
the model. After every step it checks:

- the logits equal those of a reference that applies the same edits with plain torch hooks;
- every record equals what the reference recorded (values after the edits of their module);
- records of closed captures do not change when the model runs again;
- with nothing active, the model holds no hook and no wrapped ``forward``.

The suite runs a modest number of examples; ``INTROSPECT_STATEFUL_EXAMPLES=N`` (``make
stateful``) runs more.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _support.models import gpt2_config, llama_config
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from introspect import Inspector
from introspect._errors import IntrospectError

EXAMPLES = int(os.environ.get("INTROSPECT_STATEFUL_EXAMPLES", "12"))
HIDDEN = 64
LOCATORS = [
    "embed",
    "block[0]",
    "block[1]",
    "block[-1]",
    "block[0].input",
    "block[2].input",
    "block[1].attn",
    "block[2].mlp",
    "final_norm",
]
POSITIONS: list[Any] = [None, [0], [-1], "last", [1, 2]]


class Boom(Exception):
    """Raised on purpose inside a forward."""


@dataclass
class RefEdit:
    locator: str
    kind: str
    positions: Any
    vector: torch.Tensor | None = None
    factor: float = 1.0
    value: torch.Tensor | None = None


def _mask(positions: Any, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Which positions of a call covering ``offset .. offset + seq`` an edit touches.

    Non-negative positions count in the whole sequence (a generation step holds one of them
    at most); ``-1`` and ``"last"`` are the newest token of every call.
    """
    seq = x.shape[1]
    mask = torch.zeros(seq, dtype=torch.bool)
    if positions is None:
        mask[:] = True
    elif positions == "last":
        mask[-1] = True
    else:
        for p in positions:
            if p < 0:
                mask[p] = True
            elif offset <= p < offset + seq:
                mask[p - offset] = True
    return mask.view(1, seq, *([1] * (x.dim() - 2)))


def _apply(edit: RefEdit, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    if edit.kind == "steer":
        assert edit.vector is not None
        new = x + edit.factor * edit.vector
    elif edit.kind == "scale":
        new = x * edit.factor
    elif edit.kind == "ablate":
        new = torch.zeros_like(x)
    else:
        assert edit.value is not None
        new = edit.value.expand_as(x).clone()
    return torch.where(_mask(edit.positions, x, offset), new, x)


def _hidden(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value[0]


def _with_hidden(value: Any, new: torch.Tensor) -> Any:
    return new if isinstance(value, torch.Tensor) else (new, *value[1:])


def _fits(edit: RefEdit, seq: int) -> bool:
    if edit.kind == "patch" and edit.value is not None and edit.value.shape[1] != seq:
        return False
    if isinstance(edit.positions, list):
        return all(-seq <= p < seq for p in edit.positions)
    return True


class Reference:
    """The same edits and captures made with plain hooks, on a twin of the model.

    The twin has the same weights (and the same block replacements); the engine's own hooks
    live on the model, so neither run sees the other's edits.
    """

    def __init__(self, insp: Inspector) -> None:
        self.insp = insp

    def run(
        self, edits: list[RefEdit], captured: list[str], ids: torch.Tensor, new_tokens: int = 0
    ) -> tuple[torch.Tensor, dict[str, list[tuple[Any, Any]]]]:
        """Logits of a forward (``new_tokens=0``) or the tokens of a greedy generation, and
        what each captured module saw at every call."""
        insp = self.insp
        handles = []
        records: dict[str, list[tuple[Any, Any]]] = {}
        # Where each call of the model starts in the sequence: greedy generation with a cache
        # runs the prompt, then one token per call.
        where = {"calls": 0, "offset": 0}

        def count(m: nn.Module, args: Any, kwargs: Any) -> None:
            where["offset"] = 0 if where["calls"] == 0 else ids.shape[1] + where["calls"] - 1
            where["calls"] += 1

        try:
            handles.append(insp.model.register_forward_pre_hook(count, with_kwargs=True))
            for edit in edits:
                side_input = edit.locator.endswith(".input")
                module = insp.module(edit.locator.removesuffix(".input"))
                if side_input:

                    def pre(
                        m: nn.Module,
                        args: tuple[Any, ...],
                        kwargs: dict[str, Any],
                        e: RefEdit = edit,
                    ) -> Any:
                        o = where["offset"]
                        if args:
                            return (_apply(e, args[0], o), *args[1:]), kwargs
                        new = _apply(e, kwargs["hidden_states"], o)
                        return args, {**kwargs, "hidden_states": new}

                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                else:

                    def post(
                        m: nn.Module, args: Any, kwargs: Any, out: Any, e: RefEdit = edit
                    ) -> Any:
                        return _with_hidden(out, _apply(e, _hidden(out), where["offset"]))

                    handles.append(module.register_forward_hook(post, with_kwargs=True))
            for loc in dict.fromkeys(captured):
                module = insp.module(loc)

                def keep(m: nn.Module, args: Any, kwargs: Any, out: Any, loc: str = loc) -> None:
                    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_ids"))
                    records.setdefault(loc, []).append((x.clone(), _hidden(out).clone()))

                handles.append(module.register_forward_hook(keep, with_kwargs=True))
            with torch.no_grad():
                if new_tokens:
                    result = insp.model.generate(
                        ids,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )
                else:
                    result = insp.model(ids).logits
        finally:
            for h in handles:
                h.remove()
        return result, records


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__)
        for m in model.modules()
    )


def _build(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(gpt2_config(3)).eval()
    return LlamaForCausalLM(llama_config(3)).eval()


class EngineMachine(RuleBasedStateMachine):
    family = "gpt2"

    def __init__(self) -> None:
        super().__init__()
        self.model = _build(self.family)
        self.insp = Inspector(self.model)
        self.twin = copy.deepcopy(self.model)
        self.ref = Reference(Inspector(self.twin))
        self.baseline = _hook_count(self.model)
        self.stack: list[tuple[Any, RefEdit | None, list[str]]] = []
        self.closed: list[tuple[Any, dict[str, torch.Tensor]]] = []
        self.seq = 5

    # -- what is active -----------------------------------------------------------------------

    def _edits(self) -> list[RefEdit]:
        return [e for _, e, _ in self.stack if e is not None]

    def _captured(self) -> list[str]:
        return [loc for _, _, locs in self.stack for loc in locs]

    # -- rules --------------------------------------------------------------------------------

    @precondition(lambda self: len(self.stack) < 5)
    @rule(
        locator=st.sampled_from(LOCATORS),
        kind=st.sampled_from(["steer", "scale", "ablate", "patch"]),
        positions=st.sampled_from(POSITIONS),
        factor=st.sampled_from([0.0, 0.5, -1.0, 3.0]),
        seed=st.integers(0, 2**16),
    )
    def push_edit(self, locator: str, kind: str, positions: Any, factor: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        edit = RefEdit(locator, kind, positions, factor=factor)
        if kind == "steer":
            edit.vector = torch.randn(HIDDEN, generator=gen)
            cm = self.insp.steer(locator, edit.vector.clone(), scale=factor, positions=positions)
        elif kind == "scale":
            cm = self.insp.scale(locator, factor, positions=positions)
        elif kind == "ablate":
            cm = self.insp.ablate(locator, positions=positions)
        else:
            edit.value = torch.randn(1, self.seq, HIDDEN, generator=gen)
            cm = self.insp.patch(locator, edit.value.clone(), positions=positions)
        cm.__enter__()
        self.stack.append((cm, edit, []))

    @precondition(lambda self: len(self.stack) < 5)
    @rule(locators=st.lists(st.sampled_from(LOCATORS), min_size=1, max_size=3, unique=True))
    def push_capture(self, locators: list[str]) -> None:
        cap = self.insp.capture(*locators)
        cap.__enter__()
        self.stack.append((cap, None, locators))

    @precondition(lambda self: bool(self.stack))
    @rule(with_error=st.booleans())
    def pop(self, with_error: bool) -> None:
        cm, edit, _ = self.stack.pop()
        if with_error:
            exc = Boom("injected")
            cm.__exit__(Boom, exc, None)
        else:
            cm.__exit__(None, None, None)
        if edit is None and len(cm) and not with_error:
            snapshot = {}
            for key in cm:
                snapshot[key] = cm[key].output.clone()
            self.closed.append((cm, snapshot))

    @rule(seq=st.integers(3, 7), seed=st.integers(0, 2**16))
    def forward(self, seq: int, seed: int) -> None:
        ids = torch.randint(1, 120, (1, seq), generator=torch.Generator().manual_seed(seed))
        edits = self._edits()
        captured = self._captured()
        if not all(_fits(e, seq) for e in edits):
            with pytest.raises(IntrospectError), torch.no_grad():
                self.model(ids)
            return
        ref_logits, ref_records = self.ref.run(edits, captured, ids)
        with torch.no_grad():
            logits = self.model(ids).logits
        assert torch.allclose(logits, ref_logits, atol=1e-5), "logits differ from the reference"
        for cap, _, locs in self.stack:
            for loc in locs:
                rec = cap[loc].steps[-1]
                ref_in, ref_out = ref_records[loc][0]
                assert torch.allclose(rec.output, ref_out, atol=1e-5), f"{loc}.output differs"
                if loc != "embed":
                    assert torch.allclose(rec.input, ref_in, atol=1e-5), f"{loc}.input differs"

    @rule(seq=st.integers(3, 5))
    def forward_that_raises(self, seq: int) -> None:
        block = self.insp.module("block[1]")

        def explode(*_: Any) -> None:
            raise Boom("inside the forward")

        handle = block.register_forward_pre_hook(explode)
        # An edit that does not fit this length may refuse before block[1] is reached.
        fits = all(_fits(e, seq) for e in self._edits())
        try:
            with pytest.raises(Boom if fits else (Boom, IntrospectError)), torch.no_grad():
                self.model(torch.ones(1, seq, dtype=torch.long))
        finally:
            handle.remove()

    @precondition(lambda self: not self.stack)
    @rule(index=st.integers(0, 2), seed=st.integers(0, 2**16))
    def replace_block(self, index: int, seed: int) -> None:
        blocks = self.insp.module(f"block[{index}]")
        new = copy.deepcopy(blocks)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        for model in (self.model, self.twin):
            parent = model.transformer.h if self.family == "gpt2" else model.model.layers
            parent[index] = new if model is self.model else copy.deepcopy(new)
        assert self.insp.module(f"block[{index}]") is new

    @precondition(lambda self: not any(e.kind == "patch" for e in self._edits()))
    @rule(new_tokens=st.integers(1, 3), seed=st.integers(0, 2**16))
    def generate(self, new_tokens: int, seed: int) -> None:
        ids = torch.randint(1, 120, (1, self.seq), generator=torch.Generator().manual_seed(seed))
        edits, captured = self._edits(), self._captured()
        before = {
            id(cap): {loc: len(cap[loc].steps) for loc in locs if loc in cap}
            for cap, _, locs in self.stack
        }
        ref_tokens, ref_records = self.ref.run(edits, captured, ids, new_tokens)
        with torch.no_grad():
            tokens = self.model.generate(
                ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert torch.equal(tokens, ref_tokens), "generated tokens differ from the reference"
        for cap, _, locs in self.stack:
            for loc in locs:
                steps = cap[loc].steps[before[id(cap)].get(loc, 0) :]
                assert len(steps) == len(ref_records[loc]) == new_tokens
                for step, (ref_in, ref_out) in zip(steps, ref_records[loc], strict=True):
                    assert torch.allclose(step.output, ref_out, atol=1e-5), f"{loc} step differs"
                    if loc != "embed":
                        assert torch.allclose(step.input, ref_in, atol=1e-5), f"{loc} step differs"

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def closed_records_do_not_change(self) -> None:
        for cap, snapshot in self.closed:
            for key, value in snapshot.items():
                assert torch.equal(cap[key].output, value), f"record {key} changed after exit"

    @invariant()
    def nothing_is_left_when_nothing_is_active(self) -> None:
        if not self.stack:
            assert _hook_count(self.model) == self.baseline, "a hook or wrapper was left behind"

    def teardown(self) -> None:
        while self.stack:
            cm, _, _ = self.stack.pop()
            cm.__exit__(None, None, None)
        assert _hook_count(self.model) == self.baseline


class LlamaEngineMachine(EngineMachine):
    family = "llama"


_settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestGpt2Engine = EngineMachine.TestCase
TestGpt2Engine.settings = _settings
TestLlamaEngine = LlamaEngineMachine.TestCase
TestLlamaEngine.settings = _settings


def test_reference_agrees_with_hugging_face_without_edits() -> None:
    model = _build("gpt2")
    ref = Reference(Inspector(model))
    ids = torch.tensor([[5, 6, 7]])
    logits, _ = ref.run([], [], ids)
    tokens, records = ref.run([], ["block[0]"], ids, new_tokens=3)
    with torch.no_grad():
        assert torch.equal(logits, model(ids).logits)
        assert torch.equal(
            tokens, model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        )
    assert [tuple(out.shape) for _, out in records["block[0]"]] == [
        (1, 3, 64),
        (1, 1, 64),
        (1, 1, 64),
    ]
