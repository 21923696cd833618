"""Attribution patching: every cell of :meth:`~introspect.Inspector.patching_sweep`, estimated
from two forwards and one backward.

Exact activation patching runs the corrupted input once per site with that site's value taken
from the clean run. Attribution patching (AtP; Nanda 2023) replaces each of those forwards by
the first-order term of its effect, taken at the corrupted run::

    effect(n) ≈ (n_clean - n_corrupted) · ∂metric/∂n

summed over the positions and heads the cell patches. One clean forward gives every
``n_clean``, one corrupted forward under autograd gives every ``n_corrupted`` and one backward
every gradient, whatever the number of cells.

AtP misjudges queries and keys most (Kramár et al. 2024, "AtP*"): a patched query or key moves
the attention softmax far outside its linear range. With ``qk_fix=True`` a ``q`` or ``k`` cell
is computed the AtP* way: the pattern the patch gives is computed exactly (the scores
recomputed from the captured queries and keys and what the attention function was given,
through the softmax), and only what follows the pattern is taken to first order::

    effect(q or k) ≈ Σ (pattern_patched - pattern_corrupted) · ∂metric/∂pattern

The recomputed scores are proven on every call: their softmax must reproduce the pattern the
model computed, or the fix is refused with the reason (never a guess).

AtP*'s second fix, GradDrop (``grad_drop=True``), is for a value whose direct effect and the
effects it has through later blocks cancel in the gradient, so AtP ranks it near 0. Block by
block, the gradient through that block's residual update is stopped (its skip connection
kept) and AtP is taken again; a cell's estimate is the mean of the magnitudes over the blocks
other than its own. One corrupted forward serves every backward pass (``retain_graph``): the
stopping is done by gradient hooks on each block's output and input, switched per pass.

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from introspect import Inspector, logit_difference
    >>> cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    >>> insp = Inspector(GPT2LMHeadModel(cfg).eval())
    >>> clean = {"input_ids": torch.tensor([[1, 2, 3]])}
    >>> corrupted = {"input_ids": torch.tensor([[4, 2, 3]])}
    >>> attribution_patching(insp, clean, corrupted, logit_difference(5, 6)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from introspect._analysis.lens import _save_atomically
from introspect._errors import InterventionError, MissingDependencyError
from introspect._hooks.heads import (
    HEAD_AXIS,
    HeadTap,
    attention_pattern,
    attention_scores,
    attn_part,
    head_site,
)
from introspect._html import patching_view, save_view
from introspect._locators import QUERY_KEY_SITES, Locator

if TYPE_CHECKING:
    from introspect._model.view import Analysable

__all__ = [
    "Agreement",
    "PatchingResult",
    "attribution_patching",
    "patching_agreement",
    "patching_result",
    "plot_patching",
]

_CHUNK = 1 << 24
"""How many score entries the key fix computes at once (a bound on its memory)."""


def attribution_patching(
    insp: Analysable,
    clean: Mapping[str, Any],
    corrupted: Mapping[str, Any],
    metric: Callable[[Any], Any],
    *,
    locators: str | Sequence[str] = "block[:]",
    positions: Sequence[int] | None = None,
    heads: str | None = None,
    qk_fix: bool = True,
    relative: bool = False,
    grad_drop: bool = False,
) -> torch.Tensor:
    """Attribution patching: the table of :meth:`~introspect.Inspector.patching_sweep`,
    estimated to first order.

    Returns what :meth:`~introspect.Inspector.patching_sweep` returns for the same arguments, in the
    same shape and order (``[locators, positions]``; with ``heads="each"``
    ``[locators, heads]``, or ``[locators, heads, positions]`` when positions are given), each
    cell estimated as ``(n_clean - n_corrupted) · ∂metric/∂n`` at the corrupted run, summed
    over the batch and over the positions and heads the cell patches. It costs one clean
    forward, one corrupted forward and one backward, whatever the number of cells.

    ``metric`` takes the model's output and returns a scalar tensor that depends on the logits
    differentiably (:func:`~introspect.logit_difference`, say). ``clean`` and ``corrupted`` hold
    the same number of tokens: position ``p`` of one is patched into position ``p`` of the
    other.

    ``qk_fix=True`` (AtP*) computes the cells of query and key sites (``block[i].attn.q``,
    ``.k``) through the softmax: the pattern the patched queries or keys give is computed
    exactly, the rest of the model to first order. It changes only ``q`` and ``k`` cells (the
    other sites do not reach the metric through a softmax of their own) and is refused, with
    the reason, where the scores cannot be recomputed exactly: an attention computed inline,
    one whose pattern cannot be read, or one whose recomputed scores do not reproduce the
    model's pattern. ``qk_fix=False`` is plain AtP everywhere. ``relative=True`` divides by
    ``metric(clean) - metric(corrupted)``, as :meth:`~introspect.Inspector.patching_sweep` does.

    ``grad_drop=True`` adds AtP*'s GradDrop (Kramár et al. 2024, arXiv 2403.00745, "GradDrop":
    ``(1 / (L - 1)) Σ_l |AtP with the gradient through layer l dropped|``, the term of the
    node's own layer being 0). For each block ``l`` the estimate is taken again with the
    gradient through block ``l``'s residual update (its output minus its input: the attention
    and MLP outputs of a pre-norm block) stopped and its skip connection kept; each cell is
    the mean of ``|estimate_l|`` over the ``L - 1`` blocks other than its own. A value's own
    block is the block it sits in (a part, a head, a module inside it) or that writes it to
    the residual stream (``block[i]``, and ``block[i + 1].input``, which is the same tensor);
    a value no block writes (``embed``, ``block[0].input``, the final norm) is averaged over
    all ``L`` blocks. Blocks before a value's own leave its gradient as AtP's, so a value in
    the last block gets ``|AtP|``. The cells are **magnitudes** (never negative), to be
    compared with ``|exact patching|``; with ``relative=True`` they are divided by
    ``|metric(clean) - metric(corrupted)|``. It works with ``positions``, ``heads`` and every
    site, and with ``qk_fix`` (each pass's pattern gradient through the exact softmax). It
    costs the same two forwards and one backward pass per block after the earliest swept
    value's block, plus one without a drop where a value has blocks before its own (``L`` for
    a sweep of every block). A model of one block has no other block and is refused, as are
    encoder-decoder models (two stacks).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from introspect import Inspector, logit_difference
        >>> cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> insp = Inspector(LlamaForCausalLM(cfg).eval())
        >>> clean = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
        >>> corrupted = {"input_ids": torch.tensor([[1, 9, 3, 4]])}
        >>> metric = logit_difference(5, 6)
        >>> atp = attribution_patching(insp, clean, corrupted, metric,
        ...                            locators="block[:].attn.q", heads="each")
        >>> exact = insp.patching_sweep(clean, corrupted, metric,
        ...                             locators="block[:].attn.q", heads="each")
        >>> atp.shape == exact.shape == (2, 4)
        True
        >>> drop = attribution_patching(insp, clean, corrupted, metric, grad_drop=True)
        >>> plain = attribution_patching(insp, clean, corrupted, metric)
        >>> bool((drop >= 0).all()), torch.allclose(drop[-1], plain[-1].abs())
        (True, True)
    """
    plan = _plan(insp, clean, corrupted, locators, positions, heads, qk_fix, relative, grad_drop)
    model = insp.model
    with torch.no_grad():
        with insp.capture(*plan.names) as cap:
            clean_score = _scalar(metric(model(**clean)), "clean")
        clean_values = {name: _value(cap[name], loc) for name, loc in plan.locs.items()}
    taps = list(plan.fixed.values())
    kept = [tap.arguments for tap in taps]
    # A model whose weights are frozen builds no graph: its values would have no gradient.
    frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    wanted = list(plan.names) + list(plan.extra)
    try:
        for tap in taps:
            tap.arguments = []
        for param in frozen:
            param.requires_grad_(True)
        captured = dict.fromkeys([*wanted, *plan.drops])
        with torch.enable_grad(), insp.capture(*captured) as cap:
            score = _scalar(metric(model(**corrupted)), "corrupted")
        calls = [tap.arguments for tap in taps]
    finally:
        for param in frozen:
            param.requires_grad_(False)
        for tap, before in zip(taps, kept, strict=True):
            tap.arguments = before
    if not score.requires_grad:
        raise InterventionError(
            "the metric's value on the corrupted run carries no gradient: it must be computed "
            "from the model's output with differentiable operations (logits[..., a] - "
            "logits[..., b], not argmax or .item()), outside torch.no_grad()"
        )
    corrupt_values = {
        name: _value(cap[name], insp.locator(name) if name not in plan.locs else plan.locs[name])
        for name in wanted
    }
    cells = _Cells(plan, clean_values, corrupt_values, dict(zip(plan.fixed, calls, strict=True)))
    if grad_drop:
        blocks = range(plan.drop_blocks)
        drops = _Drops(
            [_value(cap[f"block[{b}]"], Locator.parse(f"block[{b}]")) for b in blocks],
            [_value(cap[f"block[{b}].input"], Locator.parse(f"block[{b}].input")) for b in blocks],
        )
        effect = _grad_drop(plan, cells, drops, score, corrupt_values, wanted)
    else:
        found = torch.autograd.grad(
            score, [corrupt_values[name] for name in wanted], allow_unused=True
        )
        gradient = {
            name: torch.zeros_like(corrupt_values[name]) if g is None else g
            for name, g in zip(wanted, found, strict=True)
        }
        effect = torch.stack([cells.of(name, [gradient])[..., 0] for name in plan.names])
    effect = effect.float()
    if plan.heads != "each":
        effect = effect[:, 0]
    elif not plan.positions_given:
        effect = effect[..., 0]
    if relative:
        gap = float(clean_score) - float(score.detach())
        if gap == 0:
            raise InterventionError(
                "relative=True divides by metric(clean) - metric(corrupted), which is 0 here: "
                "pick inputs the metric tells apart, or use relative=False"
            )
        # GradDrop's cells are magnitudes: divided by |gap| they stay comparable with
        # |relative exact patching|.
        effect = effect / (abs(gap) if grad_drop else gap)
    return effect


# -- the cells of each locator, for one or several gradients -------------------------------------


class _Cells:
    """Each swept locator's cells, ``[heads, positions, passes]``, for a list of gradients
    (one per backward pass): the AtP product, or for q/k cells of a fixed part the QK fix."""

    def __init__(
        self,
        plan: _Plan,
        clean: dict[str, torch.Tensor],
        corrupted: dict[str, torch.Tensor],
        arguments: dict[str, list[dict[str, Any]] | None],
    ) -> None:
        self.plan = plan
        self.clean = clean
        self.corrupted = corrupted
        self.arguments = arguments

    def fixed_part(self, name: str) -> str | None:
        """The attention part whose QK fix computes this locator's cells, if any."""
        loc = self.plan.locs[name]
        attn = attn_part(loc) if head_site(loc) in ("q", "k") else None
        return attn if attn is not None and attn in self.plan.fixed else None

    def of(self, name: str, gradients: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        plan, loc = self.plan, self.plan.locs[name]
        site = head_site(loc)
        with torch.no_grad():
            attn = self.fixed_part(name)
            if attn is not None:
                fix = _QKFix(
                    plan.fixed[attn],
                    attn,
                    self.arguments[attn],
                    self.corrupted[f"{attn}.q"],
                    self.corrupted[f"{attn}.k"],
                    self.corrupted[f"{attn}.pattern"],
                )
                stack = [g[f"{attn}.pattern"] for g in gradients]
                clean = self.clean[name]
                return fix.query(plan, clean, stack) if site == "q" else fix.key(plan, clean, stack)
            delta = self.clean[name].to(torch.float64) - self.corrupted[name].to(torch.float64)
            axis = HEAD_AXIS.get(site or "", 2)
            found = [_reduce(delta * g[name].to(torch.float64), axis, plan) for g in gradients]
            return torch.stack(found, dim=-1)


# -- GradDrop: one backward per block, the gradient through that block's update stopped ----------


class _Drops:
    """Gradient hooks that stop the gradient through one block's residual update, the block
    chosen per backward pass (``active``), keeping its skip connection.

    The hook on block ``l``'s output takes the gradient that reaches it and passes zero into
    the block; the hook on block ``l``'s input adds that gradient back, as the skip connection
    would have carried it. Both read what they see, so the gradient of a swept value that is
    one of these two tensors is taken from the hook, not from what ``autograd.grad`` captures
    (before or after the hooks, depending on the version).
    """

    def __init__(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> None:
        self.outputs = outputs
        self.inputs = inputs
        self.active: int | None = None
        self.arrived: torch.Tensor | None = None
        self.passed: torch.Tensor | None = None
        for b, (y, x) in enumerate(zip(outputs, inputs, strict=True)):
            if y is x:
                raise InterventionError(
                    f"grad_drop: block[{b}] returns its input tensor itself, so its update "
                    "cannot be told from its skip connection: pass grad_drop=False"
                )

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        handles = []
        try:
            for b, (y, x) in enumerate(zip(self.outputs, self.inputs, strict=True)):
                if y.requires_grad:
                    handles.append(y.register_hook(functools.partial(self._stop, b)))  # type: ignore[no-untyped-call]
                if x.requires_grad:
                    handles.append(x.register_hook(functools.partial(self._skip, b)))  # type: ignore[no-untyped-call]
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _stop(self, block: int, grad: torch.Tensor) -> torch.Tensor | None:
        if block != self.active:
            return None
        self.arrived = grad
        return torch.zeros_like(grad)

    def _skip(self, block: int, grad: torch.Tensor) -> torch.Tensor | None:
        if block != self.active:
            return None
        if self.arrived is not None:
            grad = grad + self.arrived
        self.passed = grad
        return grad

    def gradients(
        self, score: torch.Tensor, names: list[str], values: Mapping[str, torch.Tensor], block: int
    ) -> dict[str, torch.Tensor]:
        """``∂score/∂value`` for each name, the gradient through ``block``'s update stopped."""
        self.active, self.arrived, self.passed = block, None, None
        x, y = self.inputs[block], self.outputs[block]
        # The block's output and input are asked for too, so that the backward reaches both
        # hooks even when every value asked for lies after the block (the final norm).
        through = [y, x] if x.requires_grad else [y]
        try:
            found = torch.autograd.grad(
                score,
                [values[n] for n in names] + through,
                retain_graph=True,
                allow_unused=True,
            )[: len(names)]
            if self.arrived is None or (x.requires_grad and self.passed is None):
                raise InterventionError(
                    f"grad_drop: the gradient did not pass through block[{block}]'s recorded "
                    "output and input, so stopping it there would change nothing: the block's "
                    "records are not the tensors the model went on with; pass grad_drop=False"
                )
            out = {}
            for name, g in zip(names, found, strict=True):
                value = values[name]
                if value is y:
                    g = self.arrived
                elif value is x:
                    g = self.passed
                out[name] = torch.zeros_like(value) if g is None else g
            return out
        finally:
            self.active = self.arrived = self.passed = None


def _owner(plan: _Plan, name: str, value: torch.Tensor, drops: _Drops) -> int | None:
    """The block a swept value belongs to: the block that writes it to the residual stream
    (a block's output, the next block's input), the block it sits in (a part, a head, a
    module inside it), or None (before or after every block: the embedding, block 0's input,
    the final norm)."""
    for b, y in enumerate(drops.outputs):
        if value is y:
            return b
    for b, x in enumerate(drops.inputs):
        if value is x:
            return b - 1 if b > 0 else None
    return plan.owners[name]


def _before(owner: int | None, block: int) -> bool:
    """Whether stopping the gradient through ``block`` can change a value's gradient (the
    value is upstream of the block's update)."""
    return owner is None or owner < block


def _grad_drop(
    plan: _Plan,
    cells: _Cells,
    drops: _Drops,
    score: torch.Tensor,
    values: Mapping[str, torch.Tensor],
    wanted: list[str],
) -> torch.Tensor:
    """Each cell's GradDrop estimate: the mean of ``|AtP with block l dropped|`` over the
    blocks ``l`` other than the cell's own (every block for a value no block owns)."""
    blocks = len(drops.outputs)
    owner: dict[str, int | None] = {
        name: _owner(plan, name, values[name], drops) for name in wanted
    }
    own = [owner[name] for name in plan.names]
    first = min(-1 if o is None else o for o in own)
    total = torch.zeros(len(plan.names), len(plan.head_axis), len(plan.spots), dtype=torch.float64)
    pending: dict[int, list[tuple[int, Mapping[str, torch.Tensor]]]] = {}

    def absorb(gradient: Mapping[str, torch.Tensor], weights: list[int]) -> None:
        for i, (name, weight) in enumerate(zip(plan.names, weights, strict=True)):
            if weight == 0:
                continue
            part = cells.fixed_part(name)
            if part is not None:  # the fix runs once, over every pass's pattern gradient
                pattern = f"{part}.pattern"
                pending.setdefault(i, []).append((weight, {pattern: gradient[pattern]}))
            else:
                total[i] += weight * cells.of(name, [gradient])[..., 0].abs()

    with drops.hooked():
        if any(o is not None and o >= 1 for o in own):
            # Blocks before a value's own leave its gradient as it is: AtP's, once per block.
            plain = torch.autograd.grad(
                score, [values[n] for n in wanted], retain_graph=True, allow_unused=True
            )
            gradient = {
                n: torch.zeros_like(values[n]) if g is None else g
                for n, g in zip(wanted, plain, strict=True)
            }
            absorb(gradient, [0 if o is None else o for o in own])
        for block in range(first + 1, blocks):
            names = [n for n in wanted if _before(owner[n], block)]
            gradient = drops.gradients(score, names, values, block)
            absorb(gradient, [int(_before(o, block)) for o in own])
    for i, terms in pending.items():
        found = cells.of(plan.names[i], [g for _, g in terms]).abs()
        weights = torch.tensor([w for w, _ in terms], dtype=torch.float64)
        total[i] = (found * weights).sum(-1)
    count = torch.tensor(
        [blocks if o is None else blocks - 1 for o in own], dtype=torch.float64
    ).view(-1, 1, 1)
    return total / count


# -- the plan: everything checked before any forward -----------------------------------------------


@dataclass
class _Plan:
    locs: dict[str, Locator]
    """The locators swept, by name, in order."""
    heads: str | None
    head_axis: list[int | None]
    """Heads patched one at a time (``[None]``: all at once)."""
    spots: list[int | None]
    """Positions patched one at a time (``[None]``: all at once)."""
    positions_given: bool
    fixed: dict[str, HeadTap]
    """The attention parts whose q/k cells take the QK fix, by part locator."""
    extra: list[str]
    """What the corrupted run also captures for the fix (q, k and pattern of those parts)."""
    drop_blocks: int = 0
    """GradDrop: how many blocks, each dropped in its own backward pass (0: no GradDrop)."""
    owners: dict[str, int | None] = field(default_factory=dict)
    """GradDrop: the block each swept or extra value sits in, as its locator says (``None``:
    no block's); refined after the forward by which tensors are the blocks' own."""

    @property
    def drops(self) -> list[str]:
        """What GradDrop captures on the corrupted run: each block's output and input."""
        return [f"block[{b}]{side}" for b in range(self.drop_blocks) for side in ("", ".input")]

    @property
    def names(self) -> list[str]:
        return list(self.locs)


def _token_count(inputs: Mapping[str, Any]) -> tuple[int, ...] | None:
    for key in ("input_ids", "inputs_embeds"):
        found = inputs.get(key)
        if isinstance(found, torch.Tensor) and found.dim() >= 2:
            return tuple(found.shape[:2])
    return None


def _plan(
    insp: Analysable,
    clean: Mapping[str, Any],
    corrupted: Mapping[str, Any],
    locators: str | Sequence[str],
    positions: Sequence[int] | None,
    heads: str | None,
    qk_fix: bool,
    relative: bool = False,
    grad_drop: bool = False,
) -> _Plan:
    for flag, value in (("qk_fix", qk_fix), ("relative", relative), ("grad_drop", grad_drop)):
        if not isinstance(value, bool):
            raise InterventionError(f"{flag}= takes True or False, got {value!r:.40}")
    if heads not in (None, "each"):
        raise InterventionError(f"heads= takes 'each' (one head at a time) or None, got {heads!r}")
    for name, inputs in (("clean", clean), ("corrupted", corrupted)):
        if not isinstance(inputs, Mapping):
            raise InterventionError(
                f"{name} is the model's keyword inputs (e.g. {{'input_ids': ids}}), got "
                f"{type(inputs).__name__}"
            )
    found = insp.expand([locators] if isinstance(locators, str) else locators)
    locs = {str(loc): loc for loc in found}
    counts: list[int] = []
    if heads == "each":
        counts = [insp.head_count(loc) for loc in locs.values()]
        if len(set(counts)) > 1:
            raise InterventionError(
                f"heads='each' needs locators with one head count, got {sorted(set(counts))}: "
                "sweep k/v (key/value heads) apart from q/z/result (query heads)"
            )
    shape_clean, shape_corrupted = _token_count(clean), _token_count(corrupted)
    if shape_clean is not None and shape_corrupted is not None and shape_clean != shape_corrupted:
        raise InterventionError(
            f"clean and corrupted inputs must hold the same number of tokens (position p of one "
            f"is patched into position p of the other), got [batch, seq] {list(shape_clean)} and "
            f"{list(shape_corrupted)}: pad them to one length"
        )
    seq = shape_corrupted[1] if shape_corrupted is not None else None
    positions_given = positions is not None or heads != "each"
    spots: list[int | None]
    if positions is None:
        if heads == "each":
            spots = [None]
        elif seq is None:
            raise InterventionError("pass positions=[...] when the inputs have no input_ids")
        else:
            spots = list(range(seq))
    else:
        spots = []
        for p in positions:
            if isinstance(p, bool) or not isinstance(p, int):
                raise InterventionError(f"positions= takes integer positions, got {p!r:.40}")
            if seq is not None and not -seq <= p < seq:
                raise InterventionError(
                    f"position {p} is out of range for inputs of {seq} tokens (use "
                    f"{-seq}..{seq - 1})"
                )
            spots.append(p % seq if seq is not None else p)
    fixed: dict[str, HeadTap] = {}
    extra: list[str] = []
    for name, loc in locs.items():
        site = head_site(loc)
        part = ("block" if loc.sub is None else loc.sub) if loc.is_block else loc.part
        stack = insp.adapter.stack(insp.view.stack_key(loc.stack))
        if loc.side == "output" and loc.sae is None and part in stack.outputs_changed_in_place:
            # The capture keeps a copy of what the module returned; the model goes on with
            # the tensor it then changes, so no gradient would ever reach the copy.
            raise InterventionError(
                f"{name}'s output is changed in place by {insp.adapter.name} after the module "
                "returns, so its record is a copy no gradient reaches and every cell would be "
                "0: measure it with patching_sweep"
            )
        if site in QUERY_KEY_SITES and positions_given:
            raise InterventionError(
                f"{name} is [batch, heads, query, key], so positions= cannot be placed on it: "
                "sweep it with heads='each' and no positions"
            )
        if not qk_fix or site not in ("q", "k"):
            continue
        part = attn_part(loc)
        if part in fixed:
            continue
        tap = insp.view.resolver.head_tap(loc)
        reason = tap.why_not("pattern")
        if reason is None and tap.inline:
            reason = (
                f"{type(tap.core).__name__} computes attention inline, so the terms it adds to "
                f"the scores ({tap.spec.scores}) are not passed where they can be read"
            )
        if reason is not None:
            raise InterventionError(
                f"qk_fix recomputes the softmax of {part} for each patched query or key, but its "
                f"scores cannot be recomputed exactly: {reason}; pass qk_fix=False for the "
                "linear estimate"
            )
        fixed[part] = tap
        extra.extend(f"{part}.{s}" for s in ("q", "k", "pattern") if f"{part}.{s}" not in locs)
    plan = _Plan(
        locs,
        heads,
        list(range(counts[0])) if heads == "each" else [None],
        spots,
        positions_given,
        fixed,
        list(dict.fromkeys(extra)),
    )
    if grad_drop:
        plan.drop_blocks = _drop_blocks(insp, locs)
        blocks: list[torch.nn.Module] = []
        for name in [*plan.names, *plan.extra]:
            loc = locs[name] if name in locs else Locator.parse(name)
            if loc.part == "module" and not blocks:
                blocks = [insp.module(f"block[{b}]") for b in range(plan.drop_blocks)]
            plan.owners[name] = _static_owner(insp, loc, blocks)
    return plan


def _drop_blocks(insp: Analysable, locs: Mapping[str, Locator]) -> int:
    """The number of blocks GradDrop drops one at a time, or why it cannot."""
    if insp.adapter.encoder is not None or any(loc.stack for loc in locs.values()):
        raise InterventionError(
            f"grad_drop stops the gradient through each block of one stack; "
            f"{insp.adapter.name} has an encoder and a decoder: pass grad_drop=False"
        )
    if "block" in insp.adapter.stack(None).outputs_changed_in_place:
        raise InterventionError(
            f"grad_drop hooks each block's output, which {insp.adapter.name} changes in place "
            "after the block returns: pass grad_drop=False"
        )
    blocks = insp.num_blocks
    if blocks < 2:
        raise InterventionError(
            f"grad_drop averages each cell over the blocks other than its own, and this model "
            f"has {blocks} block: there is no other; pass grad_drop=False (plain AtP)"
        )
    return blocks


def _static_owner(insp: Analysable, loc: Locator, blocks: list[torch.nn.Module]) -> int | None:
    """The block a value sits in as its locator says: a block's output and everything inside
    a block belong to it, a block's input to the block before (``None`` for block 0's), a
    module to the block that holds it, anything else (the embedding, the final norm) to none."""
    if loc.part == "block":
        index = loc.index if loc.index is not None else 0
        if loc.sub is None and (loc.sae or loc.side) == "input":
            return index - 1 if index > 0 else None
        return index
    if loc.part == "module":
        module = insp.module(loc)
        for b, block in enumerate(blocks):
            if any(m is module for m in block.modules()):
                return b
    return None


def _value(record: Any, loc: Locator) -> torch.Tensor:
    value = record.input if loc.side == "input" else record.output
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        what = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise InterventionError(
            f"{loc} holds {what}, not a float tensor: attribution patching needs a value with a "
            "gradient (token ids have none: use 'embed' or 'block[0].input')"
        )
    return value


def _scalar(value: Any, run: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = (
            f"a tensor of shape {list(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise InterventionError(
            f"the metric must return a scalar tensor (one number, e.g. the batch mean of a logit "
            f"difference), got {got} on the {run} run: reduce it (.mean()) and return the "
            "tensor itself, not .item()"
        )
    return value.reshape(())


def _reduce(product: torch.Tensor, head_axis: int, plan: _Plan) -> torch.Tensor:
    """The cells of one locator: ``product`` summed over what each cell patches."""
    out = torch.zeros(len(plan.head_axis), len(plan.spots), dtype=torch.float64)
    for a, h in enumerate(plan.head_axis):
        x = product if h is None else product.select(head_axis, h)
        if plan.spots == [None]:
            out[a, 0] = x.sum()
            continue
        by_position = x.sum(0)
        by_position = by_position.reshape(by_position.shape[0], -1).sum(-1)
        for j, p in enumerate(plan.spots):
            out[a, j] = by_position.sum() if p is None else by_position[p]
    return out


# -- the QK fix ------------------------------------------------------------------------------------


class _QKFix:
    """The q or k cells of one attention part, through the softmax (AtP*)."""

    def __init__(
        self,
        tap: HeadTap,
        part: str,
        calls: list[dict[str, Any]] | None,
        q: torch.Tensor,
        k: torch.Tensor,
        pattern: torch.Tensor,
    ) -> None:
        if not calls or len(calls) != 1:
            count = len(calls or [])
            raise InterventionError(
                f"qk_fix: {part} called its attention function {count} times in one forward; "
                "the fix reads one call (one forward of one sequence batch): pass qk_fix=False"
            )
        self.tap = tap
        self.part = part
        self.arguments = calls[0]
        self.q, self.k = q.detach(), k.detach()
        self.sinks = getattr(tap.core, "sinks", None)
        self.causal = bool(getattr(tap.core, "is_causal", False))
        self.dtype = torch.promote_types(q.dtype, torch.float32)
        self.scores = attention_scores(self.q, self.k, self.arguments, self.causal, clamp=True)
        self.pattern = attention_pattern(self.scores, self.sinks)
        self._prove(pattern.detach())

    def _prove(self, pattern: torch.Tensor) -> None:
        """The recomputed pattern must be the model's, on every query that attends somewhere."""
        real = self.scores.amax(-1) > torch.finfo(self.scores.dtype).min / 2
        mine = self.pattern[real]
        theirs = pattern.to(self.pattern.dtype)[real]
        tolerance = 1e-4 if pattern.element_size() >= 4 else 1e-2
        worst = float((mine - theirs).abs().max()) if mine.numel() else 0.0
        if mine.shape != theirs.shape or not worst <= tolerance:
            raise InterventionError(
                f"qk_fix: the scores of {self.part} recomputed from q, k and what its attention "
                f"function was given do not reproduce the model's pattern (max |diff| "
                f"{worst:.2g}; the head layout states {self.tap.spec.scores!r}), so the fixed "
                "cells would be a guess: pass qk_fix=False for the linear estimate"
            )

    def _effect(self, pattern: torch.Tensor, gradients: list[torch.Tensor]) -> torch.Tensor:
        """``Σ (pattern - pattern_corrupted) · ∂metric/∂pattern`` over the last four axes, one
        column per gradient."""
        change = pattern - self.pattern
        return torch.stack([(change * g).sum(dim=(-4, -3, -2, -1)) for g in gradients], -1)

    def query(
        self, plan: _Plan, clean: torch.Tensor, gradients: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """The cells of patching ``clean`` queries, ``[heads, positions, gradients]``."""
        # Each query's row of the pattern depends on that query alone: the effect of a set of
        # patched queries is the sum of the rows' effects, one softmax for all of them.
        rows = attention_pattern(
            attention_scores(clean, self.k, self.arguments, self.causal, clamp=True), self.sinks
        )
        change = rows - self.pattern
        found = []
        for g in gradients:
            by_query = (change * g.to(self.dtype)).sum(-1)  # [batch, heads, query]
            found.append(_reduce(by_query.transpose(1, 2).to(torch.float64), 2, plan))
        return torch.stack(found, -1)

    def key(
        self, plan: _Plan, clean: torch.Tensor, gradients: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """The cells of patching ``clean`` keys, ``[heads, positions, gradients]``."""
        # A key reaches every query's row: the keys patched together share each softmax, so
        # every cell is its own softmax (batched, in chunks), whatever the number of gradients.
        grads = [g.to(self.dtype) for g in gradients]
        patched = attention_scores(self.q, clean, self.arguments, self.causal, clamp=True)
        heads, kv = self.q.shape[2], self.k.shape[2]
        group = heads // kv
        keys = self.k.shape[1]
        cells = [(a, j) for a in range(len(plan.head_axis)) for j in range(len(plan.spots))]
        columns = torch.zeros(len(cells), heads, keys, dtype=torch.bool, device=self.q.device)
        for n, (a, j) in enumerate(cells):
            h, p = plan.head_axis[a], plan.spots[j]
            rows = slice(None) if h is None else slice(h * group, (h + 1) * group)
            columns[n, rows, slice(None) if p is None else p] = True
        per_cell = max(1, _CHUNK // max(1, self.scores.numel()))
        out = torch.zeros(len(plan.head_axis), len(plan.spots), len(grads), dtype=torch.float64)
        for start in range(0, len(cells), per_cell):
            chosen = columns[start : start + per_cell, None, :, None, :]
            scores = torch.where(chosen, patched, self.scores)
            found = self._effect(attention_pattern(scores, self.sinks), grads)
            for n, values in enumerate(found.tolist(), start=start):
                a, j = cells[n]
                out[a, j] = torch.tensor(values, dtype=torch.float64)
        return out


# -- comparing an estimate with exact patching -----------------------------------------------------


@dataclass
class Agreement:
    """How well an estimate of a patching table agrees with the exact table.

    ``pearson`` and ``spearman`` correlate every cell; ``top`` cells are ranked by absolute
    value; ``overlap`` counts the exact top cells the estimate also ranks in its top;
    ``false_negatives`` are the exact top cells it misses (as index tuples of the table).

    Example:
        >>> a = patching_agreement(torch.tensor([3.0, 0.1, 2.0]), torch.tensor([2.9, 0.0, 2.2]),
        ...                        top=2)
        >>> a.overlap, a.false_negatives
        (2, [])
    """

    pearson: float
    spearman: float
    top: int
    overlap: int
    false_negatives: list[tuple[int, ...]]
    cells: int

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON output.

        Example:
            >>> Agreement(1.0, 1.0, 1, 1, [], 2).to_dict()["overlap"]
            1
        """
        return {
            "pearson": _finite(self.pearson),
            "spearman": _finite(self.spearman),
            "top": self.top,
            "overlap": self.overlap,
            "false_negatives": [list(i) for i in self.false_negatives],
            "cells": self.cells,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    spread = float(a.norm() * b.norm())
    return float((a * b).sum()) / spread if spread > 0 else math.nan


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties sharing their mean rank."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def patching_agreement(estimate: torch.Tensor, exact: torch.Tensor, *, top: int = 10) -> Agreement:
    """Pearson and Spearman correlation, top-``top`` agreement and false negatives of an
    estimated patching table (:func:`attribution_patching`) against the exact one
    (:meth:`~introspect.Inspector.patching_sweep`), cell by cell.

    Example:
        >>> exact = torch.tensor([[0.0, 1.0], [4.0, -2.0]])
        >>> a = patching_agreement(exact * 2, exact, top=2)
        >>> round(a.pearson, 6), round(a.spearman, 6), a.overlap
        (1.0, 1.0, 2)
    """
    if estimate.shape != exact.shape:
        raise InterventionError(
            f"an estimate of shape {tuple(estimate.shape)} cannot be compared with an exact "
            f"table of shape {tuple(exact.shape)}: compute both with the same arguments"
        )
    a = estimate.detach().flatten().to(torch.float64).cpu()
    b = exact.detach().flatten().to(torch.float64).cpu()
    k = min(top, len(b))
    mine = set(a.abs().argsort(descending=True)[:k].tolist())
    theirs = b.abs().argsort(descending=True)[:k].tolist()
    missed = [i for i in theirs if i not in mine]
    shape = tuple(exact.shape)
    return Agreement(
        _pearson(a, b),
        _pearson(_ranks(a), _ranks(b)),
        k,
        k - len(missed),
        [_unravel(i, shape) for i in missed],
        len(b),
    )


def _unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index //= size
    return tuple(reversed(out))


# -- a table with its labels: the interactive view ------------------------------------------------


@dataclass
class PatchingResult:
    """A patching table with what its axes mean, for the interactive view and for JSON.

    ``values`` is what :meth:`~introspect.Inspector.patching_sweep` or
    :func:`attribution_patching` returned: ``[locators, positions]``; with heads
    ``[locators, heads]`` (``positions`` None: every position patched at once) or
    ``[locators, heads, positions]``. ``tokens`` are the prompt's tokens (they label the
    positions), ``method`` names how the table was computed, ``metric`` what it measures.
    ``exact``, when given, is the exact table of the same shape: the view draws it beside the
    estimate on one scale. :func:`patching_result` fills the labels from the sweep's arguments.

    Example:
        >>> table = PatchingResult(torch.tensor([[0.5, -1.0], [0.0, 2.0]]),
        ...                        ["block[0]", "block[1]"], [0, 1], tokens=["a", "b"])
        >>> table.to_dict()["values"], table.to_html().count('data-kind="patching"')
        ([[0.5, -1.0], [0.0, 2.0]], 1)
    """

    values: torch.Tensor
    locators: list[str]
    positions: list[int] | None
    heads: list[int] | None = None
    tokens: list[str] = field(default_factory=list)
    method: str = "activation patching"
    metric: str = "the metric"
    model: str = ""
    exact: torch.Tensor | None = None

    def agreement(self, top: int = 10) -> Agreement:
        """How well this table agrees with :attr:`exact` (:func:`patching_agreement`).

        Example:
            >>> exact = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
            >>> PatchingResult(exact * 0.9, ["embed", "block[0]"], [0, 1], exact=exact,
            ...                method="AtP").agreement(top=2).overlap
            2
        """
        if self.exact is None:
            raise InterventionError(
                "this table holds no exact table to agree with: build it with exact= (the "
                "patching_sweep of the same arguments)"
            )
        return patching_agreement(self.values, self.exact, top=top)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: the labels, the table, the exact table and their agreement.

        Example:
            >>> t = PatchingResult(torch.tensor([[1.0]]), ["block[0]"], None, heads=[0])
            >>> t.to_dict()["heads"], t.to_dict()["agreement"]
            ([0], None)
        """
        return {
            "model": self.model,
            "method": self.method,
            "metric": self.metric,
            "locators": list(self.locators),
            "positions": None if self.positions is None else list(self.positions),
            "heads": None if self.heads is None else list(self.heads),
            "tokens": list(self.tokens),
            "values": self.values.tolist(),
            "exact": None if self.exact is None else self.exact.tolist(),
            "agreement": None if self.exact is None else self.agreement().to_dict(),
        }

    def _repr_html_(self) -> str:
        return patching_view(self).html()

    def to_html(self, path: str | os.PathLike[str] | None = None, *, force: bool = False) -> str:
        """The interactive table (the exact one beside it when held) as one self-contained
        page, written atomically to ``path`` when given (an existing file only with
        ``force``); returns the page.

        Example:
            >>> t = PatchingResult(torch.tensor([[1.0, -1.0]]), ["block[0]"], [0, 1])
            >>> t.to_html().startswith("<!doctype html>")
            True
        """
        return save_view(patching_view(self), path, force=force)

    def __repr__(self) -> str:
        beside = ", exact beside" if self.exact is not None else ""
        return (
            f"PatchingResult({self.method}, {list(self.values.shape)} over "
            f"{len(self.locators)} locators{beside})"
        )


def patching_result(
    insp: Analysable,
    values: torch.Tensor,
    *,
    locators: str | Sequence[str] = "block[:]",
    positions: Sequence[int] | None = None,
    heads: str | None = None,
    tokens: Sequence[str] | None = None,
    method: str | None = None,
    metric: str = "the metric",
    model: str | None = None,
    exact: torch.Tensor | None = None,
) -> PatchingResult:
    """Label a patching table with the arguments it was computed with (``locators``,
    ``positions``, ``heads`` as given to :meth:`~introspect.Inspector.patching_sweep` or
    :func:`attribution_patching`), for its interactive view.

    ``tokens`` label the positions (the clean prompt's tokens); ``method`` names the table
    (default: ``"activation patching"``, or ``"attribution patching"`` when ``exact`` is
    given); ``model`` names the model (default: its ``name_or_path``). A table whose shape
    does not follow from the arguments is refused, in one line.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector, logit_difference
        >>> cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
        >>> insp = Inspector(GPT2LMHeadModel(cfg).eval())
        >>> clean = {"input_ids": torch.tensor([[1, 2, 3]])}
        >>> corrupted = {"input_ids": torch.tensor([[4, 2, 3]])}
        >>> table = insp.patching_sweep(clean, corrupted, logit_difference(5, 6))
        >>> labelled = patching_result(insp, table, tokens=["a", "b", "c"])
        >>> labelled.locators, labelled.positions
        (['block[0]', 'block[1]'], [0, 1, 2])
    """
    if heads not in (None, "each"):
        raise InterventionError(f"heads= takes 'each' (one head at a time) or None, got {heads!r}")
    if not isinstance(values, torch.Tensor):
        raise InterventionError(
            f"values must be the table patching_sweep or attribution_patching returned (a "
            f"tensor), got {type(values).__name__}"
        )
    names = [str(loc) for loc in insp.expand([locators] if isinstance(locators, str) else locators)]
    words = list(tokens) if tokens is not None else []
    dims = 3 if heads == "each" and positions is not None else 2
    if values.dim() != dims or values.shape[0] != len(names):
        axes = (
            "locators x heads x positions"
            if dims == 3
            else ("locators x heads" if heads == "each" else "locators x positions")
        )
        raise InterventionError(
            f"a table of shape {list(values.shape)} is not [{axes}] for {len(names)} locators: "
            "pass the locators, positions and heads it was computed with"
        )
    chosen_positions = None
    if heads != "each" or positions is not None:
        where = list(range(values.shape[-1])) if positions is None else [int(p) for p in positions]
        if len(where) != values.shape[-1]:
            raise InterventionError(
                f"{len(where)} positions for a table of {values.shape[-1]} columns: pass the "
                "positions it was computed with"
            )
        n = len(words)
        bad = [p for p in where if not -n <= p < n]
        if words and bad:
            raise InterventionError(
                f"position {bad[0]} is out of range for {n} tokens (use {-n}..{n - 1})"
            )
        chosen_positions = [p % n for p in where] if words else where
    if exact is not None and (not isinstance(exact, torch.Tensor) or exact.shape != values.shape):
        got = list(exact.shape) if isinstance(exact, torch.Tensor) else type(exact).__name__
        raise InterventionError(
            f"exact must be the exact table of the same shape {list(values.shape)}, got {got}: "
            "compute both with the same arguments"
        )
    config = getattr(insp.model, "config", None)
    named = getattr(config, "name_or_path", "") or ""
    return PatchingResult(
        values=values.detach().float().cpu(),
        locators=names,
        positions=chosen_positions,
        heads=list(range(values.shape[1])) if heads == "each" else None,
        tokens=words,
        method=method or ("attribution patching" if exact is not None else "activation patching"),
        metric=metric,
        model=model or (named if isinstance(named, str) else "") or type(insp.model).__name__,
        exact=None if exact is None else exact.detach().float().cpu(),
    )


# -- the picture -----------------------------------------------------------------------------------


def plot_patching(
    values: torch.Tensor,
    path: str | os.PathLike[str] | None = None,
    *,
    rows: Sequence[str],
    columns: Sequence[str],
    xlabel: str = "position",
    title: str | None = None,
    exact: torch.Tensor | None = None,
    dpi: int = 150,
) -> Any:
    """A heatmap of a ``[rows, columns]`` patching table (red raises the metric, blue lowers
    it, white is 0); with ``exact``, the exact table beside it on the same colour scale.

    Writes a PNG (or .svg, .pdf; atomically) when ``path`` is given; returns the matplotlib
    Figure.

    Example:
        >>> from importlib.util import find_spec
        >>> table = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
        >>> figure = (plot_patching(table, rows=["block[0]", "block[1]"], columns=["a", "b"])
        ...           if find_spec("matplotlib") else None)
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            'plotting needs matplotlib: pip install matplotlib (or "introspect-lm[demo]")'
        ) from None
    tables = [("attribution patching", values)]
    if exact is not None:
        tables.append(("exact patching", exact))
    n_rows, n_cols = values.shape
    cell_w = min(0.55, 12.0 / max(n_cols, 1))
    cell_h = min(0.3, 20.0 / max(n_rows, 1))
    width = max(3.5, cell_w * n_cols + 2.4) * len(tables)
    height = max(3.0, cell_h * n_rows + 1.8)
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    scale = max(float(t.abs().max()) for _, t in tables) or 1.0
    images = []
    for n, (name, table) in enumerate(tables):
        ax = fig.add_subplot(1, len(tables), n + 1)
        image = ax.imshow(
            table.detach().float().cpu().numpy(),
            aspect="auto",
            cmap="RdBu_r",
            vmin=-scale,
            vmax=scale,
        )
        ax.set_xticks(range(n_cols))
        ax.set_xticklabels(list(columns), fontsize=7, rotation=90 if n_cols > 8 else 0)
        ax.set_yticks(range(n_rows))
        ax.set_yticklabels(list(rows) if n == 0 else [], fontsize=7 if n_rows > 16 else 9)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=9)
        images.append(image)
    fig.colorbar(images[0], ax=fig.axes, label="change of the metric", fraction=0.05, pad=0.02)
    if title:
        fig.suptitle(textwrap.fill(title, max(40, int(width * 11))), fontsize=10)
    if path is not None:
        _save_atomically(fig, Path(path), dpi)
    return fig
