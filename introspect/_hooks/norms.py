"""A norm's scale: the per-position divisor it normalises by, as a value to read and edit.

``<norm>.scale`` (``final_norm.scale``, ``block[i].attn_norm.scale``, any block part that is a
norm) is ``[batch, seq, 1]`` (TransformerLens ``hook_scale``)::

    LayerNorm:  scale = sqrt(var(x) + eps)      norm(x) = (x - mean(x)) / scale * w + b
    RMSNorm:    scale = sqrt(mean(x²) + eps)    norm(x) = x / scale * w      (Gemma: 1 + w)

computed from the norm's input in float32 (float64 for a float64 input), the precision the
norms compute their statistics in. No norm hands its divisor out (``nn.LayerNorm`` computes it
inside one kernel), so the scale is computed from the norm's input by the formula
:data:`NORM_FORMS` states for the norm's class, and that formula is checked against the
norm's own output the first time the scale is read (per dtype and device): a norm it does not
reproduce is an error, and a norm class the table does not name is refused before the model
runs, never guessed at.

While the scale is in use the norm's output is rebuilt from it (``ValueFrom``: the norm's own
numbers, the gradient through the recorded scale), so gradients reach the record; an edit of
the scale (``patch``: freeze it at another input's value) gives ``normalised(x) / new_scale *
w + b``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from threading import RLock
from typing import Any, Literal
from weakref import WeakKeyDictionary

import torch
from torch import nn

from introspect._errors import CaptureError, InterventionError, MissingPartError
from introspect._hooks.heads import ValueFrom, in_graph
from introspect._hooks.session import edit_note, onloaded

__all__ = ["NORM_FORMS", "NormForm", "ScaleSite", "ScaleTap", "norm_form", "scale_tap"]


@dataclass(frozen=True)
class NormForm:
    """What a norm class computes, as data: ``norm(x) = normalised(x) / scale * weight + bias``.

    Example:
        >>> form = NORM_FORMS["LlamaRMSNorm"]
        >>> form.center, form.eps, form.weight
        (False, 'variance_epsilon', 'w')
    """

    center: bool
    """LayerNorm: ``normalised(x) = x - mean(x)``; RMSNorm: ``normalised(x) = x``."""
    eps: str | float
    """The attribute holding epsilon, or the modeling file's constant."""
    weight: Literal["w", "1+w"] | None
    """How the module's ``weight`` enters (``None``: it has none)."""
    bias: bool = False
    """Whether the module's ``bias`` (where it has one) is added."""

    @property
    def formula(self) -> str:
        """The formula in words.

        Example:
            >>> NORM_FORMS["GemmaRMSNorm"].formula
            'x / sqrt(mean(x²) + eps) * (1 + w)'
        """
        stat = "var(x)" if self.center else "mean(x²)"
        top = "(x - mean(x))" if self.center else "x"
        weight = {"w": " * w", "1+w": " * (1 + w)", None: ""}[self.weight]
        return f"{top} / sqrt({stat} + eps){weight}{' + b' if self.bias else ''}"


_LAYER_NORM = NormForm(center=True, eps="eps", weight="w", bias=True)
_RMS = NormForm(center=False, eps="variance_epsilon", weight="w")
_RMS_ONE_PLUS = NormForm(center=False, eps="eps", weight="1+w")

