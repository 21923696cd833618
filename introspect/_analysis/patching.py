"""Activation patching: how much each site carries of the difference between two runs.

:func:`patching_sweep` patches one site at a time from a clean run into a corrupted one and
measures a metric (:func:`logit_difference`, say); it stands on the facade's captures and
edits (typed as :class:`~introspect._model.view.Analysable`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from introspect._errors import InterventionError

if TYPE_CHECKING:
    from introspect._model.view import Analysable

__all__ = ["logit_difference", "patching_sweep"]


def logit_difference(correct: int, wrong: int, position: int = -1) -> Callable[[Any], torch.Tensor]:
    """A metric for :func:`patching_sweep`: ``logits[correct] - logits[wrong]`` (batch mean).

    Example:
        >>> metric = logit_difference(1, 0)
        >>> metric(torch.tensor([[[0.0, 2.0]]])).item()
        2.0
    """

    def metric(output: Any) -> torch.Tensor:
        logits = output if isinstance(output, torch.Tensor) else output["logits"]
        last = logits[:, position]
        return (last[:, correct] - last[:, wrong]).mean()

    return metric


def patching_sweep(
    insp: Analysable,
    clean: Mapping[str, Any],
    corrupted: Mapping[str, Any],
    metric: Callable[[Any], Any],
    *,
    locators: str | Sequence[str] = "block[:]",
    positions: Sequence[int] | None = None,
    relative: bool = False,
    heads: str | None = None,
) -> torch.Tensor:
    """Activation patching: the metric's change when one (locator, position) comes from clean.

    Runs ``clean`` once with a capture of every locator, then ``corrupted`` once per
    (locator, position) with that single value patched in from the clean run. Returns
    ``effect[i, j] = metric(patched) - metric(corrupted)`` for locator ``i`` and position
    ``positions[j]`` (every position by default); ``relative=True`` divides by
    ``metric(clean) - metric(corrupted)``, so 1.0 means the patch restores the clean behaviour.

    ``heads="each"`` patches one head at a time of head locators (``block[:].attn.z``,
    ``.result``, ``.q`` ...): ``effect[i, h]`` patches head ``h`` of locator ``i`` at every
    position, or ``effect[i, h, j]`` at ``positions[j]`` when positions are given.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
        >>> insp = Inspector(GPT2LMHeadModel(cfg).eval())
        >>> clean = {"input_ids": torch.tensor([[1, 2, 3]])}
        >>> corrupted = {"input_ids": torch.tensor([[4, 2, 3]])}
        >>> patching_sweep(insp, clean, corrupted, logit_difference(5, 6)).shape
        torch.Size([2, 3])
    """
    if heads not in (None, "each"):
        raise InterventionError(f"heads= takes 'each' (one head at a time) or None, got {heads!r}")
    names = [str(loc) for loc in insp.expand([locators] if isinstance(locators, str) else locators)]
    counts: list[int] = []
    if heads == "each":
        counts = [insp.head_count(name) for name in names]
        if len(set(counts)) > 1:
            raise InterventionError(
                f"heads='each' needs locators with one head count, got {sorted(set(counts))}: "
                "sweep k/v (key/value heads) apart from q/z/result (query heads)"
            )
    model = insp.model
    clean_ids = clean.get("input_ids")
    corrupted_ids = corrupted.get("input_ids")
    if (
        isinstance(clean_ids, torch.Tensor)
        and isinstance(corrupted_ids, torch.Tensor)
        and clean_ids.shape != corrupted_ids.shape
    ):
        raise InterventionError(
            f"clean and corrupted inputs must have the same shape to patch position by position, "
            f"got {tuple(clean_ids.shape)} and {tuple(corrupted_ids.shape)}: pad them to one length"
        )
    seq = int(corrupted_ids.shape[1]) if isinstance(corrupted_ids, torch.Tensor) else None
    positions_given = positions is not None or heads != "each"
    if heads == "each" and positions is None:
        positions = []
    elif positions is None:
        if seq is None:
            raise InterventionError("pass positions=[...] when the inputs have no input_ids")
        positions = list(range(seq))
    positions = list(positions)

    def score(output: Any) -> float:
        value = metric(output)
        return float(value.item() if isinstance(value, torch.Tensor) else value)

    with torch.no_grad():
        with insp.capture(*names) as cap:
            clean_score = score(model(**clean))
        values = {}
        for name in names:
            rec = cap[name]
            values[name] = rec.input if name.endswith(".input") else rec.output
        base = score(model(**corrupted))
        # One loop for every sweep: a head axis of one None (no heads=) and a position axis
        # of one None (heads="each" without positions: every position at once), dropped after.
        head_axis: list[int | None] = list(range(counts[0])) if heads == "each" else [None]
        spots: list[int | None] = list(positions) if positions_given else [None]
        effect = torch.zeros(len(names), len(head_axis), len(spots))
        for i, name in enumerate(names):
            for a, h in enumerate(head_axis):
                for j, p in enumerate(spots):
                    at = None if p is None else [p]
                    with insp.patch(name, values[name], positions=at, heads=h):
                        effect[i, a, j] = score(model(**corrupted)) - base
        effect = effect[:, 0] if heads != "each" else effect if positions_given else effect[..., 0]
    if relative:
        gap = clean_score - base
        if gap == 0:
            raise InterventionError(
                "relative=True divides by metric(clean) - metric(corrupted), which is 0 here: "
                "pick inputs the metric tells apart, or use relative=False"
            )
        effect = effect / gap
    return effect
