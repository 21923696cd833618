"""Every grad mode: the same values under no_grad, inference_mode, enable_grad and bf16
autocast, and under enable_grad the records are the tensors the model went on with, so
gradients with respect to them are the model's own (checked against plain hooks and, for
values inside the attention function, against central differences in float64)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from _support.models import FAMILIES
from torch import nn
from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM

from introspect import Inspector, head_scores, logit_difference
from introspect.testing import build_tiny

IDS = torch.tensor([[5, 17, 42, 9, 77, 3], [8, 1, 99, 23, 4, 60]])
MODES: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "enable_grad": torch.enable_grad,
}
LOCATORS = (
    "embed",
    "block[0]",
    "block[1].input",
    "block[1].attn",
    "block[1].mlp",
    "block[-1]",
    "final_norm",
    "block[1].attn.q",
    "block[1].attn.k",
    "block[1].attn.v",
    "block[1].attn.pattern",
    "block[1].attn.z",
    "block[1].attn.result",
)


def _inline(name: str) -> nn.Module:
    if name == "bloom":
        return build_tiny(
            BloomForCausalLM, BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=128)
        )
    config = FalconConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=128,
        multi_query=True,
        new_decoder_architecture=False,
        alibi=False,
    )
    return build_tiny(FalconForCausalLM, config)


def _model(name: str) -> nn.Module:
    if name in FAMILIES:
        config_fn, head_cls, _ = FAMILIES[name]
        return build_tiny(head_cls, config_fn())
    return _inline(name)


def _values(insp: Inspector, model: nn.Module) -> dict[str, torch.Tensor]:
    with insp.capture(*LOCATORS) as cap:
        logits = model(IDS).logits
    found = {
        loc: cap[loc].output if not loc.endswith(".input") else cap[loc].input for loc in LOCATORS
    }
    found["logits"] = logits
    return found


def _analyses(insp: Inspector, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every value the analyses give on fixed inputs, by name (in the grad mode of the call)."""
    found = _values(insp, model)
    with insp.steer("block[0]", torch.ones(64), 2.0), insp.ablate("block[1].attn.z", heads=[1]):
        found["edited"] = model(IDS).logits
    clean, corrupted = {"input_ids": IDS[:1]}, {"input_ids": IDS[1:]}
    found["sweep"] = insp.patching_sweep(clean, corrupted, logit_difference(3, 4))
    found["dla"] = insp.direct_logit_attribution(IDS[:1], 7, per_head=True).values
    found["lens"] = insp.logit_lens(IDS[:1], k=3).top_ids
    found["head scores"] = head_scores(insp, "induction", seq_len=8, batch=2).values
    return found


@pytest.mark.parametrize("mode", sorted(MODES))
def test_captures_edits_and_analyses_give_the_same_values_in_every_grad_mode(
    family: str, mode: str
) -> None:
    model = _model(family)
    insp = Inspector(model)
    with torch.no_grad():
        expected = _analyses(insp, model)
    with MODES[mode]():
        found = _analyses(insp, model)
        with insp.capture("block[-1]", "block[1].attn.z") as cap:
            generated = model.generate(  # type: ignore[operator]
                IDS, max_new_tokens=3, do_sample=False, pad_token_id=0
            )
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(found[key], value, atol=1e-5), key
    steps = cap.concat("block[-1]")
    assert steps.shape[:2] == (2, IDS.shape[1] + 2)
    with torch.no_grad():
        full = model(generated[:, :-1], output_hidden_states=True)
    assert torch.allclose(insp.apply_final_norm(steps), full.hidden_states[-1], atol=1e-5)


def test_bf16_autocast_capture_changes_nothing(family: str) -> None:
    """Bit-identical logits, except that a pattern capture runs eager attention (documented):
    then they differ from sdpa's by bf16 rounding only."""
    model = _model(family)
    insp = Inspector(model)
    exact = [loc for loc in LOCATORS if not loc.endswith("pattern")]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(IDS).logits
        with insp.capture(*exact) as cap:
            captured = model(IDS).logits
        with insp.capture("block[1].attn.pattern"):
            eager = model(IDS).logits
        hidden = model(IDS, output_hidden_states=True).hidden_states
        again = insp.hidden_states(input_ids=IDS)
    assert torch.equal(plain, captured)
    assert torch.allclose(plain.float(), eager.float(), atol=0.05)
    assert cap["block[1].attn.z"].output.dtype == torch.bfloat16
    for i, (ours, theirs) in enumerate(zip(again, hidden, strict=True)):
        assert torch.equal(ours, theirs), i


# -- gradients ----------------------------------------------------------------------------------


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, 3] - logits[1, -2, 7] + logits[:, 2, 11].sum()


