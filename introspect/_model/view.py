"""The model view: what the analyses know of a model, below the facade.

:class:`ModelView` owns the facts the analyses (lens, attribution, attention tools, export,
patching, proof) read about one model and its adapter: its blocks and head counts, the
layout of Hugging Face's ``hidden_states``, and what Hugging Face does after the last block
(final norm, the modules before the head, the head and its logit operations). The
:class:`~introspect.Inspector` wires a view to the hook engine; the analyses type against
:class:`Analysable`, the part of the facade they call, so no module below the facade imports
it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from introspect._batching import Positions
from introspect._errors import CaptureError, LocatorError, MissingPartError
from introspect._hooks.heads import HEAD_AXIS, Heads, head_site
from introspect._locators import KV_SITES, Locator
from introspect._model.layout import hidden_layout
from introspect._model.paths import get_path
from introspect._spec import AdapterSpec, LogitOp, StackSpec

if TYPE_CHECKING:
    from introspect._hooks.capture import Capture, Record
    from introspect._hooks.edits import Intervention
    from introspect._model.resolve import Resolver

__all__ = ["Analysable", "ModelView"]


def _to_dtype_of(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    param = next(module.parameters(), None)
    if param is None or not param.is_floating_point() or not x.is_floating_point():
        return x
    return x.to(param.dtype)


def _stream_width(norm: nn.Module | None) -> int | None:
    """The width a norm normalises (the residual stream's), where it says so."""
    shape = getattr(norm, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    weight = getattr(norm, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


class ModelView:
    """One model as its adapter describes it: blocks, heads, ``hidden_states``, the head.

    Everything is read from the model as it is now (a block list may change between calls).
    Built by the :class:`~introspect.Inspector`, which exposes each of these as its own
    method; the analyses reach it as ``insp.view``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
        >>> view = Inspector(m).view
        >>> view.num_blocks(), view.head_counts(None, "attn"), view.num_hidden_states()
        (2, (4, 4, 8), 3)
    """

    def __init__(self, model: nn.Module, adapter: AdapterSpec, resolver: Resolver) -> None:
        self.model = model
        self.adapter = adapter
        self.resolver = resolver

    @property
    def base(self) -> nn.Module:
        """The module the adapter's paths start from (the base model inside a task model)."""
        return self.resolver.base()[0]

    def stack_key(self, name: str | None) -> str | None:
        """The adapter's key of a stack name (``None``: the main stack)."""
        return self.resolver.stack_key(name)

    def num_blocks(self, stack: str | None = None) -> int:
        """Number of blocks in ``stack`` as the model holds them now."""
        return self.resolver.num_blocks(stack)

    # -- heads --------------------------------------------------------------------------------

    def head_counts(self, stack: str | None, part: str) -> tuple[int, int, int]:
        """Query heads, key/value heads and head width of ``part`` in ``stack``: from the first
        block that has heads (a hybrid's first blocks may have no attention)."""
        prefix = f"{stack}." if stack else ""
        refusal: MissingPartError | None = None
        for i in range(self.num_blocks(stack)):
            try:
                loc = self.resolver.locator(f"{prefix}block[{i}].{part}")
                tap = self.resolver.head_tap(loc, part)
            except MissingPartError as exc:
                refusal = refusal or exc
                continue
            return tap.heads, tap.kv_heads, tap.head_dim
        assert refusal is not None
        raise refusal

    def head_count(self, loc: Locator) -> int:
        """How many heads a head locator's value has (``kv_heads`` for ``k``/``v``)."""
        site = head_site(loc)
        if site not in HEAD_AXIS:
            raise LocatorError(
                f"{loc} is not a head locator (block[i].attn.{', .'.join(HEAD_AXIS)})"
            )
        tap = self.resolver.head_tap(loc)
        return tap.kv_heads if site in KV_SITES else tap.heads

    # -- what the model has ---------------------------------------------------------------------

    def locators(self, stack: str | None = None, *, include_head: bool = True) -> list[Locator]:
        """Every single locator this model has, in forward order."""
        stack_key = self.stack_key(stack)
        spec = self.adapter.stack(stack_key)
        prefix = f"{stack}." if stack else ""
        names: list[str] = []
        if spec.embed:
            names.append("embed")
        for i in range(len(self.resolver.blocks(stack_key))):
            names.append(f"block[{i}]")
            subs = [n for n in ("attn", "mlp") if getattr(spec, n)] + list(spec.parts)
            names.extend(f"block[{i}].{n}" for n in subs)
        if spec.final_norm:
            names.append("final_norm")
        names.extend(spec.modules)
        if include_head and stack_key == self.adapter.stack_name:
            names.append("lm_head")
        out = []
        for name in names:
            loc = Locator.parse(name if name == "lm_head" else prefix + name)
            try:
                self.resolver.module(self.resolver.locator(loc))
            except MissingPartError:
                continue  # e.g. a final norm that this config turns off
            out.append(loc)
        return out

    # -- hidden states ------------------------------------------------------------------------

    def hidden_layout(self, stack: str | None = None) -> list[Locator]:
        """Which locator yields each entry of Hugging Face's ``hidden_states``, in order."""
        stack_key = self.stack_key(stack)
        spec = self.adapter.stack(stack_key)
        n = len(self.resolver.blocks(stack_key))
        return hidden_layout(spec, n, lambda name: self.after_module(spec, name) is not None, stack)

    def num_hidden_states(self, stack: str | None = None) -> int:
        """How many entries ``hidden_states`` has (usually ``num_blocks + 1``)."""
        return len(self.hidden_layout(stack))

    def hidden_state_locator(self, i: int, stack: str | None = None) -> Locator:
        """Which locator yields ``hidden_states[i]`` (negative ``i`` allowed)."""
        layout = self.hidden_layout(stack)
        n = len(layout)
        if not isinstance(i, int) or not -n <= i < n:
            raise LocatorError(
                f"hidden_states index {i!r} is out of range for {self.adapter.name} "
                f"({n} hidden states for {n - 1} blocks: use {-n}..{n - 1})"
            )
        return layout[i]

    def hidden_state_of(self, loc: Locator, record: Record, stack: str | None = None) -> Any:
        """The ``hidden_states`` entry a locator's record holds (what HF adds between blocks
        included)."""
        value = record.input if loc.side == "input" else record.output
        if loc.is_block and loc.sub is None and loc.side == "output":
            assert loc.index is not None
            value = self.between(value, loc.index, self.adapter.stack(self.stack_key(stack)))
        return value

    # -- after the last block -----------------------------------------------------------------

    def after_module(self, spec: StackSpec, name: str) -> nn.Module | None:
        """A module the adapter names after the blocks (``final_norm`` or one of ``modules``)."""
        path = spec.final_norm if name == "final_norm" else spec.modules[name]
        return get_path(self.base, path) if path else None

    def apply_final_norm(self, hidden: torch.Tensor, stack: str | None = None) -> torch.Tensor:
        """The final norm as Hugging Face applies it (identity where there is none)."""
        norm = self.after_module(self.adapter.stack(self.stack_key(stack)), "final_norm")
        return hidden if norm is None else norm(hidden)

    def between(self, hidden: torch.Tensor, i: int, spec: StackSpec) -> torch.Tensor:
        """What HF does to the stream right after block ``i``, outside any module."""
        base = self.base
        for op in spec.between_blocks:
            hidden = op.apply(hidden, i, self.model, base)
        return hidden

    def finish(self, hidden: torch.Tensor, stack: str | None = None) -> torch.Tensor:
        """Everything HF applies after the last block before ``hidden_states[-1]``."""
        stack_key = self.stack_key(stack)
        spec = self.adapter.stack(stack_key)
        hidden = self.between(hidden, len(self.resolver.blocks(stack_key)) - 1, spec)
        for name in spec.after_blocks:
            module = self.after_module(spec, name)
            if module is not None:
                hidden = module(hidden)
        return hidden

    def head_module(self, path: str) -> nn.Module:
        """A module the head runs before ``lm_head`` (from the top-level model)."""
        module = get_path(self.model, path)
        if module is None:
            raise MissingPartError(
                f"adapter {self.adapter.name!r} says the head of {type(self.model).__name__} "
                f"runs {', '.join(self.adapter.head_modules)} before lm_head, but {path!r} is "
                "missing: is this the right adapter?"
            )
        return module

    def logits(self, hidden: torch.Tensor, *, finished: bool = False) -> torch.Tensor:
        """What the model would predict from ``hidden`` (see :meth:`Inspector.logits`)."""
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            what = hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise CaptureError(
                f"logits() reads a residual stream of floats [..., hidden], got {what}: pass a "
                "record's output (token ids go through the model, not through logits())"
            )
        if not finished:
            width = _stream_width(self.after_module(self.adapter, "final_norm"))
            if width is not None and hidden.shape[-1] != width:
                raise CaptureError(
                    f"logits() reads the residual stream [..., {width}] of "
                    f"{self.adapter.name}, got a last axis of {hidden.shape[-1]}: pass a block's "
                    "output (or finished=True for a value after the final norm)"
                )
        head = self.resolver.module(self.resolver.locator("lm_head"))
        chain = [self.head_module(path) for path in self.adapter.head_modules]
        x = hidden if finished else self.finish(hidden)
        x = LogitOp.apply_all(self.adapter.pre_head, x, self.model)
        # Mamba's forward casts to the head's dtype (its residual stream is float32 in a bf16
        # model); elsewhere the dtypes already agree and this does nothing.
        x = _to_dtype_of(x, chain[0] if chain else head)
        for module in chain:
            x = module(x)
        logits: torch.Tensor = head(x)
        return LogitOp.apply_all(self.adapter.logit_ops, logits, self.model)


class Analysable(Protocol):
    """The part of the :class:`~introspect.Inspector` the analyses call.

    The lens, attribution, attention tools, export, patching and proof type their model
    argument against this, so they stand below the facade: an ``Inspector`` is one, and so is
    anything that offers these members.
    """

    model: nn.Module
    adapter: AdapterSpec
    view: ModelView

    @property
    def num_blocks(self) -> int: ...

    def locator(self, text: str | Locator) -> Locator: ...

    def expand(self, locators: Iterable[str | Locator]) -> list[Locator]: ...

    def module(self, locator: str | Locator) -> nn.Module: ...

    def path(self, locator: str | Locator) -> str: ...

    def capture(
        self,
        *locators: str | Locator,
        stop: bool = False,
        detach: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        positions: Positions = None,
        keep_raw: bool | None = None,
    ) -> Capture: ...

    def patch(self, locator: str | Locator, value: Any, positions: Any = None, *,
              heads: Heads = None) -> Intervention: ...  # fmt: skip

    def ablate(self, locator: str | Locator, mean_over: Any = None, positions: Any = None, *,
               heads: Heads = None) -> Intervention: ...  # fmt: skip

    def head_count(self, locator: str | Locator) -> int: ...

    def num_heads_in(self, stack: str | None = None, part: str = "attn") -> int: ...

    def hidden_state_locator(self, i: int, stack: str | None = None) -> Locator: ...

    def logits(self, hidden: torch.Tensor, *, finished: bool = False) -> torch.Tensor: ...
