"""Direct logit attribution: values sum to the model's own logit, on every adapter it claims.

The convention (final norm scale frozen at the forward's value) is checked against a hand
computation on GPT-2; every built-in case either decomposes (its values sum to the logit the
model itself returned) or is refused with its reason, and the set refused is pinned so that a
regression in either direction fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _support.models import gpt2_config, llama_config
from _support.registry_cases import CASES, SPECS, Built
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from introspect import CaptureError, Inspector, LocatorError
from introspect.testing import build_tiny

# Architectures whose stream is not embedding + what each block adds, or whose head is not
# linear after the final norm: refused with the reason, never approximated.
REFUSED = {
    "bart": "no separate attention and MLP",
    "bart-causal": "no separate attention and MLP",
    "bert": "already include",
    "roberta": "already include",
    "distilbert": "vocab_transform",
    "bloom": "already include",
    "mpt": "already include",
    "opt": "no separate attention and MLP",
    "t5": "already include",
    "gemma2": "soft-caps",
    "mamba": "not one embedding",
    # From transformers 5.25 Mamba2 reports the usual hidden_states layout: then the first
    # reason that holds is the missing attention/MLP split.
    "mamba2": "not one embedding|no separate attention and MLP",
    "rwkv": "not one embedding",
}


def _has_head(insp: Inspector) -> bool:
    try:
        insp.module("lm_head")
    except Exception:
        return False
    return True


DLA_CASES = [c for c in CASES if SPECS[c.adapter].unsupported is None]


@pytest.mark.parametrize("case", DLA_CASES, ids=[c.id for c in DLA_CASES])
def test_sums_to_the_models_logit(case: Any, built: Callable[[Any], Built]) -> None:
    found = built(case)
    insp = Inspector(found.model)
    if not _has_head(insp):
        pytest.skip("a base model has no logits to attribute")
    token = 5
    if case.adapter in REFUSED:
        with pytest.raises(CaptureError, match=REFUSED[case.adapter]):
            insp.direct_logit_attribution(found.inputs, token)
        return
    with torch.no_grad():
        logits = found.model(**found.inputs).logits
    for position in (-1, 2):
        dla = insp.direct_logit_attribution(found.inputs, token, position)
        assert dla.values.shape == (2, len(dla.labels))
        expected = logits[:, position, token].double()
        assert torch.allclose(dla.values.double().sum(-1), expected, atol=1e-4, rtol=1e-4)
    spec = SPECS[case.adapter]
    if spec.heads and not {"post_attn_norm", "post_mlp_norm"} <= spec.parts.keys():
        expected = logits[:, -1, token].double()
        whole = insp.direct_logit_attribution(found.inputs, token)
        heads = insp.direct_logit_attribution(found.inputs, token, per_head=True)
        assert torch.allclose(heads.values.double().sum(-1), expected, atol=1e-4, rtol=1e-4)
        n = insp.num_heads
        per_block = heads.values[:, 1:-1].reshape(2, insp.num_blocks, n + 1)
        # The mlp term is the same either way; the heads add up to the attn term less the
        # output projection's bias, which moves into "bias".
        mlp_whole = whole.values[:, 2:-1:2]
        assert torch.allclose(per_block[:, :, n], mlp_whole, atol=1e-5)


def test_gpt2_by_hand() -> None:
    model = build_tiny(GPT2LMHeadModel, gpt2_config())
    insp = Inspector(model)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    token = 11
    dla = insp.direct_logit_attribution(ids, token)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    with insp.capture("block[:]", "block[:].attn", "block[:].mlp") as cap, torch.no_grad():
        model(ids)
    x = cap["block[-1]"].output[0, -1]
    ln = model.transformer.ln_f
    sigma = torch.sqrt(x.var(unbiased=False) + ln.eps)
    column = model.lm_head.weight[token]

    def part(c: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((c - c.mean()) / sigma * ln.weight) @ column)

    hand = [part(cap["block[0]"].input[0, -1])]
    for i in range(3):
        hand += [
            part(cap[f"block[{i}].attn"].output[0, -1]),
            part(cap[f"block[{i}].mlp"].output[0, -1]),
        ]
    with torch.no_grad():
        hand.append(float(ln.bias @ column))
    assert torch.allclose(dla.values, torch.tensor(hand), atol=1e-5)
    assert dla.logit == pytest.approx(float(out.logits[0, -1, token]), abs=1e-5)
    assert dla.top(1)[0][0] in dla.labels


def test_bad_arguments_before_any_forward() -> None:
    model = build_tiny(LlamaForCausalLM, llama_config())
    insp = Inspector(model)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[1, 2, 3]])
    try:
        with pytest.raises(LocatorError, match=r"out of range|vocab"):
            insp.direct_logit_attribution(ids, 10_000)
        with pytest.raises(CaptureError, match="position 5 is out of range"):
            insp.direct_logit_attribution(ids, 3, position=5)
        with pytest.raises(CaptureError, match="token must be"):
            insp.direct_logit_attribution(ids, 3.5)  # type: ignore[arg-type]
        with pytest.raises(CaptureError, match="position must be an int"):
            insp.direct_logit_attribution(ids, 3, position="last")  # type: ignore[arg-type]
    finally:
        handle.remove()
    assert calls == []
