"""Small SAE folders in each of the five formats, from seeded random weights.

Every writer returns the tensors exactly as it wrote them (the format's own names and
layouts), so a test can compute the format's encode/decode from them independently of
introspect's reader. The fields written, per format:

SAELens (``cfg.json`` + ``sae_weights.safetensors``), SAELens 6 layout:
    ``architecture``: standard | jumprelu | gated | topk; ``d_in``, ``d_sae``; ``dtype``
    (``float32``); ``device``; ``apply_b_dec_to_input`` (subtract ``b_dec`` before encoding);
    ``normalize_activations`` (none | constant_norm_rescale | layer_norm |
    expected_average_only_in); ``reshape_activations`` (none | hook_z: flatten heads);
    ``k`` (topk only); ``metadata``: ``hook_name`` (TransformerLens hook), ``hook_head_index``,
    ``model_name``, ``model_class_name``, ``model_from_pretrained_kwargs`` (here
    ``center_writing_weights``), ``prepend_bos``, ``context_size``, ``sae_lens_version``.
    Tensors: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec
    [d_in]``; jumprelu adds ``threshold [d_sae]``; gated has ``b_gate``, ``b_mag``, ``r_mag``
    instead of ``b_enc``.

Gemma Scope (``params.npz``, float32 numpy arrays), folder path
``gemma-scope-2b-pt-res/layer_L/width_16k/average_l0_N`` naming the site:
    ``w_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``w_dec [d_sae, d_in]``, ``b_dec [d_in]``,
    ``threshold [d_sae]`` (positive). JumpReLU; ``b_dec`` is not subtracted before encoding.

Llama Scope (``hyperparams.json`` + ``checkpoints/final.safetensors``):
    ``d_model``, ``d_sae``, ``expansion_factor``, ``hook_point_in``, ``hook_point_out``
    (equal for an SAE), ``act_fn`` (jumprelu), ``jump_relu_threshold`` (one scalar),
    ``norm_activation`` (dataset-wise), ``dataset_average_activation_norm`` (``in``, ``out``:
    inputs are scaled by ``√d_model / in``), ``apply_decoder_bias_to_pre_encoder`` (false).
    Tensors (``nn.Linear`` layout): ``encoder.weight [d_sae, d_model]``, ``encoder.bias``,
    ``decoder.weight [d_model, d_sae]``, ``decoder.bias [d_model]``.

dictionary_learning (``ae.pt``: a plain state dict from ``torch.save``; ``config.json``):
    ``trainer``: ``dict_class`` (AutoEncoder | AutoEncoderTopK | BatchTopKSAE |
    JumpReluAutoEncoder | GatedAutoEncoder), ``activation_dim``, ``dict_size``, ``k``,
    ``layer``, ``lm_name``, ``submodule_name`` (``resid_post_layer_L``).
    AutoEncoder: ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``decoder.weight [d_in,
    d_sae]``, ``bias [d_in]`` (subtracted before encoding, added after decoding).
    AutoEncoderTopK / BatchTopKSAE: ``encoder.*``, ``decoder.weight``, ``b_dec``, ``k`` (int
    buffer), ``threshold`` (a scalar buffer; BatchTopK keeps ``relu(pre)`` above it).
    JumpReluAutoEncoder: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold``.
    GatedAutoEncoder: ``encoder.weight``, ``decoder.weight``, ``decoder_bias``, ``gate_bias``,
    ``mag_bias``, ``r_mag``.

EleutherAI sparsify (``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``):
    ``cfg.json``: ``expansion_factor``, ``normalize_decoder``, ``num_latents``, ``k``,
    ``multi_topk``, ``skip_connection``, ``transcode``, ``d_in``. Tensors: ``encoder.weight
    [num_latents, d_in]``, ``encoder.bias``, ``W_dec [num_latents, d_in]``, ``b_dec [d_in]``,
    ``W_skip [d_in, d_in]`` with a skip connection. Encoding subtracts ``b_dec``, keeps the
    ``k`` largest ``relu`` pre-activations; decoding adds ``b_dec`` (and ``x @ W_skip.T``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

__all__ = [
    "SAELENS_CASES",
    "write_dictionary_learning",
    "write_gemma_scope",
    "write_llama_scope",
    "write_saelens",
    "write_sparsify",
]


SAELENS_CASES = [
    ("standard", True, "none"),
    ("standard", False, "constant_norm_rescale"),
    ("jumprelu", True, "none"),
    ("jumprelu", False, "layer_norm"),
    ("gated", True, "none"),
    ("topk", True, "none"),
    ("topk", False, "constant_norm_rescale"),
]
"""SAELens folders the tests and the sae-lens cross-check write: (architecture,
apply_b_dec_to_input, normalize_activations), covering every architecture and normalisation."""


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _dump(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def write_saelens(
    folder: Path,
    *,
    architecture: str = "standard",
    d_in: int = 64,
    d_sae: int = 128,
    seed: int = 0,
    hook_name: str = "blocks.1.hook_resid_post",
    hook_head_index: int | None = None,
    apply_b_dec_to_input: bool = True,
    normalize_activations: str = "none",
    reshape_activations: str = "none",
    k: int = 8,
    center_writing_weights: bool | None = False,
    model_class_name: str = "HookedTransformer",
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": _rand(gen, d_in, d_sae, scale=d_in**-0.5),
        "W_dec": _rand(gen, d_sae, d_in, scale=d_sae**-0.5),
        "b_dec": _rand(gen, d_in, scale=0.1),
    }
    if architecture == "gated":
        tensors["b_gate"] = _rand(gen, d_sae, scale=0.1)
        tensors["b_mag"] = _rand(gen, d_sae, scale=0.1)
        tensors["r_mag"] = _rand(gen, d_sae, scale=0.1)
    else:
        tensors["b_enc"] = _rand(gen, d_sae, scale=0.1)
    if architecture == "jumprelu":
        tensors["threshold"] = torch.rand(d_sae, generator=gen) * 0.5
    kwargs = (
        {} if center_writing_weights is None else {"center_writing_weights": center_writing_weights}
    )
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": normalize_activations,
        "reshape_activations": reshape_activations,
        "metadata": {
            "hook_name": hook_name,
            "hook_head_index": hook_head_index,
            "model_name": "tiny",
            "model_class_name": model_class_name,
            "model_from_pretrained_kwargs": kwargs,
            "prepend_bos": True,
            "context_size": 16,
            "sae_lens_version": "6.5.0",
        },
    }
    if architecture == "topk":
        cfg["k"] = k
    folder.mkdir(parents=True, exist_ok=True)
    _dump(folder / "cfg.json", cfg)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return tensors


def write_gemma_scope(
    root: Path,
    *,
    layer: int = 1,
    kind: str = "res",
    d_in: int = 64,
    d_sae: int = 128,
    seed: int = 1,
) -> tuple[Path, dict[str, np.ndarray]]:
    """A Gemma Scope folder laid out as the hub repository is (the path names the site)."""
    gen = torch.Generator().manual_seed(seed)
    folder = root / f"gemma-scope-2b-pt-{kind}" / f"layer_{layer}" / "width_16k" / "average_l0_5"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "w_enc": _rand(gen, d_in, d_sae, scale=d_in**-0.5).numpy(),
        "b_enc": _rand(gen, d_sae, scale=0.1).numpy(),
        "w_dec": _rand(gen, d_sae, d_in, scale=d_sae**-0.5).numpy(),
        "b_dec": _rand(gen, d_in, scale=0.1).numpy(),
        "threshold": (torch.rand(d_sae, generator=gen) * 0.5).numpy(),
    }
    np.savez(folder / "params.npz", **arrays)
    return folder, arrays


def write_llama_scope(
    folder: Path,
    *,
    hook: str = "blocks.1.hook_resid_post",
    d_model: int = 64,
    d_sae: int = 128,
    seed: int = 2,
    norm_in: float = 3.0,
    threshold: float = 0.2,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    hyper: dict[str, Any] = {
        "d_model": d_model,
        "d_sae": d_sae,
        "expansion_factor": d_sae // d_model,
        "hook_point_in": hook,
        "hook_point_out": hook,
        "act_fn": "jumprelu",
        "jump_relu_threshold": threshold,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_in},
        "apply_decoder_bias_to_pre_encoder": False,
        "use_decoder_bias": True,
        "sparsity_include_decoder_norm": True,
        "top_k": -1,
    }
    tensors = {
        "encoder.weight": _rand(gen, d_sae, d_model, scale=d_model**-0.5),
        "encoder.bias": _rand(gen, d_sae, scale=0.1),
        "decoder.weight": _rand(gen, d_model, d_sae, scale=d_sae**-0.5),
        "decoder.bias": _rand(gen, d_model, scale=0.1),
    }
    _dump(folder / "hyperparams.json", hyper)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
    return hyper, tensors


def write_dictionary_learning(
    folder: Path,
    *,
    dict_class: str = "AutoEncoderTopK",
    d_in: int = 64,
    d_sae: int = 128,
    k: int = 8,
    layer: int = 1,
    seed: int = 3,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    enc_w = _rand(gen, d_sae, d_in, scale=d_in**-0.5)
    enc_b = _rand(gen, d_sae, scale=0.1)
    dec_w = _rand(gen, d_in, d_sae, scale=d_sae**-0.5)
    bias = _rand(gen, d_in, scale=0.1)
    state: dict[str, torch.Tensor]
    if dict_class == "AutoEncoder":
        state = {
            "encoder.weight": enc_w,
            "encoder.bias": enc_b,
            "decoder.weight": dec_w,
            "bias": bias,
        }
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        state = {
            "encoder.weight": enc_w,
            "encoder.bias": enc_b,
            "decoder.weight": dec_w,
            "b_dec": bias,
            "k": torch.tensor(k, dtype=torch.int64),
            "threshold": torch.tensor(0.05 if dict_class == "BatchTopKSAE" else -1.0),
        }
    elif dict_class == "JumpReluAutoEncoder":
        state = {
            "W_enc": enc_w.T.contiguous(),
            "b_enc": enc_b,
            "W_dec": dec_w.T.contiguous(),
            "b_dec": bias,
            "threshold": torch.rand(d_sae, generator=gen) * 0.3,
        }
    elif dict_class == "GatedAutoEncoder":
        state = {
            "encoder.weight": enc_w,
            "decoder.weight": dec_w,
            "decoder_bias": bias,
            "gate_bias": enc_b,
            "mag_bias": _rand(gen, d_sae, scale=0.1),
            "r_mag": _rand(gen, d_sae, scale=0.1),
        }
    else:
        raise ValueError(dict_class)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ae.pt")
    _dump(
        folder / "config.json",
        {
            "trainer": {
                "dict_class": dict_class,
                "trainer_class": "TopKTrainer",
                "activation_dim": d_in,
                "dict_size": d_sae,
                "k": k,
                "layer": layer,
                "lm_name": "tiny",
                "submodule_name": f"resid_post_layer_{layer}",
            },
            "buffer": {"d_submodule": d_in, "ctx_len": 16},
        },
    )
    return state


def write_sparsify(
    root: Path,
    *,
    hookpoint: str = "h.1",
    d_in: int = 64,
    num_latents: int = 128,
    k: int = 8,
    skip: bool = False,
    transcode: bool = False,
    seed: int = 4,
) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    folder = root / hookpoint
    tensors = {
        "encoder.weight": _rand(gen, num_latents, d_in, scale=d_in**-0.5),
        "encoder.bias": _rand(gen, num_latents, scale=0.1),
        "W_dec": _rand(gen, num_latents, d_in, scale=num_latents**-0.5),
        "b_dec": _rand(gen, d_in, scale=0.1),
    }
    if skip:
        tensors["W_skip"] = _rand(gen, d_in, d_in, scale=0.05)
    _dump(
        folder / "cfg.json",
        {
            "expansion_factor": num_latents // d_in,
            "normalize_decoder": True,
            "num_latents": num_latents,
            "k": k,
            "multi_topk": False,
            "skip_connection": skip,
            "transcode": transcode,
            "d_in": d_in,
        },
    )
    save_file(tensors, str(folder / "sae.safetensors"))
    _dump(root / "config.json", {"sae": {"k": k}, "hookpoints": [hookpoint]})
    return folder, tensors


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "sae-fixtures")
    for arch in ("standard", "jumprelu", "gated", "topk"):
        write_saelens(out / f"saelens-{arch}", architecture=arch)
    write_gemma_scope(out)
    write_llama_scope(out / "llama-scope")
    for cls in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder"):
        write_dictionary_learning(out / f"dictionary-learning-{cls}", dict_class=cls)
    write_sparsify(out / "sparsify")
    print(f"wrote {out}")
