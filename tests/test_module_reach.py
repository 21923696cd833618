"""Every module is reachable: sub-modules of block parts, raw module paths, and ``mlp.post``.

``block[i].mlp.post`` (the MLP's hidden activations: its down-projection's input) is proven on
every registry case whose adapter states ``mlp_post``: the down-projection applied to the
recorded value gives the MLP's own output, as Hugging Face computed it in the same forward
(where the MLP ends with that projection). Captures, edits, generation and errors follow the
same rules as every locator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _support.models import llama_config
from _support.registry_cases import CASES, SPECS, Built
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from introspect import Inspector, Locator, LocatorError, MissingPartError
from introspect.testing import build_tiny

# MLPs whose output is not their down-projection's output: BERT's "output" adds the residual
# and normalises; RWKV's channel mix gates the value projection with the receptance.
NOT_THE_OUTPUT = {"bert", "roberta", "rwkv"}

POST_CASES = [
    c for c in CASES if SPECS[c.adapter].mlp_post and SPECS[c.adapter].unsupported is None
]


def _llama() -> LlamaForCausalLM:
    return build_tiny(LlamaForCausalLM, llama_config(layers=2))  # hidden 64, MLP 128


IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


@pytest.mark.parametrize("case", POST_CASES, ids=[c.id for c in POST_CASES])
def test_mlp_post_is_the_down_projections_input(case: Any, built: Callable[[Any], Built]) -> None:
    found = built(case)
    if isinstance(found, str):
        pytest.skip(found)
    insp = Inspector(found.model, case.adapter)
    stack = insp.adapter.stack(None) if insp.adapter.stack_name is None else insp.adapter
    names = [f"block[{i}].mlp" for i in range(insp.num_blocks)]
    reachable = []
    for name in names:
        try:
            insp.module(f"{name}.post")
        except MissingPartError:
            continue  # a mixture-of-experts block of a hybrid: one projection per expert
        reachable.append(name)
    if not reachable:
        pytest.skip(f"no block of this {case.adapter} model has a single down-projection")
    name = reachable[0]
    with torch.no_grad(), insp.capture(f"{name}.post", name) as cap:
        found.model(**found.inputs)
    post = cap[f"{name}.post"].output
    down = insp.module(f"{name}.{stack.mlp_post}")
    assert down is insp.module(f"{name}.post")
    assert post.shape[-1] == next(p for p in down.parameters()).shape[-1] or post.shape[-1] in (
        getattr(down, "in_features", None),
        getattr(down, "nx", None),
    )
    if case.adapter not in NOT_THE_OUTPUT:
        rec = cap[name]
        expected = rec.output
        if "mlp" in stack.residual_in:
            # BLOOM and MPT add the residual inside the MLP: mlp(x, residual).
            residual = rec.kwargs.get("residual", rec.args[1] if len(rec.args) > 1 else None)
            expected = expected - residual
        with torch.no_grad():
            again = down(post)
        assert torch.allclose(again, expected, atol=1e-5, rtol=1e-4)


def test_post_edits_equal_plain_hooks_on_the_down_projection() -> None:
    model = _llama().eval()
    insp = Inspector(model)
    down = model.model.layers[1].mlp.down_proj

    def zero_position_2(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        x[:, 2] = 0
        return (x, *args[1:])

    handle = down.register_forward_pre_hook(zero_position_2)
    try:
        with torch.no_grad():
            expected = model(IDS).logits
    finally:
        handle.remove()
    with torch.no_grad(), insp.ablate("block[1].mlp.post", positions=[2]):
        got = model(IDS).logits
    assert torch.equal(got, expected)
    # The record holds the edited value and names the edit; the value before it stays.
    with (
        torch.no_grad(),
        insp.scale("block[1].mlp.post", 2.0),
        insp.capture("block[1].mlp.post") as cap,
    ):
        model(IDS)
    rec = cap["block[1].mlp.post"]
    assert rec.edits == ("block[1].mlp.post: scale(2)",)
    assert torch.equal(rec.output, 2 * rec.output_before_edit)


def test_submodule_and_raw_paths_record_what_plain_hooks_see() -> None:
    model = _llama().eval()
    insp = Inspector(model)
    seen: dict[str, torch.Tensor] = {}
    gate = model.model.layers[0].mlp.gate_proj
    o_proj = model.model.layers[1].self_attn.o_proj
    handles = [
        gate.register_forward_hook(lambda m, a, o: seen.__setitem__("gate", o)),
        o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o_in", a[0])),
    ]
    try:
        with (
            torch.no_grad(),
            insp.capture(
                "block[0].mlp.gate_proj", "module:model.layers.1.self_attn.o_proj.input"
            ) as cap,
        ):
            model(IDS)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(cap["block[0].mlp.gate_proj"].output, seen["gate"])
    assert torch.equal(cap["module:model.layers.1.self_attn.o_proj.input"].input, seen["o_in"])
    # One module, two names: the same record.
    assert insp.module("module:model.layers.0.mlp.gate_proj") is gate
    assert insp.path("block[0].mlp.gate_proj") == "model.layers.0.mlp.gate_proj"


def test_raw_paths_steer_and_follow_generation() -> None:
    model = _llama().eval()
    insp = Inspector(model)
    prompt = IDS[:1]
    with (
        torch.no_grad(),
        insp.capture("module:model.layers.0", "block[0].mlp.post") as cap,
    ):
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    joined = cap.concat("module:model.layers.0")
    assert joined.shape[:2] == (1, prompt.shape[1] + 2)
    assert cap.concat("block[0].mlp.post").shape == (1, prompt.shape[1] + 2, 128)
    with torch.no_grad():
        plain = model(prompt).logits
        with insp.steer("module:model.layers.1", torch.ones(64), positions=[-1]):
            steered = model(prompt).logits
        with insp.steer("block[1]", torch.ones(64), positions=[-1]):
            by_locator = model(prompt).logits
    assert not torch.equal(plain, steered)
    assert torch.equal(steered, by_locator)


def test_unreachable_names_say_what_is_there() -> None:
    model = _llama()
    insp = Inspector(model)
    with pytest.raises(LocatorError, match=r"gate_proj, up_proj, down_proj, act_fn.*mlp\.post"):
        insp.capture("block[0].mlp.nope")
    with pytest.raises(LocatorError, match=r"'model\.layers' \(ModuleList\) holds 0, 1"):
        insp.capture("module:model.layers.7")
    with pytest.raises(LocatorError, match=r"head values: attn\.q"):
        insp.capture("block[0].attn.nope")
    with pytest.raises(LocatorError, match="cannot parse"):
        insp.capture("module:model..layers")
    # An MLP question gets an MLP answer, not an attention-head one.
    with pytest.raises(MissingPartError, match="no attention heads"):
        insp.capture("block[0].mlp.z")  # z is a head value: mlp has no head layout
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    spec = Inspector(gpt2).adapter.model_copy(update={"mlp_post": None})
    with pytest.raises(MissingPartError, match=r"states no down-projection.*c_fc, c_proj"):
        Inspector(gpt2, spec, prove=False).capture("block[0].mlp.post")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


_SEGMENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}|[0-9]{1,2}", fullmatch=True).filter(
    lambda s: s not in ("input", "output")
)


@given(st.lists(_SEGMENT, min_size=1, max_size=5), st.sampled_from(["", ".input", ".output"]))
def test_raw_locators_round_trip(segments: list[str], side: str) -> None:
    text = "module:" + ".".join(segments) + side
    loc = Locator.parse(text)
    assert loc.is_raw and loc.path == ".".join(segments)
    assert loc.side == ("input" if side == ".input" else "output")
    assert Locator.parse(str(loc)) == loc
    assert loc.module_key == "module:" + loc.path
