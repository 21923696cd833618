"""Attribution patching (AtP, AtP*): every cell against its formula computed by hand.

The reference is plain PyTorch: forward hooks on the Hugging Face modules (blocks, their
attention and MLP, the projections that make q, k, v and read z), ``torch.autograd.grad`` of
the metric, and ``(n_clean - n_corrupted) · ∂metric/∂n`` summed as each cell patches. With the
QK fix, the reference patches the query or key projection itself and reads the new pattern from
Hugging Face's own ``output_attentions`` (eager), times ``∂metric/∂pattern``. Models are float64
so that the formula, not rounding, is what is compared.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from introspect import (
    FactError,
    Inspector,
    InterventionError,
    LocatorError,
    attribution_patching,
    logit_difference,
)
from introspect._atp import patching_agreement, patching_result
from introspect.testing import build_tiny

CLEAN = torch.tensor([[5, 17, 42, 9, 33, 3], [8, 1, 60, 23, 4, 11]])
CORRUPTED = torch.tensor([[5, 29, 42, 50, 33, 3], [8, 7, 60, 2, 4, 11]])
METRIC = logit_difference(3, 4)
HEADS, KV_HEADS = 4, 2


def _build(family: str) -> nn.Module:
    if family == "gpt2":
        config: Any = GPT2Config(n_layer=2, n_embd=32, n_head=HEADS, vocab_size=64)
        return build_tiny(GPT2LMHeadModel, config).double()
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=64,
    )
    return build_tiny(LlamaForCausalLM, config).double()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Inspector]:
    model = _build(request.param)
    return request.param, model, Inspector(model)


@pytest.fixture(scope="module")
def hand(tiny: tuple[str, nn.Module, Inspector]) -> list[dict[str, torch.Tensor]]:
    """The formula by hand at blocks 0 and 1 of the tiny model."""
    family, model, _ = tiny
    return [_hand(family, model, block) for block in (0, 1)]


# -- the reference: plain hooks and torch.autograd ------------------------------------------------


def _parts(family: str, model: nn.Module, block: int) -> dict[str, nn.Module]:
    if family == "gpt2":
        layer = model.transformer.h[block]
        return {"block": layer, "attn": layer.attn, "mlp": layer.mlp, "o": layer.attn.c_proj}
    layer = model.model.layers[block]
    attn = layer.self_attn
    return {
        "block": layer,
        "attn": attn,
        "mlp": layer.mlp,
        "o": attn.o_proj,
        "q": attn.q_proj,
        "k": attn.k_proj,
        "v": attn.v_proj,
    }


@contextmanager
def _kept(
    family: str, model: nn.Module, block: int, seen: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Plain hooks keeping what the model goes on with at one block, by name."""
    parts = _parts(family, model, block)
    handles = []

    def output(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            seen[name] = out[0] if isinstance(out, tuple) else out

        return hook

    def block_input(module: nn.Module, args: Any, kwargs: Any) -> None:
        seen["input"] = args[0] if args else kwargs["hidden_states"]

    def o_input(module: nn.Module, args: Any) -> None:
        seen["z"] = args[0]

    for name in ("block", "attn", "mlp", "o"):
        handles.append(parts[name].register_forward_hook(output(name)))
    handles.append(parts["block"].register_forward_pre_hook(block_input, with_kwargs=True))
    handles.append(parts["o"].register_forward_pre_hook(o_input))
    if family == "gpt2":
        handles.append(parts["attn"].c_attn.register_forward_hook(output("qkv")))
    else:
        for name in ("q", "k", "v"):
            handles.append(parts[name].register_forward_hook(output(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _split(family: str, seen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """q, k, v and z per head, ``[batch, seq, heads, head_dim]``."""
    found = dict(seen)
    if family == "gpt2":
        width = seen["qkv"].shape[-1] // 3
        for n, name in enumerate(("q", "k", "v")):
            found[name] = seen["qkv"][..., n * width : (n + 1) * width]
    heads = {"q": HEADS, "z": HEADS, "k": HEADS, "v": HEADS}
    if family == "llama":
        heads.update(k=KV_HEADS, v=KV_HEADS)
    for name, count in heads.items():
        found[name] = found[name].unflatten(-1, (count, -1))
    return found


def _hand(family: str, model: nn.Module, block: int) -> dict[str, torch.Tensor]:
    """``(n_clean - n_corrupted) · ∂metric/∂n`` by position (``[seq]``) or by position and
    head (``[seq, heads]``), summed over the batch and the value's width."""
    clean: dict[str, torch.Tensor] = {}
    with torch.no_grad(), _kept(family, model, block, clean):
        model(CLEAN)
    corrupted: dict[str, torch.Tensor] = {}
    with torch.enable_grad(), _kept(family, model, block, corrupted):
        metric = METRIC(model(CORRUPTED).logits)
    names = sorted(corrupted)
    grads = dict(
        zip(names, torch.autograd.grad(metric, [corrupted[n] for n in names]), strict=True)
    )
    clean, after, grad = _split(family, clean), _split(family, corrupted), _split(family, grads)
    out: dict[str, torch.Tensor] = {}
    for name in ("block", "input", "attn", "mlp"):
        out[name] = ((clean[name] - after[name]) * grad[name]).sum(dim=(0, 2))
    for name in ("q", "k", "v", "z"):
        out[name] = ((clean[name] - after[name]) * grad[name]).sum(dim=(0, 3))
    o = _parts(family, model, block)["o"]
    weight = o.weight.t() if family == "gpt2" else o.weight  # [out, heads * head_dim]
    per_head = weight.unflatten(-1, (HEADS, -1))
    result = torch.einsum("bshd,ohd->bsho", clean["z"] - after["z"], per_head)
    out["result"] = (result * grads["o"].unsqueeze(-2)).sum(dim=(0, 3))
    return out


@contextmanager
def _projection_patch(
    family: str, model: nn.Module, block: int, site: str, value: torch.Tensor, rows: Any, head: Any
) -> Iterator[None]:
    """A plain hook that gives ``site`` (q or k) of ``head`` at ``rows`` its ``value`` there,
    at the projection's output (before rotary: at one position rotary is the same map)."""
    parts = _parts(family, model, block)

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        if family == "gpt2":
            width = out.shape[-1] // 3
            offset = {"q": 0, "k": width}[site]
            piece = out[..., offset : offset + width].unflatten(-1, (HEADS, -1))
            piece[:, rows, head] = value[:, rows, head]
            out[..., offset : offset + width] = piece.flatten(-2)
            return out
        shaped = out.unflatten(-1, (value.shape[2], -1))
        shaped[:, rows, head] = value[:, rows, head]
        return shaped.flatten(-2)

    module = parts["attn"].c_attn if family == "gpt2" else parts[site]
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _eager(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    twin.config._attn_implementation = "eager"
    for module in twin.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    return twin


def _hand_qk(
    family: str, model: nn.Module, block: int, site: str, cells: list[tuple[Any, Any]]
) -> list[float]:
    """Each cell through the softmax: Σ (pattern_patched - pattern) · ∂metric/∂pattern, the
    patched pattern from Hugging Face's own output_attentions with the projection patched."""
    eager = _eager(model)
    clean: dict[str, torch.Tensor] = {}
    with torch.no_grad(), _kept(family, eager, block, clean):
        eager(CLEAN)
    clean = _split(family, clean)
    with torch.enable_grad():
        out = eager(CORRUPTED, output_attentions=True)
        pattern = out.attentions[block]
        (grad,) = torch.autograd.grad(METRIC(out.logits), pattern)
    found = []
    for rows, head in cells:
        with (
            torch.no_grad(),
            _projection_patch(family, eager, block, site, clean[site], rows, head),
        ):
            patched = eager(CORRUPTED, output_attentions=True).attentions[block]
        found.append(float(((patched - pattern.detach()) * grad).sum()))
    return found


def _close(found: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    expected = expected.to(found.dtype)
    assert found.shape == expected.shape
    assert torch.allclose(found, expected, rtol=rtol, atol=1e-9), (found, expected)


# -- every cell is its formula ------------------------------------------------------------------


def test_block_attn_mlp_and_input_cells_are_the_formula(
    tiny: tuple[str, nn.Module, Inspector], hand: list[dict[str, torch.Tensor]]
) -> None:
    _, _, insp = tiny
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    found = attribution_patching(
        insp,
        *inputs,
        METRIC,
        locators=["block[0]", "block[1].input", "block[1].attn", "block[0].mlp"],
    )
    expected = [hand[0]["block"], hand[1]["input"], hand[1]["attn"], hand[0]["mlp"]]
    _close(found, torch.stack(expected))
    some = attribution_patching(
        insp, *inputs, METRIC, locators=["block[1]", "block[0].attn"], positions=[0, -1, 3]
    )
    _close(some, torch.stack([hand[1]["block"][[0, 5, 3]], hand[0]["attn"][[0, 5, 3]]]))


@pytest.mark.parametrize("site", ["z", "result", "q", "k", "v"])
def test_head_cells_are_the_formula_each_head_at_every_position_and_at_some(
    tiny: tuple[str, nn.Module, Inspector], hand: list[dict[str, torch.Tensor]], site: str
) -> None:
    _, _, insp = tiny
    by_head = [h[site] for h in hand]  # [seq, heads]
    locators = f"block[:].attn.{site}"
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    whole = attribution_patching(
        insp, *inputs, METRIC, locators=locators, heads="each", qk_fix=False
    )
    _close(whole, torch.stack([h.sum(0) for h in by_head]))
    some = attribution_patching(
        insp, *inputs, METRIC, locators=locators, heads="each", positions=[1, 5], qk_fix=False
    )
    _close(some, torch.stack([h[[1, 5]].t() for h in by_head]))
    together = attribution_patching(
        insp, *inputs, METRIC, locators=locators, positions=[3], qk_fix=False
    )
    _close(together, torch.stack([h[[3]].sum(-1) for h in by_head]))


@pytest.mark.parametrize("site", ["q", "k"])
def test_qk_fix_cells_are_the_pattern_change_through_the_softmax(
    tiny: tuple[str, nn.Module, Inspector], site: str
) -> None:
    family, model, insp = tiny
    heads = KV_HEADS if (site == "k" and family == "llama") else HEADS
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    locators = f"block[1].attn.{site}"
    each = attribution_patching(insp, *inputs, METRIC, locators=locators, heads="each")
    at = attribution_patching(
        insp, *inputs, METRIC, locators=locators, heads="each", positions=[1, 3]
    )
    together = attribution_patching(insp, *inputs, METRIC, locators=locators, positions=[3, 5])
    every = slice(None)
    cells = [(every, h) for h in range(heads)]
    cells += [([p], h) for h in range(heads) for p in (1, 3)]
    cells += [([p], every) for p in (3, 5)]
    # Llama's eager softmax runs in float32 even in a float64 model: the reference carries its
    # rounding, the fix does not (it recomputes the softmax in the model's float64).
    reference = torch.tensor(_hand_qk(family, model, 1, site, cells), dtype=torch.float64)
    _close(each[0], reference[:heads], 1e-4)
    _close(at[0], reference[heads : 3 * heads].view(heads, 2), 1e-4)
    _close(together[0], reference[3 * heads :], 1e-4)
    linear = attribution_patching(
        insp, *inputs, METRIC, locators=locators, heads="each", qk_fix=False
    )
    assert not torch.allclose(linear, each, rtol=1e-3, atol=0)  # the fix changes something


def test_cells_have_patching_sweeps_shapes_and_order(
    tiny: tuple[str, nn.Module, Inspector],
) -> None:
    family, model, insp = tiny
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    kv = KV_HEADS if family == "llama" else HEADS
    for kwargs, shape in (
        ({}, (2, 6)),
        ({"locators": ["block[1]", "block[0].mlp"], "positions": [2, 0]}, (2, 2)),
        ({"locators": "block[:].attn.z", "heads": "each"}, (2, HEADS)),
        ({"locators": "block[:].attn.pattern", "heads": "each"}, (2, HEADS)),
        ({"locators": "block[1].attn.v", "heads": "each", "positions": [4]}, (1, kv, 1)),
    ):
        assert tuple(attribution_patching(insp, *inputs, METRIC, **kwargs).shape) == shape
    small = {"locators": "block[1].attn.result", "heads": "each", "positions": [4]}
    assert insp.patching_sweep(*inputs, METRIC, **small).shape == (1, HEADS, 1)
    relative = attribution_patching(insp, *inputs, METRIC, relative=True)
    plain = attribution_patching(insp, *inputs, METRIC)
    with torch.no_grad():
        gap = float(METRIC(model(CLEAN).logits) - METRIC(model(CORRUPTED).logits))
    _close(relative, (plain / gap).float())


# -- against exact patching where first order holds ------------------------------------------------


def test_atp_and_atp_star_match_exact_patching_for_small_differences(
    tiny: tuple[str, nn.Module, Inspector],
) -> None:
    _, model, insp = tiny
    embeds = model.get_input_embeddings()(CLEAN).detach()
    noise = torch.randn(
        embeds.shape, generator=torch.Generator().manual_seed(0), dtype=embeds.dtype
    )
    clean, corrupted = {"inputs_embeds": embeds}, {"inputs_embeds": embeds + 1e-4 * noise}
    for kwargs in (
        {"locators": "block[:]", "positions": [1, 5]},
        {"locators": "block[:].attn.z", "heads": "each"},
        {"locators": "block[1].attn.q", "heads": "each", "positions": [5]},
        {"locators": "block[1].attn.k", "heads": "each"},
    ):
        exact = insp.patching_sweep(clean, corrupted, METRIC, **kwargs)
        for fix in (True, False):
            estimate = attribution_patching(insp, clean, corrupted, METRIC, qk_fix=fix, **kwargs)
            scale = float(exact.abs().max())
            assert float((estimate - exact).abs().max()) < 0.02 * scale, (kwargs, fix)
            assert patching_agreement(estimate, exact).pearson > 0.999


def test_qk_fix_is_closer_to_exact_patching_when_the_softmax_saturates() -> None:
    """Queries scaled up: a patched query moves its softmax far from linear."""
    model = _build("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    insp = Inspector(model)
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    kwargs: dict[str, Any] = {
        "locators": "block[1].attn.q",
        "heads": "each",
        "positions": [1, 3, 5],
    }
    exact = insp.patching_sweep(*inputs, METRIC, **kwargs)
    fixed = attribution_patching(insp, *inputs, METRIC, **kwargs)
    linear = attribution_patching(insp, *inputs, METRIC, qk_fix=False, **kwargs)
    assert float((fixed - exact).abs().sum()) < 0.5 * float((linear - exact).abs().sum())


# -- refusals: one line, before any forward where the inputs say enough ------------------------------


@contextmanager
def _forwards(model: nn.Module) -> Iterator[list[int]]:
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("kwargs", "inputs", "error", "match"),
    [
        ({}, ({"input_ids": CLEAN}, {"input_ids": CORRUPTED[:, :5]}), InterventionError,
         "same number of tokens"),
        ({"locators": "block[7]"}, None, LocatorError, "out of range"),
        ({"locators": "block[0].attn.nothing"}, None, LocatorError, "nothing"),
        ({"heads": "all"}, None, InterventionError, "heads= takes 'each'"),
        ({"locators": "block[0]", "heads": "each"}, None, LocatorError, "not a head locator"),
        ({"locators": ["block[0].attn.q", "block[0].attn.k"], "heads": "each"}, None,
         InterventionError, "one head count"),
        ({"locators": "block[0].attn.pattern"}, None, InterventionError, "positions= cannot"),
        ({"positions": [6]}, None, InterventionError, "out of range for inputs of 6 tokens"),
        ({"positions": ["last"]}, None, InterventionError, "integer positions"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_before_any_forward(
    tiny: tuple[str, nn.Module, Inspector],
    kwargs: dict[str, Any],
    inputs: Any,
    error: type[Exception],
    match: str,
) -> None:
    family, model, insp = tiny
    if family == "gpt2" and "one head count" in match:
        return  # GPT-2's keys have as many heads as its queries
    inputs = inputs or ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    with _forwards(model) as calls, pytest.raises(error, match=match) as caught:
        attribution_patching(insp, *inputs, METRIC, **kwargs)
    assert not calls
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("metric", "match"),
    [
        (lambda out: out.logits[:, -1, 3], r"scalar tensor .* shape \[2\]"),
        (lambda out: float(out.logits[0, -1, 3]), "scalar tensor .* float"),
        (lambda out: out.logits[0, -1].argmax().double(), "carries no gradient"),
    ],
)
def test_a_metric_that_is_not_a_differentiable_scalar_is_refused(
    metric: Callable[[Any], Any], match: str
) -> None:
    model = _build("gpt2")
    with pytest.raises(InterventionError, match=match):
        attribution_patching(
            Inspector(model), {"input_ids": CLEAN}, {"input_ids": CORRUPTED}, metric
        )


def test_qk_fix_is_refused_where_attention_is_computed_inline() -> None:
    model = build_tiny(
        BloomForCausalLM, BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=64)
    )
    insp = Inspector(model)
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    with _forwards(model) as calls, pytest.raises(InterventionError, match="inline") as caught:
        attribution_patching(insp, *inputs, METRIC, locators="block[:].attn.q", heads="each")
    assert not calls and "qk_fix=False" in str(caught.value)
    linear = attribution_patching(
        insp, *inputs, METRIC, locators="block[:].attn.q", heads="each", qk_fix=False
    )
    assert linear.shape == (2, 4)
    # Sites that do not reach the metric through a softmax of their own take no fix.
    assert attribution_patching(insp, *inputs, METRIC, locators="block[:].attn.z").shape == (2, 6)


def test_qk_fix_is_refused_when_the_scores_do_not_reproduce_the_pattern(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attention that adds a term the function's arguments do not show (a bias by key
    position here) cannot be recomputed: refused, never guessed."""
    model = _build("llama")
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = modeling.eager_attention_forward

    def biased(module: nn.Module, query: Any, key: Any, value: Any, mask: Any, **kw: Any) -> Any:
        bias = torch.linspace(0, 3, key.shape[-2], dtype=query.dtype)
        return original(module, query, key, value, bias if mask is None else mask + bias, **kw)

    monkeypatch.setattr(modeling, "eager_attention_forward", biased)
    insp = Inspector(model, prove=False)
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    with pytest.raises(InterventionError, match="do not reproduce the model's pattern"):
        attribution_patching(insp, *inputs, METRIC, locators="block[1].attn.k", heads="each")


def test_a_scaling_the_attention_function_is_not_given_is_proven_or_refused() -> None:
    """GPT-2 divides block i's scores by i + 1 with scale_attn_by_inverse_layer_idx: on
    transformers 5 its attention function is given that scaling, on 4.x it computes it itself.
    Either the fix is exact or it is refused: never the default scaling silently."""
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=HEADS, vocab_size=64, scale_attn_by_inverse_layer_idx=True
    )
    model = build_tiny(GPT2LMHeadModel, config).double()
    insp = Inspector(model)
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    try:
        found = attribution_patching(
            insp, *inputs, METRIC, locators="block[1].attn.q", heads="each"
        )
    except (InterventionError, FactError) as exc:
        # 4.x: the head-layout proof (first use) or the fix's own proof refuses.
        assert "do not reproduce the model's pattern" in str(exc) or "does not hold" in str(exc)
        return
    reference = _hand_qk("gpt2", model, 1, "q", [(slice(None), h) for h in range(HEADS)])
    _close(found[0], torch.tensor(reference, dtype=torch.float64), 1e-4)


def test_patching_agreement_counts_false_negatives() -> None:
    exact = torch.tensor([[5.0, -4.0, 0.1], [0.2, 3.0, 0.0]])
    estimate = torch.tensor([[4.0, 0.1, 0.3], [0.2, 2.5, 0.0]])
    found = patching_agreement(estimate, exact, top=3)
    assert (found.top, found.overlap, found.false_negatives) == (3, 2, [(0, 1)])
    assert found.cells == 6 and -1.0 <= found.spearman <= 1.0
    with pytest.raises(InterventionError, match="same arguments"):
        patching_agreement(estimate, exact[0])


# -- a table with its labels (the interactive view reads it) --------------------------------------


def test_patching_result_labels_each_axis_as_the_sweep_computed_it(
    tiny: tuple[str, nn.Module, Inspector],
) -> None:
    _, _, insp = tiny
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    tokens = [f"t{i}" for i in range(6)]
    exact = insp.patching_sweep(*inputs, METRIC, locators="block[:]", positions=[1, -1])
    estimate = attribution_patching(insp, *inputs, METRIC, locators="block[:]", positions=[1, -1])
    both = patching_result(
        insp, estimate, positions=[1, -1], tokens=tokens, exact=exact, metric="logit 3 - logit 4"
    )
    assert (both.locators, both.positions, both.heads) == (["block[0]", "block[1]"], [1, 5], None)
    assert both.method == "attribution patching" and both.model == type(insp.model).__name__
    assert both.exact is not None and torch.equal(both.exact, exact.float())
    data = both.to_dict()
    expected = patching_agreement(estimate, exact).to_dict()
    assert data["agreement"] == expected and data["values"] == estimate.float().tolist()
    assert data["tokens"] == tokens and data["metric"] == "logit 3 - logit 4"
    heads = {"locators": "block[:].attn.z", "heads": "each"}
    by_head = patching_result(insp, attribution_patching(insp, *inputs, METRIC, **heads), **heads)
    assert by_head.heads == list(range(HEADS)) and by_head.positions is None
    assert by_head.locators == ["block[0].attn.z", "block[1].attn.z"]
    table = attribution_patching(insp, *inputs, METRIC, positions=[4], **heads)
    by_spot = patching_result(insp, table, positions=[4], model="tiny", **heads)
    assert (by_spot.positions, by_spot.model, by_spot.method) == (
        [4],
        "tiny",
        "activation patching",
    )
    assert "3 locators" not in repr(by_spot) and "[2, 4, 1]" in repr(by_spot)


def test_patching_result_refuses_labels_that_do_not_fit_in_one_line(
    tiny: tuple[str, nn.Module, Inspector],
) -> None:
    _, _, insp = tiny
    table = torch.zeros(2, 6)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"heads": "all"}, "heads= takes 'each'"),
        (
            {"locators": "block[:].attn.z", "heads": "each", "positions": [0]},
            r"not \[locators x heads x positions\]",
        ),
        (
            {"locators": "block[0]"},
            r"shape \[2, 6\] is not \[locators x positions\] for 1 locators",
        ),
        ({"positions": [0, 1]}, "2 positions for a table of 6 columns"),
        ({"tokens": ["a", "b"]}, r"position 2 is out of range for 2 tokens \(use -2..1\)"),
        ({"exact": torch.zeros(2, 5)}, r"exact table of the same shape \[2, 6\], got \[2, 5\]"),
    ]
    for options, message in bad:
        with pytest.raises(InterventionError, match=message) as info:
            patching_result(insp, table, **options)
        assert "\n" not in str(info.value)
    with pytest.raises(InterventionError, match="values must be the table"):
        patching_result(insp, [[0.0]])  # type: ignore[arg-type]
    labelled = patching_result(insp, table)
    with pytest.raises(InterventionError, match="no exact table"):
        labelled.agreement()
