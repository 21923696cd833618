"""The hook engine: records what modules receive and return, and always cleans up.

It knows nothing about architectures: the Inspector hands it ``Target``s (a key, a module and
how to find the hidden state in its arguments and output). Hooks are removed on every exit
path; a capture with ``stop=True`` ends the forward as soon as every target has been recorded.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from threading import get_ident
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

if TYPE_CHECKING:
    from types import TracebackType

    from torch.utils.hooks import RemovableHandle

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
    "check_not_compiled",
    "edit_note",
    "enter_uses",
    "hidden_of",
    "input_device",
    "model_changed_message",
    "onloaded",
    "only_in_thread",
    "settle_offloaded",
    "stale_targets",
    "tensor_version",
]


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


# Positional index of each parameter of a forward, per forward function. A pure cache of a
# function's signature (weak keys: it never keeps a model's code alive); reading a signature
# costs tens of microseconds, too much to pay on every call of a hook.
_PARAM_INDEX: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _param_index(module: nn.Module) -> dict[str, int]:
    forward = module.forward
    func = getattr(forward, "__func__", forward)
    try:
        return _PARAM_INDEX[func]
    except (KeyError, TypeError):
        pass
    index: dict[str, int] = {}
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    for position, param in enumerate(params):
        if param.kind not in _POSITIONAL:
            break
        index[param.name] = position
    # A builtin is not weakly referenceable: its signature is read again next time.
    with contextlib.suppress(TypeError):
        _PARAM_INDEX[func] = index
    return index


def _argument(
    index: dict[str, int], args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> Any:
    value = kwargs.get(name)
    if value is None:
        position = index.get(name)
        if position is not None and position < len(args):
            value = args[position]
    return value


def call_index(module: nn.Module) -> dict[str, int]:
    """Where each positional argument of ``module``'s forward lands (read once per function).

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, x, scale=None):
        ...         return x
        >>> call_index(Net())
        {'x': 0, 'scale': 1}
    """
    return _param_index(module)


def call_argument(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> Any:
    """The argument ``name`` of one call of ``module``, passed by keyword or positionally.

    Reads the forward's signature (once per forward function) to know where a positional
    argument lands. ``None`` when the call did not pass it.

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, x, scale=None):
        ...         return x
        >>> call_argument(Net(), (1, 2), {}, "scale"), call_argument(Net(), (1,), {}, "scale")
        (2, None)
    """
    return _argument(_param_index(module), args, kwargs, name)


def call_attention_mask(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """The ``attention_mask`` one call of ``module`` received, by keyword or positionally.

    Hugging Face models take the mask as a keyword or as a positional argument
    (``LlamaModel(ids, mask)``); forward pre-hooks see both forms. Returns the tensor as
    passed (any shape), or ``None`` when the call has none.

    Example:
        >>> from transformers import LlamaConfig, LlamaModel
        >>> model = LlamaModel(LlamaConfig(num_hidden_layers=1, hidden_size=16,
        ...     intermediate_size=32, num_attention_heads=2, vocab_size=32))
        >>> mask = torch.tensor([[1, 1, 0]])
        >>> call_attention_mask(model, (torch.tensor([[1, 2, 3]]), mask), {}) is mask
        True
    """
    mask = _argument(_param_index(module), args, kwargs, "attention_mask")
    return mask if isinstance(mask, torch.Tensor) else None


def call_state(
    index: dict[str, int], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor | None, Any, Any]:
    """What one call says about its tokens: its 2-D attention mask, its cache, its positions.

    ``index`` is the forward's positional layout (:func:`call_argument` computes it); the mask
    and cache may come by keyword or positionally. Captures and edits both read calls here.

    Example:
        >>> call_state({}, (), {"attention_mask": torch.ones(1, 3), "cache_position": 7})[::2]
        (tensor([[1., 1., 1.]]), 7)
    """
    mask = _argument(index, args, kwargs, "attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    cache = None
    for name in CACHE_ARGS:
        cache = _argument(index, args, kwargs, name)
        if cache is not None:
            break
    return mask, cache, _argument(index, args, kwargs, "cache_position")


def _forced_eager() -> bool:
    # torch.compiler.set_stance("force_eager") runs compiled code eagerly, hooks included. The
    # stance has no public getter; only read it if dynamo was imported (it is, once compiled).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    stance = getattr(getattr(eval_frame, "_stance", None), "stance", None)
    return stance == "force_eager"


def check_not_compiled(
    module: nn.Module, *, action: str = "capture", error: type[Exception] = CaptureError
) -> None:
    """Refuse a module compiled with ``torch.compile``: hooks added later never run in it.

    A compiled graph keeps the hooks it was traced with; a hook registered afterwards is
    silently skipped, so a capture would record nothing and an edit would change nothing.
    Catches ``model.compile()`` and a ``torch.compile(model)`` wrapper. Under
    ``torch.compiler.set_stance("force_eager")`` the model runs eagerly, hooks included, and
    nothing is raised.

    Example:
        >>> check_not_compiled(nn.Linear(2, 2))  # not compiled: nothing to say
        >>> model = nn.Linear(2, 2)
        >>> model.compile()
        >>> try:
        ...     check_not_compiled(model)
        ... except CaptureError as exc:
        ...     print(str(exc).split(":")[0])
        Linear was compiled with model.compile()
    """
    # Plain dictionary look-ups: a capture per forward checks this every time, and nn.Module's
    # __getattr__ raises (slowly) for a missing name.
    if type(module).__name__ == "OptimizedModule" and "_orig_mod" in module._modules:
        how = "torch.compile(model)"
        fix = "pass the uncompiled model (compiled._orig_mod) and call that one"
    elif module.__dict__.get("_compiled_call_impl") is not None:
        how = "model.compile()"
        fix = "use a copy of the model that was never compiled"
    else:
        return
    if _forced_eager():
        return
    raise error(
        f"{type(module).__name__} was compiled with {how}: a compiled graph never runs hooks "
        f"added after compilation, so this {action} would see nothing. Either {fix}, or run it "
        "eagerly for the time of the "
        f"{action}: with torch.compiler.set_stance('force_eager'), {action}(...): model(...)"
    )


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


# --- generation steps -----------------------------------------------------------------------
# A KV cache is read only to tell whether each step continues the previous one. Cache classes
# differ between transformers versions; these probes try each known layout.

CACHE_ARGS = ("cache", "past_key_values", "cache_params")
"""The names under which a model call receives its cache (5.x ``cache``, 4.x
``past_key_values``, state-space models ``cache_params``)."""
_TOKEN_ARGS = ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")
_CACHE_LAYER_STATES = ("keys", "recurrent_states", "ssm_states", "conv_states")


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, torch.Tensor)), None)
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.numel() > 0:
        return value
    return None


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (``None`` for inference tensors, which have none).

    Example:
        >>> tensor_version(torch.zeros(2))
        0
        >>> with torch.inference_mode():
        ...     print(tensor_version(torch.zeros(2)))
        None
    """
    if tensor.is_inference():
        return None
    return int(tensor._version)


