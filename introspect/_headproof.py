"""The head-layout proofs: what makes a ``HeadSpec`` true of a model, checked head by head.

:func:`head_checks` is what :func:`introspect.testing.check_heads` runs for our adapters and
plugin authors, and what proof at first use (:mod:`introspect._proof`) runs on a shrunk clone
the first time a head locator of an attention part is used on an install.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from introspect._errors import MissingPartError
from introspect._hooks.heads import (
    CORE_SITES,
    HeadTap,
    attention_pattern,
    attention_scores,
    eager,
    rotate,
)
from introspect._proof import (
    Check,
    Proof,
    close,
    diff,
    example_inputs,
    fact_error,
    hf_hidden_states,
    lazy_hidden_checks,
    prove_at_first_use,
    remember,
    reports_hidden_states,
    verdict,
)
from introspect._spec import AdapterSpec

__all__ = ["FirstUse", "head_checks", "prove_heads_at_first_use", "recompute_pattern"]


class FirstUse:
    """What an Inspector has proven of its adapter on this install, and proves as it goes.

    Built with the Inspector: proves the block-level facts (or takes the cached verdict);
    :meth:`heads` proves an attention part's layout the first time one of its head locators
    is used; :meth:`forward` proves a deferred layout on the model's own ``hidden_states``.
    ``make_view(clone)`` gives an Inspector of a clone with the same spec, unproven.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
        >>> spec = Inspector(m).adapter
        >>> FirstUse(m, spec, lambda clone: Inspector(clone, spec, prove=False)).proof.status
        'proven'
    """

    def __init__(
        self,
        model: nn.Module,
        spec: AdapterSpec,
        make_view: Callable[[nn.Module], Any],
        *,
        prove: bool = True,
    ) -> None:
        self.model = model
        self.spec = spec
        self.make_view = make_view
        self.parts: set[tuple[str | None, str]] = set()
        """The attention parts whose head layout is proven, as ``(stack, part)``."""
        detected = spec.name.startswith("detected-")
        self.proof = Proof("detected" if detected else "skipped")
        if prove and not detected:
            self.proof = prove_at_first_use(model, spec, make_view)

    @property
    def proving(self) -> bool:
        """Whether facts are proven as they are used (not ``skipped`` nor ``detected``)."""
        return self.proof.status not in ("skipped", "detected")

    def heads(self, stack: str | None, part: str) -> None:
        """Prove the head layout of ``part`` of ``stack`` once (a failure raises FactError)."""
        if not self.proving or (stack, part) in self.parts:
            return
        prove_heads_at_first_use(self.model, self.spec, self.make_view, stack, part)
        self.parts.add((stack, part))

    def refuse_failed(self) -> None:
        """Raise the FactError of a failed verdict (a deferred proof that failed later)."""
        if self.proof.status == "failed":
            raise fact_error(self.spec, type(self.model), self.proof.checks)

    @property
    def deferred(self) -> bool:
        """Whether the next forward asked for ``hidden_states`` should prove the layout."""
        return self.proof.status == "deferred" and reports_hidden_states(self.model)

    def forward(
        self,
        output: Any,
        values: Sequence[torch.Tensor],
        wanted: Sequence[int],
        locators: Sequence[Any],
        stack: str | None,
        count: int,
    ) -> None:
        """Prove a deferred layout on a forward of the real model: our ``values`` (entries
        ``wanted`` of ``count``) against Hugging Face's own ``hidden_states`` in ``output``."""
        try:
            theirs = hf_hidden_states(output, stack, self.spec)
        except (KeyError, TypeError, AttributeError):
            return  # the model reports no hidden_states: nothing to prove against yet
        if theirs is None:
            return
        picked = [theirs[i] for i in wanted] if len(theirs) == count else list(theirs)
        checks = tuple(lazy_hidden_checks(values, picked, locators))
        passed = all(c.passed for c in checks)
        reason = "proven on this model's own hidden_states" if passed else self.proof.reason
        self.proof = Proof("proven" if passed else "failed", checks, reason)
        remember(self.spec, type(self.model), self.proof)
        self.refuse_failed()


