"""Reading the five common SAE formats from a local folder (no hub, no pickle).

=====================  ===============================================  ===================
format                 files                                            site name
=====================  ===============================================  ===================
``saelens``            ``cfg.json`` + ``sae_weights.safetensors``       ``metadata.hook_name``
``gemma_scope``        ``params.npz``                                   the folder names
                                                                        (``layer_12``, repo
                                                                        ``...-res``/``-mlp``/
                                                                        ``-att``)
``llama_scope``        ``hyperparams.json`` +                           ``hook_point_in``
                       ``checkpoints/final.safetensors``
``dictionary_learning``  ``ae.pt`` (+ ``config.json``)                  ``trainer.submodule_name``
``sparsify``           ``cfg.json`` + ``sae.safetensors``               the folder's name
                                                                        (a hookpoint)
=====================  ===============================================  ===================

Each reader converts the format's tensors to the SAELens layout of
:class:`~introspect._sae._model.SparseAutoencoder` and states the format's input processing
as data on it. Every refusal is one line, before any model runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from introspect._errors import SAEError
from introspect._sae._model import (
    ARCHITECTURES,
    SAELENS_CONFIG,
    SAELENS_WEIGHTS,
    InputProcessing,
    SparseAutoencoder,
)
from introspect._sae._sites import Site, map_site

__all__ = ["FORMATS", "detect_format", "load_sae"]

FORMATS: tuple[str, ...] = (
    "saelens",
    "gemma_scope",
    "llama_scope",
    "dictionary_learning",
    "sparsify",
)

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "torch.float32": torch.float32,
    "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
}

_RESIDUAL_NOTE = (
    "does not say whether TransformerLens centred its writing weights when this SAE was "
    "trained (gpt2-small-res-jb expects each token's mean removed; SAELens 3+ trains without), "
    "so the basis of {site} is unknown: pass load_sae(..., center_writing_weights=True) or "
    "=False"
)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def detect_format(path: str | os.PathLike[str]) -> str:
    """Which format the folder ``path`` holds, from the files in it.

    Example:
        >>> import tempfile
        >>> folder = SparseAutoencoder(4, 8).save(tempfile.mkdtemp())
        >>> detect_format(folder)
        'saelens'
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise SAEError(f"{folder} does not exist")
    if folder.is_file():
        if folder.name in ("ae.pt", "params.npz", SAELENS_WEIGHTS, "sae.safetensors"):
            raise SAEError(f"{folder} is a file: pass the folder that holds it ({folder.parent})")
        raise SAEError(f"{folder} is a file, not an SAE folder")
    names = set(_files(folder))
    if {SAELENS_CONFIG, SAELENS_WEIGHTS} <= names:
        return "saelens"
    if {SAELENS_CONFIG, "sae.safetensors"} <= names:
        return "sparsify"
    if "params.npz" in names:
        return "gemma_scope"
    if "hyperparams.json" in names and (folder / "checkpoints" / "final.safetensors").is_file():
        return "llama_scope"
    if "ae.pt" in names:
        return "dictionary_learning"
    inner = [
        p.name
        for p in sorted(folder.iterdir())
        if p.is_dir() and {SAELENS_CONFIG, "sae.safetensors"} <= set(_files(p))
    ]
    if inner:
        shown = ", ".join(inner[:4]) + (", ..." if len(inner) > 4 else "")
        raise SAEError(
            f"{folder} holds {len(inner)} sparsify SAEs ({shown}): load one hookpoint's folder, "
            f"e.g. load_sae('{folder / inner[0]}')"
        )
    found = ", ".join(sorted(names)[:8]) or "nothing"
    raise SAEError(
        f"{folder} is in no known SAE format (it holds {found}): expected cfg.json + "
        "sae_weights.safetensors (SAELens), params.npz (Gemma Scope), hyperparams.json + "
        "checkpoints/final.safetensors (Llama Scope), ae.pt (dictionary_learning) or cfg.json "
        "+ sae.safetensors (sparsify)"
    )


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SAEError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise SAEError(f"{path} is not a JSON object")
    return value


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return "a zip archive (torch.save's format, which may hold a pickle)"
    if head[:1] == b"\x80":
        return "a pickle"
    return "not a safetensors file"


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise SAEError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError is no OSError subclass
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            raise SAEError(
                f"{path} cannot be read as safetensors ({_sniff(path)}): introspect never "
                "unpickles a file named .safetensors; convert it with safetensors.torch.save_file"
            ) from None
        raise