def _cache_state(cache: Any) -> torch.Tensor | None:
    """A cached tensor whose rows are the batch rows and which depends on each row's tokens."""
    cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)) and layers:
        # A sliding-window layer forgets old positions: prefer a layer that keeps them all.
        layer = next((lay for lay in layers if not getattr(lay, "is_sliding", False)), layers[0])
        for name in _CACHE_LAYER_STATES:
            state = _first_tensor(getattr(layer, name, None))
            if state is not None:
                return state
        return None
    for name in ("key_cache", "ssm_states"):
        state = _first_tensor(getattr(cache, name, None))
        if state is not None:
            return state
    if isinstance(cache, (list, tuple)) and cache and isinstance(cache[0], (list, tuple)):
        return _first_tensor(cache[0])
    return None


_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _fingerprint(cache: Any) -> torch.Tensor | None:
    # One checksum per row: equal before and after a step boundary unless the rows were
    # reordered or replaced (beam search), since nothing else touches the cache between two
    # calls. Summing the values' bit patterns as integers is exact and independent of the
    # memory layout (a float sum of a reordered copy can differ in its last bit).
    return _checksum(_cache_state(cache))


def _checksum(state: torch.Tensor | None) -> torch.Tensor | None:
    as_int = _SAME_SIZE_INT.get(state.element_size()) if state is not None else None
    if state is None or as_int is None:
        return None
    bits = state.detach().view(as_int)
    return bits.sum(dim=tuple(range(1, bits.dim())), dtype=torch.int64)