def prove_heads_at_first_use(
    model: nn.Module,
    spec: AdapterSpec,
    make_view: Callable[[nn.Module], Any],
    stack: str | None,
    part: str,
) -> Proof:
    """Prove the head layout of one attention part (``attn``, ``cross_attn``) of ``spec`` for
    ``model``'s class on this install, once: :func:`head_checks` on a shrunk clone.

    A layout that fails is a :class:`~introspect.FactError` naming the check; the verdict is
    cached like the block-level one (:func:`introspect._proof.verdict`).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
        >>> spec = Inspector(m).adapter
        >>> make = lambda clone: Inspector(clone, spec, prove=False)
        >>> prove_heads_at_first_use(m, spec, make, None, "attn").status
        'proven'
    """
    where = f"{stack}.block[i].{part}" if stack else f"block[i].{part}"

    def run(clone: nn.Module) -> list[Check]:
        inputs = example_inputs(clone.config, model=clone)
        return head_checks(make_view(clone), clone, inputs, only=(stack, part))

    return verdict(model, spec, f"head layout of {where}", run)


def _attentions_field(spec: AdapterSpec, stack: str | None, part: str) -> str:
    """Which field of Hugging Face's output holds ``output_attentions`` for a stack's part."""
    if part != "attn":
        return "cross_attentions"
    if spec.encoder is None:
        return "attentions"
    return "encoder_attentions" if stack == "encoder" else "decoder_attentions"


def recompute_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    arguments: Mapping[str, Any],
    sinks: Any = None,
    causal: bool = False,
) -> torch.Tensor:
    """``softmax(q·kᵀ·scaling (soft-capped) + mask)`` from captured ``q`` ``[b, s, h, d]``,
    ``k`` ``[b, t, kv, d]`` and what the attention function was given (``scaling``,
    ``position_bias``, ``softcap``, ``attention_mask``; ``sinks``: one extra logit per head, left out after the
    softmax, as GPT-OSS does). ``causal`` masks later keys too (GPT-2 on transformers 4.x
    applies causality from a buffer of its own, not through the mask it is given).

    Example:
        >>> q, k = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
        >>> p = recompute_pattern(q, k, {"attention_mask": None})
        >>> p.shape, bool(p.sum(-1).allclose(torch.ones(1, 2, 3, dtype=p.dtype)))
        (torch.Size([1, 2, 3, 3]), True)
    """
    return attention_pattern(attention_scores(q, k, arguments, causal), sinks)


