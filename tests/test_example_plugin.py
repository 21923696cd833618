"""The example plugin (examples/introspect-toylm), when installed, loads and is conformant.

Install it with ``pip install --no-deps -e examples/introspect-toylm``.
"""

from __future__ import annotations

import pytest
import torch

from introspect import Inspector, get_registry, new_plugin_manager
from introspect._plugins import plugin_infos
from introspect.testing import assert_conformant, perturb

toylm = pytest.importorskip(
    "introspect_toylm", reason="pip install --no-deps -e examples/introspect-toylm"
)


def test_example_plugin_loads_through_its_entry_point() -> None:
    pm = new_plugin_manager()
    infos = {info.name: info for info in plugin_infos(pm)}
    assert infos["introspect-toylm"].distribution == "introspect-toylm"
    assert infos["introspect-toylm"].adapters == ("toylm",)
    assert get_registry(pm).specs["toylm"] == toylm.TOYLM


def test_example_model_is_claimed_and_conformant() -> None:
    torch.manual_seed(0)
    model = perturb(toylm.ToyLM(toylm.ToyLMConfig(num_layers=2))).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    insp = Inspector(model, plugin_manager=new_plugin_manager())
    assert insp.adapter.name == "toylm"
    assert insp.path("final_norm") == "norm"
    report = assert_conformant(model, {"input_ids": ids}, adapter=insp.adapter)
    assert report.passed
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True)
        ours = insp.hidden_states(input_ids=ids)
    for a, b in zip(ours, reference["hidden_states"], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