def cache_offset(cache: Any, cache_position: Any) -> int | torch.Tensor | None:
    """How many positions come before a model call's first token: 0 for a call without cache.

    Read from the call's ``cache_position`` (returned as a tensor, read only when needed, so a
    hook never waits for the device), else from the KV cache it was given (a ``Cache`` object's
    ``get_seq_length()``, or a legacy tuple's key length), at the start of the call: the model
    fills its cache as the call runs. ``None`` when a cache holds no countable positions (a
    state-space model's) and no ``cache_position`` says it.

    Example:
        >>> cache_offset(None, None)
        0
        >>> int(cache_offset(None, torch.tensor([7])))
        7
        >>> cache_offset(((torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)),), None)
        5
    """
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return cache_position.reshape(-1)[0]
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        try:
            value = length()
        except (ValueError, TypeError, AttributeError, IndexError):
            value = None  # e.g. a state-space cache (5.x) holds no positions to count
        if isinstance(value, (int, torch.Tensor)):
            return value
    state = _cache_state(cache)
    if isinstance(cache, (list, tuple)) and state is not None:
        return state.shape[-2]
    return None


class _RootCall:
    """One call of a capture's root: where its positions start, how many, and its cache rows.

    Tensors are kept as they are and read only when :meth:`Record.concat` asks, so the hooks
    never wait for the device.
    """

    __slots__ = (
        "_after_state",
        "_cache",
        "after",
        "batch",
        "before",
        "cache_type",
        "has_cache",
        "index",
        "offset",
        "seq",
    )

    def __init__(
        self,
        index: int,
        offset: int | torch.Tensor | None,
        seq: int | None,
        batch: int | None,
        cache: Any,
    ) -> None:
        self.index = index
        self.offset = offset
        self.seq = seq
        self.batch = batch
        self.has_cache = cache is not None
        self.cache_type = type(cache).__name__
        self.before = _fingerprint(cache) if cache is not None else None
        self.after: torch.Tensor | None = None
        # The cache state at the end of the call and its version counter, held only until the
        # next call begins (see Capture._root_done); the checksum is taken then, if at all.
        self._after_state: tuple[torch.Tensor, int] | None = None
        # Weakly: a record must not keep a whole KV cache alive.
        self._cache: weakref.ref[Any] | None = None
        if cache is not None:
            with contextlib.suppress(TypeError):
                self._cache = weakref.ref(cache)

    def holds(self, cache: Any) -> bool:
        """Whether this call was given this very cache object."""
        return self._cache is not None and self._cache() is cache

    def start(self) -> int | None:
        offset = self.offset
        return int(offset) if offset is not None else None


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
    holds: Callable[[], bool] | None = field(default=None, compare=False, repr=False)
    """Whether ``module`` is still where the locator resolved it (the model has not changed
    since); ``None``: not known, assumed to hold."""
    uses: Callable[[], contextlib.AbstractContextManager[Any]] | None = field(
        default=None, compare=False, repr=False
    )
    """What must be in place while the module is hooked (a head site's tap), entered by
    captures and edits after their own checks and exited with them."""
    unjoinable: str | None = None
    """Why the steps of this target's records cannot be joined into one sequence (the key
    axis of ``k``, ``v`` and ``pattern`` grows with the cache)."""