def head_checks(
    insp: Any,
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    head: int = 1,
    only: tuple[str | None, str] | None = None,
) -> list[Check]:
    """The checks of :func:`introspect.testing.check_heads` (listed there), on an Inspector.

    ``insp`` is an Inspector of ``model`` (typed loosely: this module sits below it);
    ``only=(stack, part)`` checks one attention part.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64)).eval()
        >>> ids = {"input_ids": torch.tensor([[1, 2, 3]])}
        >>> checks = head_checks(Inspector(m, prove=False), m, ids)
        >>> all(c.passed for c in checks), len(checks) > 8
        (True, True)
    """
    checks: list[Check] = []
    add = checks.append
    for stack in insp.adapter.stack_names:
        spec = insp.adapter.stack(stack)
        prefix = f"{stack}." if stack else ""
        for part, head_spec in spec.heads.items():
            if only is not None and only != (stack, part):
                continue
            n = insp.num_blocks_in(stack)
            by_block: dict[int, HeadTap] = {}
            for i in range(n):
                try:
                    loc = insp.locator(f"{prefix}block[{i}].{part}")
                    by_block[i] = insp.view.resolver.head_tap(loc, part)
                except MissingPartError:
                    continue  # a hybrid's block without attention, or no cross-attention here
            if not by_block:
                continue
            indices, taps = list(by_block), list(by_block.values())
            core = taps[0].why_not("pattern") is None
            readable = [s for s in sorted(CORE_SITES) if core and taps[0].why_not(s) is None]
            sites = ["z", "result", "o", *readable]
            names = [f"{prefix}block[{i}].{part}.{s}" for i in indices for s in sites]
            reference = None
            if core:
                field_name = _attentions_field(insp.adapter, stack, part)
                with torch.no_grad(), eager({id(c): c for c in _configs(model)}.values()):
                    out = model(**inputs, output_attentions=True)
                reference = out.get(field_name) if hasattr(out, "get") else None
            for tap in taps:
                tap.arguments = [] if core else None
                tap.rotations = [] if "q_pre" in readable else None
            try:
                with torch.no_grad(), insp.capture(*names) as cap:
                    model(**inputs)
            finally:
                calls = [tap.arguments or [] for tap in taps]
                rotations = [tap.rotations or [] for tap in taps]
                for tap in taps:
                    tap.arguments = None
                    tap.rotations = None
            # A hybrid's output_attentions holds its attention blocks only, in block order.
            per_block = reference is not None and len(reference) == n
            for ordinal, (i, tap) in enumerate(by_block.items()):
                where = f"{prefix}block[{i}].{part}"
                o_out = cap[f"{where}.o"].output
                result = cap[f"{where}.result"].output
                z = cap[f"{where}.z"].output
                bias = getattr(tap.o, "bias", None)
                summed = result.sum(dim=2) + (bias if isinstance(bias, torch.Tensor) else 0)
                add(
                    Check(
                        f"{where}.result sums to o",
                        close(summed, o_out, atol, rtol),
                        diff(summed, o_out),
                    )
                )
                with torch.no_grad():
                    again = tap.o(z.flatten(-2))
                add(
                    Check(
                        f"{where}.o(z) == o output",
                        close(again, o_out, atol, rtol),
                        diff(again, o_out),
                    )
                )
                if not core:
                    continue
                pattern = cap[f"{where}.pattern"].output
                sinks = getattr(tap.core, "sinks", None)
                scores = cap[f"{where}.scores"].output if "scores" in readable else None
                if scores is not None:
                    softmax = attention_pattern(scores, sinks).to(pattern.dtype)
                    add(
                        Check(
                            f"{where}: softmax(scores) == pattern",
                            close(softmax, pattern, atol, rtol),
                            diff(softmax, pattern),
                        )
                    )
                if "q_pre" in readable:
                    add(_rotary_check(where, cap, rotations[ordinal], atol, rtol))
                j = i if per_block else ordinal
                theirs = reference[j] if reference is not None and j < len(reference) else None
                ok = theirs is not None and close(pattern, theirs, atol, rtol)
                add(
                    Check(
                        f"{where}.pattern == output_attentions",
                        ok,
                        diff(pattern, theirs) if theirs is not None else float("inf"),
                        "" if theirs is not None else "no output_attentions entry",
                    )
                )
                q = cap[f"{where}.q"].output
                k = cap[f"{where}.k"].output
                v = cap[f"{where}.v"].output
                shapes = (q.shape[2:], k.shape[2], z.shape[-1])
                wanted = ((tap.heads, tap.head_dim), tap.kv_heads, v.shape[-1])
                add(
                    Check(
                        f"{where}: q is [.., {tap.heads}, {tap.head_dim}], k has "
                        f"{tap.kv_heads} heads, z is as wide as v",
                        tuple(shapes[0]) == wanted[0] and shapes[1:] == wanted[1:],
                        0.0,
                        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                        f"z {tuple(z.shape)}",
                    )
                )
                # z is the pattern's mix of the values, head by head (kv heads repeated).
                values = v.transpose(1, 2)
                if values.shape[1] != pattern.shape[1]:
                    values = values.repeat_interleave(pattern.shape[1] // values.shape[1], dim=1)
                mixed = (pattern.to(values.dtype) @ values).transpose(1, 2)
                add(
                    Check(
                        f"{where}.z == pattern · v",
                        close(mixed, z, atol, rtol),
                        diff(mixed, z),
                    )
                )
                if tap.inline:
                    continue  # its terms (mask, ALiBi, ...) are inline: stated, not passed
                arguments = calls[ordinal][0] if calls[ordinal] else {}
                causal = bool(getattr(tap.core, "is_causal", False))
                recomputed = attention_scores(q, k, arguments, causal)
                mine = attention_pattern(recomputed, sinks).to(pattern.dtype)
                # A padding query attends to nothing real: models differ in how they fill
                # such a row (uniform over all keys or over some), so only real queries count.
                real = _real_queries(inputs, stack, insp.adapter, pattern)
                if scores is not None:
                    add(
                        _scores_check(where, scores, recomputed, real, atol, rtol, head_spec.scores)
                    )
                add(
                    Check(
                        f"{where}.pattern == softmax(q·kᵀ·scaling + mask) (real queries)",
                        close(mine[real], pattern[real], atol, rtol),
                        diff(mine[real], pattern[real]),
                        head_spec.scores,
                    )
                )
            where = f"{prefix}block[{indices[-1]}].{part}"
            tap = taps[-1]
            h = min(head, tap.heads - 1)
            with (
                torch.no_grad(),
                insp.ablate(f"{where}.z", heads=[h]),
                insp.capture(f"{where}.z", f"{where}.o") as cap,
            ):
                model(**inputs)
            z_before = cap[f"{where}.z"].input.clone()
            z_before[..., h, :] = 0
            with torch.no_grad():
                hand = tap.o(z_before.flatten(-2))
            edited = cap[f"{where}.o"].output
            add(
                Check(
                    f"{where}: ablate z heads=[{h}] == o(z with head {h} zeroed)",
                    close(edited, hand, atol, rtol),
                    diff(edited, hand),
                )
            )
    return checks


def _scores_check(
    where: str,
    scores: torch.Tensor,
    recomputed: torch.Tensor,
    real: torch.Tensor,
    atol: float,
    rtol: float,
    stated: str,
) -> Check:
    """The captured scores against those recomputed from q, k and the attention's arguments,
    on real queries: the same keys masked (the dtype's lowest value, or -inf where two masks
    add up), the same values elsewhere."""
    lowest = torch.finfo(recomputed.dtype).min / 2
    kept = real & (recomputed > lowest)
    same_mask = torch.equal(recomputed[real] > lowest, scores[real].to(recomputed.dtype) > lowest)
    ours, theirs = recomputed[kept], scores[kept].to(recomputed.dtype)
    return Check(
        f"{where}.scores == q·kᵀ·scaling + mask (real queries, unmasked keys)",
        same_mask and close(ours, theirs, atol, rtol),
        diff(ours, theirs),
        stated if same_mask else "the masked keys differ",
    )


def _rotary_check(
    where: str, cap: Any, found: Sequence[dict[str, Any]], atol: float, rtol: float
) -> Check:
    """``q == rotary(q_pre)`` and ``k == rotary(k_pre)`` with the model's own rotary function
    and the arguments (cos, sin) it was called with; ``q_pre == q``, ``k_pre == k`` exactly
    where no rotary function ran."""
    q_pre, k_pre = cap[f"{where}.q_pre"].output, cap[f"{where}.k_pre"].output
    q, k = cap[f"{where}.q"].output, cap[f"{where}.k"].output
    spans = found[0] if found else {"q": [], "k": []}
    if not spans["q"] and not spans["k"]:
        same = torch.equal(q_pre, q) and torch.equal(k_pre, k)
        return Check(
            f"{where}: q_pre == q, k_pre == k (no rotary embedding here)",
            same,
            diff(q_pre, q) + diff(k_pre, k),
        )
    again_q = rotate(q_pre.transpose(1, 2), spans["q"]).transpose(1, 2)
    again_k = rotate(k_pre.transpose(1, 2), spans["k"]).transpose(1, 2)
    new_k = k[:, k.shape[1] - k_pre.shape[1] :]
    rotated = [f"{s.width} of {q.shape[-1]} dims" for s in spans["q"][:1]]
    return Check(
        f"{where}: q == rotary(q_pre), k == rotary(k_pre) (the model's rotary function)",
        close(again_q, q, atol, rtol) and close(again_k, new_k, atol, rtol),
        max(diff(again_q, q), diff(again_k, new_k)),
        f"rotary on {rotated[0]}" if rotated else "",
    )


def _real_queries(
    inputs: Mapping[str, Any], stack: str | None, spec: AdapterSpec, pattern: torch.Tensor
) -> torch.Tensor:
    """``[batch, heads, query, key]`` booleans: true on the rows of real (unpadded) queries."""
    name = "attention_mask"
    if spec.encoder is not None and stack != "encoder":
        name = "decoder_attention_mask"
    mask = inputs.get(name)
    rows = torch.ones(pattern.shape[0], pattern.shape[2], dtype=torch.bool)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= pattern.shape[2]:
        rows = mask[:, -pattern.shape[2] :].bool()
    return rows[:, None, :, None].expand(pattern.shape).to(pattern.device)


def _configs(model: nn.Module) -> list[Any]:
    found = [getattr(model, "config", None)]
    found += [getattr(m, "config", None) for m in model.modules()]
    return [c for c in found if c is not None and hasattr(c, "_attn_implementation")]
