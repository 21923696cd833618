"""Capture options that keep memory small, and gradients through captures and edits."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from introspect import CaptureError, Inspector


def _watch_outputs(module: nn.Module) -> tuple[list[weakref.ref[torch.Tensor]], Any]:
    seen: list[weakref.ref[torch.Tensor]] = []

    def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        seen.append(weakref.ref(tensor))

    return seen, module.register_forward_hook(hook)


def test_memory_options_keep_only_what_was_asked(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm)
    with torch.no_grad():
        with insp.capture("block[:]") as full:
            lm(**inputs)
        with insp.capture(
            "block[:]", positions="last", detach=True, device="cpu", dtype=torch.float16
        ) as small:
            lm(**inputs)
        with insp.capture("block[1]", positions=[0, -1]) as ends:
            lm(**inputs)
    for i in range(insp.num_blocks):
        rec = small[f"block[{i}]"]
        assert rec.output.shape == (2, 1, 64) and rec.output.dtype == torch.float16
        assert rec.input.shape == (2, 1, 64)
        want = full.last_token(f"block[{i}]").half()
        assert torch.equal(rec.output[:, 0], want)
        with pytest.raises(CaptureError, match="keep_raw=True"):
            _ = rec.args
    assert torch.equal(ends["block[1]"].output, full["block[1]"].output[:, [0, 5]])


@pytest.mark.parametrize("keep_raw", [False, True])
def test_a_reduced_capture_does_not_hold_the_full_tensors(
    lm: nn.Module, inputs: dict[str, torch.Tensor], keep_raw: bool
) -> None:
    insp = Inspector(lm)
    seen, handle = _watch_outputs(insp.module("block[1]"))
    try:
        with torch.no_grad(), insp.capture("block[1]", positions="last", keep_raw=keep_raw) as cap:
            lm(**inputs)
    finally:
        handle.remove()
    gc.collect()
    assert (seen[0]() is not None) == keep_raw
    assert cap["block[1]"].output.shape == (2, 1, 64)


@pytest.fixture
def lm64(lm: nn.Module) -> nn.Module:
    return lm.double()


# Llama's RMSNorm computes in float32 even in a float64 model: a step of 1e-3 keeps its rounding
# (~1e-7 relative) and the central difference's own error (~step^2) both far below 1e-4.
EPS, REL = 1e-3, 1e-4


def test_gradient_x_activation_matches_a_finite_difference(
    lm64: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm64)
    target = 7

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, target].sum()

    with insp.capture("block[1]") as cap:
        value = metric(lm64(**inputs).logits)
    activation = cap["block[1]"].output
    assert activation.requires_grad  # the capture kept the autograd graph
    (grad,) = torch.autograd.grad(value, activation)
    attribution = (grad * activation).sum(-1)  # gradient x activation, per token
    assert attribution.shape == (2, 6)

    direction = torch.randn(activation.shape, generator=torch.Generator().manual_seed(0)).double()
    eps = EPS

    def shifted(sign: float) -> float:
        with torch.no_grad(), insp.edit("block[1]", lambda h, rec: h + sign * eps * direction):
            return float(metric(lm64(**inputs).logits))

    finite = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert finite == pytest.approx(float((grad * direction).sum()), rel=REL)


def test_gradients_flow_into_a_steering_vector(
    lm64: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm64)
    vector = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    with insp.steer("block[0]", vector, positions="last"):
        loss = lm64(**inputs).logits[:, -1, 3].sum()
    loss.backward()
    assert vector.grad is not None
    eps = EPS
    # Along the gradient the derivative is its norm: the largest, so rounding matters least.
    norm = vector.grad.norm()
    direction = vector.grad / norm
    with torch.no_grad():
        with insp.steer("block[0]", direction, scale=eps, positions="last"):
            up = lm64(**inputs).logits[:, -1, 3].sum()
        with insp.steer("block[0]", direction, scale=-eps, positions="last"):
            down = lm64(**inputs).logits[:, -1, 3].sum()
    assert float((up - down) / (2 * eps)) == pytest.approx(float(norm), rel=REL)