def enter_uses(stack: contextlib.ExitStack, targets: Iterable[Target]) -> None:
    """Enter what each target needs in place (once per distinct ``uses``), onto ``stack``.

    Example:
        >>> entered = []
        >>> use = lambda: contextlib.nullcontext(entered.append(1))
        >>> with contextlib.ExitStack() as stack:
        ...     enter_uses(stack, [Target("a", nn.Linear(1, 1), uses=use)])
        >>> entered
        [1]
    """
    for target in targets:
        if target.uses is not None:
            stack.enter_context(target.uses())


def stale_targets(targets: Iterable[Target]) -> list[str]:
    """The keys of the targets whose module the model no longer holds where it was resolved.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> stale_targets([Target("a", lin), Target("b", lin, holds=lambda: False)])
        ['b']
    """
    return [t.key for t in targets if t.holds is not None and not t.holds()]


def model_changed_message(keys: Sequence[str], what: str) -> str:
    """The error text for a capture or edit whose modules the model no longer holds.

    Example:
        >>> model_changed_message(["block[0]"], "capture")[:40]
        'the model changed since this capture was'
    """
    return (
        f"the model changed since this {what} was built: {', '.join(keys)} "
        f"{'is' if len(keys) == 1 else 'are'} no longer where the locator found "
        f"{'it' if len(keys) == 1 else 'them'} (a block or sub-module was replaced or removed), "
        f"so the {what} would silently miss {'it' if len(keys) == 1 else 'them'}: build the "
        f"{what} again from the Inspector"
    )


# -- models dispatched with accelerate -------------------------------------------------------
# accelerate (``device_map=...`` at load, ``dispatch_model``, ``cpu_offload``, ``disk_offload``)
# wraps a module's ``forward`` with a hook (``module._hf_hook``). An offloading hook loads the
# module's weights at the start of its forward and puts them back on the meta device at the
# end: outside its forward such a module's weights hold no values.


def _offload_hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks of ``module`` that offload its weights outside its forward."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    chained = getattr(hook, "hooks", None)  # a SequentialHook holds several
    hooks = chained if isinstance(chained, (list, tuple)) else (hook,)
    return [h for h in hooks if getattr(h, "offload", False)]


@contextlib.contextmanager
def onloaded(module: nn.Module, what: str = "") -> Iterator[None]:
    """Inside the block, ``module``'s own weights hold their values, also where accelerate
    offloads them.

    A module dispatched with accelerate's offloading keeps its weights on the meta device
    outside its forward, so reading ``module.weight`` there gives a tensor without values
    (and ``einsum`` with it silently gives another). Inside this block its hook has loaded them
    as at the start of its forward; they are offloaded again on exit, so read what you need
    (``module.weight`` anew: the hook replaces the parameter) and keep a reference. Weights on
    the meta device that no hook of the module holds are an error. ``what`` names the reader.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> with onloaded(lin):
        ...     lin.weight.device.type
        'cpu'
    """
    if not any(p.is_meta for p in module.parameters(recurse=False)):
        yield
        return
    hooks = _offload_hooks(module)
    if not hooks:
        raise CaptureError(
            f"{what or 'reading'} {type(module).__name__}'s weights: they are on the meta device "
            "and hold no values, and no accelerate offloading hook of that module holds them "
            "(load the weights, or dispatch the model with accelerate so that each offloaded "
            "module keeps its own hook: device_map=..., cpu_offload, disk_offload)"
        )
    for hook in hooks:
        hook.pre_forward(module)
    try:
        yield
    finally:
        for hook in reversed(hooks):
            hook.post_forward(module, None)


