"""A spliced SAE's features are a locator: ``<site>.sae.features``, read and edited as any.

While ``insp.splice(sae, at)`` is active, ``<at>.sae.features`` names the features
``[batch, seq, d_sae]`` on their way from the encoder to the decoder: captures record them,
the usual verbs edit them (``features=`` selects latents as ``heads=`` selects heads), and the
result equals the splice's own feature edits and a hand-written forward.
"""

from __future__ import annotations

import pytest
import torch
from _support.models import llama_config
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from introspect import Inspector, InterventionError, MissingPartError, SAEError, SparseAutoencoder
from introspect.testing import build_tiny

IDS = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])


def _sae(d_in: int, seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(d_in, 4 * d_in, architecture="topk", k=6)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return sae


def _llama() -> LlamaForCausalLM:
    return build_tiny(LlamaForCausalLM, llama_config(layers=2)).eval()  # hidden 64, MLP 128


@pytest.fixture(scope="module")
def gpt2() -> tuple[GPT2LMHeadModel, Inspector]:
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).eval()
    return model, Inspector(model)


def test_features_are_recorded_as_the_splice_sees_them(
    gpt2: tuple[GPT2LMHeadModel, Inspector],
) -> None:
    model, insp = gpt2
    sae = _sae(32)
    with (
        torch.no_grad(),
        insp.splice(sae, "block[0]") as sp,
        insp.capture("block[0].sae.features", "block[0]") as cap,
    ):
        model(IDS)
    rec = cap["block[0].sae.features"]
    assert sp.features is not None and torch.equal(rec.output, sp.features)
    assert rec.output.shape == (2, 5, 128)
    # The record of the site itself holds the reconstruction the model went on with.
    assert torch.allclose(cap["block[0]"].output, sae(cap["block[0]"].output_before_edit))


@pytest.mark.parametrize("error_term", [False, True])
def test_verbs_on_features_equal_the_splices_own_edits(
    gpt2: tuple[GPT2LMHeadModel, Inspector], error_term: bool
) -> None:
    model, insp = gpt2
    sae = _sae(32, seed=1)
    with torch.no_grad():
        plain = model(IDS).logits
        with insp.splice(sae, "block[1]", error_term=error_term, ablate_features=[3, 7]):
            by_splice = model(IDS).logits
        with (
            insp.splice(sae, "block[1]", error_term=error_term),
            insp.ablate("block[1].sae.features", features=[3, 7]),
        ):
            by_verb = model(IDS).logits
        with (
            insp.splice(sae, "block[1]", error_term=error_term, steer_features={5: 2.0}),
        ):
            steered_by_splice = model(IDS).logits
        vector = torch.zeros(128)
        vector[5] = 2.0
        with (
            insp.splice(sae, "block[1]", error_term=error_term),
            insp.steer("block[1].sae.features", vector),
        ):
            steered_by_verb = model(IDS).logits
    assert torch.allclose(by_verb, by_splice, atol=1e-6)
    assert torch.allclose(steered_by_verb, steered_by_splice, atol=1e-6)
    assert not torch.allclose(steered_by_verb, plain, atol=1e-4)


def test_a_feature_edit_equals_a_hand_written_forward() -> None:
    model = _llama()
    insp = Inspector(model)
    sae = _sae(64, seed=2)
    layer = model.model.layers[0]

    def replace(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        features = sae.encode(output)
        features = features.clone()
        features[:, -1, 11] = 0.0  # latent 11 at the last position
        return sae.decode(features)

    handle = layer.register_forward_hook(replace)
    try:
        with torch.no_grad():
            expected = model(IDS).logits
    finally:
        handle.remove()
    with (
        torch.no_grad(),
        insp.splice(sae, "block[0]"),
        insp.ablate("block[0].sae.features", positions=[-1], features=11),
    ):
        got = model(IDS).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_gradients_reach_the_recorded_features(gpt2: tuple[GPT2LMHeadModel, Inspector]) -> None:
    model, insp = gpt2
    sae = _sae(32, seed=3)
    with (
        torch.enable_grad(),
        insp.splice(sae, "block[0]", error_term=True),
        insp.capture("block[0].sae.features") as cap,
    ):
        logits = model(IDS).logits
    features = cap["block[0].sae.features"].output
    (grad,) = torch.autograd.grad(logits[:, -1, 4].sum(), features)
    assert grad.shape == features.shape and grad.abs().sum() > 0


def test_features_follow_generation_steps(gpt2: tuple[GPT2LMHeadModel, Inspector]) -> None:
    model, insp = gpt2
    sae = _sae(32, seed=4)
    prompt = IDS[:1]
    with (
        torch.no_grad(),
        insp.splice(sae, "block[0]"),
        insp.capture("block[0].sae.features") as cap,
    ):
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert cap.concat("block[0].sae.features").shape == (1, prompt.shape[1] + 2, 128)


def test_bad_uses_are_refused_before_any_forward(
    gpt2: tuple[GPT2LMHeadModel, Inspector],
) -> None:
    model, insp = gpt2
    sae = _sae(32)
    with pytest.raises(MissingPartError, match="no SAE is spliced at block\\[0\\]"):
        insp.capture("block[0].sae.features")
    with pytest.raises(InterventionError, match="features= selects latents"):
        insp.ablate("block[0]", features=[1])
    with insp.splice(sae, "block[0]"):
        with (
            pytest.raises(SAEError, match="already spliced at block\\[0\\]"),
            insp.splice(sae, "block[0]"),
        ):
            pass
        with pytest.raises(InterventionError, match="latent 999 is out of range"):
            insp.ablate("block[0].sae.features", features=[999])
        with pytest.raises(InterventionError, match="features= takes integer latent"):
            insp.ablate("block[0].sae.features", features=["a"])
    # A capture built while the splice was active refuses to run after it ended.
    with insp.splice(sae, "block[0]"):
        stale = insp.capture("block[0].sae.features")
    with pytest.raises(Exception, match=r"belongs to an SAE splice that has ended"), stale:
        pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not insp._resolver.sae_sites


def test_an_mlp_hook_post_sae_splices_at_the_neurons(tmp_path: object) -> None:
    from pathlib import Path

    from _support.sae_formats import write_saelens

    from introspect import load_sae

    model = _llama()
    insp = Inspector(model)
    folder = Path(str(tmp_path)) / "post"
    write_saelens(folder, d_in=128, d_sae=96, hook_name="blocks.1.mlp.hook_post")
    sae = load_sae(folder)
    assert sae.locator == "block[1].mlp.post"
    down = model.model.layers[1].mlp.down_proj

    def replace(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        return (sae(args[0]),)

    handle = down.register_forward_pre_hook(replace)
    try:
        with torch.no_grad():
            expected = model(IDS).logits
    finally:
        handle.remove()
    with torch.no_grad(), insp.splice(sae) as sp:
        got = model(IDS).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert sp.features is not None and sp.features.shape == (2, 5, 96)
