"""The hook engine: records what modules receive and return, and always cleans up.

It knows nothing about architectures: the Inspector hands it ``Target``s (a key, a module and
how to find the hidden state in its arguments and output). Hooks are removed on every exit
path; a capture with ``stop=True`` ends the forward as soon as every target has been recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from introspect.batching import (
    call_positions,
    gather_positions,
    position_index,
    real_token_positions,
)
from introspect.errors import CaptureError

if TYPE_CHECKING:
    from types import TracebackType

    from torch.utils.hooks import RemovableHandle

__all__ = ["Capture", "EditNote", "Record", "StopForward", "Target", "edit_note", "hidden_of"]


def hidden_of(value: Any, index: int = 0) -> Any:
    """The hidden-state tensor inside a module's output, whatever its container.

    A tensor is returned as is; a tuple or list gives element ``index``; a Hugging Face
    ``ModelOutput`` gives ``last_hidden_state`` (or its first field).

    Example:
        >>> t = torch.zeros(1, 2, 3)
        >>> hidden_of((t, None)) is t and hidden_of(t) is t
        True
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return value[index] if len(value) > index else None
    if isinstance(value, Mapping):
        if "last_hidden_state" in value:
            return value["last_hidden_state"]
        for item in value.values():
            return item
    return value


def input_of(args: tuple[Any, ...], kwargs: dict[str, Any], keyword: str) -> Any:
    """The hidden-state input of a call: the first positional argument, else ``kwargs[keyword]``.

    Example:
        >>> input_of((), {"hidden_states": 1}, "hidden_states")
        1
    """
    if args:
        return args[0]
    if keyword in kwargs:
        return kwargs[keyword]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    return None


def copy_tensors(value: Any) -> Any:
    """A copy of a tensor, or of the tensors in a tuple or list (other values as they are).

    Example:
        >>> t = torch.zeros(2)
        >>> copied = copy_tensors((t, None))
        >>> _ = t.add_(1)
        >>> copied[0].tolist(), copied[1]
        ([0.0, 0.0], None)
    """
    if isinstance(value, torch.Tensor):
        return value.clone()
    if type(value) in (tuple, list):
        return type(value)(v.clone() if isinstance(v, torch.Tensor) else v for v in value)
    return value


@dataclass(frozen=True)
class Target:
    """One module to record: its key, the module, and where its hidden state lives."""

    key: str
    module: nn.Module
    input_kwarg: str = "hidden_states"
    output_index: int = 0
    needs_output: bool = True
    within: nn.Module | None = None
    """Record only calls made while this module runs (a module several stacks share)."""
    copy_output: bool = False
    """Record a copy of the output: the model changes the returned tensor in place later."""


@dataclass(frozen=True)
class Transform:
    """What to do with captured ``input``/``output`` tensors before keeping them."""

    detach: bool = False
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
    positions: Any = None
    """See :func:`introspect.batching.position_index` (``"last"``: each example's last real
    token, read from the attention mask of the call)."""

    @property
    def active(self) -> bool:
        return (
            self.detach
            or self.device is not None
            or self.dtype is not None
            or (self.positions is not None)
        )

    def __call__(self, value: Any, attention_mask: torch.Tensor | None = None) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if self.positions is not None and value.dim() >= 2:
            batch, seq = value.shape[0], value.shape[1]
            index = position_index(self.positions, batch, seq, attention_mask, value.device)
            if index is not None:
                value = gather_positions(value, index)
        if self.detach:
            value = value.detach()
        if self.device is not None or self.dtype is not None:
            value = value.to(device=self.device, dtype=self.dtype)
        return value


@dataclass
class EditNote:
    """What the active edits of one module did during its latest call.

    Written by the intervention machinery, read by captures so that a record can say whether
    it holds the value before or after an edit of the same module.

    Example:
        >>> EditNote().input_edits
        ()
    """

    input_edits: tuple[str, ...] = ()
    output_edits: tuple[str, ...] = ()
    input_before: Any = None
    output_before: Any = None


