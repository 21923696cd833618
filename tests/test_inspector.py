from __future__ import annotations

import pytest
import torch
from torch import nn

from introspect import (
    AdapterSpec,
    CaptureError,
    FactError,
    Inspector,
    LocatorError,
    MissingPartError,
    NoAdapterError,
)
from introspect.testing import assert_conformant


@pytest.fixture
def calls(lm: nn.Module) -> list[int]:
    """Counts forwards of the model, to prove errors come before any work."""
    seen: list[int] = []
    handle = lm.register_forward_pre_hook(lambda module, args: seen.append(1))
    yield seen
    handle.remove()


def test_adapter_is_chosen_by_plugins(lm: nn.Module, base_model: nn.Module, family: str) -> None:
    assert Inspector(lm).adapter.name == family
    assert Inspector(base_model).adapter.name == family
    assert Inspector(lm, adapter=family).adapter.name == family


def test_hidden_states_equal_hugging_face(
    lm: nn.Module, base_model: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    for model in (lm, base_model):
        insp = Inspector(model)
        with torch.no_grad():
            ours = insp.hidden_states(**inputs)
            theirs = model(**inputs, output_hidden_states=True).hidden_states
        assert len(ours) == len(theirs) == insp.num_blocks + 1
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), f"hidden_states[{i}]"