def _dtype(name: Any, source: str) -> torch.dtype:
    found = _DTYPES.get(str(name)) if name is not None else torch.float32
    if found is None:
        raise SAEError(f"{source}: unknown dtype {name!r} (use float32, float16 or bfloat16)")
    return found


def _int(cfg: dict[str, Any], key: str, source: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAEError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _centre(site: Site, stated: Any, override: bool | None, source: str) -> bool:
    """Whether the SAE reads its site with TransformerLens's per-token mean removed."""
    if not site.residual:
        return False
    if override is not None:
        return override
    if isinstance(stated, bool):
        return stated
    raise SAEError(f"{source} {_RESIDUAL_NOTE.format(site=site.hook_name)}")


# -- SAELens ---------------------------------------------------------------------------------


def _read_saelens(
    folder: Path, center_writing_weights: bool | None, norm_scaling_factor: float | None
) -> SparseAutoencoder:
    source = str(folder / SAELENS_CONFIG)
    cfg = _json(folder / SAELENS_CONFIG)
    metadata = dict(cfg.get("metadata") or {})
    # Before SAELens 6 the site fields sat at the top level, under older names.
    for old, new in (
        ("hook_point", "hook_name"),
        ("hook_point_head_index", "hook_head_index"),
    ):
        for holder in (cfg, metadata):
            if old in holder and new not in holder:
                holder[new] = holder[old]
    for key in ("hook_name", "hook_head_index", "model_name", "model_class_name"):
        if key not in metadata and key in cfg:
            metadata[key] = cfg[key]
    if "model_from_pretrained_kwargs" not in metadata and "model_from_pretrained_kwargs" in cfg:
        metadata["model_from_pretrained_kwargs"] = cfg["model_from_pretrained_kwargs"]
    architecture = cfg.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise SAEError(
            f"{source}: architecture {architecture!r} is not one introspect reads "
            f"({', '.join(ARCHITECTURES)})"
        )
    k = cfg.get("k")
    if architecture == "topk" and k is None:
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    normalize = cfg.get("normalize_activations") or "none"
    if isinstance(normalize, bool):  # before SAELens 6
        normalize = "expected_average_only_in" if normalize else "none"
    if normalize not in ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"):
        raise SAEError(f"{source}: unknown normalize_activations {normalize!r}")
    scale = 1.0
    if normalize == "expected_average_only_in":
        if norm_scaling_factor is None:
            raise SAEError(
                f"{source} says normalize_activations='expected_average_only_in' but no file "
                "states the scaling factor it was trained with: pass load_sae(..., "
                "norm_scaling_factor=F) (F multiplies the input; 1.0 if it is already folded)"
            )
        scale = norm_scaling_factor
        normalize = "none"
    found = metadata.get("introspect")
    ours: dict[str, Any] = found if isinstance(found, dict) else {}
    head_index = metadata.get("hook_head_index")
    site = map_site(metadata.get("hook_name"), head_index=head_index)
    if ours.get("locator") and ours["locator"] != site.locator:
        site = Site(hook_name=site.hook_name, locator=ours["locator"], head_index=head_index)
    if cfg.get("reshape_activations") == "hook_z":
        site.flatten_heads = True
    kwargs = metadata.get("model_from_pretrained_kwargs") or {}
    stated = kwargs.get("center_writing_weights") if isinstance(kwargs, dict) else None
    if stated is None and metadata.get("model_class_name") not in (None, "HookedTransformer"):
        stated = False  # a Hugging Face model: no TransformerLens processing
    centre = _centre(site, stated, center_writing_weights, source)
    processing = InputProcessing(
        centre=centre,
        scale_in=scale,
        scale_out=scale,
        normalize_activations=normalize,  # type: ignore[arg-type]
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
    )
    tensors = _safetensors(folder / SAELENS_WEIGHTS)
    if "scaling_factor" in tensors:
        factor = tensors.pop("scaling_factor")
        if not torch.allclose(factor, torch.ones_like(factor)):
            raise SAEError(
                f"{folder / SAELENS_WEIGHTS} holds a finetuning scaling_factor that is not 1: "
                "introspect does not read finetuned-scale SAEs (SAELens < 6)"
            )
    if architecture == "topk" and "threshold" in tensors:
        tensors.pop("threshold")
    d_in = _int(cfg, "d_in", source)
    d_sae = _int(cfg, "d_sae", source)
    sae = SparseAutoencoder(
        d_in,
        d_sae,
        architecture=architecture,
        k=int(k) if k is not None else None,
        processing=processing,
        skip="W_skip" in tensors,
        dtype=_dtype(cfg.get("dtype"), source),
        format="saelens",
        site=site,
        metadata=metadata,
    )
    sae.load_weights(tensors, str(folder / SAELENS_WEIGHTS))
    return sae


# -- Gemma Scope -----------------------------------------------------------------------------


def _gemma_site(folder: Path) -> Site:
    """Gemma Scope's params.npz names no site: the repository's folders do
    (``gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82``)."""
    text = "/".join(folder.resolve().parts[-6:])
    layer = re.search(r"layer_(\d+)", text)
    kind = re.search(r"-(res|mlp|att|transcoders)(?:-|/|$)", text)
    if layer is None or kind is None:
        return Site(
            reason=(
                "Gemma Scope's params.npz names no site and the folder path does not say it "
                "(expected .../gemma-scope-...-res|mlp|att/layer_N/...): pass at="
            )
        )
    n = layer.group(1)
    name = {
        "res": f"blocks.{n}.hook_resid_post",
        "mlp": f"blocks.{n}.hook_mlp_out",
        "att": f"blocks.{n}.attn.hook_z",
        "transcoders": f"blocks.{n}.hook_mlp_out",
    }[kind.group(1)]
    site = map_site(name, transcoder=kind.group(1) == "transcoders")
    if site.transcoder:
        site.reason = (
            "a Gemma Scope transcoder reads the MLP's normalised input and writes its output: "
            "splice it with at= naming the output and read its input yourself"
        )
        site.splice = False
    return site


def _read_gemma_scope(folder: Path) -> SparseAutoencoder:
    import numpy as np

    path = folder / "params.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SAEError(f"{path} cannot be read as a numpy .npz without pickle: {exc}") from None
    need = {"w_enc", "b_enc", "w_dec", "b_dec", "threshold"}
    if not need <= set(arrays):
        raise SAEError(f"{path} lacks {', '.join(sorted(need - set(arrays)))} (Gemma Scope)")
    d_in, d_sae = arrays["w_enc"].shape
    tensors = {
        "W_enc": arrays["w_enc"],
        "b_enc": arrays["b_enc"],
        "W_dec": arrays["w_dec"],
        "b_dec": arrays["b_dec"],
        "threshold": arrays["threshold"],
    }
    sae = SparseAutoencoder(
        int(d_in),
        int(d_sae),
        architecture="jumprelu",
        processing=InputProcessing(apply_b_dec_to_input=False),
        format="gemma_scope",
        site=_gemma_site(folder),
        metadata={"folder": str(folder)},
    )
    sae.load_weights(tensors, str(path))
    return sae


# -- Llama Scope -----------------------------------------------------------------------------


def _read_llama_scope(folder: Path) -> SparseAutoencoder:
    source = str(folder / "hyperparams.json")
    hp = _json(folder / "hyperparams.json")
    d_in = _int(hp, "d_model", source)
    d_sae = _int(hp, "d_sae", source)
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    site = map_site(hook_in)
    if hook_out != hook_in:
        site = Site(
            hook_name=hook_in,
            reason=f"a Llama Scope transcoder ({hook_in} -> {hook_out}): introspect splices "
            "SAEs that read and write one site",
        )
    act = hp.get("act_fn", "jumprelu")
    if act != "jumprelu":
        raise SAEError(f"{source}: act_fn {act!r} (introspect reads Llama Scope's jumprelu SAEs)")
    scale_in = scale_out = 1.0
    if hp.get("norm_activation", "dataset-wise") == "dataset-wise":
        norms = hp.get("dataset_average_activation_norm") or {}
        try:
            scale_in = math.sqrt(d_in) / float(norms["in"])
            scale_out = math.sqrt(d_in) / float(norms.get("out", norms["in"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise SAEError(
                f"{source}: norm_activation is dataset-wise but "
                "dataset_average_activation_norm.in is missing or not a positive number"
            ) from None
    threshold = hp.get("jump_relu_threshold")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise SAEError(f"{source}: jump_relu_threshold must be a number, got {threshold!r}")
    path = folder / "checkpoints" / "final.safetensors"
    raw = _safetensors(path)
    need = {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}
    if not need <= set(raw):
        raise SAEError(f"{path} lacks {', '.join(sorted(need - set(raw)))} (Llama Scope)")
    # SAELens's conversion: the scalar threshold is compared in the scaled space, times the
    # same factor the input is scaled by.
    tensors = {
        "W_enc": raw["encoder.weight"].T,
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["decoder.weight"].T,
        "b_dec": raw["decoder.bias"],
        "threshold": torch.full((d_sae,), float(threshold) * scale_in),
    }
    sae = SparseAutoencoder(
        d_in,
        d_sae,
        architecture="jumprelu",
        # TransformerLens does not centre the writing weights of RMSNorm models (Llama).
        processing=InputProcessing(
            scale_in=scale_in, scale_out=scale_out, apply_b_dec_to_input=False
        ),
        dtype=_dtype(hp.get("dtype", "float32"), source),
        format="llama_scope",
        site=site,
        metadata=hp,
    )
    sae.load_weights(tensors, str(path))
    return sae


# -- dictionary_learning ---------------------------------------------------------------------

_DICT_CLASSES = {
    "AutoEncoder": "standard",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "batchtopk",
    "JumpReluAutoEncoder": "jumprelu",
    "GatedAutoEncoder": "gated",
}


def _read_dictionary_learning(folder: Path) -> SparseAutoencoder:
    path = folder / "ae.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SAEError(
            f"{path} cannot be read as a plain state dict (weights_only=True refuses it: "
            f"{first[:160]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SAEError(f"{path} is not a state dict of tensors")
    config = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
    stated_trainer = config.get("trainer")
    trainer: dict[str, Any] = stated_trainer if isinstance(stated_trainer, dict) else {}
    dict_class = trainer.get("dict_class")
    if dict_class is None:
        # Without config.json, the keys say which class wrote the state dict.
        if "r_mag" in state:
            dict_class = "GatedAutoEncoder"
        elif "W_enc" in state:
            dict_class = "JumpReluAutoEncoder"
        elif "threshold" in state and "k" in state:
            dict_class = "BatchTopKSAE"
        elif "k" in state:
            dict_class = "AutoEncoderTopK"
        else:
            dict_class = "AutoEncoder"
    architecture = _DICT_CLASSES.get(str(dict_class))
    if architecture is None:
        raise SAEError(
            f"{folder / 'config.json'}: dict_class {dict_class!r} is not one introspect reads "
            f"({', '.join(_DICT_CLASSES)})"
        )
    st: dict[str, torch.Tensor] = dict(state)

    def take(name: str) -> torch.Tensor:
        if name not in st:
            raise SAEError(f"{path} has no {name} (a {dict_class} state dict)")
        return st[name]

    k: int | None = None
    apply_b_dec = True
    if architecture == "jumprelu":
        tensors = {n: take(n) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        apply_b_dec = bool(trainer.get("apply_b_dec_to_input", False))
    elif architecture == "gated":
        tensors = {
            "W_enc": take("encoder.weight").T,
            "W_dec": take("decoder.weight").T,
            "b_dec": take("decoder_bias"),
            "b_gate": take("gate_bias"),
            "b_mag": take("mag_bias"),
            "r_mag": take("r_mag"),
        }
    else:
        tensors = {
            "W_enc": take("encoder.weight").T,
            "b_enc": take("encoder.bias"),
            "W_dec": take("decoder.weight").T,
            "b_dec": take("bias") if architecture == "standard" else take("b_dec"),
        }
        if architecture in ("topk", "batchtopk"):
            k = int(take("k").item()) if "k" in st else int(trainer.get("k", 0)) or None
        if architecture == "batchtopk":
            tensors["threshold"] = take("threshold").reshape(-1).expand(tensors["b_enc"].shape[0])
    d_in, d_sae = tensors["W_enc"].shape
    for key, value in (("activation_dim", d_in), ("dict_size", d_sae)):
        stated = trainer.get(key)
        if stated is not None and int(stated) != int(value):
            raise SAEError(f"{folder / 'config.json'} says {key}={stated}, but ae.pt has {value}")
    submodule = trainer.get("submodule_name")
    site = map_site(submodule) if submodule else Site(reason="config.json names no submodule")
    sae = SparseAutoencoder(
        int(d_in),
        int(d_sae),
        architecture=architecture,  # type: ignore[arg-type]
        k=k if architecture == "topk" else None,
        processing=InputProcessing(apply_b_dec_to_input=apply_b_dec),
        format="dictionary_learning",
        site=site,
        metadata={"dict_class": dict_class, **{k_: v for k_, v in trainer.items()}},
    )
    if architecture == "batchtopk":
        sae.k = k
    sae.load_weights(tensors, str(path))
    return sae


# -- sparsify ----------------------------------------------------------------------------------


def _read_sparsify(folder: Path) -> SparseAutoencoder:
    source = str(folder / SAELENS_CONFIG)
    cfg = _json(folder / SAELENS_CONFIG)
    raw = _safetensors(folder / "sae.safetensors")
    need = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    if not need <= set(raw):
        raise SAEError(f"{folder / 'sae.safetensors'} lacks {', '.join(sorted(need - set(raw)))}")
    d_sae, d_in = raw["encoder.weight"].shape
    stated = cfg.get("d_in")
    if stated is not None and int(stated) != int(d_in):
        raise SAEError(f"{source} says d_in={stated}, but sae.safetensors has {d_in}")
    k = _int(cfg, "k", source)
    transcoder = bool(cfg.get("transcode", False))
    site = map_site(folder.name, transcoder=transcoder)
    tensors = {
        "W_enc": raw["encoder.weight"].T,
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
    }
    if "W_skip" in raw:
        tensors["W_skip"] = raw["W_skip"]
    sae = SparseAutoencoder(
        int(d_in),
        int(d_sae),
        architecture="topk",
        k=k,
        processing=InputProcessing(apply_b_dec_to_input=True),
        skip="W_skip" in raw,
        format="sparsify",
        site=site,
        metadata=cfg,
    )
    sae.load_weights(tensors, str(folder / "sae.safetensors"))
    return sae


_READERS: dict[str, Callable[[Path], SparseAutoencoder]] = {
    "gemma_scope": _read_gemma_scope,
    "llama_scope": _read_llama_scope,
    "dictionary_learning": _read_dictionary_learning,
    "sparsify": _read_sparsify,
}


def load_sae(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    center_writing_weights: bool | None = None,
    norm_scaling_factor: float | None = None,
) -> SparseAutoencoder:
    """Read the SAE in the local folder ``path`` (``format`` detected from its files).

    Formats: ``saelens``, ``gemma_scope``, ``llama_scope``, ``dictionary_learning`` (``ae.pt``
    read with ``weights_only=True``), ``sparsify`` (one hookpoint's folder). The SAE's
    :attr:`~SparseAutoencoder.locator` comes from the format's site name; what the format does
    to its input (``b_dec`` subtraction, SAELens's normalisation, Llama Scope's norm scaling,
    TransformerLens centring) is stated in ``sae.processing`` and applied by ``encode`` and
    ``sae(x)``.

    ``center_writing_weights`` answers, for a SAELens SAE on a residual-stream site whose
    ``cfg.json`` does not say, whether TransformerLens centred the writing weights when it was
    trained (``gpt2-small-res-jb``: ``True``); ``norm_scaling_factor`` gives the factor of an
    ``expected_average_only_in`` SAE. Without them such SAEs are refused, never read in a
    guessed basis.

    Example:
        >>> import tempfile
        >>> sae = SparseAutoencoder(8, 16, architecture="jumprelu")
        >>> loaded = load_sae(sae.save(tempfile.mkdtemp()))
        >>> loaded.format, loaded.d_in, loaded.d_sae, loaded.architecture
        ('saelens', 8, 16, 'jumprelu')
    """
    folder = Path(path).expanduser()
    found = detect_format(folder) if format is None else format
    if found not in FORMATS:
        raise SAEError(f"unknown SAE format {found!r}: use one of {', '.join(FORMATS)}")
    if format is not None and not folder.is_dir():
        raise SAEError(f"{folder} is not a folder")
    if found == "saelens":
        return _read_saelens(folder, center_writing_weights, norm_scaling_factor)
    return _READERS[found](folder)
