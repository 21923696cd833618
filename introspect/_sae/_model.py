"""The sparse autoencoder every format loads into, and its SAELens-layout writer.

One module holds every architecture in the SAELens parameter layout (``W_enc [d_in, d_sae]``,
``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``; ``threshold`` for JumpReLU and BatchTopK;
``b_gate``, ``b_mag``, ``r_mag`` for gated; ``W_skip [d_in, d_in]`` for transcoders with a
skip connection). What a format does to its input before encoding is stated as data on the
module (:class:`InputProcessing`), applied by one interpreter, and undone after decoding:

1. TransformerLens centring (``centre``): the per-token mean over the hidden axis is removed,
   as TransformerLens's ``center_writing_weights`` makes every write to the residual stream
   mean-free (``gpt2-small-res-jb``); it is added back after decoding;
2. ``scale_in`` / ``scale_out``: a constant factor (Llama Scope's ``√d / average norm``);
3. ``normalize_activations``: SAELens's run-time ``constant_norm_rescale`` (scale each token to
   norm ``√d_in``) or ``layer_norm`` (standardise each token), undone after decoding;
4. ``apply_b_dec_to_input``: ``b_dec`` subtracted before the encoder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from introspect._errors import SAEError
from introspect._export import write_atomically
from introspect._sae._sites import Site, tl_hook_name

__all__ = [
    "ARCHITECTURES",
    "SAELENS_CONFIG",
    "SAELENS_WEIGHTS",
    "InputProcessing",
    "SparseAutoencoder",
]

Architecture = Literal["standard", "jumprelu", "gated", "topk", "batchtopk"]
ARCHITECTURES: tuple[str, ...] = ("standard", "jumprelu", "gated", "topk", "batchtopk")
"""``standard``: ReLU; ``jumprelu``: ``relu(pre) * (pre > threshold)``; ``gated``: the gated
encoder; ``topk``: the ``k`` largest pre-activations, ReLU'd; ``batchtopk``: a BatchTopK SAE at
inference (dictionary_learning): ``f = relu(pre)``, kept where ``f > threshold``."""

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"

Normalize = Literal["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
_NORMALIZE = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_LN_EPS = 1e-5  # SAELens's run-time layer norm

_PARAMS: dict[str, tuple[str, ...]] = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "batchtopk": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
}


@dataclass(frozen=True)
class InputProcessing:
    """What happens to a site's value before the encoder, and is undone after the decoder.

    Example:
        >>> InputProcessing(centre=True).describe()
        'per-token mean removed (TransformerLens centred writing weights), b_dec subtracted'
    """

    centre: bool = False
    """Remove each token's mean over the hidden axis (and add it back after decoding)."""
    scale_in: float = 1.0
    """Multiply the input by this constant (Llama Scope: ``√d_model / average input norm``)."""
    scale_out: float = 1.0
    """Divide the decoder's output by this constant."""
    normalize_activations: Normalize = "none"
    """SAELens's run-time normalisation: ``constant_norm_rescale`` or ``layer_norm``."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` before the encoder (SAELens's default, sparsify always)."""

    def describe(self) -> str:
        """The processing in words (``"none"`` when the SAE reads the value as it is)."""
        parts = []
        if self.centre:
            parts.append("per-token mean removed (TransformerLens centred writing weights)")
        if self.scale_in != 1.0 or self.scale_out != 1.0:
            parts.append(f"scaled by {self.scale_in:.6g} in, 1/{self.scale_out:.6g} out")
        if self.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            parts.append(f"normalize_activations={self.normalize_activations}")
        if self.apply_b_dec_to_input:
            parts.append("b_dec subtracted")
        return ", ".join(parts) or "none"


