"""Head internals a TransformerLens user expects: ``scores``, ``q_pre``/``k_pre`` and a norm's
``scale``, proven against the model's own computation.

Every adapter's ``softmax(scores) == pattern``, ``scores`` recomputed from ``q``/``k`` and
``q == rotary(q_pre)`` are head checks (``test_heads_all``); here: every norm of every adapter
in the registry against its formula, the value masked scores hold, ``q_pre`` against the
projections it comes from (an independent computation, per family), edits, grad modes,
generation, and the refusals.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from _support.models import gpt2_config, hook_state, llama_config
from _support.registry_cases import CASES, SPECS
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from introspect import CaptureError, Inspector, InterventionError, LocatorError, MissingPartError
from introspect._hooks.heads import _PATCHED, _ROTATING
from introspect._hooks.norms import NORM_FORMS, NormForm, norm_form
from introspect._locators import Locator
from introspect.testing import build_tiny

IDS = torch.tensor([[5, 17, 42, 9, 77, 3], [8, 1, 99, 23, 4, 60]])


def _one_per_model_type() -> list[Any]:
    seen: set[tuple[str, str | None]] = set()
    found = []
    for case in CASES:
        key = (case.adapter, case.model_type)
        if SPECS[case.adapter].unsupported is None and case.class_name and key not in seen:
            seen.add(key)
            found.append(case)
    return found


TYPES = _one_per_model_type()


def _norms(insp: Inspector, spec: Any) -> list[str]:
    """Every norm locator of the first and last block and each stack's final norm."""
    names = []
    for stack in spec.stack_names:
        part_spec = spec.stack(stack)
        prefix = f"{stack}." if stack else ""
        candidates = [f"{prefix}final_norm"] if part_spec.final_norm else []
        last = insp.num_blocks_in(stack) - 1
        for i in sorted({0, last}):
            candidates += [f"{prefix}block[{i}].{name}" for name in part_spec.parts]
        for name in candidates:
            try:
                module = insp.module(name)
            except (MissingPartError, LocatorError):
                continue  # a part some blocks lack
            if "norm" in type(module).__name__.lower():
                names.append(name)
    return names