NORM_FORMS: dict[str, NormForm] = {
    "torch.nn.LayerNorm": _LAYER_NORM,
    # x * rsqrt(mean(x²) + variance_epsilon) in float32, times weight (LlamaRMSNorm's family).
    **dict.fromkeys(
        (
            "BitNetRMSNorm",
            "DeepseekV2RMSNorm",
            "DeepseekV3RMSNorm",
            "FalconMambaRMSNorm",
            "Glm4RMSNorm",
            "GptOssRMSNorm",
            "GraniteMoeRMSNorm",
            "GraniteRMSNorm",
            "LlamaRMSNorm",
            "Mamba2RMSNorm",
            "MambaRMSNorm",
            "MistralRMSNorm",
            "MixtralRMSNorm",
            "Olmo2RMSNorm",
            "OlmoeRMSNorm",
            "Phi3RMSNorm",
            "Qwen2MoeRMSNorm",
            "Qwen2RMSNorm",
            "Qwen3MoeRMSNorm",
            "Qwen3RMSNorm",
            "T5LayerNorm",
        ),
        _RMS,
    ),
    # Gemma's weight is stored as an offset from one.
    **dict.fromkeys(("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"), _RMS_ONE_PLUS),
    # A LayerNorm in float32 without bias.
    **dict.fromkeys(
        ("CohereLayerNorm", "Cohere2LayerNorm"),
        NormForm(center=True, eps="variance_epsilon", weight="w"),
    ),
    # F.layer_norm without weight or bias, eps fixed at 1e-5 in the modeling file.
    "OlmoLayerNorm": NormForm(center=True, eps=1e-5, weight=None),
}
"""The norm classes whose formula is proven (``tests/test_head_internals.py`` checks every
norm of every adapter in the registry against it), by class name: ``torch.nn.LayerNorm``, and
transformers' own classes (a class of that name from elsewhere, remote code say, is not
taken for it)."""


def norm_form(norm: nn.Module, label: str) -> NormForm:
    """The proven formula of ``norm``'s class, or the one-line refusal naming what is proven.

    Example:
        >>> norm_form(nn.LayerNorm(4), "final_norm").center
        True
        >>> try:
        ...     norm_form(nn.Linear(4, 4), "block[0].mlp")
        ... except MissingPartError as exc:
        ...     print(str(exc)[:64])
        block[0].mlp.scale cannot be read: block[0].mlp is a Linear (tor
    """
    cls = type(norm)
    if cls is nn.LayerNorm:
        return NORM_FORMS["torch.nn.LayerNorm"]
    form = NORM_FORMS.get(cls.__name__)
    if form is not None and cls.__module__.startswith("transformers.models."):
        return form
    norms = sorted(n.rpartition(".")[2] for n in NORM_FORMS)
    what = "a norm whose formula is not proven" if "norm" in cls.__name__.lower() else "not a norm"
    raise MissingPartError(
        f"{label}.scale cannot be read: {label} is a {cls.__name__} ({cls.__module__}), {what}; "
        f"a scale is read from one of: {', '.join(norms)}"
    )


class ScaleSite(nn.Module):
    """An identity module the scale of one norm passes through while something uses it.

    Example:
        >>> site = ScaleSite("final_norm")
        >>> x = torch.ones(1, 3, 1)
        >>> site(x) is x, site.name
        (True, 'scale')
    """

    def __init__(self, label: str) -> None:
        super().__init__()
        self.name = "scale"
        self.label = label

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


_LOCK = RLock()
_TAPS: WeakKeyDictionary[nn.Module, ScaleTap] = WeakKeyDictionary()


