"""The one hook engine's machinery: the model calls it follows, the modules it hooks, its exit.

Captures (:mod:`introspect._hooks.capture`) and edits (:mod:`introspect._hooks.edits`) are two uses
of one :class:`HookSession`: one reader of a model call's arguments (mask, KV cache, cache
position, where its positions start), one scoping of the calls of an encoder or a decoder
stack, one enter/exit with the thread scope, the staleness and compile checks, and the
clean-up after accelerate. It knows nothing about architectures: the Inspector hands it
``Target``s (a key, a module and how to find the hidden state in its arguments and output).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from threading import get_ident
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from introspect._errors import CaptureError
from introspect._model.paths import Chain, links_hold, links_of

if TYPE_CHECKING:
    from types import TracebackType

    from torch.utils.hooks import RemovableHandle
    from typing_extensions import Self

__all__ = [
    "CACHE_ARGS",
    "CallScope",
    "EditNote",
    "HookSession",
    "ModelCall",
    "Target",
    "cache_offset",
    "call_argument",
    "call_attention_mask",
    "call_index",
    "call_state",
    "check_not_compiled",
    "copy_tensors",
    "edit_note",
    "elsewhere",
    "enter_uses",
    "hidden_of",
    "input_device",
    "input_of",
    "input_slot",
    "is_compiling",
    "model_changed_message",
    "onloaded",
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


def input_slot(
    args: tuple[Any, ...], kwargs: dict[str, Any], keyword: str
) -> tuple[Any, str | None]:
    """The hidden-state input of a call and where it came: ``None`` for the first positional
    argument, else the keyword (``keyword``, or the first tensor passed by keyword).

    Example:
        >>> input_slot((), {"x": 1, "hidden_states": 2}, "hidden_states")
        (2, 'hidden_states')
        >>> input_slot((3,), {}, "hidden_states")
        (3, None)
    """
    if args:
        return args[0], None
    if keyword in kwargs:
        return kwargs[keyword], keyword
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return value, name
    return None, keyword


def input_of(args: tuple[Any, ...], kwargs: dict[str, Any], keyword: str) -> Any:
    """The hidden-state input of a call: the first positional argument, else ``kwargs[keyword]``
    (or the first tensor passed by keyword).

    Example:
        >>> input_of((), {"hidden_states": 1}, "hidden_states")
        1
    """
    return input_slot(args, kwargs, keyword)[0]


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


# --- generation steps -----------------------------------------------------------------------
# A KV cache is read only to tell whether each step continues the previous one. Cache classes
# differ between transformers versions; these probes try each known layout.

CACHE_ARGS = ("cache", "past_key_values", "cache_params")
"""The names under which a model call receives its cache (5.x ``cache``, 4.x
``past_key_values``, state-space models ``cache_params``)."""
_TOKEN_ARGS = ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")
_CACHE_LAYER_STATES = ("keys", "recurrent_states", "ssm_states", "conv_states")


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):  # the usual case, before the slower Mapping check
        return value if value.dim() >= 2 and value.numel() > 0 else None
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


def _known_cache(cache: Any) -> bool:
    """Whether ``cache`` has a layout :func:`_cache_state` reads (so no state there means none)."""
    if cache is None:
        return False
    if isinstance(cache, (list, tuple)):
        return True
    cache = getattr(cache, "self_attention_cache", cache)
    return any(hasattr(cache, name) for name in ("layers", "key_cache", "ssm_states"))


_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _checksum(state: torch.Tensor | None) -> torch.Tensor | None:
    # One checksum per row: equal before and after a step boundary unless the rows were
    # reordered or replaced (beam search), since nothing else touches the cache between two
    # calls. Summing the values' bit patterns as integers is exact and independent of the
    # memory layout (a float sum of a reordered copy can differ in its last bit).
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
    reads_input: bool = False
    """The value is what ``module`` receives (the MLP's ``post``: its down-projection's
    input): recorded as the record's output, edited before the module runs."""
    chain: Chain | None = field(default=None, compare=False, repr=False)
    """The links from the model to ``module`` where ``holds`` checks exactly them: sessions
    then check the links all their targets share once (see :func:`links_hold`)."""


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

    A spliced SAE's sites (``<site>.sae...``) exist only while their splice is active: the
    text says so rather than that the model changed.

    Example:
        >>> model_changed_message(["block[0]"], "capture")[:40]
        'the model changed since this capture was'
        >>> model_changed_message(["block[0].sae.features"], "capture")[:52]
        'block[0].sae.features belongs to an SAE splice that '
    """
    spliced = [key for key in keys if ".sae" in key]
    if spliced and len(spliced) == len(keys):
        return (
            f"{', '.join(spliced)} belong{'s' if len(spliced) == 1 else ''} to an SAE splice "
            f"that has ended: an SAE's sites exist only inside its 'with insp.splice(...)' "
            f"block, so the {what} would record or change nothing there. Build and run the "
            f"{what} inside the splice's block"
        )
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


is_compiling: Callable[[], bool] = getattr(
    getattr(torch, "compiler", None), "is_compiling", lambda: False
)
"""Whether torch.compile is tracing the current code."""


def elsewhere(owner: int) -> bool:
    """Whether the code running now is another thread than ``owner`` (a hook then does nothing).

    Captures and edits are scoped to the thread that entered them: hooks belong to the module,
    which every thread shares, so without this a capture in one thread would record (or stop)
    another thread's forward. A graph being traced by torch.compile cannot ask for the thread
    (and runs in one): it is never elsewhere. ``owner`` 0 means any thread.

    Example:
        >>> import threading
        >>> here, seen = threading.get_ident(), []
        >>> thread = threading.Thread(target=lambda: seen.append(elsewhere(here)))
        >>> thread.start(); thread.join()
        >>> seen, elsewhere(here), elsewhere(0)
        ([True], False, False)
    """
    return bool(owner) and not is_compiling() and get_ident() != owner


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


# -- the model calls a session follows ---------------------------------------------------------


class ModelCall:
    """One call of the model (or of one stack: an encoder, a decoder): what it says about itself.

    Its 2-D attention mask, where its positions start in the KV cache (``offset``: 0 for a call
    without cache, ``None`` when unknown), how many tokens and rows it holds, and, where a
    capture asks for it, a checksum of its cache rows before and after the call, so that the
    steps of a generation can be joined only when each row continued its own history. Tensors
    are kept as they are and read only when asked, so the hooks never wait for the device.

    Example:
        >>> call = ModelCall(1, torch.tensor(3), 2, 1, None)
        >>> call.offset, call.cached
        (3, False)
    """

    __slots__ = (
        "_after_state",
        "_cache",
        "_offset",
        "after",
        "attention_mask",
        "batch",
        "before",
        "cache_type",
        "cached",
        "empty_cache",
        "index",
        "same_rows_as",
        "seq",
    )

    def __init__(
        self,
        index: int,
        offset: int | torch.Tensor | None,
        seq: int | None,
        batch: int | None,
        cache: Any,
        *,
        attention_mask: torch.Tensor | None = None,
        checksum: bool = False,
        continues: tuple[torch.Tensor, int, int] | None = None,
    ) -> None:
        self.index = index
        self._offset = offset
        self.seq = seq
        self.batch = batch
        self.attention_mask = attention_mask
        self.cached = cache is not None
        """Whether this call is a step of incremental decoding (it was given a KV cache)."""
        self.cache_type = type(cache).__name__
        state = _cache_state(cache) if cache is not None else None
        self.empty_cache = state is None and _known_cache(cache)
        """A cache of a known layout holding no state yet (an unknown object is not known
        to be empty)."""
        self.same_rows_as: int | None = None
        """The index of the previous call when this one began with exactly the cache rows that
        call left (the very state tensor, not changed in place since): the steps join without
        a checksum."""
        self.before: torch.Tensor | None = None
        if checksum and state is not None:
            if (
                continues is not None
                and continues[0] is state
                and tensor_version(state) == continues[1]
            ):
                self.same_rows_as = continues[2]
            else:
                self.before = _checksum(state)
        self.after: torch.Tensor | None = None
        # The cache state at the end of the call and its version counter, held only until the
        # next call begins (see CallScope.begin); the checksum is taken then, if at all.
        self._after_state: tuple[torch.Tensor, int] | None = None
        # Weakly: a record must not keep a whole KV cache alive.
        self._cache: weakref.ref[Any] | None = None
        if cache is not None:
            with contextlib.suppress(TypeError):
                self._cache = weakref.ref(cache)

    @property
    def offset(self) -> int | None:
        """Tokens before this call's first one (the cache's length); ``None``: unknown."""
        if isinstance(self._offset, torch.Tensor):
            # cache_position, read only when asked (reading waits for the device).
            self._offset = int(self._offset.reshape(-1)[0].item())
        return self._offset

    def holds(self, cache: Any) -> bool:
        """Whether this call was given this very cache object."""
        return self._cache is not None and self._cache() is cache


class CallScope:
    """The calls of one module a session follows: the model (root) or one stack of it.

    ``begin`` and ``end`` are its pre- and post-hook; ``current`` is the call running now
    (``None`` outside one), ``last`` the latest call begun. Nested calls of the same module
    (depth) belong to the outer one. ``checksum``: keep each call's cache-row checksums (a
    capture joining generation steps needs them; an edit does not).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> scope = CallScope(lin)
        >>> scope.begin(lin, (torch.ones(1, 3, 2),), {"attention_mask": torch.ones(1, 3)})
        >>> scope.current.offset, scope.current.attention_mask.shape
        (0, torch.Size([1, 3]))
        >>> scope.end(lin, (), {}, None)
        >>> scope.current is None, scope.last.index
        (True, 1)
    """

    __slots__ = ("checksum", "current", "depth", "index", "last", "number", "owner")

    def __init__(self, module: nn.Module, *, checksum: bool = False, owner: int = 0) -> None:
        self.index = _param_index(module)
        self.checksum = checksum
        self.owner = owner
        """The thread whose calls are followed (``0``: any; see :func:`elsewhere`)."""
        self.depth = 0
        self.number = 0
        self.current: ModelCall | None = None
        self.last: ModelCall | None = None

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """:meth:`begin`, in the owner thread only."""
        if elsewhere(self.owner):
            return
        self.begin(module, args, kwargs)

    def post_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """:meth:`end`, in the owner thread only."""
        if elsewhere(self.owner):
            return
        self.end(module, args, kwargs, output)

    def begin(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Pre-hook: read the call's mask, cache and positions, before the model fills its cache."""
        self.depth += 1
        if self.depth > 1:
            return
        self.number += 1
        mask, cache, position = call_state(self.index, args, kwargs)
        # The positions a cache counts are the decoder's on an encoder-decoder model.
        tokens = None
        for name in _TOKEN_ARGS:
            tokens = _argument(self.index, args, kwargs, name)
            if isinstance(tokens, torch.Tensor):
                break
        shape = tokens.shape if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None
        previous = self.last
        kept: tuple[torch.Tensor, int, int] | None = None
        if previous is not None and previous._after_state is not None:
            state, version = previous._after_state
            previous._after_state = None
            kept = (state, version, previous.index)
        # cache_position as passed: its first element is read only when asked (ModelCall.offset).
        has_position = isinstance(position, torch.Tensor) and position.numel() > 0
        call = ModelCall(
            self.number,
            position if has_position else cache_offset(cache, position),
            shape[1] if shape is not None else None,
            shape[0] if shape is not None else None,
            cache,
            attention_mask=mask,
            checksum=self.checksum,
            continues=kept,
        )
        if (
            previous is not None
            and kept is not None
            and call.same_rows_as is None
            and tensor_version(kept[0]) == kept[1]  # untouched since that call ended
        ):
            # Another state tensor now (a beam reorder replaces it): compare checksums.
            previous.after = _checksum(kept[0])
        if call._offset is None and cache is not None:
            # A cache that counts no positions (a state-space model's): an empty one starts
            # at 0, the very cache object of the previous call continues where it ended.
            if call.empty_cache:
                call._offset = 0
            elif previous is not None and previous.holds(cache) and previous.seq is not None:
                start = previous.offset
                call._offset = start + previous.seq if start is not None else None
        self.current = self.last = call

    def end(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """Post-hook (also on an exception): keep what the cache holds after the call.

        The state tensor and its version counter, no computation: the checksum is taken when a
        next call begins, and only if the tensor was not changed in place meanwhile (a beam
        reorder); otherwise the step's history is unknown, and a batch of several rows is not
        joined. A capture of a plain forward so pays nothing for it.
        """
        self.depth -= 1
        if self.depth > 0:
            return
        call, self.current = self.current, None
        if call is None or not self.checksum:
            return
        cache = None
        for name in CACHE_ARGS:
            cache = _argument(self.index, args, kwargs, name)
            if cache is not None:
                break
        if cache is None and isinstance(output, (dict, Mapping)):  # a ModelOutput is a dict
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

    def close(self) -> None:
        """Forget the last state kept for a next call (there is none)."""
        for call in (self.current, self.last):
            if call is not None:
                call._after_state = None
        self.current = None
        self.depth = 0


# -- the session: one enter/exit for captures and edits -----------------------------------------


class HookSession:
    """What captures and edits share: the model calls they follow, their hooks and their exit.

    A session follows the calls of its ``root`` (the model) and of each stack a target lives in
    (``Target.within``), in the thread that entered it; checks at entry that no model it
    watches is compiled and that every target is still where its locator found it (and again
    at each call of the root); enters what the targets need in place (``Target.uses``);
    removes every hook on every exit path, and puts back what accelerate loaded for a forward
    an exception interrupted. :class:`~introspect._hooks.capture.Capture` and
    :class:`~introspect._hooks.edits.Intervention` are its two uses: ``_install`` adds their
    own hooks, ``_at_call`` their own check at each call of the root.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> with HookSession([Target("lin", lin)], root=lin) as session:
        ...     _ = lin(torch.ones(1, 3, 2))
        >>> session.root_scope.last.seq is None, session.active
        (True, False)
    """

    what = "session"
    error: type[Exception] = CaptureError
    checksum = False
    """Whether the calls keep cache-row checksums (see :class:`CallScope`)."""

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        root: nn.Module | None = None,
        model: nn.Module | None = None,
        links: Chain | None = None,
    ) -> None:
        self.targets = list(targets)
        # What the staleness check walks: the links of the targets' chains, each once (given
        # by the resolver where it knows them), and the checks of targets without a chain.
        self._links = (
            links
            if links is not None
            else links_of(t.chain for t in self.targets if t.chain is not None)
        )
        self._other_holds = [
            t.holds for t in self.targets if t.chain is None and t.holds is not None
        ]
        self.root = root
        self.model = model
        """The whole model when ``root`` is a part of it: checked for compilation, and its
        calls counted (a run that reached none of the hooks can then be named)."""
        self.active = False
        self.thread = 0
        self.model_calls = 0
        self.root_scope: CallScope | None = None
        self._scopes: dict[int, CallScope] = {}
        self._handles: list[RemovableHandle] = []
        self._uses: contextlib.ExitStack | None = None
        # Distinct targets with something to put in place (a head site's tap): most have none,
        # and then no ExitStack is built at each entry.
        self._with_uses = list({id(t): t for t in self.targets if t.uses is not None}.values())

    # -- what the uses add ------------------------------------------------------------------

    def _install(self, owner: int) -> None:
        """Add the use's own hooks (after the session's, inside its clean-up)."""

    def _uninstall(self) -> None:
        """Remove what ``_install`` added that is not a hook handle."""

    def _at_call(self) -> None:
        """A use's own check at each call of the root (after the staleness check)."""

    def _reset(self) -> None:
        """Forget what the previous time in the block recorded."""

    # -- calls ------------------------------------------------------------------------------

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """The attention mask of the latest call of the root (``None`` if none was given)."""
        scope = self.root_scope
        call = scope.last if scope is not None else None
        return call.attention_mask if call is not None else None

    def scope(self, within: nn.Module | None) -> CallScope | None:
        """The calls followed for modules inside ``within`` (the root's for ``None``); hooks
        that follow a stack are added on first request."""
        if within is None:
            return self.root_scope
        scope = self._scopes.get(id(within))
        if scope is None:
            scope = CallScope(within, checksum=self.checksum, owner=self.thread)
            self._scopes[id(within)] = scope
            self._follow(within, scope)
        return scope

    def _follow(self, module: nn.Module, scope: CallScope) -> None:
        self._handles.append(module.register_forward_pre_hook(scope.pre_hook, with_kwargs=True))
        self._handles.append(
            module.register_forward_hook(scope.post_hook, with_kwargs=True, always_call=True)
        )

    def _stale(self) -> list[str]:
        """The keys of the targets the model no longer holds (see :func:`stale_targets`)."""
        if links_hold(self._links) and all(holds() for holds in self._other_holds):
            return []
        return stale_targets(self.targets)

    def _root_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if elsewhere(self.thread):
            return  # another thread's forward: not this session's
        stale = self._stale()
        if stale:
            # A module replaced while the session is open would silently be missed.
            raise self.error(model_changed_message(stale, self.what))
        self._at_call()
        assert self.root_scope is not None
        self.root_scope.begin(module, args, kwargs)

    def _count_model_call(self, *_: Any) -> None:
        if not elsewhere(self.thread):
            self.model_calls += 1

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self.active:
            raise self.error(
                f"this {self.what} is already active: build a new one to enter it again"
            )
        stale = self._stale()
        if stale:
            raise self.error(model_changed_message(stale, self.what))
        for watched in (self.model, self.root):
            if watched is not None:
                check_not_compiled(watched, action=self.what, error=self.error)
        self.active = True
        self.model_calls = 0
        self._reset()
        self.thread = owner = get_ident()
        handles = self._handles
        try:
            if self.model is not None and self.model is not self.root:
                handles.append(self.model.register_forward_pre_hook(self._count_model_call))
            if self.root is not None:
                scope = CallScope(self.root, checksum=self.checksum, owner=owner)
                self.root_scope = scope
                handles.append(
                    self.root.register_forward_pre_hook(self._root_call, with_kwargs=True)
                )
                handles.append(
                    self.root.register_forward_hook(
                        scope.post_hook, with_kwargs=True, always_call=True
                    )
                )
            if self._with_uses:
                self._uses = contextlib.ExitStack()
                enter_uses(self._uses, self._with_uses)
            self._install(owner)
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        self._uninstall()
        for scope in (self.root_scope, *self._scopes.values()):
            if scope is not None:
                scope.close()
        self._scopes.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        uses = self._uses
        self._uses = None
        if uses is not None:
            uses.close()
        self.active = False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._remove()
        if exc is not None:
            # An error (or an early stop) inside a forward leaves the weights accelerate
            # loaded for the modules it interrupted on the execution device.
            settle_offloaded(self.model if self.model is not None else self.root)
        return None