def edit_note(module: nn.Module) -> EditNote | None:
    """The :class:`EditNote` of a module under an active edit, else ``None``.

    Example:
        >>> edit_note(nn.Linear(2, 2)) is None
        True
    """
    forward = module.__dict__.get("forward")
    note = getattr(forward, "edit_note", None) if forward is not None else None
    return note if isinstance(note, EditNote) else None


class Record:
    """What one module received and returned in one call.

    ``args``, ``kwargs`` and ``raw_output`` are exactly what the forward hook saw; ``input``
    and ``output`` are the hidden-state tensors inside them, whatever the container (a block
    returns a tuple on transformers 4.x and a tensor on 5.x: ``output`` is the tensor on both).
    ``steps`` lists the record of every call during the capture (one per generation step),
    this one first; :meth:`concat` joins them into one tensor over all positions.

    Where an edit (``steer``, ``patch``, ...) of the same module was active, ``input`` and
    ``output`` are what the rest of the model saw (after the edit), ``edits`` names the edits
    they include, and ``input_before_edit``/``output_before_edit`` hold the values before them.
    ``attention_mask`` is the mask the model was called with (``None`` if it was not given).

    Example:
        >>> rec = Record("block[0]", (torch.ones(1, 2, 4),), {}, (torch.zeros(1, 2, 4), None))
        >>> rec.output.shape, rec.input.sum().item(), rec.edits
        (torch.Size([1, 2, 4]), 8.0, ())
    """

    __slots__ = (
        "_args",
        "_input",
        "_input_before",
        "_kwargs",
        "_later",
        "_output",
        "_output_before",
        "_positions",
        "_ran",
        "_raw_kept",
        "_raw_output",
        "attention_mask",
        "edits",
        "key",
    )

    def __init__(
        self,
        key: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        raw_output: Any,
        *,
        input_kwarg: str = "hidden_states",
        output_index: int = 0,
        transform: Transform | None = None,
        ran: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        note: EditNote | None = None,
        keep_raw: bool = True,
    ) -> None:
        self.key = key
        self._ran = raw_output is not None if ran is None else ran
        inp = input_of(args, kwargs, input_kwarg)
        out = hidden_of(raw_output, output_index) if self._ran else None
        inp_before, out_before = inp, out
        edits: tuple[str, ...] = ()
        if note is not None:
            if note.input_edits:
                inp_before = note.input_before
                edits += note.input_edits
            if note.output_edits and self._ran:
                out_before = note.output_before
                edits += note.output_edits
        active = transform is not None and transform.active
        if active:
            assert transform is not None
            new_inp = transform(inp, attention_mask)
            new_out = transform(out, attention_mask)
            inp_before = new_inp if inp_before is inp else transform(inp_before, attention_mask)
            out_before = new_out if out_before is out else transform(out_before, attention_mask)
            inp, out = new_inp, new_out
        self._input, self._output = inp, out
        self._input_before, self._output_before = inp_before, out_before
        self._positions = active and transform is not None and transform.positions is not None
        self._raw_kept = keep_raw
        self._args = args if keep_raw else ()
        self._kwargs = kwargs if keep_raw else {}
        self._raw_output = raw_output if keep_raw else None
        self.attention_mask = attention_mask
        self.edits = edits
        # Later calls only: a list holding the record itself would be a reference cycle,
        # freed by the garbage collector instead of at once, keeping its tensors alive.
        self._later: list[Record] = []

    @property
    def steps(self) -> list[Record]:
        """The record of every call during the capture (one per generation step), this first."""
        return [self, *self._later]

    def add_step(self, record: Record) -> None:
        """Append the record of a later call of the same module (the capture does this).

        Example:
            >>> rec = Record("b", (torch.ones(1, 3, 2),), {}, torch.zeros(1, 3, 2))
            >>> rec.add_step(Record("b", (torch.ones(1, 1, 2),), {}, torch.ones(1, 1, 2)))
            >>> len(rec.steps)
            2
        """
        self._later.append(record)

    def _raw(self, name: str, value: Any) -> Any:
        if not self._raw_kept:
            raise CaptureError(
                f"{self.key}.{name} was not kept: a capture with detach/device/dtype/positions "
                "drops the raw call to free memory; pass keep_raw=True to capture() to keep it"
            )
        return value

    @property
    def args(self) -> tuple[Any, ...]:
        """The positional arguments exactly as the forward hook saw them."""
        return self._raw("args", self._args)  # type: ignore[no-any-return]

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments exactly as the forward hook saw them."""
        return self._raw("kwargs", self._kwargs)  # type: ignore[no-any-return]

    @property
    def raw_output(self) -> Any:
        """What the module returned (tuple, tensor or model output), as the hook saw it."""
        return self._raw("raw_output", self._raw_output)

    @property
    def input(self) -> Any:
        """The hidden-state input (first positional argument, or its keyword)."""
        return self._input

    @property
    def output(self) -> Any:
        """The hidden-state output tensor, whatever the module returns."""
        if not self._ran:
            raise CaptureError(
                f"{self.key} was recorded before it ran (input only, e.g. an early stop before "
                "it): read .input, or capture it without stopping there"
            )
        return self._output

    @property
    def input_before_edit(self) -> Any:
        """The input before any edit of this module's input (``input`` itself if none)."""
        return self._input_before

    @property
    def output_before_edit(self) -> Any:
        """The output before any edit of this module's output (``output`` itself if none)."""
        if not self._ran:
            return self.output  # raises: the module never ran
        return self._output_before

    def _side(self, side: str) -> Any:
        if side not in ("input", "output"):
            raise CaptureError(f"side must be 'input' or 'output', got {side!r}")
        return self.input if side == "input" else self.output

    def concat(self, side: str = "output") -> torch.Tensor:
        """One tensor over every step: the steps joined along the position axis.

        During ``generate`` with a KV cache the first step holds every prompt position and each
        later step one new position; joined they cover the whole generated sequence (except the
        last token, which ``generate`` never feeds back).

        Example:
            >>> rec = Record("b", (torch.ones(1, 3, 2),), {}, torch.zeros(1, 3, 2))
            >>> rec.add_step(Record("b", (torch.ones(1, 1, 2),), {}, torch.ones(1, 1, 2)))
            >>> rec.concat().shape
            torch.Size([1, 4, 2])
        """
        values = [step._side(side) for step in self.steps]
        if not all(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in values):
            raise CaptureError(f"{self.key}.{side} is not a [batch, seq, ...] tensor at every step")
        shapes = {(v.shape[0], *v.shape[2:]) for v in values}
        if len(shapes) > 1:
            raise CaptureError(
                f"the steps of {self.key} differ in batch or hidden size ({sorted(shapes)}): "
                "join them by hand (beam search reorders and resizes the batch between steps)"
            )
        return torch.cat(values, dim=1)

    def _check_full(self, what: str) -> None:
        if self._positions:
            raise CaptureError(
                f"{what} needs every position, but {self.key} was captured with positions=...: "
                "capture without positions (or with positions='last')"
            )

    def last_token(self, side: str = "output") -> torch.Tensor:
        """``[batch, ...]``: each example's value at its last real token (either padding side).

        Reads the attention mask the model was called with; without one, the last position.

        Example:
            >>> h = torch.arange(6.0).reshape(2, 3, 1)
            >>> rec = Record("b", (h,), {}, h, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
            >>> rec.last_token().flatten().tolist()
            [1.0, 5.0]
        """
        self._check_full("last_token()")
        value: torch.Tensor = self._side(side)
        index = call_positions(self.attention_mask, value.shape[0], value.shape[1], value.device)
        return value[torch.arange(value.shape[0], device=value.device), index]

    def real_tokens(self, side: str = "output") -> list[torch.Tensor]:
        """Each example's values at its real (unpadded) tokens: a list of ``[n_i, ...]``.

        Example:
            >>> h = torch.arange(6.0).reshape(2, 3, 1)
            >>> rec = Record("b", (h,), {}, h, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
            >>> [t.flatten().tolist() for t in rec.real_tokens()]
            [[1.0, 2.0], [3.0, 4.0, 5.0]]
        """
        self._check_full("real_tokens()")
        value = self._side(side)
        mask = self.attention_mask
        if mask is None:
            return list(value)
        local = mask[:, -value.shape[1] :]
        return [
            row[index.to(row.device)]
            for row, index in zip(value, real_token_positions(local), strict=True)
        ]

    def __repr__(self) -> str:
        def shape(value: Any) -> str:
            return (
                str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
            )

        return (
            f"Record({self.key!r}, input={shape(self._input)}, output={shape(self._output)}, "
            f"steps={len(self.steps)})"
        )


