"""An SAE's top latents per token of one sequence, for reading and for the interactive view.

:func:`top_features` takes what a splice recorded (``Splice.features``, or a capture of
``<site>.sae.features``) and keeps, per token, the ``k`` latents that fired most, with every
kept latent's activation on every token of the sequence.

Example:
    >>> f = torch.zeros(1, 2, 8)
    >>> f[0, 1, 3] = 2.5
    >>> top = top_features(f, k=2, tokens=["Hi", " there"], at="block[0]")
    >>> top.latents, top.of(1)
    ([3], [(3, 2.5)])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from introspect._batching import as_int
from introspect._errors import SAEError
from introspect._html import sae_features_view, save_view

__all__ = ["SAEFeatures", "top_features"]


@dataclass(frozen=True)
class SAEFeatures:
    """The top latents of an SAE per token of one sequence (see :func:`top_features`).

    ``top_ids``/``top_values`` are ``[tokens, k]``, by activation, highest first (a latent
    that did not fire has value 0); ``latents`` are the latents that fired in some token's
    top ``k`` (ascending) and ``activations[i, p]`` is latent ``latents[i]`` at token ``p``.
    """

    at: str
    tokens: list[str]
    top_ids: torch.Tensor
    top_values: torch.Tensor
    latents: list[int]
    activations: torch.Tensor
    d_sae: int

    def of(self, position: int) -> list[tuple[int, float]]:
        """The latents that fired at ``position`` (negative allowed), as ``(latent, value)``.

        Example:
            >>> f = torch.zeros(2, 4)
            >>> f[1, 2], f[1, 0] = 1.0, 0.5
            >>> top_features(f, k=3).of(-1)
            [(2, 1.0), (0, 0.5)]
        """
        n = len(self.tokens)
        number = as_int(position)
        if number is None or not -n <= number < n:
            raise SAEError(
                f"position {position!r} is out of range for {n} tokens (use {-n}..{n - 1})"
            )
        pairs = zip(self.top_ids[number].tolist(), self.top_values[number].tolist(), strict=True)
        return [(int(i), float(v)) for i, v in pairs if v != 0]

    def _repr_html_(self) -> str:
        return sae_features_view(self).html()

    def to_html(self, path: str | os.PathLike[str] | None = None, *, force: bool = False) -> str:
        """The interactive token strip and top latents as one self-contained page, written
        atomically to ``path`` when given (an existing file only with ``force``).

        Example:
            >>> f = torch.zeros(2, 4)
            >>> f[0, 1] = 1.0
            >>> top_features(f).to_html().count('data-kind="sae-features"')
            1
        """
        return save_view(sae_features_view(self), path, force=force)

    def __repr__(self) -> str:
        return (
            f"SAEFeatures({self.at or 'an SAE'}, tokens={len(self.tokens)}, "
            f"k={self.top_ids.shape[-1]}, latents={len(self.latents)})"
        )


def top_features(
    features: Any,
    *,
    k: int = 5,
    tokens: Sequence[str] | None = None,
    at: str | None = None,
    row: int = 0,
) -> SAEFeatures:
    """Per token, the ``k`` latents that fired most, from a splice or a features tensor.

    ``features`` is a :class:`~introspect._sae.Splice` after a forward (its last call's
    features, and its site), or a tensor ``[batch, seq, d_sae]`` or ``[seq, d_sae]`` (a capture
    of ``<site>.sae.features``); ``row`` picks the sequence of a batch; ``tokens`` label the
    positions (default ``[0]``, ``[1]``, ...); ``at`` names the site.

    Example:
        >>> f = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
        >>> top = top_features(f, k=2, tokens=["a", "b"])
        >>> top.of(0), top.of(1), top.activations.tolist()
        ([(1, 3.0), (2, 1.0)], [(0, 2.0)], [[0.0, 2.0], [3.0, 0.0], [1.0, 0.0]])
    """
    wanted = as_int(k)
    if wanted is None or wanted < 1:
        raise SAEError(f"k must be a whole number of at least 1, got {k!r}")
    site = at
    value = features
    if not isinstance(features, torch.Tensor):
        value = getattr(features, "features", None)
        if not hasattr(features, "features"):
            raise SAEError(
                "top_features takes a splice (after a forward) or a features tensor "
                f"[batch, seq, d_sae], got {type(features).__name__}"
            )
        if value is None:
            raise SAEError(
                "this splice has not run yet: call the model inside `with insp.splice(...)` first"
            )
        if site is None:
            site = str(getattr(features, "at", ""))
    assert isinstance(value, torch.Tensor)
    if value.dim() == 3:
        index = as_int(row)
        batch = int(value.shape[0])
        if index is None or not -batch <= index < batch:
            raise SAEError(
                f"row {row!r} is out of range for a batch of {batch} (use {-batch}..{batch - 1})"
            )
        value = value[index]
    if value.dim() != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise SAEError(
            f"features must be [batch, seq, d_sae] or [seq, d_sae] with at least one token, got "
            f"{list(features.shape if isinstance(features, torch.Tensor) else value.shape)}"
        )
    acts = value.detach().float().cpu()
    n, d_sae = int(acts.shape[0]), int(acts.shape[1])
    labels = list(tokens) if tokens is not None else [f"[{p}]" for p in range(n)]
    if len(labels) != n:
        raise SAEError(f"{len(labels)} tokens for features of {n} positions: one per position")
    top = acts.topk(min(wanted, d_sae), dim=-1)
    fired = top.indices[top.values != 0]
    latents = sorted({int(i) for i in fired.tolist()})
    return SAEFeatures(
        at=site or "",
        tokens=labels,
        top_ids=top.indices,
        top_values=top.values,
        latents=latents,
        activations=acts[:, latents].T.contiguous(),
        d_sae=d_sae,
    )
