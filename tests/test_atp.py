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
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from introspect import (
    FactError,
    Inspector,
    InterventionError,
    LocatorError,
    attribution_patching,
    logit_difference,
)
from introspect._analysis.atp import patching_agreement, patching_result
from introspect.testing import build_tiny

CLEAN = torch.tensor([[5, 17, 42, 9, 33, 3], [8, 1, 60, 23, 4, 11]])
CORRUPTED = torch.tensor([[5, 29, 42, 50, 33, 3], [8, 7, 60, 2, 4, 11]])
METRIC = logit_difference(3, 4)
HEADS, KV_HEADS = 4, 2


def _build(family: str, blocks: int = 2) -> nn.Module:
    if family == "gpt2":
        config: Any = GPT2Config(n_layer=blocks, n_embd=32, n_head=HEADS, vocab_size=64)
        return build_tiny(GPT2LMHeadModel, config).double()
    config = LlamaConfig(
        num_hidden_layers=blocks,
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


@contextmanager
def _detached(family: str, model: nn.Module, block: int | None) -> Iterator[None]:
    """GradDrop's drop by hand: the outputs of ``block``'s attention and MLP detached, so no
    gradient flows back through them (the forward is unchanged)."""
    if block is None:
        yield
        return
    parts = _parts(family, model, block)

    def detach(module: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (out[0].detach(), *out[1:])
        return out.detach()

    handles = [parts[name].register_forward_hook(detach) for name in ("attn", "mlp")]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hand(
    family: str, model: nn.Module, block: int, drop: int | None = None
) -> dict[str, torch.Tensor]:
    """``(n_clean - n_corrupted) · ∂metric/∂n`` by position (``[seq]``) or by position and
    head (``[seq, heads]``), summed over the batch and the value's width; with ``drop``, the
    gradient taken with that block's attention and MLP outputs detached."""
    clean: dict[str, torch.Tensor] = {}
    with torch.no_grad(), _kept(family, model, block, clean):
        model(CLEAN)
    corrupted: dict[str, torch.Tensor] = {}
    with (
        torch.enable_grad(),
        _kept(family, model, block, corrupted),
        _detached(family, model, drop),
    ):
        metric = METRIC(model(CORRUPTED).logits)
    names = sorted(corrupted)
    found = torch.autograd.grad(metric, [corrupted[n] for n in names], allow_unused=True)
    grads = {
        n: torch.zeros_like(corrupted[n]) if g is None else g
        for n, g in zip(names, found, strict=True)
    }
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
    family: str,
    model: nn.Module,
    block: int,
    site: str,
    cells: list[tuple[Any, Any]],
    drop: int | None = None,
) -> list[float]:
    """Each cell through the softmax: Σ (pattern_patched - pattern) · ∂metric/∂pattern, the
    patched pattern from Hugging Face's own output_attentions with the projection patched
    (the gradient with ``drop``'s attention and MLP outputs detached)."""
    eager = _eager(model)
    clean: dict[str, torch.Tensor] = {}
    with torch.no_grad(), _kept(family, eager, block, clean):
        eager(CLEAN)
    clean = _split(family, clean)
    with torch.enable_grad(), _detached(family, eager, drop):
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


def test_a_site_the_model_changes_in_place_is_refused_not_estimated_as_zero() -> None:
    """Falcon's parallel block adds the attention output into the MLP's output in place: the
    MLP's record is a copy no gradient reaches, so AtP would give 0 for every cell."""
    config = FalconConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=64,
        parallel_attn=True,
        new_decoder_architecture=False,
    )
    model = build_tiny(FalconForCausalLM, config).double()
    insp = Inspector(model)
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    with _forwards(model) as calls, pytest.raises(InterventionError) as caught:
        attribution_patching(insp, *inputs, METRIC, locators="block[:].mlp")
    assert not calls and "\n" not in str(caught.value)
    assert "block[0].mlp's output is changed in place" in str(caught.value)
    assert "patching_sweep" in str(caught.value)
    assert attribution_patching(insp, *inputs, METRIC, locators="block[:].attn").abs().sum() > 0


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


# -- GradDrop (AtP*): the mean over the other blocks of |AtP with one block dropped| ----------------

