"""A user's own nn.Module (no transformers) through an explicitly given AdapterSpec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from introspect import AdapterSpec, Inspector, LogitOp, MissingPartError, new_plugin_manager
from introspect.testing import assert_conformant, perturb

SCALE = 0.25


class Mixer(nn.Module):
    """Causal mean over previous positions, then a projection (a stand-in for attention)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        counts = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return self.proj(x.cumsum(dim=1) / counts)


class Block(nn.Module):
    """Pre-norm residual block; takes the stream as a keyword and returns a tuple."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mixer = Mixer(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
        )

    def forward(self, *, stream: torch.Tensor) -> tuple[torch.Tensor, None]:
        stream = stream + self.mixer(self.norm(stream))
        return stream + self.ffn(stream), None


class MyLM(nn.Module):
    """Embedding scaled outside its module, blocks, final norm, head, scaled logits."""

    def __init__(self, vocab: int = 50, hidden: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.final = nn.LayerNorm(hidden)
        self.unembed = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) * 2.0
        for layer in self.layers:
            x = layer(stream=x)[0]
        return self.unembed(self.final(x)) * SCALE


SPEC = AdapterSpec(
    name="mylm",
    embed="tok",
    blocks="layers",
    attn="mixer",
    mlp="ffn",
    final_norm="final",
    block_input_kwarg="stream",
    parts={"attn_norm": "norm"},
    lm_head="unembed",
    logit_ops=(LogitOp(kind="scale", value=SCALE),),
)


@pytest.fixture
def model() -> MyLM:
    torch.manual_seed(0)
    return perturb(MyLM()).eval()  # type: ignore[return-value]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))


def by_hand(model: MyLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states a Hugging Face model would return: block inputs, last one normed."""
    x = model.tok(ids) * 2.0
    states = [x]
    for layer in model.layers:
        x = layer(stream=x)[0]
        states.append(x)
    states[-1] = model.final(x)
    return states


def test_modules_and_paths(model: MyLM) -> None:
    insp = Inspector(model, adapter=SPEC)
    assert insp.num_blocks == 3
    assert insp.module("block[-1].attn") is model.layers[2].mixer
    assert insp.path("block[1].mlp") == "layers.1.ffn"
    assert insp.path("final_norm") == "final" and insp.path("lm_head") == "unembed"


def test_capture_reads_the_stream(model: MyLM, ids: torch.Tensor) -> None:
    insp = Inspector(model, adapter=SPEC)
    expected = by_hand(model, ids)
    with torch.no_grad(), insp.capture("embed", "block[:]", "block[0].attn") as cap:
        model(ids)
    # The block's stream arrives as a keyword and leaves inside a tuple: both are read.
    assert torch.allclose(cap["block[0]"].input, expected[0])
    assert cap["block[0]"].args == () and "stream" in cap["block[0]"].kwargs
    for i in range(3):
        assert isinstance(cap[f"block[{i}]"].raw_output, tuple)
        assert torch.allclose(
            cap[f"block[{i}]"].output, model.layers[i](stream=cap[f"block[{i}]"].input)[0]
        )
    # The embedding's record is the raw lookup; the model scales it outside the module.
    assert torch.allclose(cap["embed"].output * 2.0, expected[0])
    assert cap["block[0].attn"].output.shape == (2, 6, 16)


def test_hidden_states_like_reading(model: MyLM, ids: torch.Tensor) -> None:
    insp = Inspector(model, adapter=SPEC)
    with torch.no_grad():
        ours = insp.hidden_states(ids)
    expected = by_hand(model, ids)
    assert len(ours) == len(expected) == 4
    for a, b in zip(ours, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert [str(insp.hidden_state_locator(i)) for i in range(4)] == [
        "block[0].input",
        "block[0]",
        "block[1]",
        "final_norm",
    ]


def test_logits_through_its_head(model: MyLM, ids: torch.Tensor) -> None:
    insp = Inspector(model, adapter=SPEC)
    with torch.no_grad(), insp.capture("block[-1]", "block[1]") as cap:
        logits = model(ids)
    with torch.no_grad():
        assert torch.allclose(insp.logits(cap["block[-1]"].output), logits, atol=1e-6)
        # A logit lens from an earlier block goes through the same final norm and scale.
        lens = insp.logits(cap["block[1]"].output)
        expected = model.unembed(model.final(cap["block[1]"].output)) * SCALE
    assert torch.allclose(lens, expected, atol=1e-6)


def test_conformance_checks_apply_to_a_model_that_returns_hidden_states() -> None:
    class WithStates(MyLM):
        def forward(self, ids: torch.Tensor, output_hidden_states: bool = False) -> dict:  # type: ignore[override]
            out = {"logits": super().forward(ids)}
            if output_hidden_states:
                out["hidden_states"] = tuple(by_hand(self, ids))
            return out

    torch.manual_seed(0)
    model = perturb(WithStates()).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    assert assert_conformant(model, {"ids": ids}, adapter=SPEC).passed


def test_missing_part_and_no_adapter(model: MyLM) -> None:
    spec = SPEC.model_copy(update={"mlp": None, "missing": {"mlp": "MyLM has no MLP"}})
    with pytest.raises(MissingPartError, match="MyLM has no MLP"):
        Inspector(model, adapter=spec).module("block[0].mlp")
    with pytest.raises(LookupError, match="not a transformers model"):
        Inspector(model, plugin_manager=new_plugin_manager(load_entry_points=False))
