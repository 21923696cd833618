"""Interventions: change what a module receives or returns while the model runs.

Every edit is a context manager built by the Inspector (``steer``, ``ablate``, ``patch``,
``scale``, ``edit``) on the same locators captures use. Edits compose with each other and with
captures in one forward, and apply at every step of ``generate``.

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

Captures read an :class:`~introspect.capture.EditNote` the edit leaves on the module, so a
record of the edited module says which edits its values include and keeps the values before
them. Everything is removed on every exit path, including an exception raised by an edit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from introspect.batching import position_index
from introspect.capture import EditNote, Record, Target, hidden_of
from introspect.errors import CaptureError, InterventionError

if TYPE_CHECKING:
    from types import TracebackType

    from torch.utils.hooks import RemovableHandle

    from introspect.inspector import Inspector

__all__ = [
    "Edit",
    "EditOp",
    "Intervention",
    "as_value",
    "logit_difference",
    "mean_activation",
    "patching_sweep",
]

Side = Literal["input", "output"]
EditFn = Callable[[torch.Tensor, Record], torch.Tensor]
"""``fn(value, record) -> value``: ``value`` is the current hidden tensor, ``record`` the call."""


@dataclass
class EditOp:
    """How an edit computes the new value from the current one.

    ``add`` adds ``tensor``; ``scale`` multiplies by ``factor``; ``zero`` zeroes; ``set``
    replaces by ``tensor`` (see :meth:`introspect.Inspector.patch` for the shapes it takes);
    ``fn`` calls ``fn(value, record)``.

    Example:
        >>> EditOp("scale", factor=0.5).kind
        'scale'
    """

    kind: Literal["add", "scale", "zero", "set", "fn"]
    tensor: torch.Tensor | None = None
    factor: float = 1.0
    fn: EditFn | None = None
    _cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def cast(self, like: torch.Tensor) -> torch.Tensor:
        assert self.tensor is not None
        key = (like.device, like.dtype)
        value = self._cast.get(key)
        if value is None:
            value = self.tensor.to(device=like.device, dtype=like.dtype)
            # Only constants are cached: a tensor that needs grad must stay in the graph.
            if not value.requires_grad:
                self._cast[key] = value
        return value


@dataclass
class Edit:
    """One edit of one module: where (target, side), what (op) and at which positions.

    Built by :class:`introspect.Inspector` (``steer``, ``ablate``, ``patch``, ``scale``,
    ``edit``); ``label`` is what records and errors call it.

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

    @property
    def name(self) -> str:
        where = self.target.key + (".input" if self.side == "input" else "")
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
    return tensor if tensor.is_floating_point() else tensor.float()


def mean_activation(activations: Any, side: Side = "output") -> torch.Tensor:
    """The mean vector of a set of activations (every axis but the last is averaged).

    ``activations`` is a tensor ``[..., hidden]``, a Record (its ``output`` at every step), or a
    list of them.

    Example:
        >>> mean_activation(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])).tolist()
        [2.0, 3.0]
    """
    items = activations if isinstance(activations, (list, tuple)) else [activations]
    rows: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, Record):
            values = [step.input if side == "input" else step.output for step in item.steps]
        else:
            values = [item]
        for value in values:
            tensor = as_value(value, "mean_over")
            if tensor.dim() == 0:
                raise InterventionError("mean_over needs activations [..., hidden], got a scalar")
            rows.append(tensor.detach().reshape(-1, tensor.shape[-1]).float())
    if not rows or len({r.shape[-1] for r in rows}) != 1:
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


def _position_mask(
    index: list[int] | torch.Tensor, batch: int, seq: int, like: torch.Tensor
) -> Any:
    mask = torch.zeros(batch, seq, dtype=torch.bool, device=like.device)
    if isinstance(index, torch.Tensor):
        mask.scatter_(1, index.to(like.device), True)
    else:
        mask[:, index] = True
    return mask.view(batch, seq, *([1] * (like.dim() - 2)))


