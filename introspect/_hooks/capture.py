"""Captures: record what modules receive and return while the model runs.

A :class:`Capture` is one use of the hook engine (:class:`~introspect._hooks.session.HookSession`),
edits the other: it adds one forward hook (or pre-hook) per ``Target`` and keeps a
:class:`Record` of each call. Hooks are removed on every exit path; a capture with
``stop=True`` ends the forward as soon as every target has been recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from introspect._batching import (
    call_positions,
    gather_positions,
    later_call_index,
    position_index,
    real_token_positions,
)
from introspect._errors import CaptureError
from introspect._hooks.session import (
    CACHE_ARGS,
    EditNote,
    HookSession,
    ModelCall,
    Target,
    cache_offset,
    call_argument,
    call_attention_mask,
    call_index,
    call_state,
    check_not_compiled,
    copy_tensors,
    edit_note,
    elsewhere,
    enter_uses,
    hidden_of,
    input_device,
    input_of,
    model_changed_message,
    onloaded,
    settle_offloaded,
    stale_targets,
    tensor_version,
)
from introspect._locators import Locator, query_key_site

if TYPE_CHECKING:
    from types import TracebackType

    from introspect._model.paths import Chain

# The engine's names stay importable from here, where they were defined first.
__all__ = [
    "CACHE_ARGS",
    "Capture",
    "EditNote",
    "Record",
    "StopForward",
    "Target",
    "cache_offset",
    "call_argument",
    "call_attention_mask",
    "call_index",
    "call_state",
    "capture_targets",
    "check_not_compiled",
    "edit_note",
    "enter_uses",
    "hidden_of",
    "input_device",
    "model_changed_message",
    "onloaded",
    "settle_offloaded",
    "stale_targets",
    "tensor_version",
]


_DEVICE_FORMS = "'cpu', 'cuda', 'cuda:0', 'mps', or a torch.device"


def _parse_device(device: object) -> torch.device | None:
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise CaptureError(
            f"device must be a string or a torch.device, got {type(device).__name__}: use "
            f"{_DEVICE_FORMS}"
        )
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise CaptureError(f"device {device!r} is not a device: use {_DEVICE_FORMS}") from None
    if parsed.type == "meta":
        raise CaptureError(
            "device 'meta' holds no values: records moved there could not be read; use "
            f"{_DEVICE_FORMS}"
        )
    if parsed.type == "cuda" and (
        not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()
    ):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise CaptureError(
            f"device {device!r} is not available here ({count} CUDA devices): use 'cpu'"
            + (f" or 'cuda:0'..'cuda:{count - 1}'" if count else "")
        )
    return parsed


def _parse_dtype(dtype: object) -> torch.dtype | None:
    if dtype is None:
        return None
    parsed = dtype
    if isinstance(dtype, str):
        parsed = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(parsed, torch.dtype) or not parsed.is_floating_point:
        raise CaptureError(
            f"dtype {dtype!r} is not a floating-point torch dtype: hidden states would be "
            "truncated; use torch.float16, torch.bfloat16, torch.float32 (or their names, "
            "e.g. 'bfloat16')"
        )
    return parsed


@dataclass(frozen=True)
class Transform:
    """What to do with captured ``input``/``output`` tensors before keeping them."""

    detach: bool = False
    device: torch.device | str | None = None
    """Parsed into a ``torch.device`` when built; an unknown or unavailable one is an error."""
    dtype: torch.dtype | str | None = None
    """A floating-point ``torch.dtype`` or its name (``"bfloat16"``), converted when built."""
    positions: Any = None
    """See :func:`introspect._batching.position_index` (``"last"``: each example's last real
    token, read from the attention mask of the call)."""

    def __post_init__(self) -> None:
        # Checked here, before the model runs: a bad value found inside a hook would surface
        # as a foreign error from the middle of the forward.
        object.__setattr__(self, "device", _parse_device(self.device))
        object.__setattr__(self, "dtype", _parse_dtype(self.dtype))

    @property
    def active(self) -> bool:
        return (
            self.detach
            or self.device is not None
            or self.dtype is not None
            or (self.positions is not None)
        )

    def __call__(
        self,
        value: Any,
        attention_mask: torch.Tensor | None = None,
        offset: int | None = 0,
        cached: bool = False,
    ) -> Any:
        """``value`` transformed. ``offset`` is the number of tokens before this call and
        ``cached`` whether it runs with a KV cache: then non-negative positions count in the
        whole sequence, as edits count them (a position beyond this call is a later step's)."""
        if not isinstance(value, torch.Tensor):
            return value
        if self.positions is not None and value.dim() >= 2:
            batch, seq = value.shape[0], value.shape[1]
            index: list[int] | torch.Tensor | None
            if (cached or offset != 0) and not isinstance(self.positions, str):
                index = later_call_index(self.positions, batch, seq, offset, value.device)
            else:
                index = position_index(self.positions, batch, seq, attention_mask, value.device)
            if index is not None:
                value = gather_positions(value, index)
        if self.detach:
            value = value.detach()
        if self.device is not None or self.dtype is not None:
            value = value.to(device=self.device, dtype=cast("torch.dtype | None", self.dtype))
        return value


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
        "_call",
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
        "_unjoinable",
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
        call: ModelCall | None = None,
        unjoinable: str | None = None,
        output_is_input: bool = False,
    ) -> None:
        self.key = key
        self._call = call
        self._unjoinable = unjoinable
        self._ran = raw_output is not None if ran is None else ran
        inp = input_of(args, kwargs, input_kwarg)
        out = hidden_of(raw_output, output_index) if self._ran else None
        inp_before, out_before = inp, out
        edits: tuple[str, ...] = ()
        if note is not None:
            if note.input_edits:
                inp_before = note.input_before
                edits += note.input_edits
            if note.output_edits and self._ran and not output_is_input:
                out_before = note.output_before
                edits += note.output_edits
        if output_is_input:
            # The value is what the module receives (the MLP's post): both sides hold it.
            out, out_before = inp, inp_before
        active = transform is not None and transform.active
        if active:
            assert transform is not None
            offset: int | None = 0
            cached = call is not None and call.cached
            if transform.positions is not None and call is not None:
                offset = call.offset  # reads cache_position only when positions need it
            new_inp = transform(inp, attention_mask, offset, cached)
            new_out = transform(out, attention_mask, offset, cached)
            if inp_before is not inp:
                inp_before = transform(inp_before, attention_mask, offset, cached)
            else:
                inp_before = new_inp
            if out_before is not out:
                out_before = transform(out_before, attention_mask, offset, cached)
            else:
                out_before = new_out
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

        Joining is refused (:class:`~introspect._errors.CaptureError`) where it would not be one
        sequence per row: a step that does not start where the previous one ended (no KV
        cache, ``use_cache=False``; or two independent forwards), a changed batch, or cache
        rows reordered between steps (beam search). Records of a capture without a root model
        carry no call information and are joined as they are.

        Example:
            >>> rec = Record("b", (torch.ones(1, 3, 2),), {}, torch.zeros(1, 3, 2))
            >>> rec.add_step(Record("b", (torch.ones(1, 1, 2),), {}, torch.ones(1, 1, 2)))
            >>> rec.concat().shape
            torch.Size([1, 4, 2])
        """
        steps = self.steps
        if self._unjoinable is not None and len(steps) > 1:
            raise CaptureError(
                f"cannot join the steps of {self.key}: {self._unjoinable}; {_STEPS_INSTEAD}"
            )
        values = [step._side(side) for step in steps]
        if not all(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in values):
            raise CaptureError(f"{self.key}.{side} is not a [batch, seq, ...] tensor at every step")
        for number in range(1, len(steps)):
            _check_continues(self.key, number, steps[number - 1], steps[number], values)
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


_STEPS_INSTEAD = (
    "read the steps one by one with cap.steps(...), or use generate(..., "
    "output_hidden_states=True, return_dict_in_generate=True)"
)


def _check_continues(
    key: str, number: int, previous: Record, step: Record, values: list[Any]
) -> None:
    """Raise unless ``step`` continues ``previous`` position by position, row by row."""
    before, call = previous._call, step._call
    if before is None or call is None:
        return  # recorded without a root: nothing is known about the calls
    where = f"step {number} of {key}"
    if call is before:
        raise CaptureError(
            f"{where} comes from the same forward as step {number - 1}: the module ran twice in "
            f"one call of the model, so its steps are not consecutive positions; {_STEPS_INSTEAD}"
        )
    seq = before.seq if before.seq is not None else values[number - 1].shape[1]
    start, previous_start = call.offset, before.offset
    end = previous_start + seq if previous_start is not None else None
    if start == 0:
        raise CaptureError(
            f"{where} starts again at position 0 instead of continuing step {number - 1}: the "
            "model ran without a KV cache (use_cache=False recomputes every position at each "
            "step) or ran twice independently in one capture, so joining would repeat "
            "positions. Read cap.steps(...) instead: without a cache, the last step already "
            "holds every position"
        )
    if start is None or end is None:
        raise CaptureError(
            f"cannot join the steps of {key}: the model's cache ({call.cache_type}) does not "
            f"say where each step starts, so they may not be one sequence; {_STEPS_INSTEAD}"
        )
    if start != end:
        raise CaptureError(
            f"{where} starts at position {start}, not where step {number - 1} ended ({end}): "
            f"the steps are not one sequence (a cache cropped or reused?); {_STEPS_INSTEAD}"
        )
    batch = call.batch if call.batch is not None else values[number].shape[0]
    previous_batch = before.batch if before.batch is not None else values[number - 1].shape[0]
    if batch != previous_batch:
        raise CaptureError(
            f"{where} has a batch of {batch}, step {number - 1} of {previous_batch}: rows "
            f"do not line up across steps; {_STEPS_INSTEAD}"
        )
    if call.same_rows_as is not None and call.same_rows_as == before.index:
        return  # this step began with the very cache rows the previous one left
    if before.after is None or call.before is None:
        if batch <= 1:
            return  # a single row cannot be reordered
        raise CaptureError(
            f"cannot join the steps of {key}: the model's cache ({call.cache_type}) is not one "
            "the capture can read, so it cannot check that each row of the batch kept its "
            f"history between steps (beam search reorders them); {_STEPS_INSTEAD}"
        )
    if not torch.equal(before.after, call.before.to(before.after.device)):
        raise CaptureError(
            f"cannot join the steps of {key}: the rows of the KV cache were reordered between "
            f"step {number - 1} and step {number} (beam search moves its beams between steps, "
            "which a capture cannot follow), so row i of a later step does not continue row i "
            "of an earlier one. Read the steps one by one with cap.steps(...), or follow each "
            "returned beam with generate(..., num_beams=..., output_hidden_states=True, "
            "return_dict_in_generate=True) and its beam_indices"
        )


class StopForward(Exception):
    """Raised inside a forward to end it early once a capture has everything it needs."""

    def __init__(self, capture: Capture) -> None:
        super().__init__("introspect early stop")
        self.capture = capture


KeyFn = Callable[[str], str]


def capture_targets(
    locators: Sequence[Locator],
    target: Callable[[Locator, bool], Target],
    stop: bool,
    positions: Any,
) -> list[Target]:
    """One target per module the locators name, recording its output where any locator (or
    the whole run, without ``stop``) needs it; ``target`` resolves one locator.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> locs = [Locator.parse("block[0].input"), Locator.parse("block[0]")]
        >>> [t.key for t in capture_targets(locs, lambda l, o: Target(l.module_key, lin), True, None)]
        ['block[0]']
    """
    by_key: dict[str, Target] = {}
    for loc in locators:
        needs_output = loc.side == "output" or not stop
        key = loc.module_key
        if key in by_key:
            if needs_output and not by_key[key].needs_output:
                by_key[key] = target(loc, True)
            continue
        by_key[key] = target(loc, needs_output)
    if positions is not None:
        patterns = [str(loc) for loc in locators if query_key_site(loc)]
        if patterns:
            raise CaptureError(
                f"positions= selects tokens on the sequence axis, which {patterns[0]} "
                "([batch, heads, query, key]) does not have first: capture it whole and "
                "index its query axis (value[:, :, -1])"
            )
    return list(by_key.values())


class Capture(HookSession):
    """A context manager that records ``Target``s while a forward (or ``generate``) runs.

    Built by :meth:`introspect.Inspector.capture`; index it with a locator string.
    Given a ``root`` module (the model), it also keeps the ``attention_mask`` each call of the
    root received (by keyword or positionally), so records of a padded batch know which tokens
    are real, and where each call's positions start, so :meth:`concat` can refuse steps that
    are not one sequence. ``model`` (the whole model, when ``root`` is a part of it) is only
    watched: a compiled model is refused, and a run that reached none of the hooks is named.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> with Capture([Target("lin", lin)]) as cap:
        ...     _ = lin(torch.ones(1, 2))
        >>> cap["lin"].output.shape
        torch.Size([1, 2])
    """

    what = "capture"
    error = CaptureError
    checksum = True

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        stop: bool = False,
        transform: Transform | None = None,
        key_fn: KeyFn | None = None,
        root: nn.Module | None = None,
        keep_raw: bool = True,
        model: nn.Module | None = None,
        expand_fn: Callable[[str], list[str]] | None = None,
        links: Chain | None = None,
    ) -> None:
        super().__init__(targets, root=root, model=model, links=links)
        self._expand_fn = expand_fn
        self.stop = stop
        self.transform = transform
        self.records: dict[str, Record] = {}
        self.stopped = False
        self.keep_raw = keep_raw
        self._key_fn = key_fn

    def _reset(self) -> None:
        self.records.clear()
        self.stopped = False

    def _install(self, owner: int) -> None:
        self._total = len({t.key for t in self.targets})
        for target in self.targets:
            hook = self._make_hook(target, owner)
            if target.needs_output and not target.reads_input:
                handle = target.module.register_forward_hook(hook, with_kwargs=True)
            else:
                handle = target.module.register_forward_pre_hook(hook, with_kwargs=True)
            self._handles.append(handle)

    def _make_hook(self, target: Target, owner: int) -> Callable[..., Any]:
        """The hook that records ``target`` in the thread ``owner`` only (see
        :func:`~introspect._hooks.session.elsewhere`)."""
        records = self.records
        transform = self.transform
        total = self._total
        key = target.key
        module = target.module
        input_kwarg = target.input_kwarg
        output_index = target.output_index
        stop = self.stop
        keep_raw = self.keep_raw
        copy_output = target.copy_output
        # Inside a stack (encoder, decoder) its own call says which tokens are real and where
        # the positions start; elsewhere the model's call does. A module several stacks share
        # (one embedding for encoder and decoder) records only its own stack's calls.
        within = target.within
        scope = self.scope(within)

        reads_input = target.reads_input

        def keep(args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, ran: bool) -> None:
            if within is not None and scope is not None and scope.depth == 0:
                return
            call = scope.last if scope is not None else None
            rec = Record(
                key,
                args,
                kwargs,
                output,
                input_kwarg=input_kwarg,
                output_index=output_index,
                transform=transform,
                ran=ran,
                attention_mask=call.attention_mask if call is not None else None,
                note=edit_note(module),
                keep_raw=keep_raw,
                call=call,
                unjoinable=target.unjoinable,
                output_is_input=reads_input,
            )
            first = records.get(key)
            if first is None:
                records[key] = rec
                if stop and len(records) == total:
                    self.stopped = True
                    raise StopForward(self)
            else:
                first.add_step(rec)

        if target.needs_output and not reads_input:

            def forward_hook(
                module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
            ) -> None:
                if elsewhere(owner):
                    return  # another thread's forward
                keep(args, kwargs, copy_tensors(output) if copy_output else output, True)

            return forward_hook

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if elsewhere(owner):
                return
            keep(args, kwargs, None, reads_input)

        return pre_hook

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        super().__exit__(exc_type, exc, tb)
        return isinstance(exc, StopForward) and exc.capture is self

    def _key(self, locator: str) -> str:
        return self._key_fn(locator) if self._key_fn is not None else locator

    def __repr__(self) -> str:
        steps = {key: len(rec.steps) for key, rec in self.records.items()}
        recorded = ", ".join(
            f"{k!r}" + (f" ({n} steps)" if n > 1 else "") for k, n in steps.items()
        )
        stop = f"stop=True, stopped={self.stopped}" if self.stop else "stop=False"
        return (
            f"Capture(targets={[t.key for t in self.targets]}, "
            f"{'active' if self.active else 'inactive'}, recorded=[{recorded}], {stop})"
        )

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
            if self.model_calls and (self.root_scope is None or not self.root_scope.number):
                raise CaptureError(
                    f"{locator!r} recorded nothing although the model ran: the model is "
                    "compiled (torch.compile), and a compiled graph never runs hooks added after "
                    "compilation. Call the uncompiled model (compiled._orig_mod), or run it "
                    "eagerly inside the block: with torch.compiler.set_stance('force_eager'): "
                    "model(...)"
                ) from None
            raise CaptureError(
                f"{locator!r} was captured but its module never ran: run the model inside the "
                "'with' block (if it did run, is it a torch.compile'd copy? a compiled graph "
                "skips hooks added after compilation: call the uncompiled model)"
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

    def stack(self, locator: str | Sequence[str]) -> torch.Tensor:
        """The values of several records as one tensor, stacked on a new first axis.

        ``locator`` names several records at once (``"block[:]"``, ``"block[2:5].attn"``,
        ``"block[:].input"``) or is a list of locators, in order: the result is ``[records,
        batch, seq, hidden]`` (TransformerLens's ``stack_activation``). Every value must have
        one shape; a generation's later steps are not included (use :meth:`concat` per record).

        Example:
            >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
            >>> with Capture([Target("a", a), Target("b", b)]) as cap:
            ...     _ = b(a(torch.ones(1, 3, 2)))
            >>> cap.stack(["a", "b"]).shape
            torch.Size([2, 1, 3, 2])
        """
        names = [locator] if isinstance(locator, str) else list(locator)
        expanded: list[str] = []
        for name in names:
            expanded += self._expand_fn(name) if self._expand_fn is not None else [name]
        if not expanded:
            raise CaptureError(f"{locator!r} names no record to stack")
        values = [self[name]._side(self._side(name)) for name in expanded]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            found = ", ".join(
                f"{n} {tuple(v.shape)}" for n, v in zip(expanded, values, strict=True)
            )
            raise CaptureError(
                f"cannot stack values of different shapes ({found}): stack records of one kind"
            )
        return torch.stack(values)

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