@dataclass
class _Undo:
    """Per-input statistics the output side needs (means, norms) for one call."""

    mean: torch.Tensor | None = None
    norm_coeff: torch.Tensor | None = None
    ln_mu: torch.Tensor | None = None
    ln_std: torch.Tensor | None = None
    raw: torch.Tensor | None = None


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder (or transcoder) on one site of a model, in SAELens's layout.

    ``encode(x)`` gives the features ``[..., d_sae]``; ``decode(features)`` the decoder's
    output (``features @ W_dec + b_dec``, rescaled by a constant ``scale_out``); ``sae(x)`` the
    reconstruction of ``x`` in the site's own basis, with every per-input step of
    :attr:`processing` undone (which ``decode`` alone cannot do: use
    ``sae.reconstruct(x, features)`` for edited features). Build one from a folder with
    :func:`introspect.load_sae`; ``save(path)`` writes the SAELens layout.

    Example:
        >>> sae = SparseAutoencoder(8, 32, architecture="topk", k=4)
        >>> x = torch.randn(2, 5, 8)
        >>> sae.encode(x).shape, (sae.encode(x) > 0).sum(-1).max().item() <= 4, sae(x).shape
        (torch.Size([2, 5, 32]), True, torch.Size([2, 5, 8]))
    """

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    b_enc: nn.Parameter | None
    threshold: nn.Parameter | None
    b_gate: nn.Parameter | None
    b_mag: nn.Parameter | None
    r_mag: nn.Parameter | None
    W_skip: nn.Parameter | None

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        architecture: Architecture = "standard",
        k: int | None = None,
        processing: InputProcessing | None = None,
        skip: bool = False,
        dtype: torch.dtype = torch.float32,
        format: str = "saelens",
        site: Site | None = None,
        locator: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise SAEError(
                f"unknown SAE architecture {architecture!r}: use one of {', '.join(ARCHITECTURES)}"
            )
        if architecture == "topk" and (k is None or not 0 < k <= d_sae):
            raise SAEError(f"a topk SAE needs 0 < k <= d_sae ({d_sae}), got k={k}")
        self.d_in = int(d_in)
        self.d_sae = int(d_sae)
        self.architecture: Architecture = architecture
        self.k = k
        self.processing = processing or InputProcessing()
        self.format = format
        """Which format the weights were read from (``saelens``, ``gemma_scope``, ...)."""
        self.site = site or Site(locator=locator)
        if locator is not None:
            self.site.locator = locator
        self.metadata: dict[str, Any] = dict(metadata or {})
        """What the format says beyond the weights (model name, context size, ...)."""
        shapes = {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
            "threshold": (d_sae,),
            "b_gate": (d_sae,),
            "b_mag": (d_sae,),
            "r_mag": (d_sae,),
        }
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "b_mag", "r_mag"):
            if name in _PARAMS[architecture]:
                self.register_parameter(name, nn.Parameter(torch.zeros(shapes[name], dtype=dtype)))
            else:
                self.register_parameter(name, None)
        self.register_parameter(
            "W_skip", nn.Parameter(torch.zeros(d_in, d_in, dtype=dtype)) if skip else None
        )

    # -- facts -----------------------------------------------------------------------------

    @property
    def locator(self) -> str | None:
        """The site as a locator, from the format's site name (``None``: see ``site_reason``)."""
        return self.site.locator

    @property
    def site_reason(self) -> str | None:
        """Why :attr:`locator` is ``None`` (or why splicing there is refused)."""
        return self.site.reason

    @property
    def hook_name(self) -> str | None:
        """The site as the format names it (``blocks.3.hook_resid_post``, ``layers.3``, ...)."""
        return self.site.hook_name

    @property
    def head_index(self) -> int | None:
        """The one head an ``attn.z`` SAE reads (``None``: all heads, flattened)."""
        return self.site.head_index

    @property
    def is_transcoder(self) -> bool:
        """Whether it maps a module's input to its output (sparsify ``transcode``)."""
        return self.site.transcoder

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"{self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k}, format={self.format}, "
            f"locator={self.locator}, input: {self.processing.describe()}"
        )

    # -- the input side -----------------------------------------------------------------------

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise SAEError(
                f"this SAE reads vectors of width d_in={self.d_in}, got {tuple(x.shape)}: "
                f"the site ({self.locator or self.hook_name}) has another width on this model"
            )

    def _process_in(self, x: torch.Tensor) -> tuple[torch.Tensor, _Undo]:
        self._check_width(x)
        p = self.processing
        undo = _Undo(raw=x)
        x = x.to(self.dtype)
        if p.centre:
            undo.mean = x.mean(dim=-1, keepdim=True)
            x = x - undo.mean
        if p.scale_in != 1.0:
            x = x * p.scale_in
        if p.normalize_activations == "constant_norm_rescale":
            undo.norm_coeff = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            x = x * undo.norm_coeff
        elif p.normalize_activations == "layer_norm":
            undo.ln_mu = x.mean(dim=-1, keepdim=True)
            x = x - undo.ln_mu
            undo.ln_std = x.std(dim=-1, keepdim=True)
            x = x / (undo.ln_std + _LN_EPS)
        if p.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, undo

    def _activate(self, sae_in: torch.Tensor) -> torch.Tensor:
        arch = self.architecture
        if arch == "gated":
            assert self.b_gate is not None and self.b_mag is not None and self.r_mag is not None
            gate = (sae_in @ self.W_enc + self.b_gate) > 0
            magnitude = torch.relu(sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
            return gate.to(magnitude.dtype) * magnitude
        assert self.b_enc is not None
        pre = sae_in @ self.W_enc + self.b_enc
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":
            assert self.threshold is not None
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if arch == "batchtopk":
            assert self.threshold is not None
            post = torch.relu(pre)
            return post * (post > self.threshold).to(pre.dtype)
        assert self.k is not None
        top = torch.topk(pre, k=self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The features of ``x`` (``[..., d_in]``, the site's value), ``[..., d_sae]``.

        Example:
            >>> sae = SparseAutoencoder(4, 6)
            >>> sae.encode(torch.zeros(3, 4)).shape
            torch.Size([3, 6])
        """
        sae_in, _ = self._process_in(x)
        return self._activate(sae_in)

    # -- the output side ------------------------------------------------------------------------

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """``features @ W_dec + b_dec`` (divided by the constant ``scale_out``), ``[..., d_in]``.

        A per-input normalisation (``constant_norm_rescale``, ``layer_norm``, TransformerLens
        centring) or a transcoder's skip connection needs the input too: use ``sae(x)`` or
        ``sae.reconstruct(x, features)`` for the value in the site's basis.

        Example:
            >>> sae = SparseAutoencoder(4, 6)
            >>> torch.equal(sae.decode(torch.zeros(6)), sae.b_dec.detach())
            True
        """
        if features.shape[-1] != self.d_sae:
            raise SAEError(
                f"decode() takes [..., d_sae={self.d_sae}] features, got {tuple(features.shape)}"
            )
        out = features.to(self.dtype) @ self.W_dec + self.b_dec
        if self.processing.scale_out != 1.0:
            out = out / self.processing.scale_out
        return out

    def _process_out(self, out: torch.Tensor, undo: _Undo) -> torch.Tensor:
        p = self.processing
        if p.normalize_activations == "constant_norm_rescale":
            assert undo.norm_coeff is not None
            out = out / undo.norm_coeff
        elif p.normalize_activations == "layer_norm":
            assert undo.ln_std is not None and undo.ln_mu is not None
            out = out * undo.ln_std + undo.ln_mu
        if p.centre:
            assert undo.mean is not None
            out = out + undo.mean
        if self.W_skip is not None:
            assert undo.raw is not None
            out = out + undo.raw.to(self.dtype) @ self.W_skip.mT
        return out

    def reconstruct(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``features`` decoded into ``x``'s basis (the per-input steps undone with ``x``'s
        statistics): ``sae(x) == sae.reconstruct(x, sae.encode(x))``.

        Example:
            >>> sae = SparseAutoencoder(4, 6, processing=InputProcessing(centre=True))
            >>> x = torch.randn(2, 4)
            >>> torch.equal(sae(x), sae.reconstruct(x, sae.encode(x)))
            True
        """
        _, undo = self._process_in(x)
        return self._process_out(self.decode(features), undo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x`` in the site's basis (``[..., d_in]``)."""
        sae_in, undo = self._process_in(x)
        return self._process_out(self.decode(self._activate(sae_in)), undo)

    def encode_and_reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encode(x), sae(x))`` from one pass over ``x``."""
        sae_in, undo = self._process_in(x)
        features = self._activate(sae_in)
        return features, self._process_out(self.decode(features), undo)

    # -- saving -----------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters by their SAELens names (contiguous, detached)."""
        return {
            name: value.detach().contiguous()
            for name, value in self.named_parameters(recurse=False)
        }

    def config(self) -> dict[str, Any]:
        """The SAELens ``cfg.json`` of this SAE (its site and processing in ``metadata``)."""
        p = self.processing
        if p.scale_in != 1.0 or p.scale_out != 1.0:
            raise SAEError(
                "this SAE scales its input by a constant SAELens's cfg.json cannot state: fold "
                "the factor into the weights first (sae.fold_scaling()), then save"
            )
        site = self.site
        metadata: dict[str, Any] = {
            **{k: v for k, v in self.metadata.items() if k != "introspect"},
            "hook_name": site.hook_name or tl_hook_name(site.locator) or site.locator,
            "hook_head_index": site.head_index,
            "model_from_pretrained_kwargs": {"center_writing_weights": p.centre},
        }
        metadata.setdefault("model_class_name", "HookedTransformer")
        metadata["introspect"] = {
            "locator": site.locator,
            "format": self.format,
            "transcoder": site.transcoder,
        }
        cfg: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": p.apply_b_dec_to_input,
            "normalize_activations": p.normalize_activations,
            "reshape_activations": "hook_z" if site.flatten_heads else "none",
            "metadata": metadata,
        }
        if self.k is not None:
            cfg["k"] = self.k
        return cfg

    @torch.no_grad()
    def fold_scaling(self) -> None:
        """Fold constant input/output scales into the weights (the features stay the same).

        Example:
            >>> sae = SparseAutoencoder(4, 6, processing=InputProcessing(scale_in=2.0,
            ...                         scale_out=2.0, apply_b_dec_to_input=False))
            >>> _ = torch.nn.init.normal_(sae.W_enc), torch.nn.init.normal_(sae.W_dec)
            >>> x = torch.randn(3, 4)
            >>> before = sae(x)
            >>> sae.fold_scaling()
            >>> torch.allclose(before, sae(x), atol=1e-6), sae.processing.scale_in
            (True, 1.0)
        """
        p = self.processing
        if p.apply_b_dec_to_input and p.scale_in != p.scale_out:
            raise SAEError("cannot fold different in/out scales while b_dec is subtracted")
        if p.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise SAEError("cannot fold a constant scale under a run-time normalisation")
        self.W_enc.mul_(p.scale_in)
        self.W_dec.div_(p.scale_out)
        self.b_dec.div_(p.scale_out)
        self.processing = InputProcessing(
            centre=p.centre,
            normalize_activations=p.normalize_activations,
            apply_b_dec_to_input=p.apply_b_dec_to_input,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` (SAELens's layout) to ``path``.

        Both files are written atomically; :func:`introspect.load_sae` reads them back to the
        same SAE (site and input processing included), and SAELens's ``SAE.load_from_disk``
        reads them too.

        Example:
            >>> import tempfile
            >>> from introspect import load_sae
            >>> sae = SparseAutoencoder(4, 6, architecture="topk", k=2)
            >>> folder = sae.save(tempfile.mkdtemp())
            >>> sorted(p.name for p in folder.iterdir())
            ['cfg.json', 'sae_weights.safetensors']
            >>> load_sae(folder).k
            2
        """
        from safetensors.torch import save_file

        folder = Path(path).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config()
        tensors = self.state_tensors()
        if self.architecture == "batchtopk":
            # SAELens has no inference class for BatchTopK: it saves one as JumpReLU, whose
            # relu(pre) * (pre > threshold) equals relu(pre) * (relu(pre) > t) for t >= 0.
            assert self.threshold is not None
            if bool((self.threshold < 0).any()):
                raise SAEError("a batchtopk SAE with a negative threshold has no SAELens form")
            cfg["architecture"] = "jumprelu"
        text = json.dumps(cfg, indent=2) + "\n"

        def write_tensors(tmp: str) -> None:
            save_file(tensors, tmp)

        def write_config(tmp: str) -> None:
            Path(tmp).write_text(text, "utf-8")

        write_atomically(
            [(folder / SAELENS_WEIGHTS, write_tensors), (folder / SAELENS_CONFIG, write_config)]
        )
        return folder

    # -- checks ---------------------------------------------------------------------------------

    def load_weights(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Copy ``tensors`` (by SAELens name) in, checking names, shapes and finiteness."""
        expected = dict(self.named_parameters(recurse=False))
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise SAEError(f"{source} has no {', '.join(missing)} (a {self.architecture} SAE)")
        with torch.no_grad():
            for name, param in expected.items():
                value = tensors[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise SAEError(
                        f"{source}: {name} has shape {tuple(value.shape)}, expected "
                        f"{tuple(param.shape)} for d_in={self.d_in}, d_sae={self.d_sae}"
                    )
                if value.is_floating_point():
                    bad = (~torch.isfinite(value)).sum().item()
                    if bad:
                        raise SAEError(
                            f"{source}: {name} holds {bad} non-finite value(s) (NaN or inf): "
                            "the file is corrupt or was saved mid-divergence"
                        )
                param.copy_(value.to(param.dtype))


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise SAEError(f"{what} is {value}, not a finite number")
    return value


def processing_dict(p: InputProcessing) -> dict[str, Any]:
    """The processing as JSON-ready data."""
    return asdict(p)