class StopForward(Exception):
    """Raised inside a forward to end it early once a capture has everything it needs."""

    def __init__(self, capture: Capture) -> None:
        super().__init__("introspect early stop")
        self.capture = capture


KeyFn = Callable[[str], str]


class Capture:
    """A context manager that records ``Target``s while a forward (or ``generate``) runs.

    Built by :meth:`introspect.Inspector.capture`; index it with a locator string.
    Given a ``root`` module (the model), it also keeps the ``attention_mask`` each call of the
    root received, so records of a padded batch know which tokens are real.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> with Capture([Target("lin", lin)]) as cap:
        ...     _ = lin(torch.ones(1, 2))
        >>> cap["lin"].output.shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        stop: bool = False,
        transform: Transform | None = None,
        key_fn: KeyFn | None = None,
        root: nn.Module | None = None,
        keep_raw: bool = True,
    ) -> None:
        self.targets = list(targets)
        self.stop = stop
        self.transform = transform
        self.records: dict[str, Record] = {}
        self.stopped = False
        self.attention_mask: torch.Tensor | None = None
        """The attention mask of the latest call of the root (``None`` if none was given)."""
        self.root = root
        self.keep_raw = keep_raw
        self._key_fn = key_fn
        self._handles: list[RemovableHandle] = []
        self._depths: dict[int, list[int]] = {}
        self._active = False

    def _make_hook(self, target: Target) -> Callable[..., Any]:
        records = self.records
        transform = self.transform
        total = len({t.key for t in self.targets})
        key = target.key
        module_dict = target.module.__dict__
        input_kwarg = target.input_kwarg
        output_index = target.output_index
        stop = self.stop
        keep_raw = self.keep_raw
        copy_output = target.copy_output

        def keep(args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, ran: bool) -> None:
            # An active edit wraps the module's forward; only then is there a note to read.
            note = None
            if "forward" in module_dict:
                note = getattr(module_dict["forward"], "edit_note", None)
            rec = Record(
                key,
                args,
                kwargs,
                output,
                input_kwarg=input_kwarg,
                output_index=output_index,
                transform=transform,
                ran=ran,
                attention_mask=self.attention_mask,
                note=note if isinstance(note, EditNote) else None,
                keep_raw=keep_raw,
            )
            first = records.get(key)
            if first is None:
                records[key] = rec
                if stop and len(records) == total:
                    self.stopped = True
                    raise StopForward(self)
            else:
                first.add_step(rec)

        if target.needs_output:

            def forward_hook(
                module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
            ) -> None:
                keep(args, kwargs, copy_tensors(output) if copy_output else output, True)

            return forward_hook

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            keep(args, kwargs, None, False)

        return pre_hook

    def _mask_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def __enter__(self) -> Capture:
        if self._active:
            raise CaptureError("this capture is already active: start a new one with capture()")
        self._active = True
        self.records.clear()
        self.stopped = False
        self.attention_mask = None
        try:
            if self.root is not None:
                self._handles.append(
                    self.root.register_forward_pre_hook(self._mask_hook, with_kwargs=True)
                )
            for target in self.targets:
                hook = self._scoped(target, self._make_hook(target))
                if target.needs_output:
                    handle = target.module.register_forward_hook(hook, with_kwargs=True)
                else:
                    handle = target.module.register_forward_pre_hook(hook, with_kwargs=True)
                self._handles.append(handle)
        except BaseException:
            self._remove()
            raise
        return self

    def _scoped(self, target: Target, hook: Callable[..., Any]) -> Callable[..., Any]:
        # A module shared by several stacks (one embedding for encoder and decoder) must not
        # record the other stack's calls: count how deep we are inside the target's stack.
        within = target.within
        if within is None:
            return hook
        depth = self._depths.get(id(within))
        if depth is None:
            depth = self._depths[id(within)] = [0]

            def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                depth[0] += 1

            def leave(
                module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
            ) -> None:
                depth[0] -= 1

            self._handles.append(within.register_forward_pre_hook(enter, with_kwargs=True))
            self._handles.append(
                within.register_forward_hook(leave, with_kwargs=True, always_call=True)
            )

        def scoped(module: nn.Module, *rest: Any) -> Any:
            return hook(module, *rest) if depth[0] > 0 else None

        return scoped

    def _remove(self) -> None:
        self._depths.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._remove()
        return isinstance(exc, StopForward) and exc.capture is self

    def _key(self, locator: str) -> str:
        return self._key_fn(locator) if self._key_fn is not None else locator

    def __getitem__(self, locator: str) -> Record:
        key = self._key(locator)
        try:
            return self.records[key]
        except KeyError:
            known = [t.key for t in self.targets]
            if key not in known:
                raise CaptureError(
                    f"{locator!r} was not captured; this capture recorded: {', '.join(known)}"
                ) from None
            raise CaptureError(
                f"{locator!r} was captured but its module never ran: run the model inside the "
                "'with' block"
            ) from None

    def __contains__(self, locator: object) -> bool:
        return isinstance(locator, str) and self._key(locator) in self.records

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def keys(self) -> list[str]:
        """The module keys recorded so far, in the order their modules first ran."""
        return list(self.records)

    @staticmethod
    def _side(locator: str) -> str:
        return "input" if locator.strip().endswith(".input") else "output"

    def concat(self, locator: str) -> torch.Tensor:
        """One tensor over every step of ``locator`` (``.input`` for the input side).

        During ``generate`` the first step holds the prompt and each later step one token: the
        result is ``[batch, prompt + new - 1, hidden]``.

        Example:
            >>> lin = nn.Linear(2, 2)
            >>> with Capture([Target("lin", lin)]) as cap:
            ...     _ = lin(torch.ones(1, 3, 2)), lin(torch.ones(1, 1, 2))
            >>> cap.concat("lin").shape
            torch.Size([1, 4, 2])
        """
        return self[locator].concat(self._side(locator))

    def steps(self, locator: str) -> list[torch.Tensor]:
        """The value of ``locator`` (``.input`` for the input side) at every step, in order.

        Example:
            >>> lin = nn.Linear(2, 2)
            >>> with Capture([Target("lin", lin)]) as cap:
            ...     _ = lin(torch.ones(1, 3, 2)), lin(torch.ones(1, 1, 2))
            >>> [tuple(t.shape) for t in cap.steps("lin")]
            [(1, 3, 2), (1, 1, 2)]
        """
        side = self._side(locator)
        return [step._side(side) for step in self[locator].steps]

    def last_token(self, locator: str) -> torch.Tensor:
        """Each example's value at its last real token (``[batch, hidden]``), either padding side.

        Example:
            >>> lin = nn.Linear(2, 2)
            >>> with Capture([Target("lin", lin)]) as cap:
            ...     _ = lin(torch.ones(2, 3, 2))
            >>> cap.last_token("lin").shape
            torch.Size([2, 2])
        """
        return self[locator].last_token(self._side(locator))

    def real_tokens(self, locator: str) -> list[torch.Tensor]:
        """Each example's values at its real (unpadded) tokens: a list of ``[n_i, hidden]``.

        Example:
            >>> lin = nn.Linear(2, 2)
            >>> with Capture([Target("lin", lin)]) as cap:
            ...     _ = lin(torch.ones(2, 3, 2))
            >>> [tuple(t.shape) for t in cap.real_tokens("lin")]
            [(3, 2), (3, 2)]
        """
        return self[locator].real_tokens(self._side(locator))
