"""Sparse autoencoders: every format against a reference written from its documentation,
the site table, refusals, splicing (bit-identical with the error term, equal to plain hooks
without it), evaluation and training with resume."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _support.models import FAMILIES
from _support.sae_formats import (
    SAELENS_CASES,
    write_dictionary_learning,
    write_gemma_scope,
    write_llama_scope,
    write_saelens,
    write_sparsify,
)
from torch import nn

from introspect import (
    ActivationDataset,
    Inspector,
    SAEError,
    SparseAutoencoder,
    evaluate_sae,
    load_sae,
    train_sae,
)
from introspect._sae import map_site, splice
from introspect.testing import build_tiny

torch.set_grad_enabled(True)


def _x(d: int = 64, seed: int = 11, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    return torch.randn(*shape, d, generator=torch.Generator().manual_seed(seed)) * 2.0


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- references, each written from the format's own documentation -----------------------------


def ref_saelens(
    t: dict[str, torch.Tensor], cfg: dict[str, Any], x: torch.Tensor
) -> tuple[Any, Any]:
    """SAELens 6: normalise, subtract b_dec if apply_b_dec_to_input, encode, decode, undo."""
    norm = cfg["normalize_activations"]
    coeff = mu = std = None
    if norm == "constant_norm_rescale":
        coeff = cfg["d_in"] ** 0.5 / x.norm(dim=-1, keepdim=True)
        x_in = x * coeff
    elif norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x_in = (x - mu) / (std + 1e-5)
    else:
        x_in = x
    if cfg["apply_b_dec_to_input"]:
        x_in = x_in - t["b_dec"]
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (x_in @ t["W_enc"] + t["b_gate"]) > 0
        f = gate.float() * torch.relu(x_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    else:
        pre = x_in @ t["W_enc"] + t["b_enc"]
        if arch == "standard":
            f = torch.relu(pre)
        elif arch == "jumprelu":
            f = torch.relu(pre) * (pre > t["threshold"]).float()
        else:
            top = pre.topk(cfg["k"], dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    out = f @ t["W_dec"] + t["b_dec"]
    if coeff is not None:
        out = out / coeff
    if std is not None and mu is not None:
        out = out * std + mu
    return f, out


@pytest.mark.parametrize(("architecture", "apply_b_dec", "normalize"), SAELENS_CASES)
def test_saelens_matches_its_documented_encode_and_decode(
    tmp_path: Path, architecture: str, apply_b_dec: bool, normalize: str
) -> None:
    t = write_saelens(
        tmp_path,
        architecture=architecture,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=normalize,
    )
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    sae = load_sae(tmp_path)
    assert (sae.format, sae.architecture, sae.d_in, sae.d_sae) == ("saelens", architecture, 64, 128)
    assert sae.locator == "block[1]"
    x = _x()
    f, out = ref_saelens(t, cfg, x)
    with torch.no_grad():
        _close(sae.encode(x), f)
        _close(sae(x), out)
        if normalize == "none":
            _close(sae.decode(f), f @ t["W_dec"] + t["b_dec"])


def test_gemma_scope_matches_its_tutorial(tmp_path: Path) -> None:
    folder, a = write_gemma_scope(tmp_path, layer=1, kind="res")
    sae = load_sae(folder)
    assert (sae.format, sae.architecture, sae.locator) == ("gemma_scope", "jumprelu", "block[1]")
    x = _x()
    w_enc, b_enc, w_dec, b_dec, thr = (
        torch.from_numpy(a[k]) for k in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")
    )
    pre = x @ w_enc + b_enc  # Gemma Scope: no b_dec subtraction
    acts = (pre > thr) * torch.relu(pre)
    with torch.no_grad():
        _close(sae.encode(x), acts)
        _close(sae(x), acts @ w_dec + b_dec)
    mlp, _ = write_gemma_scope(tmp_path / "m", layer=3, kind="mlp")
    assert load_sae(mlp).locator == "block[3].mlp"
    assert load_sae(mlp).site.after_norm == "block[3].post_mlp_norm"


def test_llama_scope_scales_its_input_by_the_dataset_norm(tmp_path: Path) -> None:
    _, t = write_llama_scope(tmp_path, norm_in=3.0, threshold=0.2)
    sae = load_sae(tmp_path)
    assert (sae.format, sae.locator) == ("llama_scope", "block[1]")
    x = _x()
    scale = 64**0.5 / 3.0
    pre = (x * scale) @ t["encoder.weight"].T + t["encoder.bias"]
    # As SAELens 6.5 converts Llama Scope: the scalar threshold times the same scale.
    f = torch.relu(pre) * (pre > 0.2 * scale)
    out = (f @ t["decoder.weight"].T + t["decoder.bias"]) / scale
    with torch.no_grad():
        _close(sae.encode(x), f)
        _close(sae(x), out)
    assert "scaled by" in sae.processing.describe()


@pytest.mark.parametrize(
    "dict_class",
    ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder", "GatedAutoEncoder"],
)
def test_dictionary_learning_matches_its_classes(tmp_path: Path, dict_class: str) -> None:
    s = write_dictionary_learning(tmp_path, dict_class=dict_class, k=8)
    sae = load_sae(tmp_path)
    assert (sae.format, sae.locator) == ("dictionary_learning", "block[1]")
    x = _x()
    if dict_class == "AutoEncoder":
        f = torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        out = f @ s["decoder.weight"].T + s["bias"]
    elif dict_class == "AutoEncoderTopK":
        post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        top = post.topk(8, dim=-1)
        f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
        out = f @ s["decoder.weight"].T + s["b_dec"]
    elif dict_class == "BatchTopKSAE":
        post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        f = post * (post > s["threshold"])
        out = f @ s["decoder.weight"].T + s["b_dec"]
    elif dict_class == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        f = torch.relu(pre) * (pre > s["threshold"])
        out = f @ s["W_dec"] + s["b_dec"]
    else:
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        gate = (x_enc + s["gate_bias"]) > 0
        f = gate * torch.relu(x_enc * s["r_mag"].exp() + s["mag_bias"])
        out = f @ s["decoder.weight"].T + s["decoder_bias"]
    with torch.no_grad():
        _close(sae.encode(x), f)
        _close(sae(x), out)


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_matches_its_encode_and_decode(tmp_path: Path, skip: bool) -> None:
    folder, t = write_sparsify(tmp_path, hookpoint="layers.1", skip=skip, k=8)
    sae = load_sae(folder)
    assert (sae.format, sae.architecture, sae.k, sae.locator) == ("sparsify", "topk", 8, "block[1]")
    x = _x()
    post = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    top = post.topk(8, dim=-1, sorted=False)
    f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    out = f @ t["W_dec"] + t["b_dec"]
    if skip:
        out = out + x @ t["W_skip"].T
    with torch.no_grad():
        _close(sae.encode(x), f)
        _close(sae(x), out)


def test_centred_residual_saes_read_the_token_mean_removed(tmp_path: Path) -> None:
    t = write_saelens(tmp_path, hook_name="blocks.1.hook_resid_pre", center_writing_weights=True)
    sae = load_sae(tmp_path)
    assert sae.processing.centre and sae.locator == "block[1].input"
    x = _x()
    centred = x - x.mean(-1, keepdim=True)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    f, out = ref_saelens(t, cfg, centred)
    with torch.no_grad():
        _close(sae.encode(x), f)
        _close(sae(x), out + x.mean(-1, keepdim=True))
    # Not stated and not a residual site: nothing to decide; a z SAE is never centred.
    z = tmp_path / "z"
    write_saelens(
        z, d_in=16, hook_name="blocks.0.attn.hook_z", hook_head_index=2, center_writing_weights=None
    )
    assert not load_sae(z).processing.centre and load_sae(z).head_index == 2


def test_save_round_trips_through_the_saelens_layout(tmp_path: Path) -> None:
    for i, folder in enumerate(
        [
            write_gemma_scope(tmp_path / "g")[0],
            write_sparsify(tmp_path / "s", hookpoint="h.1", skip=True)[0],
        ]
    ):
        sae = load_sae(folder)
        again = load_sae(sae.save(tmp_path / f"saved{i}"))
        assert again.format == "saelens" and again.locator == sae.locator
        x = _x()
        with torch.no_grad():
            assert torch.equal(again(x), sae(x))
            assert torch.equal(again.encode(x), sae.encode(x))
    cfg = json.loads((tmp_path / "saved0" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["apply_b_dec_to_input"] is False and cfg["architecture"] == "jumprelu"


# -- the site table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "locator"),
    [
        ("hook_embed", "embed"),
        ("blocks.3.hook_resid_pre", "block[3].input"),
        ("blocks.3.hook_resid_post", "block[3]"),
        ("blocks.3.hook_resid_mid", "block[3].mlp_norm.input"),
        ("blocks.3.hook_mlp_out", "block[3].mlp"),
        ("blocks.3.hook_attn_out", "block[3].attn"),
        ("blocks.3.attn.hook_z", "block[3].attn.z"),
        ("blocks.3.mlp.hook_post", "block[3].mlp.post"),
        ("layers.3", "block[3]"),
        ("model.layers.3", "block[3]"),
        ("layers.3.mlp", "block[3].mlp"),
        ("h.3", "block[3]"),
        ("resid_post_layer_3", "block[3]"),
        ("hook_pos_embed", None),
        ("blocks.3.attn.hook_q", None),
        ("something_else", None),
    ],
)
def test_site_names_map_onto_locators(name: str, locator: str | None) -> None:
    site = map_site(name)
    assert site.locator == locator
    assert (site.reason is None) == (locator is not None and "resid_mid" not in name)


# -- refusals: one line each, before any forward ------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def test_bad_folders_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SAEError, match="no known SAE format") as exc:
        load_sae(tmp_path)
    _one_line(exc)
    nan = tmp_path / "nan"
    t = write_saelens(nan)
    t["W_dec"][3, 4] = float("nan")
    from safetensors.torch import save_file

    save_file(t, str(nan / "sae_weights.safetensors"))
    with pytest.raises(SAEError, match="non-finite") as exc:
        load_sae(nan)
    _one_line(exc)
    pickled = tmp_path / "pickled"
    write_saelens(pickled)
    (pickled / "sae_weights.safetensors").write_bytes(pickle.dumps({"W_enc": [1.0]}))
    with pytest.raises(SAEError, match=r"cannot be read as safetensors.*pickle") as exc:
        load_sae(pickled)
    _one_line(exc)
    shape = tmp_path / "shape"
    write_saelens(shape)
    cfg = json.loads((shape / "cfg.json").read_text())
    cfg["d_sae"] = 96
    (shape / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match=r"W_enc has shape \(64, 128\), expected \(64, 96\)") as exc:
        load_sae(shape)
    _one_line(exc)
    unknown = tmp_path / "unknown-centring"
    write_saelens(unknown, center_writing_weights=None)
    with pytest.raises(SAEError, match="center_writing_weights=True") as exc:
        load_sae(unknown)
    _one_line(exc)
    assert load_sae(unknown, center_writing_weights=True).processing.centre
    scaled = tmp_path / "scaled"
    write_saelens(scaled, normalize_activations="expected_average_only_in")
    with pytest.raises(SAEError, match="norm_scaling_factor") as exc:
        load_sae(scaled)
    _one_line(exc)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("unpickled!",))


def test_dictionary_learning_never_unpickles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_dictionary_learning(tmp_path)
    torch.save({"encoder.weight": _Evil()}, tmp_path / "ae.pt")
    with pytest.raises(SAEError, match="weights_only=True") as exc:
        load_sae(tmp_path)
    _one_line(exc)
    assert "unpickled" not in capsys.readouterr().out


# -- splicing ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2() -> tuple[nn.Module, Inspector]:
    config_fn, head_cls, _ = FAMILIES["gpt2"]
    model = build_tiny(head_cls, config_fn())
    return model, Inspector(model)


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, Inspector]:
    config_fn, head_cls, _ = FAMILIES["llama"]
    model = build_tiny(head_cls, config_fn())
    return model, Inspector(model)


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request: pytest.FixtureRequest) -> tuple[nn.Module, Inspector]:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


IDS = torch.tensor([[5, 17, 42, 9, 77, 3], [8, 1, 99, 23, 4, 60]])


def _topk_sae(tmp_path: Path, hook: str = "blocks.1.hook_resid_post") -> SparseAutoencoder:
    write_saelens(tmp_path, architecture="topk", k=8, hook_name=hook, seed=5)
    return load_sae(tmp_path)


def _block(model: nn.Module, i: int) -> nn.Module:
    base = model.base_model
    return base.h[i] if hasattr(base, "h") else base.layers[i]  # type: ignore[index]


def _replace_output(fn: Any) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0], args), *output[1:])
        return fn(output, args)

    return hook


def test_error_term_splice_leaves_the_logits_bit_identical(
    tiny: tuple[nn.Module, Inspector], tmp_path: Path
) -> None:
    model, insp = tiny
    sae = _topk_sae(tmp_path)
    plain = model(IDS).logits
    with splice(insp, sae, error_term=True) as sp:
        logits = model(IDS).logits
    assert torch.equal(logits, plain)
    assert sp.features is not None and sp.features.shape == (2, 6, 128)
    # Gradients reach the features although the forward is the model's own.
    (grad,) = torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), sp.features)
    assert grad.abs().sum() > 0
    with torch.no_grad(), splice(insp, sae, error_term=True) as sp2:
        assert torch.equal(model(IDS).logits, plain)
    with insp.capture("block[1]") as cap, torch.no_grad():
        model(IDS)
    assert sp2.features is not None
    assert torch.equal(sp2.features, sae.encode(cap["block[1]"].output))


def test_splice_equals_a_plain_hook_forward(
    tiny: tuple[nn.Module, Inspector], tmp_path: Path
) -> None:
    model, insp = tiny
    sae = _topk_sae(tmp_path)
    with torch.no_grad():
        with splice(insp, sae) as sp:
            spliced = model(IDS).logits
        handle = _block(model, 1).register_forward_hook(_replace_output(lambda h, a: sae(h)))
        try:
            manual = model(IDS).logits
        finally:
            handle.remove()
    assert torch.equal(spliced, manual)
    assert not torch.equal(spliced, model(IDS).logits)
    assert sp.calls == 1


def test_feature_edits_equal_manual_edits(
    llama: tuple[nn.Module, Inspector], tmp_path: Path
) -> None:
    model, insp = llama
    sae = _topk_sae(tmp_path)
    ablated, steered = [3, 7, 50], {5: 2.5, 90: -1.0}

    def edit(f: torch.Tensor) -> torch.Tensor:
        f = f.clone()
        f[..., ablated] = 0
        for i, v in steered.items():
            f[..., i] += v
        return f

    with torch.no_grad():
        handle = _block(model, 1).register_forward_hook(
            _replace_output(lambda h, a: sae.reconstruct(h, edit(sae.encode(h))))
        )
        try:
            manual = model(IDS).logits
        finally:
            handle.remove()
        with splice(insp, sae, ablate_features=ablated, steer_features=steered) as sp:
            edited = model(IDS).logits
        torch.testing.assert_close(edited, manual, atol=1e-6, rtol=1e-6)
        assert sp.features is not None and sp.features_before_edit is not None
        assert sp.features[..., 3].abs().max() == 0
        # features_fn on selected latents only, with the error term: x + (x̂_edited - x̂).
        with splice(insp, sae, error_term=True, features_fn=lambda f: f * 3, features=[5, 6]):
            with_error = model(IDS).logits
        plain_h = insp.capture("block[1]")
        with plain_h as cap:
            model(IDS)
        h = cap["block[1]"].output
        f = sae.encode(h)
        g = f.clone()
        g[..., [5, 6]] *= 3
        expected_h = h + (sae.reconstruct(h, g) - sae.reconstruct(h, f))
        handle = _block(model, 1).register_forward_hook(_replace_output(lambda o, a: expected_h))
        try:
            manual_error = model(IDS).logits
        finally:
            handle.remove()
        torch.testing.assert_close(with_error, manual_error, atol=1e-5, rtol=1e-5)


def test_head_sae_and_transcoder_splice(gpt2: tuple[nn.Module, Inspector], tmp_path: Path) -> None:
    model, insp = gpt2
    write_saelens(
        tmp_path / "z",
        d_in=16,
        architecture="topk",
        k=4,
        hook_name="blocks.1.attn.hook_z",
        hook_head_index=2,
    )
    zsae = load_sae(tmp_path / "z")
    plain = model(IDS).logits
    with torch.no_grad():
        with splice(insp, zsae, error_term=True):
            assert torch.equal(model(IDS).logits, plain)
        with splice(insp, zsae):
            spliced = model(IDS).logits

        def pre(module: nn.Module, args: Any) -> Any:
            z = args[0].unflatten(-1, (4, 16)).clone()
            z[..., 2, :] = zsae(z[..., 2, :])
            return (z.flatten(-2),)

        handle = model.transformer.h[1].attn.c_proj.register_forward_pre_hook(pre)
        try:
            manual = model(IDS).logits
        finally:
            handle.remove()
    torch.testing.assert_close(spliced, manual, atol=1e-6, rtol=1e-6)
    folder, _ = write_sparsify(tmp_path / "tc", hookpoint="h.1.mlp", transcode=True, skip=True)
    tc = load_sae(folder)
    assert tc.is_transcoder and tc.locator == "block[1].mlp"
    with torch.no_grad():
        with splice(insp, tc):
            spliced = model(IDS).logits
        handle = model.transformer.h[1].mlp.register_forward_hook(lambda m, a, o: tc(a[0]))
        try:
            manual = model(IDS).logits
        finally:
            handle.remove()
    torch.testing.assert_close(spliced, manual, atol=1e-6, rtol=1e-6)


def test_sites_are_checked_before_any_forward(
    gpt2: tuple[nn.Module, Inspector], tmp_path: Path
) -> None:
    model, insp = gpt2
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        narrow = SparseAutoencoder(32, 64)
        with pytest.raises(SAEError, match="d_in=32 values, but block\\[0\\] is 64 wide") as exc:
            splice(insp, narrow, "block[0]")
        _one_line(exc)
        write_saelens(tmp_path / "pos", hook_name="hook_pos_embed")
        with pytest.raises(SAEError, match="pass at=") as exc:
            splice(insp, load_sae(tmp_path / "pos"))
        _one_line(exc)
        folder, _ = write_sparsify(tmp_path / "sp", hookpoint="layers.1")
        with pytest.raises(SAEError, match=r"'transformer\.h\.1'") as exc:
            splice(insp, load_sae(folder))
        _one_line(exc)
        write_saelens(tmp_path / "mid", hook_name="blocks.1.hook_resid_mid")
        with pytest.raises(SAEError, match="second norm") as exc:
            splice(insp, load_sae(tmp_path / "mid"))
        _one_line(exc)
        write_saelens(tmp_path / "far", hook_name="blocks.9.hook_resid_post")
        with pytest.raises(SAEError, match="block\\[9\\], which this model lacks") as exc:
            splice(insp, load_sae(tmp_path / "far"))
        _one_line(exc)
    finally:
        handle.remove()
    assert calls == []


# -- evaluation ---------------------------------------------------------------------------------


def test_evaluate_reports_the_documented_figures(
    llama: tuple[nn.Module, Inspector], tmp_path: Path
) -> None:
    model, insp = llama
    sae = _topk_sae(tmp_path)
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0
    result = evaluate_sae(insp, sae, {"input_ids": IDS, "attention_mask": mask})
    with torch.no_grad(), insp.capture("block[1]") as cap:
        clean = model(IDS, attention_mask=mask).logits
    h = cap["block[1]"].output
    real = mask.bool()
    pairs = real[:, :-1] & real[:, 1:]

    def ce(logits: torch.Tensor) -> float:
        logp = logits[:, :-1][pairs].log_softmax(-1)
        return float(-logp.gather(-1, IDS[:, 1:][pairs][:, None]).mean())

    with torch.no_grad():
        handle = _block(model, 1).register_forward_hook(
            _replace_output(lambda o, a: torch.zeros_like(o))
        )
        try:
            ablated = model(IDS, attention_mask=mask).logits
        finally:
            handle.remove()
        x, xhat, f = h[real].double(), sae(h)[real].double(), sae.encode(h)[real]
    assert result.tokens == 10 and result.at == "block[1]"
    assert result.ce_clean == pytest.approx(ce(clean), rel=1e-5)
    assert result.ce_ablate == pytest.approx(ce(ablated), rel=1e-5)
    ev = 1 - ((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert result.explained_variance == pytest.approx(float(ev), rel=1e-6)
    assert result.l0 == pytest.approx(float((f != 0).sum(-1).float().mean()))
    assert result.dead == int(((f != 0).sum(0) == 0).sum())
    expected = (result.ce_ablate - result.ce_sae) / (result.ce_ablate - result.ce_clean)
    assert result.ce_score == pytest.approx(expected)
    assert "CE score" in str(result)


def test_evaluate_skip_first_leaves_the_first_positions_alone(
    llama: tuple[nn.Module, Inspector], tmp_path: Path
) -> None:
    """skip_first=2: positions 0 and 1 are neither spliced nor ablated nor counted."""
    model, insp = llama
    sae = _topk_sae(tmp_path)
    result = evaluate_sae(insp, sae, IDS, skip_first=2)
    with torch.no_grad(), insp.capture("block[1]") as cap:
        clean = model(IDS).logits
    h = cap["block[1]"].output

    def replaced(fn: Any) -> torch.Tensor:
        def edit(o: torch.Tensor, _: Any) -> torch.Tensor:
            out = fn(o).to(o.dtype)
            return torch.cat([o[:, :2], out[:, 2:]], dim=1)

        handle = _block(model, 1).register_forward_hook(_replace_output(edit))
        try:
            return model(IDS).logits
        finally:
            handle.remove()

    with torch.no_grad():
        spliced, ablated = replaced(sae), replaced(torch.zeros_like)
        x, xhat = h[:, 2:].flatten(0, 1).double(), sae(h)[:, 2:].flatten(0, 1).double()
        f = sae.encode(h)[:, 2:].flatten(0, 1)

    def ce(logits: torch.Tensor) -> float:
        logp = logits[:, 2:-1].log_softmax(-1)
        return float(-logp.gather(-1, IDS[:, 3:, None]).mean())

    assert result.tokens == IDS.shape[0] * (IDS.shape[1] - 2)
    assert result.ce_clean == pytest.approx(ce(clean), rel=1e-5)
    assert result.ce_sae == pytest.approx(ce(spliced), rel=1e-5)
    assert result.ce_ablate == pytest.approx(ce(ablated), rel=1e-5)
    ev = 1 - ((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert result.explained_variance == pytest.approx(float(ev), rel=1e-6)
    assert result.l0 == pytest.approx(float((f != 0).sum(-1).float().mean()))
    for bad in (-1, 1.5, True):
        with pytest.raises(SAEError, match="skip_first must be") as exc:
            evaluate_sae(insp, sae, IDS, skip_first=bad)
        _one_line(exc)
    left = torch.ones_like(IDS)
    left[0, 0] = 0
    with pytest.raises(SAEError, match="right-padded") as exc:
        evaluate_sae(insp, sae, {"input_ids": IDS, "attention_mask": left}, skip_first=1)
    _one_line(exc)
    with pytest.raises(SAEError, match="after the first") as exc:
        evaluate_sae(insp, sae, IDS, skip_first=IDS.shape[1])
    _one_line(exc)


# -- training -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, Inspector]:
    from introspect import extract
    from introspect.zoo import load_model

    model, tokenizer = load_model("toy-llama", progress=False)
    folder = tmp_path_factory.mktemp("acts")
    corpus = folder / "corpus.txt"
    corpus.write_text(
        "\n".join(
            f"Document {i}: the quick brown fox number {i} jumps over {i * 7} dogs."
            for i in range(40)
        )
        + "\n"
    )
    insp = Inspector(model)
    extract(insp, tokenizer, [corpus], ["block[1]"], folder / "acts", dtype="float32")
    return folder / "acts", model, insp


def test_train_resumes_to_the_same_weights(
    extracted: tuple[Path, nn.Module, Inspector], tmp_path: Path
) -> None:
    acts, _, insp = extracted
    args: dict[str, Any] = {
        "at": "block[1]",
        "k": 4,
        "expansion": 2,
        "batch_size": 64,
        "steps": 8,
        "checkpoint_every": 2,
        "dead_after": 64,
    }
    straight = train_sae(acts, out=tmp_path / "a", **args)
    assert straight.metadata["training"]["finished"] and straight.locator == "block[1]"
    part = train_sae(acts, out=tmp_path / "b", stop_after=3, **args)
    assert not part.metadata["training"]["finished"]
    resumed = train_sae(acts, out=tmp_path / "b", **args)
    for name, value in straight.state_tensors().items():
        assert torch.equal(value, resumed.state_tensors()[name]), name
    loaded = load_sae(tmp_path / "b")
    assert loaded.locator == "block[1]" and loaded.k == 4 and loaded.d_sae == 128
    assert torch.allclose(loaded.W_dec.norm(dim=-1), torch.ones(128), atol=1e-5)
    again = train_sae(acts, out=tmp_path / "b", **args)  # finished: read back, not retrained
    assert torch.equal(again.W_enc, loaded.W_enc)
    result = evaluate_sae(insp, loaded, IDS % 100)
    assert 0 < result.l0 <= 4
    with pytest.raises(SAEError, match="other settings") as exc:
        train_sae(acts, out=tmp_path / "b", stop_after=1, **{**args, "k": 3, "steps": 9})
    _one_line(exc)


def test_train_skip_first_never_sees_the_first_positions(
    extracted: tuple[Path, nn.Module, Inspector], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from introspect._sae import _train

    acts, _, _ = extracted
    seen: list[torch.Tensor] = []
    step = _train._step

    def spy(sae: Any, opt: Any, x: torch.Tensor, *rest: Any) -> Any:
        seen.append(x.clone())
        return step(sae, opt, x, *rest)

    monkeypatch.setattr(_train, "_step", spy)
    sae = train_sae(
        acts,
        out=tmp_path / "s",
        at="block[1]",
        k=4,
        expansion=2,
        batch_size=64,
        steps=4,
        skip_first=1,
    )
    assert sae.metadata["training"]["settings"]["skip_first"] == 1
    ds = ActivationDataset(acts)
    first = ds["block[1]"][:][ds.tokens.pos[:] == 0].float()
    rows = torch.cat(seen)
    assert len(seen) == 4 and len(first) == 40
    # No row trained on is a document's first token (every first token's activation is the same
    # vector on this model: the first token of each document is the same word).
    assert not any(torch.equal(row, first[0]) for row in rows)
    assert (rows.shape[0] < 4 * 64) and rows.shape[0] > 0
    with pytest.raises(SAEError, match="skip_first must be") as exc:
        train_sae(acts, out=tmp_path / "t", at="block[1]", k=4, expansion=2, skip_first=-1)
    _one_line(exc)


def test_sae_lens_reads_our_folders_the_same() -> None:
    """The real package, where installed (benchmarks/sae_lens_check.py runs it from its own
    environment otherwise)."""
    sae_lens = pytest.importorskip("sae_lens")
    import tempfile

    folder = Path(tempfile.mkdtemp())
    write_saelens(folder, architecture="jumprelu")
    ours = load_sae(folder)
    theirs = sae_lens.SAE.load_from_disk(folder)
    x = _x()
    with torch.no_grad():
        _close(ours.encode(x), theirs.encode(x))
        _close(ours(x), theirs(x))


def test_numpy_is_enough_for_gemma_scope(tmp_path: Path) -> None:
    folder, arrays = write_gemma_scope(tmp_path)
    np.savez(folder / "params.npz", **{k: v for k, v in arrays.items() if k != "threshold"})
    with pytest.raises(SAEError, match="lacks threshold") as exc:
        load_sae(folder)
    _one_line(exc)
