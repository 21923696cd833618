"""Head locators and head edits at their edges: errors first, nothing left behind, generation.

The happy path of every architecture is proven in ``test_heads_all``; these tests try what a
researcher gets wrong or pushes: bad head indices, heads= where it means nothing, a pattern
captured from a model loaded with sdpa (switched to eager and back, even on an error), nested
uses, k/v edits under a KV cache (refused: the cache would keep the unedited keys), per-head
mean ablation, and q captured through generate equal to a full forward's q.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _support.models import gpt2_config, llama_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from introspect import CaptureError, Inspector, InterventionError, LocatorError, MissingPartError
from introspect.testing import build_tiny

IDS = torch.tensor([[5, 17, 42, 9, 77, 3], [8, 1, 99, 23, 4, 60]])


def llama(implementation: str = "sdpa") -> Any:
    model = build_tiny(LlamaForCausalLM, llama_config())
    model.set_attn_implementation(implementation)
    return model


def _hooks(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _configs(model: Any) -> list[Any]:
    return [m.config for m in model.modules() if hasattr(m, "config")]


def test_counts() -> None:
    insp = Inspector(llama())
    assert (insp.num_heads, insp.num_kv_heads, insp.head_dim) == (4, 2, 16)
    assert insp.head_count("block[1].attn.v") == 2
    assert insp.head_count("block[1].attn.result") == 4
    with pytest.raises(LocatorError, match="not a head locator"):
        insp.head_count("block[1].attn")


def test_pattern_switches_to_eager_and_back_even_on_error() -> None:
    model = llama("sdpa")
    insp = Inspector(model)
    model(IDS)  # transformers 5 installs its own hooks on first use
    hooks = _hooks(model)
    with insp.capture("block[0].attn.pattern"):
        assert model.config._attn_implementation == "eager"
        with insp.capture("block[1].attn.pattern"):  # nested: restored only at the outer exit
            pass
        assert model.config._attn_implementation == "eager"
        model(IDS)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), insp.capture("block[0].attn.q"):
        assert model.model.layers[0].self_attn.config is not model.config
        raise RuntimeError("boom")
    assert model.model.layers[0].self_attn.config is model.config
    assert all(c._attn_implementation == "sdpa" for c in _configs(model))
    assert _hooks(model) == hooks


def test_bad_heads_are_errors_before_any_forward() -> None:
    model = llama()
    insp = Inspector(model)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InterventionError, match=r"head 4 is out of range .* 4 heads"):
            insp.ablate("block[0].attn.z", heads=[4])
        with pytest.raises(InterventionError, match=r"head 2 is out of range .* 2 heads"):
            insp.ablate("block[0].attn.k", heads=2)  # k has num_kv_heads
        with pytest.raises(InterventionError, match=r"not one: edit 'block\[0\].attn.z'"):
            insp.ablate("block[0]", heads=[0])
        with pytest.raises(InterventionError, match="not one"):
            insp.scale("block[0].attn", 0.0, heads=[0])
        with pytest.raises(InterventionError, match="integer head indices"):
            insp.ablate("block[0].attn.z", heads=[0.5])
        with pytest.raises(InterventionError, match="heads= is empty"):
            insp.ablate("block[0].attn.z", heads=[])
        with pytest.raises(InterventionError, match="takes a head index"):
            insp.ablate("block[0].attn.z", heads="all")
        with pytest.raises(InterventionError, match="positions= cannot be placed"):
            insp.ablate("block[0].attn.pattern", positions=[1])
        with pytest.raises(InterventionError, match="mean ablation of"):
            insp.ablate("block[0].attn.pattern", mean_over=torch.ones(4))
        with pytest.raises(CaptureError, match="does not have first"):
            insp.capture("block[0].attn.pattern", positions="last")
        with pytest.raises(
            LocatorError, match=r"has no module at .logits.*head values: attn.q_pre"
        ):
            insp.capture("block[0].attn.logits")
        with pytest.raises(LocatorError, match="out of range"):
            insp.capture("block[7].attn.q")
    finally:
        handle.remove()
    assert calls == []


def test_steering_one_query_head_changes_only_its_pattern() -> None:
    model = llama()
    insp = Inspector(model)
    with insp.capture("block[0].attn.pattern") as clean:
        model(IDS)
    vector = torch.randn(16)
    with (
        insp.steer("block[0].attn.q", vector, scale=3.0, heads=[2]),
        insp.capture("block[0].attn.pattern", "block[0].attn.q") as cap,
    ):
        model(IDS)
    before, after = clean["block[0].attn.pattern"].output, cap["block[0].attn.pattern"].output
    changed = (after - before).abs().amax(dim=(0, 2, 3))
    assert changed[2] > 1e-3 and torch.all(changed[[0, 1, 3]] == 0)
    q = cap["block[0].attn.q"]
    assert torch.allclose(q.output[:, :, 2], q.input[:, :, 2] + 3.0 * vector)
    assert torch.equal(q.output[:, :, 0], q.input[:, :, 0])


def test_heads_and_positions_together() -> None:
    model = build_tiny(GPT2LMHeadModel, gpt2_config())
    insp = Inspector(model)
    with (
        insp.ablate("block[1].attn.z", heads=[1, -1], positions=[2]),
        insp.capture("block[1].attn.z") as cap,
    ):
        model(IDS)
    z = cap["block[1].attn.z"]
    zeroed = torch.zeros(z.output.shape[:3], dtype=torch.bool)
    zeroed[:, 2, [1, 3]] = True
    assert torch.all(z.output[zeroed] == 0)
    assert torch.equal(z.output[~zeroed], z.input[~zeroed])
    assert z.edits == ("block[1].attn.z: ablate(zero) heads=[1, -1]",)


def test_mean_ablation_is_one_vector_per_head() -> None:
    model = llama()
    insp = Inspector(model)
    with insp.capture("block[0].attn.z") as ref:
        model(IDS)
    values = ref["block[0].attn.z"].output
    with (
        insp.ablate("block[0].attn.z", mean_over=ref["block[0].attn.z"], heads=[3]),
        insp.capture("block[0].attn.z") as cap,
    ):
        model(IDS)
    out = cap["block[0].attn.z"].output
    assert torch.allclose(out[:, :, 3], values[:, :, 3].mean(dim=(0, 1)).expand_as(out[:, :, 3]))
    assert torch.equal(out[:, :, :3], values[:, :, :3])


def test_result_edit_equals_o_from_the_edited_results() -> None:
    model = build_tiny(GPT2LMHeadModel, gpt2_config())
    insp = Inspector(model)
    with (
        insp.scale("block[2].attn.result", 0.5, heads=0),
        insp.capture("block[2].attn.result", "block[2].attn.o") as cap,
    ):
        model(IDS)
    result = cap["block[2].attn.result"]
    assert torch.allclose(result.output[:, :, 0], 0.5 * result.input[:, :, 0])
    bias = insp.module("block[2].attn.o").bias
    assert torch.allclose(cap["block[2].attn.o"].output, result.output.sum(2) + bias, atol=1e-6)


def test_kv_edits_under_a_cache_are_refused() -> None:
    model = llama()
    insp = Inspector(model)
    prompt = IDS[:1, :3]
    with (
        insp.ablate("block[0].attn.k", heads=0),
        pytest.raises(InterventionError, match="not the KV cache"),
    ):
        model.generate(prompt, max_new_tokens=2, do_sample=False)
    with insp.ablate("block[0].attn.v", heads=0):
        out = model.generate(prompt, max_new_tokens=2, do_sample=False, use_cache=False)
    assert out.shape == (1, 5)


def test_q_through_generate_equals_a_full_forward() -> None:
    model = llama()
    insp = Inspector(model)
    prompt = IDS[:1, :3]
    with insp.capture("block[1].attn.q", "block[1].attn.z", "block[1].attn.k") as cap:
        out = model.generate(prompt, max_new_tokens=3, do_sample=False)
    with insp.capture("block[1].attn.q", "block[1].attn.z") as full:
        model(out[:, :-1])
    for name in ("block[1].attn.q", "block[1].attn.z"):
        assert torch.allclose(cap.concat(name), full[name].output, atol=1e-5)
    with pytest.raises(CaptureError, match="key axis of k"):
        cap.concat("block[1].attn.k")
    steps = cap.steps("block[1].attn.k")
    assert [s.shape[1] for s in steps] == [3, 4, 5]


def test_attention_free_and_missing_layouts_are_refused() -> None:
    from transformers import RwkvConfig, RwkvForCausalLM

    model = RwkvForCausalLM(
        RwkvConfig(num_hidden_layers=2, hidden_size=32, attention_hidden_size=32, vocab_size=64)
    ).eval()
    insp = Inspector(model)
    with pytest.raises(MissingPartError, match="no attention heads"):
        insp.capture("block[0].attn.z")
    with pytest.raises(MissingPartError, match="no attention heads"):
        insp.num_heads  # noqa: B018


@settings(max_examples=15, deadline=None)
@given(
    heads=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    factor=st.floats(-2, 2, allow_nan=False),
)
def test_scaling_heads_of_z_matches_o_on_scaled_z(heads: list[int], factor: float) -> None:
    model = _GPT2
    insp = Inspector(model)
    with (
        insp.scale("block[1].attn.z", factor, heads=heads),
        insp.capture("block[1].attn.z", "block[1].attn.o") as cap,
        torch.no_grad(),
    ):
        model(IDS)
    z = cap["block[1].attn.z"].input.clone()
    z[:, :, sorted(set(heads))] *= factor
    with torch.no_grad():
        hand = insp.module("block[1].attn.o")(z.flatten(-2))
    assert torch.allclose(cap["block[1].attn.o"].output, hand, atol=1e-5)


_GPT2 = build_tiny(GPT2LMHeadModel, gpt2_config())


def _inline_models() -> list[Any]:
    """Models whose attention transformers computes inline (traced, not dispatched)."""
    from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM

    bloom = build_tiny(
        BloomForCausalLM, BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=128)
    )
    falcon = build_tiny(
        FalconForCausalLM,
        FalconConfig(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            vocab_size=128,
            multi_query=True,
            alibi=False,
        ),
    )
    return [bloom, falcon]


@pytest.mark.parametrize("index", [0, 1], ids=["bloom-baddbmm", "falcon-multi-query"])
def test_inline_attention_edits_reach_the_product(index: int) -> None:
    model = _inline_models()[index]
    model.config._attn_implementation = "eager"
    insp = Inspector(model)
    with insp.capture("block[1].attn.pattern", "block[1].attn.z") as clean:
        model(IDS)
    vector = torch.randn(insp.head_dim)
    with (
        insp.steer("block[1].attn.q", vector, scale=2.0, heads=[1]),
        insp.capture("block[1].attn.pattern") as cap,
    ):
        model(IDS)
    changed = cap["block[1].attn.pattern"].output - clean["block[1].attn.pattern"].output
    per_head = changed.abs().amax(dim=(0, 2, 3))
    assert per_head[1] > 1e-4 and torch.all(per_head[[0, 2, 3]] == 0)
    with insp.ablate("block[1].attn.pattern", heads=0), insp.capture("block[1].attn.z") as cap:
        model(IDS)
    z = cap["block[1].attn.z"].output
    assert torch.all(z[:, :, 0] == 0)
    assert torch.allclose(z[:, :, 1:], clean["block[1].attn.z"].output[:, :, 1:], atol=1e-6)
    with insp.ablate("block[1].attn.v", heads=0), insp.capture("block[1].attn.z") as cap:
        model(IDS)
    if insp.num_kv_heads == 1:  # one value head serves every query head
        assert torch.all(cap["block[1].attn.z"].output == 0)
    else:
        assert torch.all(cap["block[1].attn.z"].output[:, :, 0] == 0)


def test_paths_of_head_values() -> None:
    insp = Inspector(build_tiny(GPT2LMHeadModel, gpt2_config()))
    assert insp.path("block[1].attn.q") == "transformer.h.1.attn:q"
    assert insp.path("block[1].attn.o") == "transformer.h.1.attn.c_proj"


def test_threads_capture_their_own_head_values() -> None:
    import threading

    model = llama()
    insp = Inspector(model)
    rows = {i: IDS[i : i + 1] for i in range(2)}
    with torch.no_grad(), insp.capture("block[1].attn.z", "block[1].attn.pattern") as ref:
        for ids in rows.values():
            model(ids)
    expected = ref.steps("block[1].attn.z")
    hooks = _hooks(model)
    got: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(10):
                with torch.no_grad(), insp.capture("block[1].attn.z") as cap:
                    model(rows[i])
                got.setdefault(i, []).append(cap["block[1].attn.z"].output)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in rows:
        assert len(got[i]) == 10
        for value in got[i]:
            assert torch.allclose(value, expected[i], atol=1e-5)
    assert model.model.layers[1].self_attn.config is model.config
    assert _hooks(model) == hooks


def test_a_boolean_mask_built_for_sdpa_is_refused_under_a_pattern_capture() -> None:
    """Packed documents: sdpa reads a boolean 4-D mask as "may attend", eager would add it to
    the scores. The pattern capture switches to eager, so it refuses rather than change what
    the model computes; the same mask as an additive float mask is read alike by both."""
    config = llama_config()
    config._attn_implementation = "sdpa"
    model = build_tiny(LlamaForCausalLM, config)
    insp = Inspector(model)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3, 8, 60]])
    doc = torch.tensor([0] * 4 + [1] * 4)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :])
    mask = allowed[None, None]
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        refused = pytest.raises(CaptureError, match=r"boolean attention mask.*additive float")
        with refused, insp.capture("block[1].attn.pattern"):
            model(ids, attention_mask=mask)
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(ids, attention_mask=mask).logits, plain)
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        with insp.capture("block[1].attn.pattern") as cap:
            captured = model(ids, attention_mask=additive).logits
    assert torch.allclose(captured, plain, atol=1e-5)
    pattern = cap["block[1].attn.pattern"].output
    assert float(pattern[..., 4:, :4].abs().max()) == 0.0  # never across documents
    # q/k/v captures keep sdpa and accept the boolean mask as it is.
    with torch.no_grad(), insp.capture("block[1].attn.q"):
        assert torch.equal(model(ids, attention_mask=mask).logits, plain)
