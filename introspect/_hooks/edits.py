"""Interventions: change what a module receives or returns while the model runs.

Every edit is a context manager built by the Inspector (``steer``, ``ablate``, ``patch``,
``scale``, ``edit``) on the same locators captures use. Edits compose with each other and with
captures in one forward, and apply at every step of ``generate``.

Three invariants hold for every edit; a value that would break one is an
:class:`~introspect._errors.InterventionError`, never a quietly different answer:

- an edit never changes a value's shape: a steering vector or patch value must broadcast *to*
  the value (``broadcast_shapes(v, x) == x.shape``), and ``fn`` must return the value's shape;
- an edit never hands the model a tensor the caller still owns: a replaced value is always a
  fresh tensor, so a model that adds to it in place (Falcon's ``mlp_output += ...``) cannot
  change a Record or a patch value, and repeated forwards agree;
- an edit never silently does nothing: arguments are checked when the edit is built, and a
  position that no call of the model can hold is an error.

Positions are positions of the whole sequence so far, as a forward over it without a cache
would number them (negative counts from its end). A model call with a KV cache covers
positions ``[offset, offset + seq)``, ``offset`` being the cache's length before the call, read
from ``cache_position`` or the cache the model (root) was called with; the edit touches the
requested positions that fall inside, so a prompt position is edited in the prompt step only
and a later position when its token is processed. A call without a cache is an independent
forward (offset 0) where every position must exist.

Where an edit runs matters, because Hugging Face records ``output_hidden_states`` in three ways:
transformers 5.x with forward hooks it installs on first use; transformers 4.x Llama-style models
(``check_model_inputs``) by wrapping each layer's ``forward`` for the duration of the call and
recording what that ``forward`` returns, before any forward hook runs; older loops (GPT-2 on
4.x) from the value the block call returns. So:

- an edit of an *output* runs inside the module's call: while the edit is active the module's
  ``forward`` is wrapped (an instance attribute, removed on exit), so every forward hook —
  Hugging Face's own included, whenever it was registered — and every ``forward`` wrapper sees
  the edited value;
- an edit of a block *input* is a forward pre-hook registered with ``prepend=True``, so it runs
  before every other pre-hook and every forward hook sees the edited arguments.

Captures read an :class:`~introspect._hooks.capture.EditNote` the edit leaves on the module, so a
record of the edited module says which edits its values include and keeps the values before
them. Everything is removed on every exit path, including an exception raised by an edit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from threading import RLock, get_ident
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from introspect._batching import call_positions, check_positions
from introspect._errors import InterventionError
from introspect._hooks.capture import Record
from introspect._hooks.heads import (
    HEAD_AXIS,
    Heads,
    attn_part,
    check_heads,
    head_site,
    heads_in_range,
)
from introspect._hooks.session import (
    CallScope,
    EditNote,
    HookSession,
    ModelCall,
    Target,
    hidden_of,
    input_slot,
    tensor_version,
)
from introspect._locators import Locator

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


__all__ = [
    "Edit",
    "EditOp",
    "Intervention",
    "as_factor",
    "as_value",
    "edit_fn_name",
    "edits_at",
    "mean_activation",
]

Side = Literal["input", "output"]
EditFn = Callable[[torch.Tensor, Record], torch.Tensor]
"""``fn(value, record) -> value``: ``value`` is the current hidden tensor, ``record`` the call."""


@dataclass
class EditOp:
    """How an edit computes the new value from the current one.

    ``add`` adds ``factor * tensor``; ``scale`` multiplies by ``factor``; ``zero`` zeroes;
    ``set`` replaces by ``tensor`` (see :meth:`introspect.Inspector.patch` for the shapes it
    takes); ``fn`` calls ``fn(value, record)``.

    Example:
        >>> op = EditOp("add", tensor=torch.ones(2), factor=3.0)
        >>> op.operand(torch.zeros(1, 1, 2, dtype=torch.float64))
        tensor([3., 3.], dtype=torch.float64)
    """

    kind: Literal["add", "scale", "zero", "set", "fn"]
    tensor: torch.Tensor | None = None
    factor: float = 1.0
    fn: EditFn | None = None
    _cast: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = field(default_factory=dict)

    def operand(self, like: torch.Tensor) -> torch.Tensor:
        """``tensor`` on ``like``'s device and dtype (times ``factor`` for ``add``).

        Computed at every call from the tensor as it is now, so a trainable vector stays in
        the graph of each forward and its updates count; a constant is cached per device,
        dtype and in-place version.
        """
        assert self.tensor is not None
        source = self.tensor
        version = None if source.requires_grad else tensor_version(source)
        key = (like.device, like.dtype, version if version is not None else -1)
        if version is not None:
            cached = self._cast.get(key)
            if cached is not None:
                return cached
        value = source.to(device=like.device, dtype=like.dtype)
        if self.kind == "add" and self.factor != 1.0:
            value = value * self.factor
        if version is not None:
            # An entry of an older version can never be read again.
            self._cast = {k: v for k, v in self._cast.items() if k[2] == version}
            self._cast[key] = value
        return value


@dataclass
class Edit:
    """One edit of one module: where (target, side), what (op) and at which positions.

    Built by :class:`introspect.Inspector` (``steer``, ``ablate``, ``patch``, ``scale``,
    ``edit``); ``label`` is what records and errors call it. ``positions`` is checked (and
    put in its plain form by :func:`introspect._batching.check_positions`) when the edit is
    built.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> edit = Edit(Target("lin", lin), "output", EditOp("zero"), None, "ablate(zero)")
        >>> with Intervention([edit]):
        ...     lin(torch.ones(1, 1, 2)).abs().sum().item()
        0.0
    """

    target: Target
    side: Side
    op: EditOp
    positions: Any = None
    label: str = "edit"
    heads: tuple[int, ...] | None = None
    """Only these heads of a head value are edited (the others keep their value)."""
    head_axis: int = 2
    """The axis of the value that counts heads (1 for ``pattern``)."""
    no_cache: str | None = None
    """Why this edit cannot apply in a call with a KV cache (``k``/``v``: the cache keeps the
    unedited keys), or ``None``."""

    def __post_init__(self) -> None:
        self.positions = check_positions(self.positions, InterventionError)

    @property
    def name(self) -> str:
        input_side = self.side == "input" and not self.target.reads_input
        where = self.target.key + (".input" if input_side else "")
        return f"{where}: {self.label}"


def as_value(value: Any, what: str) -> torch.Tensor:
    """``value`` as a float tensor (a Record gives its output); the autograd graph is kept.

    Example:
        >>> as_value([1, 2], "vector").dtype
        torch.float32
    """
    if isinstance(value, Record):
        value = value.output
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise InterventionError(
                f"{what} must be a tensor (or a Record), got {type(value).__name__}"
            ) from None
    tensor: torch.Tensor = value
    if tensor.is_meta:
        raise InterventionError(
            f"{what} is on the meta device, so it holds no values: build it on a real device "
            "(e.g. from a capture of the model after its weights are loaded)"
        )
    if tensor.is_complex():
        raise InterventionError(f"{what} must hold real numbers, got {tensor.dtype}")
    return tensor if tensor.is_floating_point() else tensor.float()


def as_factor(value: Any, what: str) -> float:
    """``value`` as a finite float, for ``scale=`` and ``factor=``; anything else is refused.

    Python and NumPy numbers and one-element tensors that need no gradient are accepted.

    Example:
        >>> as_factor(2, "scale")
        2.0
        >>> try:
        ...     as_factor("2", "scale")
        ... except InterventionError as exc:
        ...     print(exc)
        scale must be a real number, got '2' (str)
    """
    number = value
    if isinstance(number, torch.Tensor):
        if number.numel() != 1 or number.requires_grad or number.is_meta:
            raise InterventionError(
                f"{what} must be a real number, got a tensor of shape {tuple(number.shape)}"
                f"{' that requires grad' if number.requires_grad else ''}: a trainable scale "
                "belongs in the vector itself"
            )
        number = number.item()
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise InterventionError(
            f"{what} must be a real number, got {value!r} ({type(value).__name__})"
        )
    factor = float(number)
    if not math.isfinite(factor):
        raise InterventionError(
            f"{what} must be finite, got {factor}: it would make every edited value nan or inf"
        )
    return factor


def mean_activation(activations: Any, side: Side = "output", trailing: int = 1) -> torch.Tensor:
    """The mean vector of a set of activations (every axis but the last is averaged).

    ``activations`` is a tensor ``[..., hidden]``, a Record (its ``output`` at every step), or a
    list of them. A Record of a padded batch contributes its real tokens only (its attention
    mask says which). ``trailing`` axes are kept (2 for a head value ``[batch, seq, heads,
    head_dim]``: the mean is one vector per head).

    Example:
        >>> mean_activation(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])).tolist()
        [2.0, 3.0]
    """
    items = activations if isinstance(activations, (list, tuple)) else [activations]
    rows: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, Record):
            values = []
            for step in item.steps:
                value = step.input if side == "input" else step.output
                mask = step.attention_mask
                if (
                    mask is not None
                    and not step._positions
                    and isinstance(value, torch.Tensor)
                    and value.dim() >= 3
                    and mask.shape[0] == value.shape[0]
                ):
                    # Padding is no activation of the model's: leave it out of the mean.
                    value = torch.cat(step.real_tokens(side))
                values.append(value)
        else:
            values = [item]
        for value in values:
            tensor = as_value(value, "mean_over")
            if tensor.dim() < trailing + (1 if trailing > 1 else 0):
                raise InterventionError(
                    f"mean_over needs activations [..., hidden], got shape {tuple(tensor.shape)}"
                )
            kept = tuple(tensor.shape[tensor.dim() - trailing :])
            rows.append(tensor.detach().reshape(-1, *kept).float())
    if not rows or len({r.shape[1:] for r in rows}) != 1:
        raise InterventionError(
            "mean_over needs at least one activation, all with the same hidden size"
        )
    return torch.cat(rows).mean(0)


def _replace_hidden(value: Any, index: int, new: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (*value[:index], new, *value[index + 1 :])
    if isinstance(value, list):
        return [*value[:index], new, *value[index + 1 :]]
    if isinstance(value, Mapping):
        key = "last_hidden_state" if "last_hidden_state" in value else next(iter(value))
        out = copy.copy(value)
        out[key] = new  # type: ignore[index]
        return out
    raise InterventionError(f"cannot put an edited value back into a {type(value).__name__}")


# -- the model call an edit runs in ----------------------------------------------------------


def _describe(call: ModelCall | None, seq: int) -> str:
    if call is None or not call.cached:
        return ""
    offset = call.offset
    if offset is None:
        return f" (this call is a generation step holding {seq} new token(s) after a cache)"
    if offset == 0:
        return ""
    return f" (this call is a generation step holding {seq} new token(s) after {offset} cached)"


@dataclass
class _Hits:
    """The positions of one call an edit touches."""

    mask: torch.Tensor
    """``[batch, seq]`` booleans."""
    local: list[int] | None = None
    """Shared positions within the call, for a list of positions; in the order requested."""
    ordinals: list[int] | None = None
    """For each of ``local``, which requested position it is."""

    def where(self, like: torch.Tensor) -> torch.Tensor:
        return self.mask.view(*self.mask.shape, *([1] * (like.dim() - 2)))


def _out_of_range(edit: Edit, p: int, seq: int, call: ModelCall | None) -> InterventionError:
    offset = call.offset if call is not None else 0
    if call is not None and call.cached and offset:
        total = offset + seq
        return InterventionError(
            f"{edit.name}: position {p} is out of range for a sequence of {total} tokens so "
            f"far{_describe(call, seq)} (use {-total}..{total - 1})"
        )
    hint = (
        ""
        if call is not None and call.cached
        else "; this call has no KV cache, so it is an independent forward: a position after "
        "its tokens never comes"
    )
    return InterventionError(
        f"{edit.name}: position {p} is out of range for a call of {seq} tokens (use "
        f"{-seq}..{seq - 1}){hint}"
    )


def _locate(
    edit: Edit, batch: int, seq: int, call: ModelCall | None, device: torch.device
) -> _Hits | Literal[False] | None:
    """The positions of this call the edit touches: ``None`` all, ``False`` none (an earlier
    or later step's)."""
    positions = edit.positions
    if positions is None:
        return None
    if isinstance(positions, str):
        mask = call.attention_mask if call is not None else None
        last = call_positions(mask, batch, seq, device)
        hits = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        hits[torch.arange(batch, device=device), last] = True
        return _Hits(hits)
    offset = call.offset if call is not None else 0
    cached = call is not None and call.cached
    if offset is None:
        return _locate_unknown(edit, batch, seq, device)
    total = offset + seq
    if isinstance(positions, torch.Tensor):
        return _locate_tensor(edit, positions, batch, seq, call, device)
    if isinstance(positions, slice):
        chosen = range(total)[positions]
        local = [a - offset for a in chosen if a >= offset]
        if not local:
            if not cached:
                raise InterventionError(
                    f"{edit.name}: positions={positions} selects no position of a call of "
                    f"{seq} tokens"
                )
            return False
        hits = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        hits[:, local] = True
        return _Hits(hits)
    local, ordinals = [], []
    for i, p in enumerate(positions):
        if p >= total and cached:
            continue  # a later token's: edited when the step that holds it runs
        if not -total <= p < total:
            raise _out_of_range(edit, p, seq, call)
        absolute = p % total
        if absolute >= offset:
            local.append(absolute - offset)
            ordinals.append(i)
    if len(set(local)) != len(local):
        raise InterventionError(
            f"{edit.name}: positions {positions} name one position twice in a call of {seq} "
            "tokens (a negative and a non-negative index): list each position once"
        )
    if not local:
        return False
    hits = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    hits[:, local] = True
    return _Hits(hits, local, ordinals)


def _locate_unknown(edit: Edit, batch: int, seq: int, device: torch.device) -> _Hits | None:
    """A call whose cache length cannot be read: only positions counted from its end fit."""
    positions = edit.positions
    if isinstance(positions, slice) and positions in (slice(None), slice(None, None, 1)):
        return None
    if isinstance(positions, list) and all(-seq <= p < 0 for p in positions):
        local = [p + seq for p in positions]
        hits = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        hits[:, local] = True
        return _Hits(hits, local, list(range(len(local))))
    raise InterventionError(
        f"{edit.name}: this call holds {seq} token(s) after a KV cache whose length cannot be "
        f"read, so positions={positions} cannot be placed: use negative positions or 'last', "
        "or call the model with a transformers Cache (or cache_position)"
    )


def _locate_tensor(
    edit: Edit,
    positions: torch.Tensor,
    batch: int,
    seq: int,
    call: ModelCall | None,
    device: torch.device,
) -> _Hits | Literal[False]:
    offset = call.offset if call is not None else 0
    assert offset is not None
    cached = call is not None and call.cached
    total = offset + seq
    rows = positions.to(device=device, dtype=torch.long)
    if rows.dim() == 1:
        rows = rows.unsqueeze(1)
    if rows.shape[0] != batch:
        raise InterventionError(
            f"{edit.name}: a positions tensor gives one position (or row of positions) per "
            f"example: expected shape [{batch}] or [{batch}, k], got {tuple(positions.shape)}"
        )
    low, high = int(rows.min()), int(rows.max())
    if low < -total or (high >= total and not cached):
        raise _out_of_range(edit, low if low < -total else high, seq, call)
    local = torch.where(rows < 0, rows + total, rows) - offset
    inside = (local >= 0) & (local < seq)
    if not bool(inside.any()):
        return False
    # Positions outside this call go to a spare column that is dropped.
    spare = torch.where(inside, local, torch.full_like(local, seq))
    hits = torch.zeros(batch, seq + 1, dtype=torch.bool, device=device)
    hits.scatter_(1, spare, True)
    return _Hits(hits[:, :seq])


def _head_mask(edit: Edit, x: torch.Tensor) -> torch.Tensor:
    """Booleans that broadcast to ``x``: true on the edited heads."""
    assert edit.heads is not None
    axis = edit.head_axis
    count = x.shape[axis] if x.dim() > axis else 0
    if not edit.heads or max(edit.heads) >= count:
        raise InterventionError(
            f"{edit.name}: heads={list(edit.heads)} do not fit a value of shape "
            f"{tuple(x.shape)} with {count} heads on axis {axis}"
        )
    keep = torch.zeros(count, dtype=torch.bool, device=x.device)
    keep[list(edit.heads)] = True
    shape = [1] * x.dim()
    shape[axis] = count
    return keep.view(shape)


def _fits(value: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``value`` broadcasts *to* ``x``'s shape (``broadcast_shapes(v, x) == x``)."""
    if value.dim() > x.dim():
        return False
    return all(v in (1, n) for v, n in zip(reversed(value.shape), reversed(x.shape), strict=False))


def _patch_value(
    edit: Edit, x: torch.Tensor, hits: _Hits | None, call: ModelCall | None
) -> torch.Tensor:
    value = edit.op.operand(x)
    if value.shape == x.shape:
        return value
    features = tuple(x.shape[2:])
    if hits is not None and hits.local is not None and hits.ordinals is not None:
        count = len(edit.positions)
        rows: torch.Tensor | None = None
        if tuple(value.shape) == (count, *features):
            rows = value.unsqueeze(0)
        elif (
            value.dim() == x.dim()
            and tuple(value.shape[1:]) == (count, *features)
            and value.shape[0] in (1, x.shape[0])
        ):
            rows = value
        if rows is not None:
            # One row per requested position: this call takes the rows of those it holds.
            placed = x.clone()
            placed[:, hits.local] = rows[:, hits.ordinals].expand(
                x.shape[0], len(hits.local), *features
            )
            return placed
    if not _fits(value, x):
        raise InterventionError(
            f"{edit.name}: a patch value of shape {tuple(value.shape)} does not fit a value of "
            f"shape {tuple(x.shape)}{_describe(call, x.shape[1])}: pass the full value of this "
            "shape (e.g. the clean run's Record), one row per position, or one vector that "
            "broadcasts to the value without changing its shape"
        )
    return value.expand(x.shape)


_LOCK = RLock()
"""Guards installing and removing wrapped forwards (see :meth:`Intervention.__enter__`)."""

_WRAP_DEPTH = 8
"""How many ``__wrapped__`` links :func:`_wrapper_of` follows."""


def _wrapper_of(module: nn.Module) -> _EditedForward | None:
    """The edit wrapper ``module``'s forward runs: its ``forward`` itself, or one wrapped by
    wrappers installed after it (accelerate's ``add_hook_to_module``, transformers 4.x while it
    records hidden states), which link it as ``__wrapped__``.

    Example:
        >>> _wrapper_of(nn.Linear(2, 2)) is None
        True
    """
    forward = module.__dict__.get("forward")
    for _ in range(_WRAP_DEPTH):
        if isinstance(forward, _EditedForward):
            return forward if forward.module is module else None
        forward = getattr(forward, "__wrapped__", None)
        if forward is None:
            return None
    return None


class _EditedForward:
    """Installed as ``module.forward`` while edits of the module are active.

    It calls the forward it replaced and applies the output edits to what it returns, so that
    every forward hook and every wrapper Hugging Face puts around ``forward`` sees the edit. It
    also owns the input pre-hook and the :class:`EditNote` captures read.
    """

    def __init__(self, module: nn.Module, target: Target) -> None:
        previous = module.__dict__.get("forward")
        self.previous = previous
        self.inner: Callable[..., Any] = previous if previous is not None else module.forward
        self.module = module
        self.target = target
        self.input_edits: list[Edit] = []
        self.output_edits: list[Edit] = []
        self.calls: dict[int, CallScope] = {}
        """The calls each edit reads (its intervention's scope of the model or of a stack)."""
        self.threads: dict[int, int] = {}
        """The thread each edit applies in (the one that entered its intervention)."""
        self.scoped: set[int] = set()
        """Edits that apply only while their stack runs (no call of it: the module ran in
        another stack)."""
        self.edit_notes: dict[int, EditNote] = {}
        """Each thread's note of its latest call (read through :func:`~introspect._hooks.capture.edit_note`;
        a plain attribute, so a ``functools.wraps`` wrapper of this forward carries it)."""
        self.pre_handle: RemovableHandle | None = None
        self.__wrapped__ = self.inner

    @property
    def edit_note(self) -> EditNote:
        """What this thread's latest call did (captures read it; threads don't share it)."""
        thread = get_ident()
        note = self.edit_notes.get(thread)
        if note is None:
            note = self.edit_notes[thread] = EditNote()
        return note

    # -- applying -----------------------------------------------------------------------------

    def call(self, edit: Edit) -> ModelCall | None:
        """The model call now running, as the edit's intervention saw it (``None``: none)."""
        scope = self.calls.get(id(edit))
        return scope.current if scope is not None else None

    def mask(self, edit: Edit) -> torch.Tensor | None:
        """The attention mask of the current model call, as the edit's intervention saw it."""
        call = self.call(edit)
        return call.attention_mask if call is not None else None

    def _apply(
        self,
        edits: list[Edit],
        x: Any,
        make_record: Callable[[], Record],
    ) -> tuple[Any, tuple[str, ...]]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            why = (
                "token ids cannot be edited: edit 'embed' or a block input instead"
                if isinstance(x, torch.Tensor) and not x.is_floating_point()
                else "e.g. the module was called by hand on a single vector"
            )
            raise InterventionError(
                f"{edits[0].name}: the value here is {what}, not a [batch, seq, ...] float tensor "
                f"({why})"
            )
        if x.dim() == 2 and any(e.positions is not None for e in edits):
            # [batch, hidden] (insp.logits of one position, say) would read as [batch, seq].
            raise InterventionError(
                f"{edits[0].name}: the value here is {tuple(x.shape)}, which has no sequence axis, "
                "so positions cannot be placed in it: pass [batch, seq, hidden] (keep the "
                "position axis, e.g. h[:, -1:]) or leave the edit without positions"
            )
        batch, seq = x.shape[0], x.shape[1]
        applied: list[str] = []
        thread = get_ident()
        for edit in edits:
            if self.threads.get(id(edit), thread) != thread:
                continue  # another thread's edit: this forward is not its business
            call = self.call(edit)
            if call is None and id(edit) in self.scoped:
                continue  # a shared module running in another stack than the edit's
            if edit.no_cache is not None and call is not None and call.cached:
                raise InterventionError(f"{edit.name}: {edit.no_cache}")
            hits = _locate(edit, batch, seq, call, x.device)
            if hits is False:
                continue
            new = self._compute(edit, x, hits, make_record, call)
            if hits is not None:
                new = torch.where(hits.where(x), new, x)
            if edit.heads is not None:
                new = torch.where(_head_mask(edit, x), new, x)
            elif new is not x and edit.op.kind in ("set", "fn"):
                # The caller may still hold this tensor and the model may add to it in place.
                new = new.clone(memory_format=torch.contiguous_format)
            x = new
            applied.append(edit.name)
        return x, tuple(applied)

    def _compute(
        self,
        edit: Edit,
        x: torch.Tensor,
        hits: _Hits | None,
        make_record: Callable[[], Record],
        call: ModelCall | None,
    ) -> torch.Tensor:
        op = edit.op
        if op.kind == "set":
            return _patch_value(edit, x, hits, call)
        if op.kind == "scale":
            return x * op.factor
        if op.kind == "zero":
            return torch.zeros_like(x)
        if op.kind == "add":
            vector = op.operand(x)
            if not _fits(vector, x):
                raise InterventionError(
                    f"{edit.name}: a vector of shape {tuple(vector.shape)} cannot be added to a "
                    f"value of shape {tuple(x.shape)}{_describe(call, x.shape[1])}: the sum must "
                    "keep the value's shape, so pass a [hidden] vector (or one that broadcasts "
                    "to the value, e.g. [seq, hidden] only for calls of that many tokens)"
                )
            return x + vector
        assert op.fn is not None
        version = x._version
        new = op.fn(x, make_record())
        if x._version != version:
            raise InterventionError(
                f"{edit.name}: fn(value, record) changed the value in place (e.g. x.mul_(0)), which "
                "also changes what the model and the records already hold: return a new tensor "
                "(x * 0) instead"
            )
        if not isinstance(new, torch.Tensor) or new.shape != x.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise InterventionError(
                f"{edit.name}: fn(value, record) must return a tensor of the value's shape "
                f"{tuple(x.shape)}, got {got}"
            )
        if not new.is_floating_point():
            raise InterventionError(
                f"{edit.name}: fn(value, record) returned a {new.dtype} tensor: it must return "
                f"floating-point values, like the {x.dtype} value it was given"
            )
        if new.device != x.device:
            raise InterventionError(
                f"{edit.name}: fn(value, record) returned a tensor on {new.device}, but the "
                f"value is on {x.device}: return it on the value's device"
            )
        return new if new.dtype == x.dtype else new.to(x.dtype)

    # -- hooks --------------------------------------------------------------------------------

    def pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        note = self.edit_note
        if not self.input_edits:
            note.input_edits, note.input_before = (), None
            return None
        x, keyword = input_slot(args, kwargs, self.target.input_kwarg)

        def make_record() -> Record:
            return Record(
                self.target.key,
                args,
                kwargs,
                None,
                input_kwarg=self.target.input_kwarg,
                ran=False,
                attention_mask=self.mask(self.input_edits[0]),
            )

        new, applied = self._apply(self.input_edits, x, make_record)
        note.input_edits = applied
        note.input_before = x if applied else None
        if not applied:
            return None
        if keyword is None:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, keyword: new}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        note = self.edit_note
        if not self.output_edits:
            note.output_edits, note.output_before = (), None
            return out
        index = self.target.output_index
        x = hidden_of(out, index)

        def make_record() -> Record:
            return Record(
                self.target.key,
                args,
                kwargs,
                out,
                input_kwarg=self.target.input_kwarg,
                output_index=index,
                attention_mask=self.mask(self.output_edits[0]),
            )

        new, applied = self._apply(self.output_edits, x, make_record)
        note.output_edits = applied
        note.output_before = x if applied else None
        return _replace_hidden(out, index, new) if applied else out

    # -- lifetime -----------------------------------------------------------------------------

    @classmethod
    def attach(cls, target: Target) -> _EditedForward:
        module = target.module
        current = _wrapper_of(module)
        if current is not None:
            return current
        state = cls(module, target)
        module.forward = state
        return state

    def add(self, edit: Edit, calls: CallScope | None = None, scoped: bool = False) -> None:
        if calls is not None:
            self.calls[id(edit)] = calls
        if scoped:
            self.scoped.add(id(edit))
        self.threads[id(edit)] = get_ident()
        if edit.side == "input":
            if self.pre_handle is None:
                self.pre_handle = self.module.register_forward_pre_hook(
                    self.pre_hook, with_kwargs=True, prepend=True
                )
            self.input_edits.append(edit)
        else:
            self.output_edits.append(edit)

    def discard(self, edit: Edit) -> None:
        for edits in (self.input_edits, self.output_edits):
            for i, known in enumerate(edits):
                if known is edit:
                    del edits[i]
                    break
        self.calls.pop(id(edit), None)
        self.threads.pop(id(edit), None)
        self.scoped.discard(id(edit))
        if not self.input_edits:
            for note in self.edit_notes.values():
                note.input_edits, note.input_before = (), None
            if self.pre_handle is not None:
                self.pre_handle.remove()
                self.pre_handle = None
        if not self.output_edits:
            for note in self.edit_notes.values():
                note.output_edits, note.output_before = (), None
        if self.input_edits or self.output_edits:
            return
        forward: Any = self.module.__dict__.get("forward")
        if forward is self:
            if self.previous is None:
                del self.module.forward
            else:
                self.module.forward = self.previous
            return
        # Wrapped after it was installed (accelerate's add_hook_to_module keeps the forward it
        # wraps in module._old_forward and calls that; functools links __wrapped__): link the
        # wrapper past this one, or it would stay in the model after the edit.
        inner = self.previous if self.previous is not None else self.inner
        if self.module.__dict__.get("_old_forward") is self:
            self.module.__dict__["_old_forward"] = inner
        for _ in range(_WRAP_DEPTH):
            following = getattr(forward, "__wrapped__", None)
            if following is self:
                with contextlib.suppress(AttributeError, TypeError):
                    forward.__wrapped__ = inner
                break
            if following is None:
                break
            forward = following


class Intervention(HookSession):
    """A context manager applying edits while the model (or ``generate``) runs.

    Built by :meth:`introspect.Inspector.steer`, ``ablate``, ``patch``, ``scale`` and ``edit``.
    Compose several with one ``with`` statement, together with captures; ``a + b`` is one
    intervention doing both. On exit (normal or not) the model is exactly as before. Given the
    model (``root``), it reads each call's attention mask and KV cache, which ``"last"`` and
    positions during ``generate`` need.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> x = torch.ones(1, 3, 2)
        >>> double = Intervention([Edit(Target("lin", lin), "output", EditOp("scale", factor=2.0))])
        >>> with double:
        ...     edited = lin(x)
        >>> torch.allclose(edited, 2 * lin(x))
        True
    """

    what = "intervention"
    error = InterventionError

    def __init__(
        self,
        edits: Sequence[Edit],
        *,
        root: nn.Module | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__([edit.target for edit in edits], root=root, model=model)
        self.edits = list(edits)
        self._states: list[tuple[_EditedForward, Edit]] = []

    def __add__(self, other: Intervention) -> Intervention:
        if not isinstance(other, Intervention):
            return NotImplemented
        # Fresh Edit objects: an edit's per-call state is keyed by its identity, so sharing one
        # with an intervention that is active would tie the two together.
        return Intervention(
            [dataclasses.replace(edit) for edit in (*self.edits, *other.edits)],
            root=self.root if self.root is not None else other.root,
            model=self.model if self.model is not None else other.model,
        )

    def _at_call(self) -> None:
        lost = [edit.name for state, edit in self._states if _wrapper_of(state.module) is not state]
        if lost:
            # Its forward replaced (accelerate's remove_hook_from_module puts back the forward
            # it had wrapped): the edit would silently not apply.
            raise InterventionError(
                f"{', '.join(lost)}: the module's forward was replaced while this edit was "
                "active (e.g. accelerate's remove_hook_from_module, which puts back the forward "
                "it wrapped), so the edit would silently not apply: dispatch or undispatch the "
                "model outside the 'with' block of an edit"
            )

    def _install(self, owner: int) -> None:
        # One lock for every module's wrapper: two threads entering or leaving edits of one
        # module must not both install (or both remove) its wrapped forward.
        with _LOCK:
            for edit in self.edits:
                # The call an edit reads: the model's, or its own stack's (an encoder's or a
                # decoder's own mask and cache; none outside a call of that stack, so an edit
                # of a module several stacks share applies only within its own).
                scope = self.scope(edit.target.within)
                state = _EditedForward.attach(edit.target)
                self._states.append((state, edit))
                state.add(edit, scope, scoped=edit.target.within is not None)

    def _uninstall(self) -> None:
        with _LOCK:
            for state, edit in reversed(self._states):
                state.discard(edit)
        self._states.clear()

    def __repr__(self) -> str:
        return f"Intervention({', '.join(e.name for e in self.edits)})"


def edit_fn_name(fn: Any) -> str:
    """The name of an ``edit()`` function, after checking it takes ``(value, record)``.

    Example:
        >>> edit_fn_name(lambda value, record: value)
        '<lambda>'
    """
    if not callable(fn):
        raise InterventionError(
            f"edit() needs a callable fn(value, record) -> value, got {type(fn).__name__}"
        )
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise InterventionError(
            f"edit() calls fn(value, record) with two arguments, but {fn!r} does not take "
            "them: write it as def fn(value, record): ... (use record or ignore it)"
        ) from None
    except ValueError:
        pass  # a builtin without a signature: it will tell at the call
    return str(getattr(fn, "__name__", type(fn).__name__))


def _counts_from_the_start(positions: Any) -> bool:
    """Whether ``positions`` name a position counted from the first token."""
    if positions is None or isinstance(positions, str):
        return False
    if isinstance(positions, slice):
        return True
    if isinstance(positions, torch.Tensor):
        return bool((positions >= 0).any())
    return any(int(p) >= 0 for p in positions)


def edits_at(
    locs: Sequence[Locator],
    op: EditOp,
    positions: Any,
    label: str,
    heads: Heads = None,
    features: Heads = None,
    *,
    target: Callable[[Locator], Target],
    head_count: Callable[[Locator], int],
) -> list[Edit]:
    """The edits of one verb (``steer``, ``patch``, ...) at each locator, checked before any
    forward: which values take ``heads=`` and ``positions=``, and which cannot be edited.

    ``target`` resolves a locator to the module to hook, ``head_count`` counts its heads.
    ``features`` selects latents of a spliced SAE's features (``<site>.sae.features``) as
    ``heads`` selects heads.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> loc = Locator.parse("block[0]")
        >>> [e.name for e in edits_at([loc], EditOp("zero"), None, "ablate", None,
        ...     target=lambda l: Target(str(l), lin), head_count=lambda l: 0)]
        ['block[0]: ablate']
    """
    if not locs:
        raise InterventionError(f"{label} names no module on this model")
    wanted = check_heads(heads)
    if wanted is not None:
        label += f" heads={list(wanted)}"
    latents = check_heads(features, "features=", "latent")
    if latents is not None:
        label += f" features={list(latents)}"
    edits = []
    for loc in locs:
        site = head_site(loc)
        if latents is not None and loc.sae is None:
            raise InterventionError(
                f"features= selects latents of a spliced SAE's features, but {loc} is not "
                f"'<site>.sae.features': edit '{loc}.sae.features' inside insp.splice(sae, "
                f"'{loc}')"
            )
        if wanted is not None and site not in HEAD_AXIS:
            raise InterventionError(
                f"heads= edits single heads of a head locator (block[i].attn.q, .k, .v, "
                f".z, .result or .pattern), but {loc} is not one: edit "
                f"'{attn_part(loc)}.z' to reach heads before the output projection"
            )
        if site == "pattern" and positions is not None:
            raise InterventionError(
                f"{loc} is [batch, heads, query, key], so positions= cannot be placed on "
                "it: edit it whole, or change some query rows with edit(fn)"
            )
        head_list = heads_in_range(wanted, head_count(loc), loc) if wanted is not None else None
        hooked = target(loc)
        if latents is not None:
            d_sae = int(getattr(hooked.module, "d_sae", 0))
            head_list = heads_in_range(latents, d_sae, loc, "latent")
        if loc.side == "input" and loc.part == "embed" and not loc.is_block:
            raise InterventionError(
                "embed.input is token ids and cannot be edited: edit 'embed' (its output) "
                "or 'block[0].input' instead"
            )
        if loc.part == "lm_head" and _counts_from_the_start(
            check_positions(positions, InterventionError)
        ):
            # The head runs after the model's stack, on the positions it keeps (during
            # generate only the last): a position from the start would land on another token.
            raise InterventionError(
                f"lm_head edits take positions from the end (-1, 'last'), not {positions!r}: "
                "the head sees only the positions it computes logits for (one during "
                "generate); edit 'final_norm' to reach a position counted from the start"
            )
        no_cache = None
        if site in ("k", "v"):
            no_cache = (
                f"an edit of {site} reaches this call's attention but not the KV cache that "
                "later steps read (the cache keeps the unedited values), so under a cache it "
                "would be silently partial: run with use_cache=False, or edit q, z or result"
            )
        edits.append(
            Edit(
                hooked,
                "input" if hooked.reads_input else loc.side,
                op,
                positions,
                label,
                heads=head_list,
                head_axis=HEAD_AXIS.get(site or "", 2),
                no_cache=no_cache,
            )
        )
    return edits
