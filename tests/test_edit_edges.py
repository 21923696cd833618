"""Edits at their edges: shapes, aliasing, positions during generation, arguments, gradients.

Each test names the defect it closes ("never silently wrong"): an edit keeps the value's shape,
never hands the model a tensor the caller still owns, and never silently does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from _support.models import gpt2_config, llama_config
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM, LlamaModel

from introspect import Inspector
from introspect._errors import CaptureError, InterventionError
from introspect._hooks.capture import Target, hidden_of
from introspect._hooks.edits import Edit, EditOp, Intervention
from introspect.testing import build_tiny

HIDDEN = 64
PROMPT = torch.tensor([[5, 17, 42, 9, 77, 3]])


def _vector(seed: int = 0, *shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (HIDDEN,)), generator=torch.Generator().manual_seed(seed)) * 3


def _lm(family: str) -> nn.Module:
    if family == "gpt2":
        return build_tiny(GPT2LMHeadModel, gpt2_config())
    return build_tiny(LlamaForCausalLM, llama_config())


# -- 1. a steering or patch value never changes the value's shape ------------------------------


def test_steer_vector_that_would_grow_the_batch_is_refused() -> None:
    lm = _lm("gpt2")
    insp = Inspector(lm)
    with (
        pytest.raises(InterventionError, match=r"cannot be added.*\(1, 6, 64\)"),
        insp.steer("block[0]", torch.ones(2, 1, HIDDEN)),
    ):
        lm(PROMPT)


def test_steer_rows_that_would_grow_the_sequence_at_a_position_are_refused() -> None:
    lm = _lm("llama")
    insp = Inspector(lm)
    with (
        pytest.raises(InterventionError, match="cannot be added"),
        insp.steer("block[0]", torch.ones(4, HIDDEN), positions=[0]),
    ):
        lm(torch.tensor([[5]]))


def test_patch_vector_that_would_grow_the_batch_is_refused() -> None:
    lm = _lm("gpt2")
    insp = Inspector(lm)
    with (
        pytest.raises(InterventionError, match="does not fit"),
        insp.patch("block[0]", torch.ones(2, 1, HIDDEN), positions=[1]),
    ):
        lm(PROMPT)


def test_a_seq_by_hidden_vector_in_generate_fails_at_the_first_step_it_does_not_fit() -> None:
    lm = _lm("llama")
    insp = Inspector(lm)
    per_token = _vector(1, PROMPT.shape[1], HIDDEN)
    with torch.no_grad(), insp.steer("block[1]", per_token):
        fits = lm(PROMPT).logits  # a call of exactly that many tokens is fine
        with pytest.raises(InterventionError, match="generation step holding 1 new token"):
            lm.generate(PROMPT, max_new_tokens=3, do_sample=False)  # type: ignore[operator]
    with torch.no_grad(), insp.capture("block[1]") as cap:
        plain = lm(PROMPT).logits
    assert not torch.allclose(fits, plain)
    assert cap["block[1]"].output.shape == (1, PROMPT.shape[1], HIDDEN)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 4),
    shape=st.lists(st.sampled_from([1, 2, 3, 4, 8]), min_size=1, max_size=4),
    positions=st.sampled_from([None, [0], [-1], "last"]),
    kind=st.sampled_from(["add", "set"]),
)
def test_an_edit_keeps_the_value_shape_or_refuses(
    batch: int, seq: int, shape: list[int], positions: Any, kind: str
) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(batch, seq, 8)
    vector = torch.randn(*shape)
    edit = Edit(Target("lin", lin), "output", EditOp(kind, tensor=vector), positions)  # type: ignore[arg-type]
    plain = lin(x)
    fits = _broadcasts(vector.shape, plain.shape)
    with Intervention([edit]):
        if not fits:
            with pytest.raises(InterventionError):
                lin(x)
            return
        out = lin(x)
    assert out.shape == plain.shape
    new = plain + vector if kind == "add" else vector.expand_as(plain)
    where = slice(None) if positions is None else [seq - 1] if positions == "last" else positions
    expected = plain.clone()
    expected[:, where] = new.expand_as(plain)[:, where]
    assert torch.allclose(out, expected, atol=1e-6)


def _broadcasts(value: torch.Size, target: torch.Size) -> bool:
    """Whether ``value`` broadcasts *to* ``target`` (without changing its shape)."""
    try:
        return torch.broadcast_shapes(value, target) == target
    except RuntimeError:
        return False


# -- 2. the model never receives a tensor the caller still owns --------------------------------


def _falcon() -> nn.Module:
    config = transformers.FalconConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=64,
        bos_token_id=1,
        eos_token_id=2,
        new_decoder_architecture=True,
        num_kv_heads=2,
    )
    return build_tiny(transformers.FalconForCausalLM, config)


@contextmanager
def _replace_output(
    module: nn.Module, value: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """A hand-written patch: the module returns a fresh tensor from ``value``."""
    handle = module.register_forward_hook(lambda m, a, out: value(out))
    try:
        yield
    finally:
        handle.remove()


def test_patching_falcon_mlp_from_a_record_leaves_the_record_as_it_was() -> None:
    falcon = _falcon()
    insp = Inspector(falcon)
    clean, corrupted = torch.tensor([[3, 9, 14, 27]]), torch.tensor([[3, 9, 50, 27]])
    with torch.no_grad(), insp.capture("block[0].mlp") as cap:
        falcon(clean)
    record = cap["block[0].mlp"]
    snapshot = record.output.clone()
    with torch.no_grad(), insp.patch("block[0].mlp", record):
        first = falcon(corrupted).logits
        second = falcon(corrupted).logits
    assert torch.equal(record.output, snapshot)  # the model's `+=` did not reach the record
    assert torch.equal(first, second)
    with (
        torch.no_grad(),
        _replace_output(insp.module("block[0].mlp"), lambda out: snapshot.clone()),
    ):
        by_hand = falcon(corrupted).logits
    assert torch.allclose(first, by_hand, atol=1e-6)


@pytest.mark.parametrize("how", ["vector patch", "mean ablation", "patch at a position"])
def test_falcon_in_place_add_gets_a_fresh_tensor(how: str) -> None:
    falcon = _falcon()
    insp = Inspector(falcon)
    ids = torch.tensor([[3, 9, 14, 27]])
    vector = _vector(2, 32)
    kept = vector.clone()
    mlp = insp.module("block[0].mlp")
    if how == "vector patch":
        edit = insp.patch("block[0].mlp", vector)
        expected: Callable[[torch.Tensor], torch.Tensor] = lambda out: kept.expand_as(out).clone()  # noqa: E731
    elif how == "mean ablation":
        edit = insp.ablate("block[0].mlp", mean_over=vector[None, None])
        expected = lambda out: kept.expand_as(out).clone()  # noqa: E731
    else:
        edit = insp.patch("block[0].mlp", vector, positions=[1])

        def expected(out: torch.Tensor) -> torch.Tensor:
            new = out.clone()
            new[:, 1] = kept
            return new

    with torch.no_grad(), edit:
        first = falcon(ids).logits
        second = falcon(ids).logits
    assert torch.equal(vector, kept)
    assert torch.equal(first, second)
    with torch.no_grad(), _replace_output(mlp, expected):
        by_hand = falcon(ids).logits
    assert torch.allclose(first, by_hand, atol=1e-6)


# -- 3. positions during generate follow the cache of each call --------------------------------


def _cache_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position[0])
    return 0 if cache is None else int(cache.get_seq_length())


@contextmanager
def _steer_absolute(
    insp: Inspector, locator: str, vector: torch.Tensor, absolute: Callable[[int, int], list[int]]
) -> Iterator[None]:
    """A hand-written steer: ``absolute(offset, seq)`` lists the call's positions to edit."""
    offset = [0]

    def read(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        offset[0] = _cache_length(kwargs)

    def add(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = hidden_of(output, 0)
        seq = hidden.shape[1]
        local = [p - offset[0] for p in absolute(offset[0], seq)]
        local = [p for p in local if 0 <= p < seq]
        new = hidden.clone()
        new[:, local] += vector
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])

    handles = [
        insp.model.base_model.register_forward_pre_hook(read, with_kwargs=True),
        insp.module(locator).register_forward_hook(add),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _scores(lm: nn.Module, **kwargs: Any) -> Any:
    return lm.generate(  # type: ignore[operator]
        PROMPT,
        max_new_tokens=4,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "positions",
    [[0], slice(0, 1), torch.tensor([0]), [2], [7], [-1], slice(4, None)],
    ids=["[0]", "slice(0,1)", "tensor([0])", "[2]", "[7] after the prompt", "[-1]", "slice(4,)"],
)
def test_generate_edits_each_absolute_position_when_its_token_is_processed(
    family: str, positions: Any
) -> None:
    lm = _lm(family)
    insp = Inspector(lm)
    vector = _vector(3)

    def absolute(offset: int, seq: int) -> list[int]:
        total = offset + seq
        if isinstance(positions, slice):
            return list(range(total)[positions])
        items = positions.tolist() if isinstance(positions, torch.Tensor) else positions
        return [p % total for p in items if p < total]

    with torch.no_grad():
        with insp.steer("block[1]", vector, positions=positions):
            steered = _scores(lm)
        with _steer_absolute(insp, "block[1]", vector, absolute):
            by_hand = _scores(lm)
        plain = _scores(lm)
    assert torch.equal(steered.sequences, by_hand.sequences)
    for ours, theirs in zip(steered.scores, by_hand.scores, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert not all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(steered.scores, plain.scores, strict=True)
    )


def test_one_patch_row_per_position_lands_in_the_step_that_holds_it() -> None:
    lm = _lm("llama")
    insp = Inspector(lm)
    rows = _vector(6, 2, HIDDEN)
    block = insp.module("block[1]")
    offset = [0]

    def read(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        offset[0] = _cache_length(kwargs)

    def put(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = hidden_of(output, 0).clone()
        for row, absolute in enumerate([2, 7]):
            if offset[0] <= absolute < offset[0] + hidden.shape[1]:
                hidden[:, absolute - offset[0]] = rows[row]
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    with torch.no_grad():
        with insp.patch("block[1]", rows, positions=[2, 7]):
            patched = _scores(lm)
        handles = [
            insp.model.base_model.register_forward_pre_hook(read, with_kwargs=True),
            block.register_forward_hook(put),
        ]
        try:
            by_hand = _scores(lm)
        finally:
            for handle in handles:
                handle.remove()
    for ours, theirs in zip(patched.scores, by_hand.scores, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_without_a_cache_every_step_reruns_absolute_positions(family: str) -> None:
    lm = _lm(family)
    insp = Inspector(lm)
    vector = _vector(4)
    with torch.no_grad():
        with insp.steer("block[1]", vector, positions=[0]):
            steered = _scores(lm, use_cache=False)
        with _steer_absolute(insp, "block[1]", vector, lambda offset, seq: [0]):
            by_hand = _scores(lm, use_cache=False)
    for ours, theirs in zip(steered.scores, by_hand.scores, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_shorter_independent_forward_is_not_a_generation_step(family: str) -> None:
    lm = _lm(family)
    insp = Inspector(lm)
    with insp.steer("block[0]", _vector(), positions=[4]), torch.no_grad():
        lm(PROMPT)
        with pytest.raises(InterventionError, match="out of range for a call of 3 tokens"):
            lm(PROMPT[:, :3])
    with (
        torch.no_grad(),
        pytest.raises(InterventionError, match="independent forward"),
        insp.steer("block[0]", _vector(), positions=[4]),
    ):
        lm(PROMPT[:, :3])


class _Root(nn.Module):
    """A model whose cache argument takes any form (legacy tuples, unknown objects)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(
        self,
        x: torch.Tensor,
        past_key_values: Any = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.layer(x)


def _root_edit(root: _Root, positions: Any) -> Intervention:
    vector = torch.ones(4)
    return Intervention(
        [Edit(Target("layer", root.layer), "output", EditOp("add", tensor=vector), positions)],
        root=root,
    )


@pytest.mark.parametrize(
    "cache",
    [
        ((torch.zeros(1, 2, 5, 3), torch.zeros(1, 2, 5, 3)),),
        {"cache_position": torch.tensor([5])},
    ],
    ids=["legacy tuple", "cache_position"],
)
def test_offset_comes_from_a_legacy_tuple_or_cache_position(cache: Any) -> None:
    root = _Root()
    x = torch.randn(1, 1, 4)
    kwargs = cache if isinstance(cache, dict) else {"past_key_values": cache}
    plain = root(x)
    with _root_edit(root, [5]):
        assert torch.allclose(root(x, **kwargs), plain + 1)
    with _root_edit(root, [2]):  # a cached position: already processed
        assert torch.equal(root(x, **kwargs), plain)


def test_a_cache_of_unknown_length_refuses_absolute_positions() -> None:
    root = _Root()
    x = torch.randn(1, 2, 4)
    with _root_edit(root, [0]), pytest.raises(InterventionError, match="cannot be read"):
        root(x, past_key_values=object())
    with _root_edit(root, [-1]):
        out = root(x, past_key_values=object())
    expected = root(x)
    expected[:, -1] += 1
    assert torch.allclose(out, expected)


# -- 5. a positional attention mask is read ----------------------------------------------------


def test_last_token_steering_reads_a_positionally_passed_mask() -> None:
    base = build_tiny(LlamaModel, llama_config())
    insp = Inspector(base)
    ids = torch.tensor([[5, 17, 42, 9], [8, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    vector = _vector(5)
    with torch.no_grad():
        with insp.steer("block[1]", vector, positions="last"):
            positional = base(ids, mask).last_hidden_state
        with insp.steer("block[1]", vector, positions=torch.tensor([3, 1])):
            by_index = base(input_ids=ids, attention_mask=mask).last_hidden_state
        with insp.steer("block[1]", vector, positions=[-1]):
            last_column = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(positional, by_index, atol=1e-6)
    assert not torch.allclose(positional[1, :2], last_column[1, :2], atol=1e-4)


# -- 13. a reused intervention with a trainable vector -----------------------------------------


def test_a_trainable_steering_vector_reused_in_an_optimiser_loop() -> None:
    lm = _lm("gpt2")
    insp = Inspector(lm)
    for p in lm.parameters():
        p.requires_grad_(False)
    vector = torch.zeros(HIDDEN, requires_grad=True)
    steer = insp.steer("block[1]", vector, scale=2.0)
    optimiser = torch.optim.SGD([vector], lr=0.5)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(logits[0, -1], -1)[7]

    losses = []
    for _ in range(3):
        optimiser.zero_grad()
        with steer, insp.capture("block[1]") as cap:
            loss = loss_of(lm(PROMPT).logits)
        loss.backward()
        rec = cap["block[1]"]
        assert torch.allclose(
            rec.output - rec.output_before_edit, 2.0 * vector.detach().expand_as(rec.output)
        )
        # By hand: a forward hook adding 2 * (a copy of) the vector.
        copy = vector.detach().clone().requires_grad_(True)

        def add(module: nn.Module, args: Any, out: Any, copy: torch.Tensor = copy) -> Any:
            new = hidden_of(out, 0) + 2.0 * copy
            return new if isinstance(out, torch.Tensor) else (new, *out[1:])

        handle = insp.module("block[1]").register_forward_hook(add)
        try:
            reference = loss_of(lm(PROMPT).logits)
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(reference, copy)
        assert vector.grad is not None
        assert torch.allclose(vector.grad, grad, atol=1e-6)
        assert torch.allclose(loss, reference.detach(), atol=1e-6)
        losses.append(loss.item())
        optimiser.step()
    assert losses[0] > losses[1] > losses[2]


# -- 17. arguments are checked when the edit is built ------------------------------------------

BAD_EDITS: dict[str, Callable[[Inspector], object]] = {
    "scale='2'": lambda insp: insp.steer("block[0]", _vector(), scale="2"),  # type: ignore[arg-type]
    "scale=None": lambda insp: insp.steer("block[0]", _vector(), scale=None),  # type: ignore[arg-type]
    "scale=nan": lambda insp: insp.steer("block[0]", _vector(), scale=float("nan")),
    "scale(loc, 'x')": lambda insp: insp.scale("block[0]", "x"),  # type: ignore[arg-type]
    "positions='first'": lambda insp: insp.steer("block[0]", _vector(), positions="first"),  # type: ignore[arg-type]
    "positions=[1.5]": lambda insp: insp.steer("block[0]", _vector(), positions=[1.5]),  # type: ignore[list-item]
    "positions=True": lambda insp: insp.ablate("block[0]", positions=True),
    "positions=[True]": lambda insp: insp.ablate("block[0]", positions=[True]),
    "positions=bool tensor": lambda insp: insp.ablate("block[0]", positions=torch.tensor([True])),
    "positions=float tensor": lambda insp: insp.ablate("block[0]", positions=torch.tensor([1.7])),
    "positions=[]": lambda insp: insp.ablate("block[0]", positions=[]),
    "positions=[2, 2]": lambda insp: insp.ablate("block[0]", positions=[2, 2]),
    "positions=tensor([[1, 1]])": lambda insp: insp.ablate(
        "block[0]", positions=torch.tensor([[1, 1]])
    ),
    "positions=np.array": lambda insp: insp.ablate("block[0]", positions=np.array([1, 2])),  # type: ignore[arg-type]
    "positions={1, 2}": lambda insp: insp.ablate("block[0]", positions={1, 2}),  # type: ignore[arg-type]
    "meta vector": lambda insp: insp.steer("block[0]", torch.ones(HIDDEN, device="meta")),
    "meta patch": lambda insp: insp.patch("block[0]", torch.ones(HIDDEN, device="meta")),
}


@pytest.mark.parametrize("case", sorted(BAD_EDITS))
def test_bad_arguments_are_refused_when_the_edit_is_built(case: str) -> None:
    insp = Inspector(_lm("gpt2"))
    with pytest.raises(InterventionError) as caught:
        BAD_EDITS[case](insp)
    message = str(caught.value)
    assert any(word in message for word in ("use", "must", "pass", "only", "once", "meta"))


def test_capture_positions_are_checked_when_the_capture_is_built() -> None:
    insp = Inspector(_lm("gpt2"))
    with pytest.raises(CaptureError, match="only string is 'last'"):
        insp.capture("block[0]", positions="first")  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match="integers"):
        insp.capture("block[0]", positions=torch.tensor([0.5]))


@pytest.mark.parametrize(
    "scalar", [np.int64(2), torch.tensor(2), np.int32(2)], ids=["np.int64", "torch", "np.int32"]
)
def test_integer_scalars_of_any_kind_are_positions(scalar: Any) -> None:
    lm = _lm("gpt2")
    insp = Inspector(lm)
    with torch.no_grad():
        with insp.steer("block[0]", _vector(), positions=scalar):
            ours = lm(PROMPT).logits
        with insp.steer("block[0]", _vector(), positions=[2]):
            reference = lm(PROMPT).logits
        with insp.capture("block[0]", positions=scalar) as cap:
            lm(PROMPT)
    assert torch.equal(ours, reference)
    assert cap["block[0]"].output.shape == (1, 1, HIDDEN)


def test_an_edit_fn_returning_integers_is_refused_and_other_floats_are_cast() -> None:
    lm = _lm("gpt2")
    insp = Inspector(lm)
    with (
        pytest.raises(InterventionError, match="floating-point"),
        insp.edit("block[0]", lambda h, rec: h.long()),
    ):
        lm(PROMPT)
    with torch.no_grad(), insp.edit("block[0]", lambda h, rec: 2 * h.double()):
        doubled = lm(PROMPT).logits
    with torch.no_grad(), insp.scale("block[0]", 2):
        reference = lm(PROMPT).logits
    assert doubled.dtype == torch.float32
    assert torch.allclose(doubled, reference, atol=1e-5)


def test_lm_head_edits_refuse_positions_counted_from_the_start() -> None:
    """During generate the head sees only the last position: [0] would edit the wrong token."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(2)).eval()
    insp = Inspector(model)
    for positions in ([0], slice(0, 2), torch.tensor([1])):
        with pytest.raises(InterventionError, match="lm_head edits take positions from the end"):
            insp.scale("lm_head", 0.0, positions=positions)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        plain = model(ids).logits
        with insp.scale("lm_head", 0.0, positions=[-1]):
            edited = model(ids).logits
    assert torch.equal(edited[:, :-1], plain[:, :-1]) and edited[:, -1].abs().max() == 0


def test_an_active_intervention_inside_a_sum_keeps_its_own_scoping() -> None:
    """`a + b` builds fresh edits: leaving it must not strip `a`'s positions or thread."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(2)).eval()
    insp = Inspector(model)
    ids = torch.tensor([[5, 17, 42, 0, 0], [8, 1, 99, 23, 4]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    vector = torch.full((64,), 2.0)
    a = insp.steer("block[0]", vector, positions="last")
    with torch.no_grad(), a:
        with insp.capture("block[0]") as before:
            model(input_ids=ids, attention_mask=mask)
        with a + insp.scale("block[1]", 1.0):
            pass
        with insp.capture("block[0]") as after:
            model(input_ids=ids, attention_mask=mask)
    assert torch.equal(before["block[0]"].output, after["block[0]"].output)


def test_an_edit_fn_that_changes_the_value_in_place_is_refused() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(2)).eval()
    insp = Inspector(model)
    with (
        pytest.raises(InterventionError, match="changed the value in place"),
        torch.no_grad(),
        insp.edit("block[0]", lambda x, rec: x.mul_(0)),
    ):
        model(torch.tensor([[1, 2, 3]]))


def test_positions_on_a_value_without_a_sequence_axis_are_refused() -> None:
    """insp.logits(h[:, -1]) under a positional edit of final_norm: [batch, hidden] has no seq."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(2)).eval()
    insp = Inspector(model)
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        model(torch.tensor([[1, 2, 3]]))
    h = cap["block[-1]"].output
    with insp.steer("final_norm", torch.ones(64), positions=[-1]):
        with pytest.raises(InterventionError, match="no sequence axis"):
            insp.logits(h[:, -1])
        kept = insp.logits(h[:, -1:])
    with insp.steer("final_norm", torch.ones(64)):
        everywhere = insp.logits(h)
    assert torch.allclose(kept[:, 0], everywhere[:, -1], atol=1e-5)


def test_mean_ablation_of_a_padded_record_averages_real_tokens_only() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(2)).eval()
    insp = Inspector(model)
    with torch.no_grad(), insp.capture("block[0]") as cap:
        insp.run_batch([[5, 17, 42, 9], [8, 1]], padding_side="right")
    rec = cap["block[0]"]
    real = torch.cat([rec.output[0, :4], rec.output[1, :2]])
    ablate = insp.ablate("block[0]", mean_over=rec)
    edit = ablate.edits[0]
    assert edit.op.tensor is not None
    assert torch.allclose(edit.op.tensor, real.mean(0), atol=1e-6)


def test_an_edit_fn_of_the_wrong_arity_is_refused_when_built() -> None:
    torch.manual_seed(0)
    insp = Inspector(GPT2LMHeadModel(gpt2_config(2)).eval())
    with pytest.raises(InterventionError, match="two arguments"):
        insp.edit("block[0]", lambda x: x)


def test_hidden_states_and_logits_check_their_inputs() -> None:
    torch.manual_seed(0)
    insp = Inspector(GPT2LMHeadModel(gpt2_config(2)).eval())
    with pytest.raises(CaptureError, match="pass its inputs"):
        insp.hidden_states()
    with pytest.raises(CaptureError, match="residual stream of floats"):
        insp.logits(torch.tensor([[1, 2, 3]]))


def test_logits_of_the_wrong_width_is_a_clear_error() -> None:
    torch.manual_seed(0)
    insp = Inspector(LlamaForCausalLM(llama_config(2)).eval())
    with pytest.raises(CaptureError, match=r"residual stream \[\.\.\., 64\]"):
        insp.logits(torch.randn(1, 3, 32))