def _patch_value(
    op: EditOp, x: torch.Tensor, index: list[int] | torch.Tensor | None, name: str
) -> torch.Tensor:
    value = op.cast(x)
    if value.shape == x.shape:
        return value
    if isinstance(index, list) and value.dim() >= 2 and value.shape[-2] == len(index):
        # One row per patched position: put them in place.
        full = x.clone()
        full[:, index] = value.expand(x.shape[0], *value.shape[-2:]) if value.dim() == 2 else value
        return full
    try:
        return value.expand_as(x)
    except RuntimeError:
        raise InterventionError(
            f"{name}: a patch value of shape {tuple(value.shape)} does not fit a value of shape "
            f"{tuple(x.shape)}: pass the full [batch, seq, hidden] value (e.g. the clean run's "
            "Record), one row per position, or one vector broadcast to the positions"
        ) from None


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
        self.calls: dict[int, int] = {}
        self.first_seq: dict[int, int] = {}
        self.masks: dict[int, Callable[[], torch.Tensor | None]] = {}
        self.edit_note = EditNote()
        self.pre_handle: RemovableHandle | None = None
        self.__wrapped__ = self.inner

    # -- applying -----------------------------------------------------------------------------

    def mask(self, edit: Edit) -> torch.Tensor | None:
        """The attention mask of the current model call, as the edit's intervention saw it."""
        source = self.masks.get(id(edit))
        return source() if source is not None else None

    def _apply(
        self,
        edits: list[Edit],
        x: Any,
        make_record: Callable[[], Record],
    ) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InterventionError(
                f"{edits[0].name}: the value here is {what}, not a [batch, seq, ...] float tensor "
                "(token ids cannot be edited: edit 'embed' or a block input instead)"
            )
        batch, seq = x.shape[0], x.shape[1]
        for edit in edits:
            index = self._index(edit, batch, seq, x)
            if index is False:
                continue
            new = self._compute(edit, x, index, make_record)
            if index is None:
                x = new
            else:
                assert not isinstance(index, bool)
                x = torch.where(_position_mask(index, batch, seq, x), new, x)
        return x

    def _index(
        self, edit: Edit, batch: int, seq: int, x: torch.Tensor
    ) -> list[int] | torch.Tensor | Literal[False] | None:
        """Resolved positions; ``False`` when this call holds none of them (a later step)."""
        key = id(edit)
        calls = self.calls.get(key, 0)
        self.calls[key] = calls + 1
        if calls == 0:
            self.first_seq[key] = seq
        positions = edit.positions
        if positions is None:
            return None
        # A cached generation step sees only the new token: positions of the prompt are skipped.
        continuation = calls > 0 and seq < self.first_seq.get(key, seq)
        if continuation and not isinstance(positions, str):
            if isinstance(positions, torch.Tensor):
                if positions.numel() and int(positions.max()) >= seq:
                    return False
            elif not isinstance(positions, slice):
                items = [positions] if isinstance(positions, int) else list(positions)
                items = [p for p in items if -seq <= p < seq]
                if not items:
                    return False
                positions = items
        try:
            return position_index(positions, batch, seq, self.mask(edit), x.device)
        except CaptureError as exc:
            raise InterventionError(f"{edit.name}: {exc}") from None

    def _compute(
        self,
        edit: Edit,
        x: torch.Tensor,
        index: list[int] | torch.Tensor | None,
        make_record: Callable[[], Record],
    ) -> torch.Tensor:
        op = edit.op
        if op.kind == "fn":
            assert op.fn is not None
            new = op.fn(x, make_record())
        elif op.kind == "set":
            return _patch_value(op, x, index, edit.name)
        elif op.kind == "scale":
            return x * op.factor
        elif op.kind == "zero":
            return torch.zeros_like(x)
        else:
            vector = op.cast(x)
            try:
                return x + vector
            except RuntimeError:
                raise InterventionError(
                    f"{edit.name}: a vector of shape {tuple(vector.shape)} cannot be added to a "
                    f"value of shape {tuple(x.shape)}: pass a [hidden] vector (or one that "
                    "broadcasts to [batch, seq, hidden])"
                ) from None
        if not isinstance(new, torch.Tensor) or new.shape != x.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise InterventionError(
                f"{edit.name}: fn(value, record) must return a tensor of the value's shape "
                f"{tuple(x.shape)}, got {got}"
            )
        return new

    # -- hooks --------------------------------------------------------------------------------

    def pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        note = self.edit_note
        if not self.input_edits:
            note.input_edits, note.input_before = (), None
            return None
        keyword = self.target.input_kwarg
        if args:
            x = args[0]
        elif keyword in kwargs:
            x = kwargs[keyword]
        else:
            keyword = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), keyword)
            x = kwargs.get(keyword)

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

        new = self._apply(self.input_edits, x, make_record)
        note.input_edits = tuple(e.name for e in self.input_edits)
        note.input_before = x
        if args:
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

        new = self._apply(self.output_edits, x, make_record)
        note.output_edits = tuple(e.name for e in self.output_edits)
        note.output_before = x
        return _replace_hidden(out, index, new)

    # -- lifetime -----------------------------------------------------------------------------

    @classmethod
    def attach(cls, target: Target) -> _EditedForward:
        module = target.module
        current = module.__dict__.get("forward")
        if isinstance(current, _EditedForward):
            return current
        state = cls(module, target)
        module.forward = state
        return state

    def add(self, edit: Edit, mask: Callable[[], torch.Tensor | None] | None = None) -> None:
        if mask is not None:
            self.masks[id(edit)] = mask
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
        self.first_seq.pop(id(edit), None)
        self.masks.pop(id(edit), None)
        if not self.input_edits:
            self.edit_note.input_edits, self.edit_note.input_before = (), None
            if self.pre_handle is not None:
                self.pre_handle.remove()
                self.pre_handle = None
        if not self.output_edits:
            self.edit_note.output_edits, self.edit_note.output_before = (), None
        if self.input_edits or self.output_edits:
            return
        if self.module.__dict__.get("forward") is self:
            if self.previous is None:
                del self.module.forward
            else:
                self.module.forward = self.previous