BLOCKS = 3


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def deep(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Inspector]:
    """Three blocks: a value in the middle block has one block before and one after it."""
    model = _build(request.param, BLOCKS)
    return request.param, model, Inspector(model)


@pytest.fixture(scope="module")
def dropped(
    deep: tuple[str, nn.Module, Inspector],
) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """The formula by hand at each block, with each block's attention and MLP detached."""
    family, model, _ = deep
    return {
        (block, drop): _hand(family, model, block, drop)
        for block in range(BLOCKS)
        for drop in range(BLOCKS)
    }


def _own(block: int, site: str) -> int | None:
    """The block a value belongs to: a block's input is written by the block before it."""
    if site == "input":
        return block - 1 if block > 0 else None
    return block


def _grad_drop_by_hand(
    dropped: dict[tuple[int, int], dict[str, torch.Tensor]],
    block: int,
    site: str,
    cell: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> torch.Tensor:
    """Mean over the blocks l other than the value's own of |its cells with l dropped|."""
    others = [d for d in range(BLOCKS) if d != _own(block, site)]
    return torch.stack([cell(dropped[block, d][site]).abs() for d in others]).mean(0)


def test_grad_drop_cells_are_the_mean_over_other_blocks_by_position(
    deep: tuple[str, nn.Module, Inspector],
    dropped: dict[tuple[int, int], dict[str, torch.Tensor]],
) -> None:
    _, _, insp = deep
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    sites = [(b, s) for b in range(BLOCKS) for s in ("block", "input", "attn", "mlp")]
    locators = [f"block[{b}]" if s == "block" else f"block[{b}].{s}" for b, s in sites]
    found = attribution_patching(insp, *inputs, METRIC, locators=locators, grad_drop=True)
    _close(found, torch.stack([_grad_drop_by_hand(dropped, b, s) for b, s in sites]))
    assert bool((found >= 0).all())
    some = attribution_patching(
        insp, *inputs, METRIC, locators=["block[1]", "block[0].input"], positions=[0, -1, 3],
        grad_drop=True,
    )  # fmt: skip
    expected = [_grad_drop_by_hand(dropped, 1, "block"), _grad_drop_by_hand(dropped, 0, "input")]
    _close(some, torch.stack(expected)[:, [0, 5, 3]])
    # The embedding is block 0's input (GPT-2 adds position embeddings, equal in both runs):
    # no block writes it, so it is averaged over every block.
    embed = attribution_patching(insp, *inputs, METRIC, locators="embed", grad_drop=True)
    _close(embed[0], _grad_drop_by_hand(dropped, 0, "input"))
    # The final norm comes after every block: no drop changes its gradient.
    norm = attribution_patching(insp, *inputs, METRIC, locators="final_norm", grad_drop=True)
    _close(norm, attribution_patching(insp, *inputs, METRIC, locators="final_norm").abs())
    # Every block before a value's own leaves AtP's gradient: the last block's values get |AtP|.
    plain = attribution_patching(insp, *inputs, METRIC, locators=locators)
    last = [n for n, (b, s) in enumerate(sites) if b == BLOCKS - 1 and s != "input"]
    _close(found[last], plain[last].abs())
    assert not torch.allclose(found, plain.abs(), rtol=1e-3, atol=0)  # dropping changes cells


@pytest.mark.parametrize("site", ["z", "result", "q", "k", "v"])
def test_grad_drop_head_cells_are_the_mean_over_other_blocks(
    deep: tuple[str, nn.Module, Inspector],
    dropped: dict[tuple[int, int], dict[str, torch.Tensor]],
    site: str,
) -> None:
    _, _, insp = deep
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    locators = f"block[:].attn.{site}"
    options: dict[str, Any] = {"locators": locators, "qk_fix": False, "grad_drop": True}

    def by_hand(cell: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return torch.stack([_grad_drop_by_hand(dropped, b, site, cell) for b in range(BLOCKS)])

    whole = attribution_patching(insp, *inputs, METRIC, heads="each", **options)
    _close(whole, by_hand(lambda t: t.sum(0)))  # each head at every position at once
    some = attribution_patching(insp, *inputs, METRIC, heads="each", positions=[1, 5], **options)
    _close(some, by_hand(lambda t: t[[1, 5]].t()))
    together = attribution_patching(insp, *inputs, METRIC, positions=[3], **options)
    _close(together, by_hand(lambda t: t[[3]].sum(-1)))


@pytest.mark.parametrize("site", ["q", "k"])
def test_grad_drop_with_the_qk_fix_takes_each_pass_through_the_softmax(
    deep: tuple[str, nn.Module, Inspector], site: str
) -> None:
    family, model, insp = deep
    heads = KV_HEADS if (site == "k" and family == "llama") else HEADS
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    found = attribution_patching(
        insp, *inputs, METRIC, locators=f"block[:2].attn.{site}", heads="each", grad_drop=True
    )
    cells = [(slice(None), h) for h in range(heads)]
    for block in (0, 1):
        others = [d for d in range(BLOCKS) if d != block]
        per_drop = [_hand_qk(family, model, block, site, cells, drop=d) for d in others]
        expected = torch.tensor(per_drop, dtype=torch.float64).abs().mean(0)
        _close(found[block], expected, 1e-4)  # Llama's eager softmax is float32 (see above)
    linear = attribution_patching(
        insp, *inputs, METRIC, locators=f"block[:2].attn.{site}", heads="each", grad_drop=True,
        qk_fix=False,
    )  # fmt: skip
    assert not torch.allclose(linear, found, rtol=1e-3, atol=0)


def test_grad_drop_pattern_cells_against_hugging_faces_attentions(
    deep: tuple[str, nn.Module, Inspector],
) -> None:
    family, model, insp = deep
    eager = _eager(model)
    with torch.no_grad():
        clean = eager(CLEAN, output_attentions=True).attentions
    expected = []
    for block in range(BLOCKS):
        terms = []
        for drop in (d for d in range(BLOCKS) if d != block):
            with torch.enable_grad(), _detached(family, eager, drop):
                out = eager(CORRUPTED, output_attentions=True)
                (grad,) = torch.autograd.grad(METRIC(out.logits), out.attentions[block])
            change = (clean[block] - out.attentions[block].detach()) * grad
            terms.append(change.sum(dim=(0, 2, 3)).abs())
        expected.append(torch.stack(terms).mean(0))
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    found = attribution_patching(
        insp, *inputs, METRIC, locators="block[:].attn.pattern", heads="each", grad_drop=True
    )
    _close(found, torch.stack(expected), 1e-4)


def test_grad_drop_stops_a_blocks_whole_update_where_its_parts_include_the_stream() -> None:
    """BLOOM's attention and MLP outputs already include the residual stream: the block's
    update (output minus input) is what is dropped, never the skip connection."""
    model = build_tiny(
        BloomForCausalLM, BloomConfig(n_layer=BLOCKS, hidden_size=32, n_head=4, vocab_size=64)
    ).double()
    layers = model.transformer.h

    def cells(drop: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        runs: list[dict[str, torch.Tensor]] = [{}, {}]
        handles = []
        for b, layer in enumerate(layers):

            def hook(module: nn.Module, args: Any, kwargs: Any, out: Any, b: int = b) -> Any:
                x = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple) else out
                if b == drop:
                    y = x + (y - x).detach()  # the update's gradient stopped, the skip kept
                runs[run][f"out{b}"], runs[run][f"in{b}"] = y, x
                return (y, *out[1:]) if isinstance(out, tuple) else y

            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        try:
            run = 0
            with torch.no_grad():
                model(CLEAN)
            run = 1
            with torch.enable_grad():
                metric = METRIC(model(CORRUPTED).logits)
        finally:
            for handle in handles:
                handle.remove()
        names = [f"out{b}" for b in range(BLOCKS)] + [f"in{b}" for b in range(BLOCKS)]
        grads = torch.autograd.grad(metric, [runs[1][n] for n in names])
        out = [
            ((runs[0][n] - runs[1][n]) * g).sum(dim=(0, 2))
            for n, g in zip(names, grads, strict=True)
        ]
        return torch.stack(out[:BLOCKS]), torch.stack(out[BLOCKS:])

    by_drop = {drop: cells(drop) for drop in range(BLOCKS)}
    outputs = [
        torch.stack([by_drop[d][0][b].abs() for d in range(BLOCKS) if d != b]).mean(0)
        for b in range(BLOCKS)
    ]
    block_inputs = [
        torch.stack([by_drop[d][1][b].abs() for d in range(BLOCKS) if d != _own(b, "input")]).mean(
            0
        )
        for b in range(BLOCKS)
    ]
    insp = Inspector(model)
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    locators = [f"block[{b}]" for b in range(BLOCKS)] + [f"block[{b}].input" for b in range(BLOCKS)]
    found = attribution_patching(insp, *inputs, METRIC, locators=locators, grad_drop=True)
    _close(found, torch.stack(outputs + block_inputs))


def test_grad_drop_is_one_forward_of_each_run_and_a_backward_per_block(
    deep: tuple[str, nn.Module, Inspector],
) -> None:
    _, model, insp = deep
    head = model.get_output_embeddings()
    passes: list[int] = []

    def count(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(lambda grad: passes.append(1))

    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    handle = head.register_forward_hook(count)
    try:
        for locators, expected in (
            ("block[:]", BLOCKS),  # one plain pass, one per block after block 0
            ("block[2]", 1),  # nothing after the last block: AtP's gradient alone
            ("block[1:]", 2),
            ("embed", BLOCKS),  # no block writes it: one pass per block, no plain one
        ):
            passes.clear()
            with _forwards(model) as forwards:
                attribution_patching(insp, *inputs, METRIC, locators=locators, grad_drop=True)
            assert (len(forwards), len(passes)) == (2, expected), locators
    finally:
        handle.remove()


def test_grad_drop_relative_divides_magnitudes_by_the_gaps_magnitude(
    deep: tuple[str, nn.Module, Inspector],
) -> None:
    _, model, insp = deep
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    plain = attribution_patching(insp, *inputs, METRIC, grad_drop=True)
    relative = attribution_patching(insp, *inputs, METRIC, grad_drop=True, relative=True)
    with torch.no_grad():
        gap = float(METRIC(model(CLEAN).logits) - METRIC(model(CORRUPTED).logits))
    _close(relative, (plain / abs(gap)).float())
    assert bool((relative >= 0).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grad_drop": "yes"}, "grad_drop= takes True or False, got 'yes'"),
        ({"grad_drop": 1}, "grad_drop= takes True or False, got 1"),
        ({"grad_drop": None}, "grad_drop= takes True or False, got None"),
        ({"qk_fix": "no"}, "qk_fix= takes True or False"),
        ({"relative": 0}, "relative= takes True or False"),
    ],
)
def test_grad_drop_bad_flags_are_refused_before_any_forward(
    tiny: tuple[str, nn.Module, Inspector], kwargs: dict[str, Any], match: str
) -> None:
    _, model, insp = tiny
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    with _forwards(model) as calls, pytest.raises(InterventionError, match=match) as caught:
        attribution_patching(insp, *inputs, METRIC, **kwargs)
    assert not calls and "\n" not in str(caught.value)


def test_grad_drop_on_one_block_is_refused_there_is_no_other_block() -> None:
    model = _build("gpt2", 1)
    insp = Inspector(model)
    inputs = ({"input_ids": CLEAN}, {"input_ids": CORRUPTED})
    for locators in ("block[:]", "embed"):
        with _forwards(model) as calls, pytest.raises(InterventionError) as caught:
            attribution_patching(insp, *inputs, METRIC, locators=locators, grad_drop=True)
        assert not calls and "\n" not in str(caught.value)
        assert "has 1 block: there is no other; pass grad_drop=False" in str(caught.value)
    assert attribution_patching(insp, *inputs, METRIC).shape == (1, 6)


def test_grad_drop_is_refused_on_an_encoder_decoder() -> None:
    model = build_tiny(
        T5ForConditionalGeneration,
        T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=64),
    )
    ids = {"input_ids": CLEAN, "decoder_input_ids": CLEAN[:, :3]}
    with _forwards(model) as calls, pytest.raises(InterventionError, match="encoder and a"):
        attribution_patching(Inspector(model), ids, ids, METRIC, grad_drop=True)
    assert not calls
