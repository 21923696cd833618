"""``outputs_changed_in_place``: records of modules whose output the model later mutates."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from introspect import AdapterSpec, Inspector


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Linear(4, 4)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.mlp(hidden_states)
        out += self.attn(hidden_states)  # changes the tensor the MLP returned
        return hidden_states + out


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


SPEC = AdapterSpec(name="tiny-in-place", blocks="layers", attn="attn", mlp="mlp")


@pytest.mark.parametrize("declared", [False, True])
def test_record_holds_what_the_module_returned_only_when_declared(declared: bool) -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    spec = SPEC.model_copy(update={"outputs_changed_in_place": ("mlp",)}) if declared else SPEC
    insp = Inspector(model, spec)
    x = torch.randn(2, 3, 4)
    with torch.no_grad(), insp.capture("block[0].mlp", "block[0].attn") as cap:
        model(x)
    mlp = model.layers[0].mlp(x).detach()
    recorded = cap["block[0].mlp"].output
    if declared:
        assert torch.equal(recorded, mlp)
        assert torch.equal(cap["block[0].mlp"].raw_output, mlp)
    else:
        # The hazard the field exists for: a plain reference sees the later in-place add.
        assert torch.allclose(recorded, mlp + cap["block[0].attn"].output)


def test_unknown_name_is_rejected() -> None:
    with pytest.raises(ValidationError, match="outputs_changed_in_place names 'ffn'"):
        SPEC.model_validate({**SPEC.model_dump(), "outputs_changed_in_place": ("ffn",)})
