"""Spec features for encoder-decoder stacks, split heads, tensor logit ops and stream ops.

Each is proven on a small plain-PyTorch model whose forward is written out here, so the
expected values follow from the code in this file alone.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pydantic
import pytest
import torch
from torch import nn

from introspect import AdapterSpec, Inspector, MissingPartError
from introspect._hooks.capture import Capture, Target
from introspect._hookspecs import hookimpl
from introspect._plugins import get_registry, new_plugin_manager
from introspect._spec import LogitOp, StackSpec, StreamOp
from introspect.testing import example_inputs

HIDDEN, VOCAB = 8, 11


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + torch.tanh(self.mlp(hidden))


class Stack(nn.Module):
    def __init__(self, embed: nn.Embedding, layers: int) -> None:
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        for block in self.layers:
            hidden = block(hidden)
        return self.norm(hidden)  # type: ignore[no-any-return]


class EncoderDecoder(nn.Module):
    """Two stacks calling one shared embedding module, like T5 on transformers 4.x."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(VOCAB, HIDDEN)
        self.encoder = Stack(self.shared, 2)
        self.decoder = Stack(self.shared, 3)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(ids)
        return self.head(self.decoder(decoder_ids) + memory.mean(1, keepdim=True))  # type: ignore[no-any-return]


ENC_DEC = AdapterSpec(
    name="toy-enc-dec",
    stack_name="decoder",
    encoder=StackSpec(
        embed="encoder.embed", blocks="encoder.layers", final_norm="encoder.norm", root="encoder"
    ),
    embed="decoder.embed",
    blocks="decoder.layers",
    final_norm="decoder.norm",
    root="decoder",
    lm_head="head",
)


def test_a_shared_module_records_each_stack_only_while_that_stack_runs() -> None:
    model = EncoderDecoder()
    insp = Inspector(model, ENC_DEC)
    ids, decoder_ids = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5]])
    assert insp.module("encoder.embed") is insp.module("decoder.embed")
    with insp.capture("encoder.embed", "decoder.embed", "lm_head") as cap:
        model(ids, decoder_ids)
    assert torch.equal(cap["encoder.embed"].output, model.shared(ids))
    assert torch.equal(cap["decoder.embed"].output, model.shared(decoder_ids))
    assert len(cap["encoder.embed"].steps) == len(cap["decoder.embed"].steps) == 1
    # lm_head runs outside the decoder's root and is still recorded.
    assert cap["lm_head"].output.shape == (1, 2, VOCAB)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_target_within_counts_nested_calls() -> None:
    inner = nn.Linear(2, 2)
    outer = nn.Sequential(inner)
    with Capture([Target("inner", inner, within=outer)]) as cap:
        inner(torch.ones(1, 2))  # outside `outer`: not recorded
        outer(torch.zeros(1, 2))
    assert torch.equal(cap["inner"].input, torch.zeros(1, 2))
    assert len(cap["inner"].steps) == 1