def test_conformance_on_both_classes(
    lm: nn.Module, base_model: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    assert assert_conformant(lm, inputs).passed
    assert assert_conformant(base_model, inputs).passed


def test_logits_of_last_block_equal_model_logits(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm)
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        out = lm(**inputs, output_hidden_states=True)
    with torch.no_grad():
        logits = insp.logits(cap["block[-1]"].output)
        finished = insp.logits(out.hidden_states[-1], finished=True)
    assert torch.allclose(logits, out.logits, atol=1e-5)
    assert torch.allclose(finished, out.logits, atol=1e-5)


def test_indices_keep_only_those(lm: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    insp = Inspector(lm)
    with torch.no_grad():
        full = lm(**inputs, output_hidden_states=True).hidden_states
        picked = insp.hidden_states(**inputs, indices=[0, -1])
        middle = insp.hidden_states(**inputs, indices=[2, 1])
    assert len(picked) == 2
    assert torch.allclose(picked[0], full[0]) and torch.allclose(picked[1], full[-1])
    assert torch.allclose(middle[0], full[2]) and torch.allclose(middle[1], full[1])


def test_early_indices_stop_the_forward(lm: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    insp = Inspector(lm)
    ran: list[str] = []
    handle = insp.module("block[-1]").register_forward_hook(lambda *a: ran.append("last"))
    try:
        with torch.no_grad():
            first = insp.hidden_states(**inputs, indices=[0])
    finally:
        handle.remove()
    assert ran == []
    with torch.no_grad():
        assert torch.allclose(first[0], lm(**inputs, output_hidden_states=True).hidden_states[0])


def test_negative_and_positive_indices_name_one_record(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm)
    n = insp.num_blocks
    with torch.no_grad(), insp.capture("block[:]") as cap:
        lm(**inputs)
    for i in range(n):
        assert cap[f"block[{i}]"] is cap[f"block[{i - n}]"]
        assert insp.module(f"block[{i}]") is insp.module(f"block[{i - n}]")
    assert len(cap) == n
    with pytest.raises(CaptureError, match="several records"):
        cap["block[0:2]"]


def test_slices(lm: nn.Module) -> None:
    insp = Inspector(lm)
    blocks = insp.modules("block[:]")
    assert len(blocks) == insp.num_blocks
    assert insp.modules("block[1:]") == blocks[1:]
    assert insp.modules("block[::-1]") == blocks[::-1]
    assert [str(x) for x in insp.expand(["block[-2:].mlp"])] == ["block[1].mlp", "block[2].mlp"]
    with pytest.raises(LocatorError, match="several modules"):
        insp.module("block[0:2]")


def test_hidden_state_locator_for_every_index(
    lm: nn.Module, inputs: dict[str, torch.Tensor]
) -> None:
    insp = Inspector(lm)
    n = insp.num_blocks
    with torch.no_grad():
        theirs = lm(**inputs, output_hidden_states=True).hidden_states
    expected = ["block[0].input", *[f"block[{i}]" for i in range(n - 1)], "final_norm"]
    for i in range(-(n + 1), n + 1):
        loc = insp.hidden_state_locator(i)
        assert str(loc) == expected[i]
        with torch.no_grad(), insp.capture(loc) as cap:
            lm(**inputs)
        rec = cap[str(loc)]
        value = rec.input if loc.side == "input" else rec.output
        assert torch.allclose(value, theirs[i], atol=1e-6)
    for bad in (n + 1, -(n + 2)):
        with pytest.raises(LocatorError, match=rf"{n + 1} hidden states for {n} blocks"):
            insp.hidden_state_locator(bad)


def test_paths_are_dotted_paths_from_the_top(lm: nn.Module, family: str) -> None:
    insp = Inspector(lm)
    expected = {
        "gpt2": ("transformer.ln_f", "transformer.h.2", "transformer.wte", "lm_head"),
        "llama": ("model.norm", "model.layers.2", "model.embed_tokens", "lm_head"),
    }[family]
    got = tuple(insp.path(x) for x in ("final_norm", "block[-1]", "embed", "lm_head"))
    assert got == expected
    assert insp.module("block[0].attn") is lm.get_submodule(insp.path("block[0].attn"))


def test_records_capture_embed_and_head(lm: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    insp = Inspector(lm)
    with torch.no_grad(), insp.capture("embed", "lm_head") as cap:
        out = lm(**inputs)
    assert torch.equal(cap["embed"].input, inputs["input_ids"])
    assert torch.allclose(cap["embed"].output, insp.module("embed")(inputs["input_ids"]))
    assert torch.allclose(cap["lm_head"].output, out.logits)


@pytest.mark.parametrize(
    ("locator", "error", "fragment"),
    [
        ("block[3]", LocatorError, r"out of range for .* \(3 blocks.*: use -3\.\.2\)"),
        ("block[-4]", LocatorError, r"use -3\.\.2"),
        ("blorp", LocatorError, r"unknown locator 'blorp'.*valid: embed, block\[i\]"),
        ("block[0].ffn", LocatorError, r"unknown block part 'ffn'.*valid: block\[i\]\.attn"),
        ("encoder.block[0]", LocatorError, r"no stack named 'encoder'.*single stack"),
        ("block[", LocatorError, "cannot parse"),
    ],
)
def test_bad_locators_fail_before_the_model_runs(
    lm: nn.Module, calls: list[int], locator: str, error: type[Exception], fragment: str
) -> None:
    insp = Inspector(lm)
    with pytest.raises(error, match=fragment), insp.capture("block[0]", locator):
        lm(torch.tensor([[1, 2, 3]]))
    assert calls == []


def test_missing_part_says_which_adapter_and_why(lm: nn.Module, family: str) -> None:
    spec = Inspector(lm).adapter.model_copy(
        update={"name": "no-norm", "final_norm": None, "model_types": ()}
    )
    with pytest.raises(FactError, match=r"'no-norm' states facts .* hidden_states\[-1\]"):
        Inspector(lm, adapter=spec)  # the spec is wrong for this model: refused as such
    insp = Inspector(lm, adapter=spec, prove=False)
    with pytest.raises(
        MissingPartError, match=r"final_norm does not exist on adapter 'no-norm'.*BERT"
    ):
        insp.module("final_norm")
    assert torch.equal(insp.apply_final_norm(torch.ones(1, 2, 64)), torch.ones(1, 2, 64))


def test_base_model_has_no_head(base_model: nn.Module) -> None:
    insp = Inspector(base_model)
    with pytest.raises(MissingPartError, match="no lm_head: it is a base model"):
        insp.logits(torch.zeros(1, 2, 64))
    assert "lm_head" not in [str(x) for x in insp.locators()]


class Unclaimed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_unclaimed_model_lists_adapters_and_points_to_docs() -> None:
    with pytest.raises(NoAdapterError, match=r"no adapter claims Unclaimed.*gpt2.*llama.*plugin"):
        Inspector(Unclaimed())
    with pytest.raises(NoAdapterError, match="no adapter named 'nope'"):
        Inspector(Unclaimed(), adapter="nope")


def test_plain_module_with_explicit_spec() -> None:
    model = Unclaimed()
    spec = AdapterSpec(name="unclaimed", blocks="layers")
    insp = Inspector(model, adapter=spec)
    x = torch.randn(2, 4)
    with torch.no_grad(), insp.capture("block[:]") as cap:
        y = model(x)
    assert torch.equal(cap["block[0]"].input, x)
    assert torch.equal(cap["block[-1]"].output, y)
