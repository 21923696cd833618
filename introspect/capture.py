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

from introspect.errors import CaptureError

if TYPE_CHECKING:
    from types import TracebackType

    from torch.utils.hooks import RemovableHandle

__all__ = ["Capture", "Record", "StopForward", "Target", "hidden_of"]


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
    positions: Sequence[int] | slice | None = None

    @property
    def active(self) -> bool:
        return (
            self.detach
            or self.device is not None
            or self.dtype is not None
            or (self.positions is not None)
        )

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if self.positions is not None and value.dim() >= 2:
            index = self.positions
            value = value[:, index] if isinstance(index, slice) else value[:, list(index)]
        if self.detach:
            value = value.detach()
        if self.device is not None or self.dtype is not None:
            value = value.to(device=self.device, dtype=self.dtype)
        return value


class Record:
    """What one module received and returned in one call.

    ``args``, ``kwargs`` and ``raw_output`` are exactly what the forward hook saw; ``input``
    and ``output`` are the hidden-state tensors inside them, whatever the container (a block
    returns a tuple on transformers 4.x and a tensor on 5.x: ``output`` is the tensor on both).
    ``steps`` lists the record of every call during the capture (one per generation step),
    this one first.

    Example:
        >>> rec = Record("block[0]", (torch.ones(1, 2, 4),), {}, (torch.zeros(1, 2, 4), None))
        >>> rec.output.shape, rec.input.sum().item()
        (torch.Size([1, 2, 4]), 8.0)
    """

    __slots__ = ("_input", "_output", "args", "key", "kwargs", "raw_output", "steps")

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
    ) -> None:
        self.key = key
        self.args = args
        self.kwargs = kwargs
        self.raw_output = raw_output
        inp = input_of(args, kwargs, input_kwarg)
        out = hidden_of(raw_output, output_index) if raw_output is not None else None
        if transform is not None and transform.active:
            inp, out = transform(inp), transform(out)
        self._input = inp
        self._output = out
        self.steps: list[Record] = [self]

    @property
    def input(self) -> Any:
        """The hidden-state input (first positional argument, or its keyword)."""
        return self._input

    @property
    def output(self) -> Any:
        """The hidden-state output tensor, whatever the module returns."""
        if self.raw_output is None and self._output is None:
            raise CaptureError(
                f"{self.key} was recorded before it ran (input only, e.g. an early stop before "
                "it): read .input, or capture it without stopping there"
            )
        return self._output

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
    ) -> None:
        self.targets = list(targets)
        self.stop = stop
        self.transform = transform
        self.records: dict[str, Record] = {}
        self.stopped = False
        self._key_fn = key_fn
        self._handles: list[RemovableHandle] = []
        self._depths: dict[int, list[int]] = {}
        self._active = False

    def _make_hook(self, target: Target) -> Callable[..., Any]:
        records = self.records
        transform = self.transform
        total = len({t.key for t in self.targets})
        key = target.key
        input_kwarg = target.input_kwarg
        output_index = target.output_index
        stop = self.stop
        copy_output = target.copy_output

        def keep(args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            rec = Record(
                key,
                args,
                kwargs,
                output,
                input_kwarg=input_kwarg,
                output_index=output_index,
                transform=transform,
            )
            first = records.get(key)
            if first is None:
                records[key] = rec
                if stop and len(records) == total:
                    self.stopped = True
                    raise StopForward(self)
            else:
                first.steps.append(rec)

        if target.needs_output:

            def forward_hook(
                module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
            ) -> None:
                keep(args, kwargs, copy_tensors(output) if copy_output else output)

            return forward_hook

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            keep(args, kwargs, None)

        return pre_hook

    def __enter__(self) -> Capture:
        if self._active:
            raise CaptureError("this capture is already active: start a new one with capture()")
        self._active = True
        self.records.clear()
        self.stopped = False
        try:
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
