"""The ToyLM adapter, proven against the model's own hidden states and logits."""

from __future__ import annotations

import introspect_toylm
import pytest
import torch
from introspect_toylm import TOYLM, ToyLM, ToyLMConfig

from introspect import Inspector, get_registry, new_plugin_manager
from introspect.testing import assert_conformant, perturb


def tiny_model() -> ToyLM:
    torch.manual_seed(0)
    model = ToyLM(ToyLMConfig(num_layers=3))
    return perturb(model).eval()  # type: ignore[return-value]


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 7), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_the_plugin_registers_its_adapter() -> None:
    pm = new_plugin_manager(load_entry_points=False, plugins=[introspect_toylm])
    assert get_registry(pm).specs["toylm"] == TOYLM
    assert Inspector(tiny_model(), plugin_manager=pm).adapter == TOYLM


def test_conformant() -> None:
    report = assert_conformant(tiny_model(), inputs(), adapter=TOYLM)
    assert report.passed


def test_hidden_states_and_logits_by_hand() -> None:
    model, batch = tiny_model(), inputs()
    insp = Inspector(model, adapter=TOYLM)
    with torch.no_grad():
        reference = model(**batch, output_hidden_states=True)
        ours = insp.hidden_states(**batch)
        with insp.capture("embed", "pos_embed", "block[-1]") as cap:
            model(**batch)
        logits = insp.logits(cap["block[-1]"].output)
    assert len(ours) == len(reference["hidden_states"]) == 4
    for a, b in zip(ours, reference["hidden_states"], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # hidden_states[0] is block 0's input: the lookup plus the positions.
    assert torch.allclose(ours[0], cap["embed"].output + cap["pos_embed"].output, atol=1e-6)
    assert torch.allclose(logits, reference["logits"], atol=1e-5)


def test_entry_point_when_installed() -> None:
    pm = new_plugin_manager()
    if pm.get_plugin("introspect-toylm") is None:
        pytest.skip("not installed: pip install -e examples/introspect-toylm")
    assert Inspector(tiny_model(), plugin_manager=pm).adapter.name == "toylm"