class ScaleTap:
    """The scale site of one norm, and the hook that computes the scale while it is used.

    Example:
        >>> norm = nn.LayerNorm(4)
        >>> tap = ScaleTap(norm, "final_norm")
        >>> with tap.use():
        ...     _ = norm(torch.randn(2, 3, 4))
        >>> tap.form.center, norm._forward_hooks == {}
        (True, True)
    """

    def __init__(self, norm: nn.Module, label: str) -> None:
        self.norm = norm
        self.label = label
        self.form = norm_form(norm, label)
        self.site = ScaleSite(label)
        self._users = 0
        self._handle: Any = None
        self._proven: set[tuple[torch.dtype, str]] = set()

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Hook the norm while inside (entered by captures and edits of the scale)."""
        with _LOCK:
            if self._users == 0:
                # First among the norm's hooks, so that a capture of the norm itself records
                # the output an edit of the scale gives.
                self._handle = self.norm.register_forward_hook(
                    self._after, with_kwargs=True, prepend=True
                )
            self._users += 1
        try:
            yield
        finally:
            with _LOCK:
                self._users -= 1
                if self._users == 0:
                    self._handle.remove()
                    self._handle = None

    def epsilon(self) -> float:
        """The norm's epsilon, as its formula states where to find it."""
        eps = self.form.eps
        value = getattr(self.norm, eps, None) if isinstance(eps, str) else eps
        if not isinstance(value, (int, float)):
            raise CaptureError(
                f"{self.label}.scale: {type(self.norm).__name__} has no number at .{eps}, where "
                "its formula keeps epsilon"
            )
        return float(value)

    def divide(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normalised(x), scale)`` in float32 (float64 for a float64 ``x``).

        Example:
            >>> tap = ScaleTap(nn.LayerNorm(2, eps=0.0), "final_norm")
            >>> [t.tolist() for t in tap.divide(torch.tensor([[1.0, 3.0]]))]
            [[[-1.0, 1.0]], [[1.0]]]
        """
        value = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.form.center:
            value = value - value.mean(dim=-1, keepdim=True)
        scale = torch.sqrt(value.pow(2).mean(dim=-1, keepdim=True) + self.epsilon())
        return value, scale

    def apply(self, normalised: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``normalised / scale * weight + bias``, as the norm's formula states (float32)."""
        out = normalised / scale.to(normalised.dtype)
        with onloaded(self.norm, f"{self.label}.scale"):  # accelerate may have offloaded them
            weight = getattr(self.norm, "weight", None)
            bias = getattr(self.norm, "bias", None)
            if self.form.weight is not None and isinstance(weight, torch.Tensor):
                w = weight.to(out.dtype)
                out = out * (1.0 + w if self.form.weight == "1+w" else w)
            if self.form.bias and isinstance(bias, torch.Tensor):
                out = out + bias.to(out.dtype)
        return out

    def _after(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise CaptureError(
                f"{self.label}.scale: {type(module).__name__} was called with "
                f"{type(x).__name__} and returned {type(output).__name__}, not tensors"
            )
        normalised, scale = self.divide(x)
        note = edit_note(module)
        edited = note is not None and bool(note.output_edits)
        own = note.output_before if edited and note is not None else output
        self._prove(own, normalised, scale)
        new = self.site(scale)
        if new is not scale:
            if edited:
                raise InterventionError(
                    f"{self.label}.scale and {self.label} are both edited: an edited scale "
                    f"rebuilds the norm's output, which would drop the edit of {self.label}; "
                    "edit one of them"
                )
            return self.apply(normalised, new).to(output.dtype)
        if edited or not in_graph(scale):
            return None
        # The norm's own numbers; the gradient flows through the record.
        through = self.apply(normalised, scale).to(output.dtype)
        return ValueFrom.apply(output, through)  # type: ignore[no-untyped-call]

    def _prove(self, output: torch.Tensor, normalised: torch.Tensor, scale: torch.Tensor) -> None:
        """Check the formula against the norm's own output, once per dtype and device."""
        key = (output.dtype, output.device.type)
        if key in self._proven:
            return
        with torch.no_grad():
            mine = self.apply(normalised.detach(), scale.detach())
            theirs = output.detach().to(mine.dtype)
            rtol = max(1e-4, 8 * torch.finfo(output.dtype).eps)
            atol = rtol * 1e-2 * max(1.0, float(theirs.abs().max()) if theirs.numel() else 1.0)
            worst = float((mine - theirs).abs().max()) if theirs.numel() else 0.0
            held = bool(torch.allclose(mine, theirs, rtol=rtol, atol=atol))
        if not held:
            raise CaptureError(
                f"{self.label}.scale: {type(self.norm).__name__}'s output is not "
                f"{self.form.formula} with the scale computed so (they differ by up to "
                f"{worst:.3g}): this transformers version computes it differently, so its "
                "scale cannot be read"
            )
        self._proven.add(key)


def scale_tap(norm: nn.Module, label: str) -> ScaleTap:
    """The scale tap of a norm (one per module, kept while it lives); refused with one line
    for a module whose formula is not proven.

    Example:
        >>> norm = nn.LayerNorm(4)
        >>> scale_tap(norm, "final_norm") is scale_tap(norm, "final_norm")
        True
    """
    with _LOCK:
        tap = _TAPS.get(norm)
        if tap is None:
            tap = _TAPS[norm] = ScaleTap(norm, label)
        return tap