def settle_offloaded(model: nn.Module | None) -> None:
    """Offload again what accelerate loaded for forwards that an exception interrupted.

    An offloading hook puts its module's weights back on the meta device only when its forward
    returns; an early stop (or an error) raised inside that forward leaves them loaded on the
    execution device. Captures and edits call this when they exit on an exception; modules
    that no forward interrupted (all their weights already offloaded) are left alone.

    Example:
        >>> settle_offloaded(nn.Linear(2, 2))  # no accelerate hooks: nothing to do
    """
    if model is None:
        return
    # A plain walk (model.modules() builds every name): an early stop pays it at every call.
    modules = [model]
    hooked = []
    for module in modules:
        for child in module._modules.values():
            if child is not None:
                modules.append(child)
        if "_hf_hook" in module.__dict__:
            hooked.append(module)
    for module in hooked:
        for hook in _offload_hooks(module):
            inner = bool(getattr(hook, "place_submodules", False))
            if any(not p.is_meta for p in module.parameters(recurse=inner)):
                hook.post_forward(module, None)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its first parameter that holds values (else the CPU).

    A model dispatched with accelerate moves inputs to each module's execution device itself;
    its offloaded parameters are on the meta device, which holds no values.

    Example:
        >>> input_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


_is_compiling: Callable[[], bool] = getattr(
    getattr(torch, "compiler", None), "is_compiling", lambda: False
)