@contextlib.contextmanager
def _plain_hooks(insp: Inspector, seen: dict[str, torch.Tensor]) -> Iterator[None]:
    """Plain torch hooks that keep the tensors the model goes on with (the reference)."""
    handles = []

    def keep(key: str, side: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any = None) -> None:
            if side == "input":
                seen[key] = args[0] if args else kwargs["hidden_states"]
            else:
                seen[key] = output[0] if isinstance(output, tuple) else output

        return hook

    attn_o = insp.module("block[1].attn.o")
    for key, loc, side in (
        ("block[0]", "block[0]", "output"),
        ("block[1].attn", "block[1].attn", "output"),
        ("block[1].mlp", "block[1].mlp", "output"),
        ("block[-1]", "block[-1]", "output"),
        ("embed", "embed", "output"),
    ):
        module = insp.module(loc)
        handles.append(module.register_forward_hook(keep(key, side), with_kwargs=True))
    handles.append(attn_o.register_forward_pre_hook(keep("o.input", "input"), with_kwargs=True))
    handles.append(attn_o.register_forward_hook(keep("o.output", "output"), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_gradients_reach_every_record_as_plain_hooks_see_them(name: str) -> None:
    model = _model(name)
    insp = Inspector(model)
    heads = insp.num_heads
    seen: dict[str, torch.Tensor] = {}
    with torch.enable_grad(), _plain_hooks(insp, seen):
        metric = _metric(model(IDS).logits)
        keys = sorted(seen)
        reference = dict(
            zip(keys, torch.autograd.grad(metric, [seen[k] for k in keys]), strict=True)
        )
    wanted = ["embed", "block[0]", "block[1].attn", "block[1].mlp", "block[-1]"]
    wanted += ["block[1].attn.z", "block[1].attn.result"]
    with torch.enable_grad(), insp.capture(*wanted) as cap:
        metric_here = _metric(model(IDS).logits)
    assert torch.equal(metric_here, metric)
    grads = torch.autograd.grad(metric_here, [cap[k].output for k in wanted])
    found = dict(zip(wanted, grads, strict=True))
    for key in ("embed", "block[0]", "block[1].attn", "block[1].mlp", "block[-1]"):
        assert found[key] is not None, key
        assert torch.allclose(found[key], reference[key], atol=1e-6), key
    z = reference["o.input"].unflatten(-1, (heads, -1))
    assert torch.allclose(found["block[1].attn.z"], z, atol=1e-6)
    per_head = reference["o.output"].unsqueeze(-2).expand_as(found["block[1].attn.result"])
    assert torch.allclose(found["block[1].attn.result"], per_head, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom", "falcon"])
@pytest.mark.parametrize("site", ["q", "k", "v", "pattern", "z", "result"])
def test_gradients_of_head_values_match_central_differences(name: str, site: str) -> None:
    model = _model(name).double()
    insp = Inspector(model)
    loc = f"block[1].attn.{site}"
    with torch.enable_grad(), insp.capture(loc) as cap:
        metric = _metric(model(IDS).logits)
    value = cap[loc].output
    (grad,) = torch.autograd.grad(metric, value)
    direction = torch.randn(
        value.shape, generator=torch.Generator().manual_seed(1), dtype=value.dtype
    )
    # Rotary tables stay float32 in a float64 model: a smaller step only measures their rounding.
    eps = 1e-3
    results = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            with insp.steer(loc, direction, sign * eps):
                results.append(_metric(model(IDS).logits))
    numeric = (results[0] - results[1]) / (2 * eps)
    analytic = (grad * direction).sum().to(numeric.dtype)  # BLOOM's softmax runs in float32
    assert torch.allclose(analytic, numeric, rtol=2e-3, atol=1e-6), (
        float(analytic),
        float(numeric),
    )


def test_gradients_reach_every_step_of_a_cached_loop(family: str) -> None:
    """A hand-written decoding loop under autograd (``generate`` itself runs under no_grad)."""
    model = _model(family)
    insp = Inspector(model)
    with torch.enable_grad(), insp.capture("block[1]", "block[1].attn.z") as cap:
        first = model(IDS[:1], use_cache=True)
        token = first.logits[:, -1:].argmax(-1)
        cache = getattr(first, "cache", None) or first.past_key_values
        name = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        second = model(token, **{name: cache}, use_cache=True)
    logit = second.logits[0, -1, 5]
    for key in ("block[1]", "block[1].attn.z"):
        steps = cap[key].steps
        assert [s.output.shape[1] for s in steps] == [IDS.shape[1], 1]
        grads = torch.autograd.grad(logit, [s.output for s in steps], retain_graph=True)
        # The second step reaches the logit directly, the first one through the KV cache.
        assert all(g.abs().sum() > 0 for g in grads), key