class Intervention:
    """A context manager applying edits while the model (or ``generate``) runs.

    Built by :meth:`introspect.Inspector.steer`, ``ablate``, ``patch``, ``scale`` and ``edit``.
    Compose several with one ``with`` statement, together with captures; ``a + b`` is one
    intervention doing both. On exit (normal or not) the model is exactly as before.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> x = torch.ones(1, 3, 2)
        >>> double = Intervention([Edit(Target("lin", lin), "output", EditOp("scale", factor=2.0))])
        >>> with double:
        ...     edited = lin(x)
        >>> torch.allclose(edited, 2 * lin(x))
        True
    """

    def __init__(self, edits: Sequence[Edit], *, root: nn.Module | None = None) -> None:
        self.edits = list(edits)
        self.root = root
        self.attention_mask: torch.Tensor | None = None
        self._states: list[tuple[_EditedForward, Edit]] = []
        self._mask_handle: RemovableHandle | None = None
        self._active = False

    def __add__(self, other: Intervention) -> Intervention:
        if not isinstance(other, Intervention):
            return NotImplemented
        return Intervention(
            [*self.edits, *other.edits], root=self.root if self.root is not None else other.root
        )

    def _mask_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _current_mask(self) -> torch.Tensor | None:
        return self.attention_mask

    def __enter__(self) -> Intervention:
        if self._active:
            raise InterventionError(
                "this intervention is already active: build a new one to apply it twice"
            )
        self._active = True
        self.attention_mask = None
        try:
            if self.root is not None:
                self._mask_handle = self.root.register_forward_pre_hook(
                    self._mask_hook, with_kwargs=True
                )
            for edit in self.edits:
                state = _EditedForward.attach(edit.target)
                self._states.append((state, edit))
                state.add(edit, self._current_mask)
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for state, edit in reversed(self._states):
            state.discard(edit)
        self._states.clear()
        if self._mask_handle is not None:
            self._mask_handle.remove()
            self._mask_handle = None
        self._active = False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def __repr__(self) -> str:
        return f"Intervention({', '.join(e.name for e in self.edits)})"


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
    insp: Inspector,
    clean: Mapping[str, Any],
    corrupted: Mapping[str, Any],
    metric: Callable[[Any], Any],
    *,
    locators: str | Sequence[str] = "block[:]",
    positions: Sequence[int] | None = None,
    relative: bool = False,
) -> torch.Tensor:
    """Activation patching: the metric's change when one (locator, position) comes from clean.

    Runs ``clean`` once with a capture of every locator, then ``corrupted`` once per
    (locator, position) with that single value patched in from the clean run. Returns
    ``effect[i, j] = metric(patched) - metric(corrupted)`` for locator ``i`` and position
    ``positions[j]`` (every position by default); ``relative=True`` divides by
    ``metric(clean) - metric(corrupted)``, so 1.0 means the patch restores the clean behaviour.

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
    names = [str(loc) for loc in insp.expand([locators] if isinstance(locators, str) else locators)]
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
    if positions is None:
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
        effect = torch.zeros(len(names), len(positions))
        for i, name in enumerate(names):
            for j, p in enumerate(positions):
                with insp.patch(name, values[name], positions=[p]):
                    effect[i, j] = score(model(**corrupted)) - base
    if relative:
        gap = clean_score - base
        if gap == 0:
            raise InterventionError(
                "relative=True divides by metric(clean) - metric(corrupted), which is 0 here: "
                "pick inputs the metric tells apart, or use relative=False"
            )
        effect = effect / gap
    return effect
