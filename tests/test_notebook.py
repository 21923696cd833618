"""The original notebook's three findings, on GPT-2 and Llama, with forward and generate."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from torch import nn

from introspect import Inspector, get_hidden_state

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def _generate_hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    result = model.generate(
        **inputs,
        max_new_tokens=1,
        do_sample=False,
        output_hidden_states=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return result.hidden_states[0]


def _forward_hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    return model(**inputs, output_hidden_states=True).hidden_states


RUNNERS = {"forward": _forward_hidden_states, "generate": _generate_hidden_states}


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_three_findings_through_get_hidden_state(
    lm: nn.Module, family: str, tokenizer: Any, runner: str
) -> None:
    prompt = "Tokyo is the capital of Japan."
    with torch.no_grad():
        reference = RUNNERS[runner](lm, tokenizer(prompt))
    first = get_hidden_state(lm, tokenizer, prompt, 0)
    last = get_hidden_state(lm, tokenizer, prompt, -1)

    def hidden(raw: Any) -> torch.Tensor:
        return raw[0] if isinstance(raw, tuple) else raw

    # The raw output is exactly what the hook saw: a tuple for GPT-2 on transformers 4.x.
    expect_tuple = family == "gpt2" and TRANSFORMERS_MAJOR < 5
    assert isinstance(first["output"], tuple) is expect_tuple
    assert set(first) == {"args", "kwargs", "output"}

    # 1. hidden_states[1] is block 0's output.
    assert torch.allclose(reference[1], hidden(first["output"]), atol=1e-6)
    # 2. hidden_states[0] is block 0's input (the embedding output).
    assert torch.allclose(reference[0], first["args"][0], atol=1e-6)
    # 3. hidden_states[-1] is NOT the last block's output, but the final norm of it.
    final_norm = Inspector(lm).module("final_norm")
    raw_last = hidden(last["output"])
    assert not torch.allclose(reference[-1], raw_last, atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(reference[-1], final_norm(raw_last), atol=1e-6)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_three_findings_through_capture(
    lm: nn.Module, inputs: dict[str, torch.Tensor], runner: str
) -> None:
    insp = Inspector(lm)
    with torch.no_grad(), insp.capture("embed", "block[0]", "block[-1]", "final_norm") as cap:
        reference = RUNNERS[runner](lm, inputs)
    assert torch.allclose(reference[1], cap["block[0]"].output, atol=1e-6)
    assert torch.allclose(reference[0], cap["block[0]"].input, atol=1e-6)
    assert not torch.allclose(reference[-1], cap["block[-1]"].output, atol=1e-3)
    with torch.no_grad():
        normed = insp.apply_final_norm(cap["block[-1]"].output)
    assert torch.allclose(reference[-1], normed, atol=1e-6)
    assert torch.allclose(reference[-1], cap["final_norm"].output, atol=1e-6)
    # Record.output is the tensor on every version; raw_output is what the hook saw.
    assert isinstance(cap["block[-1]"].output, torch.Tensor)
    assert cap["block[-1]"].raw_output is not None
    assert cap["block[-1]"].args[0] is cap["block[-1]"].input


def test_capture_during_generate_records_each_step(lm: nn.Module) -> None:
    insp = Inspector(lm)
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )
    steps = cap["block[-1]"].steps
    assert [s.output.shape[1] for s in steps] == [4, 1, 1]