class SplitHead(nn.Module):
    """A model whose head is spread over three attributes (like DistilBERT's)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Stack(nn.Embedding(VOCAB, HIDDEN), 2)
        self.transform = nn.Linear(HIDDEN, HIDDEN)
        self.activation = nn.GELU()
        self.projector = nn.Linear(HIDDEN, VOCAB)
        self.register_buffer("bias", torch.randn(VOCAB))
        self.config = SimpleNamespace(new_flag=False, old_flag=True, scale=4.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.body(ids)
        return self.projector(self.activation(self.transform(hidden))) + self.bias  # type: ignore[no-any-return]


SPLIT = AdapterSpec(
    name="toy-split",
    embed="body.embed",
    blocks="body.layers",
    final_norm="body.norm",
    head_modules=("transform", "activation"),
    lm_head="projector",
    logit_ops=(LogitOp(kind="add", tensor="bias"),),
)


def test_split_head_and_tensor_logit_op() -> None:
    torch.manual_seed(0)
    model = SplitHead()
    insp = Inspector(model, SPLIT)
    ids = torch.tensor([[1, 2, 3, 4]])
    with insp.capture("block[-1]") as cap:
        logits = model(ids)
    assert torch.allclose(insp.logits(cap["block[-1]"].output), logits, atol=1e-6)
    assert insp.module("lm_head") is model.projector


def test_split_head_missing_module_is_named() -> None:
    spec = SPLIT.model_copy(update={"head_modules": ("transform", "nowhere")})
    with pytest.raises(MissingPartError, match="'nowhere' is missing"):
        Inspector(SplitHead(), spec).logits(torch.zeros(1, 2, HIDDEN))


@pytest.mark.parametrize(
    ("only_if", "scaled"),
    [("new_flag|old_flag", False), ("absent_flag|old_flag", True), ("absent_flag", False)],
)
def test_only_if_reads_the_first_flag_the_config_has(only_if: str, scaled: bool) -> None:
    op = LogitOp(kind="scale", config_attr="scale", only_if=only_if)
    insp = Inspector(SplitHead(), SPLIT.model_copy(update={"pre_head": (op,), "logit_ops": ()}))
    model: Any = insp.model
    hidden = torch.randn(1, 2, HIDDEN)
    normed = model.body.norm(hidden)
    expected = model.projector(model.activation(model.transform(normed * (4.0 if scaled else 1))))
    assert torch.allclose(insp.logits(hidden), expected, atol=1e-6)


def test_logit_op_needs_exactly_one_source() -> None:
    with pytest.raises(pydantic.ValidationError, match="exactly one of config_attr, value or"):
        LogitOp(kind="add", value=1.0, tensor="bias")
    with pytest.raises(pydantic.ValidationError, match="dotted module path"):
        LogitOp(kind="add", tensor="not a path")


class Rescaled(nn.Module):
    """Halves the stream after every ``rescale_every``-th block, outside any module."""

    def __init__(self, layers: int, every: int, final_norm: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.LayerNorm(HIDDEN) if final_norm else None
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.rescaled = True
        self.config = SimpleNamespace(rescale_every=every)

    def forward(self, ids: torch.Tensor) -> dict[str, Any]:
        hidden, states = self.embed(ids), []
        for i, block in enumerate(self.layers):
            hidden = block(hidden)
            if self.rescaled and (i + 1) % self.config.rescale_every == 0:
                hidden = hidden / 2
            states.append(hidden)
        if self.norm is not None:
            hidden = self.norm(hidden)
            states.append(hidden)
        return {"hidden_states": tuple(states), "logits": self.head(hidden)}


RESCALED = AdapterSpec(
    name="toy-rescaled",
    embed="embed",
    blocks="layers",
    final_norm="norm",
    lm_head="head",
    hidden_states_start="block_output",
    between_blocks=(
        StreamOp(kind="divide", value=2, every="rescale_every", only_if_attr="rescaled"),
    ),
)


@pytest.mark.parametrize(("layers", "every"), [(3, 1), (3, 2), (2, 2)])
@pytest.mark.parametrize("final_norm", [True, False], ids=["norm", "no_norm"])
def test_stream_ops_between_blocks(layers: int, every: int, final_norm: bool) -> None:
    torch.manual_seed(0)
    model = Rescaled(layers, every, final_norm)
    insp = Inspector(model, RESCALED)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        reference = model(ids)
        ours = insp.hidden_states(ids)
        with insp.capture("block[-1]") as cap:
            model(ids)
    assert len(ours) == len(reference["hidden_states"])
    for a, b in zip(ours, reference["hidden_states"], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert str(insp.hidden_state_locator(0)) == "block[1].input"
    last = insp.finish(cap["block[-1]"].output)
    assert torch.allclose(last, reference["hidden_states"][-1], atol=1e-6)
    assert torch.allclose(insp.logits(cap["block[-1]"].output), reference["logits"], atol=1e-6)


def test_stream_op_flag_off_means_no_change() -> None:
    model = Rescaled(2, 1)
    model.rescaled = False
    insp = Inspector(model, RESCALED)
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        reference = model(torch.tensor([[1, 2]]))
    assert torch.equal(insp.finish(cap["block[-1]"].output), reference["hidden_states"][-1])


class _ClaimPlugin:
    @hookimpl
    def register_adapters(self, register: Any) -> None:
        register(AdapterSpec(name="by-type", model_types=("toy",), blocks="layers"))
        register(AdapterSpec(name="by-class", architectures=("ToyEncoderOnly",), blocks="layers"))


class ToyEncoderOnly(nn.Module):
    config = SimpleNamespace(model_type="toy")


class ToyFull(nn.Module):
    config = SimpleNamespace(model_type="toy")


def test_a_class_name_claim_replaces_the_model_type_claim() -> None:
    registry = get_registry(new_plugin_manager(load_entry_points=False, plugins=[_ClaimPlugin()]))
    assert [s.name for s in registry.candidates(ToyEncoderOnly())] == ["by-class"]
    assert [s.name for s in registry.candidates(ToyFull())] == ["by-type"]


def test_example_inputs_add_decoder_ids_only_where_the_forward_takes_them() -> None:
    config = SimpleNamespace(vocab_size=VOCAB, is_encoder_decoder=True)

    class Seq2Seq(nn.Module):
        def forward(self, input_ids: Any, decoder_input_ids: Any = None) -> None: ...

    class EncoderOnly(nn.Module):
        def forward(self, input_ids: Any) -> None: ...

    assert "decoder_input_ids" in example_inputs(config)
    assert "decoder_input_ids" in example_inputs(config, model=Seq2Seq())
    assert "decoder_input_ids" not in example_inputs(config, model=EncoderOnly())