def only_in_thread(owner: int, hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, run only in the thread ``owner`` (a forward in another thread is left alone).

    Captures and edits are scoped to the thread that entered them: hooks belong to the module,
    which every thread shares, so without this a capture in one thread would record (or stop)
    another thread's forward.

    Example:
        >>> import threading
        >>> calls = []
        >>> hook = only_in_thread(threading.get_ident(), lambda *a: calls.append(a))
        >>> thread = threading.Thread(target=hook, args=("elsewhere",))
        >>> thread.start(); thread.join(); _ = hook("here")
        >>> calls
        [('here',)]
    """

    def scoped(*args: Any, **kwargs: Any) -> Any:
        # A graph being traced by torch.compile cannot ask for the thread (and runs in one).
        if _is_compiling() or get_ident() == owner:
            return hook(*args, **kwargs)
        return None

    return scoped


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
    """This thread's :class:`EditNote` of a module under an active edit, else ``None``.

    The edit leaves ``edit_notes`` (a dict: thread -> note) on the module's wrapped ``forward``;
    a plain dict attribute, so that Hugging Face's own ``functools.wraps`` wrapper around that
    ``forward`` (transformers 4.x, while it records ``output_hidden_states``) carries it too.

    Example:
        >>> edit_note(nn.Linear(2, 2)) is None
        True
    """
    forward = module.__dict__.get("forward")
    notes = getattr(forward, "edit_notes", None) if forward is not None else None
    note = notes.get(get_ident()) if isinstance(notes, dict) else None
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
        call: _RootCall | None = None,
        unjoinable: str | None = None,
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
            if note.output_edits and self._ran:
                out_before = note.output_before
                edits += note.output_edits
        active = transform is not None and transform.active
        if active:
            assert transform is not None
            offset: int | None = 0
            cached = call is not None and call.has_cache
            if transform.positions is not None and call is not None:
                offset = call.start()  # reads cache_position only when positions need it
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
    start, previous_start = call.start(), before.start()
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


def _begin_call(
    index: dict[str, int],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    previous: _RootCall | None,
    number: int,
) -> tuple[torch.Tensor | None, _RootCall]:
    """The attention mask of a call (of the model, or of one stack) and what it says about its
    positions; settles the previous call's cache checksum first (see :func:`_end_call`)."""
    mask, cache, position = call_state(index, args, kwargs)
    # The positions a cache counts are the decoder's on an encoder-decoder model.
    tokens = None
    for name in _TOKEN_ARGS:
        tokens = _argument(index, args, kwargs, name)
        if isinstance(tokens, torch.Tensor):
            break
    shape = tokens.shape if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None
    offset = cache_offset(cache, position)
    if previous is not None and previous._after_state is not None:
        state, version = previous._after_state
        previous._after_state = None
        if tensor_version(state) == version:  # untouched since that call ended
            previous.after = _checksum(state)
    call = _RootCall(
        number,
        offset,
        shape[1] if shape is not None else None,
        shape[0] if shape is not None else None,
        cache,
    )
    if offset is None and cache is not None:
        # A cache that counts no positions (a state-space model's): an empty one starts
        # at 0, the very cache object of the previous call continues where it ended.
        if call.before is None:
            call.offset = 0
        elif previous is not None and previous.holds(cache) and previous.seq is not None:
            start = previous.start()
            call.offset = start + previous.seq if start is not None else None
    return mask, call


def _end_call(
    call: _RootCall | None,
    index: dict[str, int],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
) -> None:
    """Keep what the cache holds after ``call``, before anything (a beam reorder) touches it.

    The state tensor and its version counter, no computation: the checksum is taken when a
    next call begins, and only if the tensor was not changed in place meanwhile; otherwise the
    step's history is unknown, and a batch of several rows is not joined. A capture of a plain
    forward so pays nothing for it.
    """
    if call is None:
        return
    cache = None
    for name in CACHE_ARGS:
        cache = _argument(index, args, kwargs, name)
        if cache is not None:
            break
    if cache is None and isinstance(output, Mapping):
        cache = next((output[n] for n in CACHE_ARGS if output.get(n) is not None), None)
    state = _cache_state(cache) if cache is not None else None
    version = tensor_version(state) if state is not None else None
    if state is not None and version is None:
        # An inference tensor keeps no version counter, so a later in-place change (a beam
        # reorder) could not be seen: take the checksum now, while the state is the call's.
        call.after = _checksum(state)
        call._after_state = None
        return
    call._after_state = (state, version) if state is not None and version is not None else None


class _StackCall:
    """The current call of one stack's root (an encoder or a decoder), for modules inside it."""

    __slots__ = ("call", "depth", "index", "mask", "number")

    def __init__(self, module: nn.Module) -> None:
        self.depth = 0
        self.index = _param_index(module)
        self.mask: torch.Tensor | None = None
        self.call: _RootCall | None = None
        self.number = 0


class Capture:
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
    ) -> None:
        self.targets = list(targets)
        self._expand_fn = expand_fn
        self.stop = stop
        self.transform = transform
        self.records: dict[str, Record] = {}
        self.stopped = False
        self.attention_mask: torch.Tensor | None = None
        """The attention mask of the latest call of the root (``None`` if none was given)."""
        self.root = root
        self.model = model
        self.keep_raw = keep_raw
        self._key_fn = key_fn
        self._handles: list[RemovableHandle] = []
        self._uses = contextlib.ExitStack()
        self._stacks: dict[int, _StackCall] = {}
        self._active = False
        self._thread = 0
        self._call: _RootCall | None = None
        self._root_calls = 0
        self._model_calls = 0
        self._root_index: dict[str, int] = {}

    def _make_hook(self, target: Target) -> Callable[..., Any]:
        records = self.records
        transform = self.transform
        total = len({t.key for t in self.targets})
        key = target.key
        module = target.module
        input_kwarg = target.input_kwarg
        output_index = target.output_index
        stop = self.stop
        keep_raw = self.keep_raw
        copy_output = target.copy_output

        # Inside a stack (encoder, decoder) its own call says which tokens are real and where
        # the positions start; elsewhere the model's call does.
        stacks = self._stacks
        within = id(target.within) if target.within is not None else None

        def keep(args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, ran: bool) -> None:
            stack = stacks.get(within) if within is not None else None
            rec = Record(
                key,
                args,
                kwargs,
                output,
                input_kwarg=input_kwarg,
                output_index=output_index,
                transform=transform,
                ran=ran,
                attention_mask=self.attention_mask if stack is None else stack.mask,
                note=edit_note(module),
                keep_raw=keep_raw,
                call=self._call if stack is None else stack.call,
                unjoinable=target.unjoinable,
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
        # The root's pre-hook: the call's mask, and where its positions start in the cache.
        stale = stale_targets(self.targets)
        if stale:
            # A module replaced while the capture is open would silently record nothing.
            raise CaptureError(model_changed_message(stale, "capture"))
        self._root_calls += 1
        self.attention_mask, self._call = _begin_call(
            self._root_index, args, kwargs, self._call, self._root_calls
        )

    def _root_done(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        # What the cache holds after this call, before anything (a beam reorder) can touch it:
        # the state tensor and its version counter, no computation. The checksum is taken when
        # a next call begins, and only if the tensor was not changed in place meanwhile;
        # otherwise the step's history is unknown, and a batch of several rows is not joined.
        # A capture of a plain forward so pays nothing for it.
        _end_call(self._call, self._root_index, args, kwargs, output)

    def _count_model_call(self, *_: Any) -> None:
        self._model_calls += 1

    def __enter__(self) -> Capture:
        if self._active:
            raise CaptureError("this capture is already active: start a new one with capture()")
        self._active = True
        self.records.clear()
        self.stopped = False
        self.attention_mask = None
        self._call = None
        self._root_calls = self._model_calls = 0
        stale = stale_targets(self.targets)
        if stale:
            self._active = False
            raise CaptureError(model_changed_message(stale, "capture"))
        self._thread = owner = get_ident()
        try:
            for watched in (self.model, self.root):
                if watched is not None:
                    check_not_compiled(watched)
            if self.model is not None and self.model is not self.root:
                self._handles.append(
                    self.model.register_forward_pre_hook(
                        only_in_thread(owner, self._count_model_call)
                    )
                )
            if self.root is not None:
                self._root_index = _param_index(self.root)
                self._handles.append(
                    self.root.register_forward_pre_hook(
                        only_in_thread(owner, self._mask_hook), with_kwargs=True
                    )
                )
                self._handles.append(
                    self.root.register_forward_hook(
                        only_in_thread(owner, self._root_done), with_kwargs=True
                    )
                )
            enter_uses(self._uses, self.targets)
            for target in self.targets:
                hook = only_in_thread(owner, self._scoped(target, self._make_hook(target)))
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
        stack = self._stacks.get(id(within))
        if stack is None:
            stack = self._stacks[id(within)] = _StackCall(within)

            def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                # A stack's own mask and cache: the decoder's, not the encoder's mask that the
                # model received, and the encoder's even when generate calls it directly.
                stack.depth += 1
                if stack.depth == 1:
                    stack.number += 1
                    stack.mask, stack.call = _begin_call(
                        stack.index, args, kwargs, stack.call, stack.number
                    )

            def leave(
                module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
            ) -> None:
                stack.depth -= 1
                if stack.depth == 0:
                    _end_call(stack.call, stack.index, args, kwargs, output)

            owner = self._thread
            self._handles.append(
                within.register_forward_pre_hook(only_in_thread(owner, enter), with_kwargs=True)
            )
            self._handles.append(
                within.register_forward_hook(
                    only_in_thread(owner, leave), with_kwargs=True, always_call=True
                )
            )

        def scoped(module: nn.Module, *rest: Any) -> Any:
            return hook(module, *rest) if stack.depth > 0 else None

        return scoped

    def _remove(self) -> None:
        if self._call is not None:
            self._call._after_state = None  # no next call: the last state is not needed
        for stack in self._stacks.values():
            if stack.call is not None:
                stack.call._after_state = None
        self._stacks.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._uses.close()
        self._active = False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._remove()
        if exc is not None:
            # An early stop ends the forward inside the modules that called the one recorded:
            # accelerate's offloading hooks among them never offloaded their weights again.
            settle_offloaded(self.model if self.model is not None else self.root)
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
            f"{'active' if self._active else 'inactive'}, recorded=[{recorded}], {stop})"
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
            if self._model_calls and not self._root_calls:
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