def _expected(form: NormForm, norm: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and the norm's output by hand, in float64, from the formula stated as data."""
    x = x.double()
    normalised = x - x.mean(-1, keepdim=True) if form.center else x
    eps = getattr(norm, form.eps) if isinstance(form.eps, str) else form.eps
    scale = torch.sqrt(normalised.pow(2).mean(-1, keepdim=True) + eps)
    out = normalised / scale
    if form.weight is not None:
        w = norm.weight.double()
        out = out * (1 + w if form.weight == "1+w" else w)
    if form.bias and getattr(norm, "bias", None) is not None:
        out = out + norm.bias.double()
    return scale, out


@pytest.mark.parametrize("case", TYPES, ids=[c.id for c in TYPES])
def test_norm_scales_and_masked_scores(case: Any, built: Any) -> None:
    """Each norm's scale is sqrt(var + eps) / sqrt(mean(x²) + eps) of its input, and the norm
    is normalised(x) / scale * weight (+ bias) as NORM_FORMS states; masked scores hold the
    dtype's lowest value (or -inf where a model adds two masks) and get no weight."""
    spec = SPECS[case.adapter]
    found = built(case)
    model, inputs = found.model, dict(found.inputs)
    insp = Inspector(model)
    norms = _norms(insp, spec)
    assert norms, f"{case.id}: no norm found"
    names = [*norms, *(f"{n}.scale" for n in norms)]
    prefix = f"{spec.stack_name}." if spec.stack_name else ""
    attn = f"{prefix}block[0].attn"
    tap = None
    if spec.attn is not None and spec.heads:
        tap = insp._resolver.head_tap(insp.locator(attn))
        if tap.why_not("scores") is None:
            names += [f"{attn}.scores", f"{attn}.pattern"]
    mask = inputs["attention_mask"].clone()
    mask[0, :2] = 0
    inputs["attention_mask"] = mask
    with torch.no_grad(), insp.capture(*names) as cap:
        model(**inputs)
    for name in norms:
        norm = insp.module(name)
        form = norm_form(norm, name)
        record = cap[name]
        scale, out = _expected(form, norm, record.input)
        captured = cap[f"{name}.scale"].output
        assert captured.shape == (*record.input.shape[:-1], 1)
        assert torch.allclose(captured.double(), scale, rtol=1e-6), name
        assert torch.allclose(record.output.double(), out, rtol=1e-4, atol=1e-5), name
    if f"{attn}.scores" in names:
        assert tap is not None
        scores = cap[f"{attn}.scores"].output
        lowest = torch.finfo(scores.dtype).min
        masked = scores <= lowest / 1e3
        assert masked.any(), f"{case.id}: nothing masked in a padded batch"
        held = {lowest, float("-inf")}
        scaled_after = getattr(tap.core, "scale_attn", None)
        if tap.inline and scaled_after is not None:  # CodeGen on 4.x divides after masking
            held.add(lowest / float(scaled_after))
        assert set(scores[masked].unique().tolist()) <= held
        # A padding query attends to nothing real: its row is uniform, the others weigh 0.
        real = mask.bool()[:, None, -scores.shape[2] :, None].expand(scores.shape)
        assert torch.all(cap[f"{attn}.pattern"].output[masked & real] == 0)


def test_every_norm_part_in_the_registry_is_proven() -> None:
    """A registry norm missing from NORM_FORMS would be refused: the table must name them."""
    names = {n.rpartition(".")[2] for n in NORM_FORMS}
    assert {"LayerNorm", "LlamaRMSNorm", "GemmaRMSNorm", "T5LayerNorm", "OlmoLayerNorm"} <= names


def _case(case_id: str) -> Any:
    for case in CASES:
        if case.id == case_id:
            return case
    raise AssertionError(case_id)


def _rotary(module: Any) -> Any:
    return sys.modules[type(module).__module__].apply_rotary_pos_emb


@pytest.mark.parametrize(
    ("case_id", "projection"),
    [
        ("llama-llama-LlamaForCausalLM", "q_proj"),
        ("llama-qwen3-Qwen3ForCausalLM", "q_norm"),  # after the per-head q-norm
        ("gpt_neox-gpt_neox-GPTNeoXForCausalLM", "query_key_value"),  # partial rotary
        ("phi-phi-PhiForCausalLM", "q_proj"),  # partial rotary, split before the function
    ],
)
def test_q_pre_is_the_projection_before_rotary(case_id: str, projection: str, built: Any) -> None:
    """q_pre is what the projection (and any q-norm) gives, per head; q is the model's own
    rotary function of it, with the cos/sin the attention received."""
    found = built(_case(case_id))
    model, inputs = found.model, found.inputs
    insp = Inspector(model)
    names = ["block[0].attn", f"block[0].attn.{projection}"] + [
        f"block[0].attn.{s}" for s in ("q_pre", "k_pre", "q", "k")
    ]
    with torch.no_grad(), insp.capture(*names) as cap:
        model(**inputs)
    q_pre, k_pre = cap["block[0].attn.q_pre"].output, cap["block[0].attn.k_pre"].output
    q, k = cap["block[0].attn.q"].output, cap["block[0].attn.k"].output
    b, s, heads, d = q.shape
    projected = cap[f"block[0].attn.{projection}"].output
    if projection == "query_key_value":  # GPT-NeoX: [q | k | v] per head
        projected = projected.view(b, s, heads, 3 * d)[..., :d]
    assert torch.equal(q_pre, projected.reshape(b, s, heads, d))
    cos, sin = cap["block[0].attn"].kwargs["position_embeddings"]
    r = cos.shape[-1]
    attn = insp.module("block[0].attn")
    with torch.no_grad():
        q_rot, k_rot = _rotary(attn)(
            q_pre[..., :r].transpose(1, 2), k_pre[..., :r].transpose(1, 2), cos, sin
        )
    assert torch.allclose(torch.cat([q_rot.transpose(1, 2), q_pre[..., r:]], -1), q, atol=1e-6)
    assert torch.allclose(torch.cat([k_rot.transpose(1, 2), k_pre[..., r:]], -1), k, atol=1e-6)
    assert (r < d) == (projection in ("query_key_value", "q_proj") and "llama" not in case_id)
    assert not torch.equal(q_pre, q)


def test_q_pre_and_k_pre_are_q_and_k_without_rotary() -> None:
    model = build_tiny(GPT2LMHeadModel, gpt2_config())
    insp = Inspector(model)
    names = [f"block[1].attn.{s}" for s in ("q_pre", "k_pre", "q", "k")]
    with torch.no_grad(), insp.capture(*names) as cap:
        model(IDS)
    assert torch.equal(cap[names[0]].output, cap[names[2]].output)
    assert torch.equal(cap[names[1]].output, cap[names[3]].output)


def _llama(implementation: str = "eager") -> Any:
    config = llama_config()
    config._attn_implementation = implementation
    return build_tiny(LlamaForCausalLM, config)


def test_steering_q_pre_is_rotated_like_the_model_rotates() -> None:
    model = _llama("sdpa")
    insp = Inspector(model)
    vector = torch.randn(16)
    names = ["block[1].attn", "block[1].attn.q_pre", "block[1].attn.q", "block[1].attn.k"]
    with torch.no_grad(), insp.capture("block[1].attn.q") as clean:
        model(IDS)
    with (
        torch.no_grad(),
        insp.steer("block[1].attn.q_pre", vector, scale=2.0, heads=[1], positions=[2]),
        insp.capture(*names) as cap,
    ):
        model(IDS)
    q_pre = cap["block[1].attn.q_pre"]
    delta = q_pre.output - q_pre.input
    assert torch.allclose(delta[:, 2, 1], 2.0 * vector.expand(2, 16))
    delta[:, 2, 1] = 0
    assert torch.all(delta == 0)
    cos, sin = cap["block[1].attn"].kwargs["position_embeddings"]
    k = cap["block[1].attn.k"].output
    with torch.no_grad():
        rotated, _ = _rotary(insp.module("block[1].attn"))(
            q_pre.output.transpose(1, 2), k.transpose(1, 2), cos, sin
        )
    q = cap["block[1].attn.q"].output
    assert torch.allclose(q, rotated.transpose(1, 2), atol=1e-6)
    changed = (q - clean["block[1].attn.q"].output).abs().amax(dim=-1)
    assert torch.all(changed[:, 2, 1] > 0)
    changed[:, 2, 1] = 0
    assert torch.all(changed == 0)


def test_a_q_pre_edit_reaches_a_partial_rotary(built: Any) -> None:
    found = built(_case("phi-phi-PhiForCausalLM"))
    model, inputs = found.model, found.inputs
    insp = Inspector(model)
    names = ["block[0].attn", "block[0].attn.q_pre", "block[0].attn.q", "block[0].attn.k_pre"]
    with (
        torch.no_grad(),
        insp.scale("block[0].attn.q_pre", 3.0, heads=0),
        insp.capture(*names) as cap,
    ):
        model(**inputs)
    q_pre = cap["block[0].attn.q_pre"].output
    cos, sin = cap["block[0].attn"].kwargs["position_embeddings"]
    r = cos.shape[-1]
    with torch.no_grad():
        q_rot, _ = _rotary(insp.module("block[0].attn"))(
            q_pre[..., :r].transpose(1, 2),
            cap["block[0].attn.k_pre"].output[..., :r].transpose(1, 2),
            cos,
            sin,
        )
    expected = torch.cat([q_rot.transpose(1, 2), q_pre[..., r:]], -1)
    assert torch.allclose(cap["block[0].attn.q"].output, expected, atol=1e-6)
    assert torch.allclose(q_pre[:, :, 0], 3.0 * cap["block[0].attn.q_pre"].input[:, :, 0])


def test_read_only_values_refuse_edits_before_any_forward() -> None:
    model = _llama("sdpa")
    insp = Inspector(model)
    model(IDS)  # transformers 5 installs its own hooks on first use
    state = hook_state(model)
    rotary = _rotary(model.model.layers[0].self_attn)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for site, edit in (
            ("k_pre", lambda loc: insp.ablate(loc, heads=0)),
            ("scores", lambda loc: insp.patch(loc, torch.zeros(1))),
            ("scores", lambda loc: insp.steer(loc, torch.ones(1))),
        ):
            with (
                pytest.raises(InterventionError, match=rf"attn.{site} can be read but not edited"),
                edit(f"block[0].attn.{site}"),
            ):
                model(IDS)
    finally:
        handle.remove()
    assert calls == []
    assert hook_state(model) == state
    assert model.config._attn_implementation == "sdpa"
    assert model.model.layers[0].self_attn.config is model.config
    assert _rotary(model.model.layers[0].self_attn) is rotary
    assert not _ROTATING and not _PATCHED


def test_values_in_every_grad_mode_leave_the_model_as_it_was() -> None:
    model = _llama("eager")
    insp = Inspector(model)
    names = [
        "block[1].attn.q_pre",
        "block[1].attn.k_pre",
        "block[1].attn.scores",
        "block[1].attn_norm.scale",
        "final_norm.scale",
    ]
    with torch.no_grad():
        plain = model(IDS).logits
    values = {}
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode(), insp.capture(*names) as cap:
            logits = model(IDS).logits
        assert torch.equal(logits, plain), mode.__name__
        values[mode.__name__] = {n: cap[n].output.detach().clone() for n in names}
    for name in names:
        assert torch.equal(values["no_grad"][name], values["inference_mode"][name])
        assert torch.equal(values["no_grad"][name], values["enable_grad"][name])
    # Gradients reach every record, and the model's own gradients are as without a capture.
    model.requires_grad_(True)
    try:
        model.zero_grad()
        model(IDS).logits[:, -1, 7].sum().backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        with insp.capture(*names) as cap:
            loss = model(IDS).logits[:, -1, 7].sum()
        grads = torch.autograd.grad(loss, [cap[n].output for n in names], retain_graph=True)
        loss.backward()
    finally:
        model.requires_grad_(False)
    for name, grad in zip(names, grads, strict=True):
        assert grad is not None and grad.abs().sum() > 0, name
    for name, parameter in model.named_parameters():
        if name in expected:
            assert torch.allclose(parameter.grad, expected[name], atol=1e-6), name


def test_scale_patch_freezes_the_norm_at_another_scale() -> None:
    model = build_tiny(GPT2LMHeadModel, gpt2_config())
    insp = Inspector(model)
    other = torch.tensor([[7, 7, 7, 1, 2, 3], [9, 8, 7, 6, 5, 4]])
    with torch.no_grad(), insp.capture("final_norm.scale") as ref:
        model(other)
    frozen = ref["final_norm.scale"].output
    with (
        torch.no_grad(),
        insp.patch("final_norm.scale", ref["final_norm.scale"]),
        insp.capture("final_norm", "final_norm.scale") as cap,
    ):
        logits = model(IDS).logits
    norm = insp.module("final_norm")
    x = cap["final_norm"].input
    by_hand = (x - x.mean(-1, keepdim=True)) / frozen * norm.weight + norm.bias
    assert torch.allclose(cap["final_norm"].output, by_hand, atol=1e-5)
    assert torch.equal(cap["final_norm.scale"].output, frozen)
    assert torch.allclose(logits, model.lm_head(by_hand), atol=1e-5)
    both = insp.scale("final_norm", 2.0) + insp.patch("final_norm.scale", frozen)
    with pytest.raises(InterventionError, match="are both edited"), torch.no_grad(), both:
        model(IDS)


def test_through_generate() -> None:
    model = _llama("sdpa")
    insp = Inspector(model)
    prompt = IDS[:1, :3]
    names = ["block[1].attn.q_pre", "block[1].attn.k_pre", "block[1].attn.scores"]
    with torch.no_grad(), insp.capture(*names, "final_norm.scale") as cap:
        out = model.generate(prompt, max_new_tokens=3, do_sample=False)
    with torch.no_grad(), insp.capture(*names, "final_norm.scale") as full:
        model(out[:, :-1])
    for name in ("block[1].attn.q_pre", "final_norm.scale"):
        assert torch.allclose(cap.concat(name), full[name].output, atol=1e-5)
    # Under the cache, k_pre holds each step's keys before rotary (the cache holds them after).
    steps = cap.steps("block[1].attn.k_pre")
    assert [s.shape[1] for s in steps] == [3, 1, 1]
    joined = torch.cat(list(steps), dim=1)
    assert torch.allclose(joined, full["block[1].attn.k_pre"].output, atol=1e-5)
    assert [s.shape[-2:] for s in cap.steps("block[1].attn.scores")] == [(3, 3), (1, 4), (1, 5)]
    for name in ("block[1].attn.k_pre", "block[1].attn.scores"):
        with pytest.raises(CaptureError, match=r"not one sequence|steps overlap"):
            cap.concat(name)
    with torch.no_grad(), insp.steer("block[1].attn.q_pre", torch.ones(16), heads=0):
        steered = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert steered.shape == out.shape


def test_scale_locators_and_refusals() -> None:
    assert str(Locator.parse("final_norm.scale")) == "final_norm.scale"
    assert str(Locator.parse("decoder.final_norm.scale.input")) == "decoder.final_norm.scale.input"
    assert Locator.parse("block[2].mlp_norm.scale").sub == "mlp_norm.scale"
    model = _llama("sdpa")
    insp = Inspector(model)
    assert insp.path("block[0].attn_norm.scale") == "model.layers.0.input_layernorm:scale"
    assert insp.path("final_norm.scale") == "model.norm:scale"
    with pytest.raises(MissingPartError, match=r"block\[0\].mlp is a LlamaMLP .*not a norm;"):
        insp.capture("block[0].mlp.scale")
    with pytest.raises(MissingPartError, match=r"lm_head is a Linear"):
        insp.capture("lm_head.scale")

    class OwnNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / x.norm(dim=-1, keepdim=True) * self.weight

    own = _llama("sdpa")
    own.model.norm = OwnNorm()
    with pytest.raises(MissingPartError, match=r"OwnNorm .*a norm whose formula is not proven"):
        Inspector(own, prove=False).capture("final_norm.scale")


def test_a_formula_the_norm_does_not_compute_is_an_error(monkeypatch: Any) -> None:
    model = _llama("sdpa")
    norm = model.model.layers[2].post_attention_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    wrong = NormForm(center=False, eps="variance_epsilon", weight="1+w")
    monkeypatch.setitem(NORM_FORMS, "LlamaRMSNorm", wrong)
    insp = Inspector(model)
    refused = pytest.raises(CaptureError, match=r"mlp_norm.scale: LlamaRMSNorm's output is not")
    with refused, torch.no_grad(), insp.capture("block[2].mlp_norm.scale"):
        model(IDS)


def test_q_pre_is_refused_where_rotary_cannot_be_followed() -> None:
    model = _llama("sdpa")
    insp = Inspector(model)
    tap = insp._resolver.head_tap(insp.locator("block[0].attn"))
    followed = tap.rotary
    tap.rotary = ()
    try:
        with pytest.raises(MissingPartError, match=r"receives position embeddings .* calls no"):
            insp.capture("block[0].attn.q_pre")
        insp.capture("block[0].attn.q")  # the others stay readable
    finally:
        tap.rotary = followed


def test_query_key_values_refuse_positions_and_rows_per_token(tmp_path: Any) -> None:
    """scores, like pattern, has no sequence axis first: positions= and extraction are refused
    (before, positions= would have picked along the heads axis), and k_pre counts kv heads."""
    from introspect import attribution_patching, extract, logit_difference
    from introspect.zoo import load_model

    model = _llama()
    insp = Inspector(model)
    toy_model, tokenizer = load_model("toy-llama", progress=False)
    toy = Inspector(toy_model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("One document.\n", encoding="utf-8")
    for site in ("scores", "pattern"):
        with pytest.raises(CaptureError, match=r"\[batch, heads, query, key\]"):
            insp.capture(f"block[0].attn.{site}", positions="last")
        with pytest.raises(LocatorError, match=r"extract block\[0\]\.attn\.z or the block"):
            extract(toy, tokenizer, [corpus], [f"block[0].attn.{site}"], tmp_path / "x")
        ids = torch.tensor([[1, 2, 3, 4]])
        with pytest.raises(InterventionError, match="positions= cannot be placed"):
            attribution_patching(
                insp,
                {"input_ids": ids},
                {"input_ids": ids},
                logit_difference(1, 2),
                locators=f"block[0].attn.{site}",
                positions=[-1],
            )
    assert not (tmp_path / "x").exists()
    assert insp.head_count("block[0].attn.k_pre") == insp.num_kv_heads
    assert insp.head_count("block[0].attn.q_pre") == insp.num_heads
    assert insp.head_count("block[0].attn.scores") == insp.num_heads
