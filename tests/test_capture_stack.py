"""cap.stack: several records as one tensor, as TransformerLens's stack_activation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from introspect import CaptureError, Inspector


def test_stack_of_every_block_equals_hugging_faces_hidden_states(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm)
    with torch.no_grad(), insp.capture("block[:]", "block[:].input", "block[1:].attn") as cap:
        hidden = lm(**inputs, output_hidden_states=True).hidden_states
    outputs = cap.stack("block[:]")
    n = insp.num_blocks
    assert outputs.shape == (n, *hidden[0].shape)
    # hidden_states[i + 1] is block i's output, except the last (after the final norm).
    assert torch.equal(outputs[:-1], torch.stack(hidden[1:n]))
    assert torch.equal(insp.apply_final_norm(outputs[-1]), hidden[-1])
    assert torch.equal(cap.stack("block[:].input"), torch.stack(hidden[:n]))
    assert torch.equal(cap.stack("block[-2:]")[0], outputs[-2])
    attn = cap.stack("block[1:].attn")
    assert attn.shape[0] == n - 1
    assert torch.equal(attn[0], cap["block[1].attn"].output)
    listed = cap.stack(["block[0]", "block[2].input"])
    assert torch.equal(listed[1], cap["block[2]"].input)


def test_stack_errors_say_what_to_do(lm: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    insp = Inspector(lm)
    with torch.no_grad(), insp.capture("block[:]", "embed") as cap:
        lm(**inputs)
    with pytest.raises(CaptureError, match=r"cap\.stack\('block\[:\]'\)"):
        cap["block[:]"]
    with pytest.raises(CaptureError, match="was not captured"):
        cap.stack("block[:].attn")
    with pytest.raises(CaptureError, match="names no record"):
        cap.stack([])
