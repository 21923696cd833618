"""Attention heads: the places inside an attention module where heads can be read and edited.

A head locator (``block[i].attn.q_pre``, ``.k_pre``, ``.q``, ``.k``, ``.v``, ``.scores``,
``.pattern``, ``.z``, ``.result``) names
a value that passes *inside* the attention module, not a module. Each is given a
:class:`HeadSite`: an identity module that the value is passed through while a capture or an
edit uses it, so that the hook engine records and edits it exactly as it records and edits a
block (its record's ``output`` is the value, after any edit; ``input`` the value before).

Where the values pass through a site, per attention module (a :class:`HeadTap`):

- ``z`` and ``result``: hooks on the output projection ``o``. ``z`` is ``o``'s input split per
  head; ``result`` is each head's write through ``o`` (``z`` times ``o``'s weight, head by
  head), and when ``result`` is edited ``o``'s output becomes ``result.sum(heads) + bias``.
  Where the heads pass through a norm before ``o`` (``HeadSpec.o_norm``), ``z`` is the norm's
  input and ``result`` each head's slice of ``o``'s (normed) input times ``o``'s weight.
- ``q``, ``k``, ``v``, ``pattern``: the arguments and the weights of the attention function
  transformers calls (its ``AttentionInterface``). While a site is in use, the module that
  calls it (``core``) is given a copy of its config whose attention implementation is
  ``"introspect_heads"``: a function registered once with transformers that passes ``q``, ``k``
  and ``v`` through their sites, calls the implementation the model really uses, and passes
  the weights through ``pattern``. A module that did not call it while a site was in use is an
  error, never a silently empty record. Where the modeling file computes attention inline, the
  module's forward is followed instead (:class:`_Trace`, a ``TorchFunctionMode`` active only
  inside it): the scores matmul gives ``q`` and ``k``, the softmax ``pattern``, the values
  matmul ``v``.
- ``pattern`` needs the attention weights, which only eager attention computes: while a
  ``pattern`` or ``scores`` site is in use the model's config is switched to ``eager`` (so its
  masks are built for eager too) and restored afterwards.
- ``scores``: what the eager attention function hands its softmax (:class:`_Scores`, a
  ``TorchFunctionMode`` active only inside that call; inline: the input of the softmax the
  trace sees). Masked entries hold what the model put there: ``torch.finfo(dtype).min`` in
  transformers' eager attention, ``-inf`` where a modeling file adds two masks (GPT-Neo; GPT-2
  on 4.x), ``min / scale_attn`` where it scales after masking (CodeGen on 4.x). Read-only.
- ``q_pre``, ``k_pre``: the queries and keys before the rotary embedding, read where ``q`` and
  ``k`` are: what each rotary function of the modeling file (``apply_*rotary*``, wrapped while a
  site is in use) returned is found in ``q``/``k`` and replaced by what it received
  (:meth:`HeadTap.before_rotary`). They are ``q``/``k`` where no rotary function ran, and after
  any q/k norm (what the rotary function receives). An edit of ``q_pre`` is rotated again by
  the same function and arguments; ``k_pre`` is read-only (a KV cache holds the rotated keys).

Nothing is left on the model once the last capture or edit that uses a site exits.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import numbers
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from threading import RLock, get_ident
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from introspect._errors import CaptureError, InterventionError, MissingPartError
from introspect._hooks.session import onloaded
from introspect._locators import KV_SITES, QUERY_KEY_SITES, Locator
from introspect._model.paths import get_path
from introspect._spec import HeadSpec

__all__ = [
    "CORE_SITES",
    "EAGER_SITES",
    "HEAD_AXIS",
    "IMPLEMENTATION",
    "KV_SITES",
    "QUERY_KEY_SITES",
    "READ_ONLY_SITES",
    "SITES",
    "HeadSite",
    "HeadTap",
    "Heads",
    "attention_pattern",
    "attention_scores",
    "attn_part",
    "check_heads",
    "head_site",
    "head_tap",
    "heads_in_range",
    "rotary_functions",
    "rotate",
]

SITES = ("q_pre", "k_pre", "q", "k", "v", "scores", "pattern", "z", "result")
"""The head values, in the order a forward computes them."""
CORE_SITES = frozenset({"q_pre", "k_pre", "q", "k", "v", "scores", "pattern"})
"""The values read from the attention function (the others from the output projection)."""
EAGER_SITES = frozenset({"scores", "pattern"})
"""The values only eager attention computes: the model runs eager while one is in use."""
HEAD_AXIS = {
    "q_pre": 2,
    "k_pre": 2,
    "q": 2,
    "k": 2,
    "v": 2,
    "z": 2,
    "result": 2,
    "scores": 1,
    "pattern": 1,
}
"""Which axis of each value counts heads (``pattern`` is ``[batch, heads, query, key]``)."""
READ_ONLY_SITES = {
    "scores": (
        "edit block[i].attn.pattern (the weights the softmax gives), or q/k, instead: edits of "
        "the scores themselves are not supported"
    ),
    "k_pre": (
        "an edit before the rotary embedding would not reach the keys a KV cache already holds; "
        "edit k (after the rotary embedding) or q_pre instead"
    ),
}
"""The head values that can be read but not edited, with what to edit instead."""
IMPLEMENTATION = "introspect_heads"
"""The attention implementation name a tapped module's config copy carries."""

_LOCK = RLock()
_TAPS: WeakKeyDictionary[nn.Module, HeadTap] = WeakKeyDictionary()
_CORES: WeakKeyDictionary[nn.Module, HeadTap] = WeakKeyDictionary()
_EAGER: dict[int, list[Any]] = {}
"""id(config) -> [config, users, implementation before the switch to eager]."""
_REGISTERED = False
_ROTATING: dict[int, list[HeadTap]] = {}
"""thread id -> the taps whose attention runs now in that thread with q_pre or k_pre in use
(innermost last): the rotary functions note their calls there."""
_PATCHED: dict[tuple[int, str], list[Any]] = {}
"""(id(module globals), name) -> [globals, the rotary function, its wrapper, users]."""
_ROTARY_NAME = re.compile(r"^_?apply_\w*(?:rotary|rope)", re.IGNORECASE)
"""The modeling files' rotary functions (apply_rotary_pos_emb, apply_rotary_emb, ...)."""


class HeadSite(nn.Module):
    """An identity module a head value is passed through while something uses it.

    Example:
        >>> site = HeadSite("q")
        >>> x = torch.ones(1, 2, 4, 8)
        >>> site(x) is x, site.active()
        (True, False)
    """

    def __init__(self, name: str, label: str = "block[i].attn") -> None:
        super().__init__()
        self.name = name
        self.label = label

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def __setattr__(self, name: str, value: Any) -> None:
        # An edit wraps a site by setting its forward (before any forward runs): a value that
        # cannot be edited is refused here, where every edit verb passes.
        if name == "forward" and self.__dict__.get("name") in READ_ONLY_SITES:
            site = self.__dict__["name"]
            raise InterventionError(
                f"{self.__dict__['label']}.{site} can be read but not edited: "
                f"{READ_ONLY_SITES[site]}"
            )
        super().__setattr__(name, value)

    def active(self) -> bool:
        """Whether a capture hooks this site or an edit wraps it (else it is not called)."""
        found = self.__dict__
        return bool(found["_forward_hooks"] or found["_forward_pre_hooks"]) or "forward" in found


def _modeling_module(module: nn.Module) -> Any:
    return sys.modules.get(type(module).__module__)


def uses_attention_interface(core: nn.Module) -> bool:
    """Whether ``core``'s transformers modeling file dispatches through the attention interface.

    Example:
        >>> uses_attention_interface(nn.Linear(2, 2))
        False
    """
    found = _modeling_module(core)
    return (
        getattr(found, "ALL_ATTENTION_FUNCTIONS", None) is not None
        and getattr(found, "eager_attention_forward", None) is not None
    )


def fixed_implementation(core: nn.Module) -> str | None:
    """The attention implementation ``core``'s class was chosen for when the model loaded.

    transformers 4.x picks some attention classes at load time from a table in the modeling
    file (``{"eager": BertSelfAttention, "sdpa": BertSdpaSelfAttention}``): such a module keeps
    its implementation whatever the config says later. ``None`` where the class is the eager
    one or the file has no such table.

    Example:
        >>> fixed_implementation(nn.Linear(2, 2)) is None
        True
    """
    cls = type(core)
    for value in vars(_modeling_module(core) or object).values():
        if isinstance(value, dict) and "eager" in value and cls in value.values():
            if value["eager"] is cls:
                return None
            return next(str(k) for k, v in value.items() if v is cls)
    return None


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, _attend)
    _REGISTERED = True


def _attend(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    tap = _CORES.get(module)
    if tap is None:
        raise CaptureError(
            f"{type(module).__name__} asked for the {IMPLEMENTATION!r} attention implementation "
            "outside a capture or edit of its heads: set its config's attention implementation "
            "back (e.g. model.set_attn_implementation('sdpa'))"
        )
    return tap.attend(module, query, key, value, attention_mask, *args, **kwargs)


def _switch_eager(config: Any) -> None:
    entry = _EAGER.get(id(config))
    if entry is None:
        before = getattr(config, "_attn_implementation", None)
        _EAGER[id(config)] = [config, 1, before]
        config.__dict__["_attn_implementation_internal"] = "eager"
    else:
        entry[1] += 1


def _restore_eager(config: Any) -> None:
    entry = _EAGER.get(id(config))
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _EAGER[id(config)]
        config.__dict__["_attn_implementation_internal"] = entry[2]


@contextlib.contextmanager
def eager(configs: Iterable[Any]) -> Iterator[None]:
    """Run under eager attention while inside: ``configs`` switched, then restored.

    Counted with the switches head captures make, so nesting either in the other restores
    each config only when the last user leaves.

    Example:
        >>> from transformers import GPT2Config
        >>> config = GPT2Config(attn_implementation="sdpa")
        >>> with eager([config]):
        ...     inside = config._attn_implementation
        >>> inside, config._attn_implementation
        ('eager', 'sdpa')
    """
    found = list(configs)
    with _LOCK:
        for config in found:
            _switch_eager(config)
    try:
        yield
    finally:
        with _LOCK:
            for config in found:
                _restore_eager(config)


def _weight_per_head(o: nn.Module, heads: int) -> Callable[[], torch.Tensor]:
    """A function giving ``o``'s weight as ``[out, heads, head_dim]`` (read at each call)."""
    weight = getattr(o, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise MissingPartError(
            f"the output projection {type(o).__name__} has no 2-D weight, so each head's result "
            "cannot be computed"
        )
    if isinstance(o, nn.Linear):
        return lambda: o.weight.view(o.weight.shape[0], heads, -1)
    nf = getattr(o, "nf", None)
    if isinstance(nf, int) and weight.shape[1] == nf:
        # transformers' Conv1D (GPT-2 family): weight is [in, out].
        def transposed() -> torch.Tensor:
            current = o.weight
            assert isinstance(current, torch.Tensor)
            return current.t().reshape(current.shape[1], heads, -1)

        return transposed
    raise MissingPartError(
        f"the output projection {type(o).__name__} is neither nn.Linear nor transformers' "
        "Conv1D, so each head's result cannot be computed from its weight"
    )


class HeadTap:
    """The sites of one attention module, and what must be in place while they are used.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> attn = model.model.layers[0].self_attn
        >>> tap = head_tap(attn, HeadSpec(o="o_proj"), cfg, "block[0].attn")
        >>> tap.heads, tap.kv_heads, tap.head_dim
        (4, 2, 8)
    """

    def __init__(self, attn: nn.Module, spec: HeadSpec, config: Any, label: str) -> None:
        self.attn = attn
        self.spec = spec
        self.label = label
        self.sites = {name: HeadSite(name, label) for name in SITES}
        core: nn.Module | None = attn
        if spec.core:
            core = get_path(attn, spec.core)
        self.core = core
        o = get_path(attn, spec.o)
        if o is None:
            raise MissingPartError(
                f"{label}: the head layout says the output projection is {spec.o!r} inside "
                f"{type(attn).__name__}, which has no such module"
            )
        self.projection = o
        """The output projection module (``result`` is read at its output)."""
        self.z_module = o
        """The module whose input is ``z``: ``o``, or the norm before it (``o_norm``)."""
        self.o: nn.Module = o
        """What ``z`` goes through to ``o``'s output: ``o``, or ``o`` after ``o_norm``."""
        if spec.o_norm is not None:
            norm = get_path(attn, spec.o_norm)
            if norm is None:
                raise MissingPartError(
                    f"{label}: the head layout says the heads pass through the norm "
                    f"{spec.o_norm!r} inside {type(attn).__name__}, which has no such module"
                )
            self.z_module = norm
            self.o = _NormThenProject(norm, o)
        self.heads, self.kv_heads, self.head_dim = spec.counts(config, core)
        self.config = config
        self.inline = core is not None and not uses_attention_interface(core)
        """Whether ``core`` computes attention inline (then q/k/v/pattern are traced)."""
        self._per_head = _weight_per_head(o, self.heads) if _has_weight(o) else None
        self._core_users = 0
        self._o_users = 0
        self._handles: list[Any] = []
        self._o_handles: list[Any] = []
        self._real_config: Any = None
        self._eager_config: Any = None
        self._ran: dict[int, bool] = {}
        self._modes: dict[int, _Trace] = {}
        self.rotary: tuple[tuple[dict[str, Any], str], ...] = (
            rotary_functions(core) if core is not None else ()
        )
        """The rotary functions ``core``'s forward calls, as (module globals, name)."""
        self._pre_users = 0
        self._rotary_handles: list[Any] = []
        self._rotary_calls: dict[int, list[_RotaryCall]] = {}
        self.arguments: list[dict[str, Any]] | None = None
        """Set to a list to keep what each call gave the attention function (the mask, the
        scaling and the other keyword arguments): the conformance checks recompute the
        pattern from them. ``None`` (the default) keeps nothing."""
        self.rotations: list[dict[str, list[_Span]]] | None = None
        """Set to a list to keep, for each call that reads q_pre or k_pre, where the rotary
        functions' values were found (``{"q": spans, "k": spans}``): the conformance checks
        rotate q_pre again with them. ``None`` (the default) keeps nothing."""

    # -- what a site needs --------------------------------------------------------------------

    def why_not(self, site: str) -> str | None:
        """Why ``site`` cannot be read on this module (``None``: it can)."""
        if site in CORE_SITES:
            if self.spec.qkv_missing:
                return self.spec.qkv_missing
            if self.core is None:
                return f"the head layout names core={self.spec.core!r}, which is missing"

        if site in EAGER_SITES and self.core is not None:
            fixed = fixed_implementation(self.core)
            if fixed is not None:
                import transformers

                return (
                    f"{type(self.core).__name__} was built for {fixed} attention when the model "
                    f"loaded (transformers {transformers.__version__} picks this class then), "
                    "which computes no attention weights: load the model with "
                    "attn_implementation='eager' to read scores and patterns (q, k and v work "
                    "as loaded)"
                )
        if site in ("q_pre", "k_pre") and self.core is not None and not self.rotary:
            hint = _rotary_hint(self.core)
            if hint is not None:
                return (
                    f"{type(self.core).__name__} {hint}, but its forward calls no "
                    "apply_*rotary*/apply_*rope* function of its modeling file, where the values "
                    "before the rotary embedding are read"
                )
        if site == "result" and self._per_head is None:
            return f"the output projection {type(self.projection).__name__} has no 2-D weight"
        return None

    @contextlib.contextmanager
    def use(self, site: str) -> Iterator[None]:
        """Hold what ``site`` needs in place (entered by captures and edits that use it)."""
        with _LOCK:
            self._acquire(site)
        try:
            yield
        finally:
            with _LOCK:
                self._release(site)

    def _acquire(self, site: str) -> None:
        reason = self.why_not(site)
        if reason is not None:
            raise MissingPartError(f"{self.label}.{site} cannot be read: {reason}")
        if site in CORE_SITES:
            if self._core_users == 0:
                self._install_core()
            self._core_users += 1
            if site in EAGER_SITES:
                _switch_eager(self._real_config)
                self._eager_config = self._real_config
            if site in ("q_pre", "k_pre"):
                if self._pre_users == 0:
                    self._install_rotary()
                self._pre_users += 1
        else:
            if self._o_users == 0:
                self._o_handles = [
                    self.z_module.register_forward_pre_hook(self._o_pre, with_kwargs=True),
                    self.projection.register_forward_hook(self._o_post, with_kwargs=True),
                ]
            self._o_users += 1

    def _release(self, site: str) -> None:
        if site in CORE_SITES:
            if site in ("q_pre", "k_pre"):
                self._pre_users -= 1
                if self._pre_users == 0:
                    self._remove_rotary()
            if site in EAGER_SITES:
                _restore_eager(self._eager_config)
            self._core_users -= 1
            if self._core_users == 0:
                self._remove_core()
        else:
            self._o_users -= 1
            if self._o_users == 0:
                for handle in self._o_handles:
                    handle.remove()
                self._o_handles = []

    def _install_core(self) -> None:
        core = self.core
        assert core is not None
        if self.inline:
            self._real_config = core.__dict__.get("config") or self.config
            self._handles = [
                core.register_forward_pre_hook(self._inline_enter),
                core.register_forward_hook(self._inline_leave, always_call=True),
            ]
            return
        _register()
        real = core.__dict__.get("config")
        if real is None:
            raise MissingPartError(f"{self.label}: {type(core).__name__} has no config attribute")
        view = copy.copy(real)
        view.__dict__["_attn_implementation_internal"] = IMPLEMENTATION
        self._real_config = real
        core.config = view
        _CORES[core] = self
        self._handles = [
            core.register_forward_pre_hook(self._core_enter),
            core.register_forward_hook(self._core_leave),
        ]

    def _remove_core(self) -> None:
        core = self.core
        assert core is not None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if not self.inline and core.__dict__.get("config") is not self._real_config:
            core.config = self._real_config
        _CORES.pop(core, None)
        self._real_config = None

    # -- before the rotary embedding ----------------------------------------------------------

    def _install_rotary(self) -> None:
        core = self.core
        assert core is not None
        self._rotary_handles = [
            core.register_forward_pre_hook(self._rotary_enter),
            core.register_forward_hook(self._rotary_leave, always_call=True),
        ]
        _patch_rotary(self.rotary)

    def _remove_rotary(self) -> None:
        for handle in self._rotary_handles:
            handle.remove()
        self._rotary_handles = []
        _unpatch_rotary(self.rotary)

    def _rotary_enter(self, module: nn.Module, args: Any) -> None:
        thread = get_ident()
        _ROTATING.setdefault(thread, []).append(self)
        self._rotary_calls[thread] = []

    def _rotary_leave(self, module: nn.Module, args: Any, output: Any) -> None:
        thread = get_ident()
        stack = _ROTATING.get(thread, [])
        if stack and stack[-1] is self:
            stack.pop()
        if not stack:
            _ROTATING.pop(thread, None)
        self._rotary_calls.pop(thread, None)

    def note_rotary(self, function: Any, args: tuple[Any, ...], kwargs: Any, out: Any) -> None:
        """Keep what a rotary function received and returned while this attention runs."""
        calls = self._rotary_calls.get(get_ident())
        if calls is None:
            return
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        pairs: list[tuple[int, torch.Tensor, torch.Tensor]] | None = []
        for i, returned in enumerate(outs):
            received = args[i] if i < len(args) else None
            if not (
                isinstance(received, torch.Tensor)
                and isinstance(returned, torch.Tensor)
                and received.shape == returned.shape
                and received.dim() == 4
            ):
                pairs = None  # not "each value rotated in place of what it received"
                break
            assert pairs is not None
            pairs.append((i, received, returned))
        calls.append(_RotaryCall(function, args, dict(kwargs), pairs))

    def before_rotary(
        self, query: torch.Tensor, key: torch.Tensor, repeated: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` ``[b, heads, s, d]`` and ``key`` ``[b, kv, t, d]`` (``[b, heads, t, d]``
        where ``repeated``: copied to every query head of its group) passed through ``q_pre``
        and ``k_pre`` (the values before the rotary embedding), back as the model goes on.

        What a rotary function returned is found, exactly, in ``query`` or ``key`` (the last
        positions of ``key`` under a KV cache; all of each head or a part, first or last); the
        value before it is ``query``/``key`` with those dimensions replaced by what the function
        received. An edit of ``q_pre`` is rotated again by the same function with the same
        arguments (cos, sin).
        """
        calls = self._rotary_calls.get(get_ident(), [])
        group = self.heads // self.kv_heads if repeated and self.kv_heads < self.heads else 1
        keys = key[:, ::group] if group > 1 else key
        spans: dict[str, list[_Span]] = {"q": [], "k": []}
        for call in calls:
            name = getattr(call.function, "__name__", type(call.function).__name__)
            if call.pairs is None:
                raise CaptureError(
                    f"{self.label}: the rotary function {name} did not return one rotated value "
                    "per value it received (each shaped alike), so q_pre and k_pre cannot be read"
                )
            for index, received, returned in call.pairs:
                for role, value in (("q", query), ("k", keys)):
                    found = _locate(value, returned)
                    if found is not None:
                        spans[role].append(_Span(call, index, received, *found))
                        break
                else:
                    raise CaptureError(
                        f"{self.label}: what {name} returned is not found in the queries or keys "
                        "the attention received (the model changes them after the rotary "
                        "embedding), so q_pre and k_pre cannot be read"
                    )
        if self.rotations is not None:
            self.rotations.append(spans)
        sites = self.sites
        if sites["q_pre"].active():
            if not spans["q"]:
                query = sites["q_pre"](query.transpose(1, 2)).transpose(1, 2)
            else:
                pre = _unrotate(query, spans["q"])
                shown = pre.transpose(1, 2)
                new = sites["q_pre"](shown)
                if new is not shown:
                    query = rotate(new.transpose(1, 2), spans["q"]).to(query.dtype)
                elif in_graph(shown):
                    # Unedited under autograd: the model keeps its numbers, its gradient flows
                    # through the record (rotated again, as the model rotated it).
                    through = rotate(shown.transpose(1, 2), spans["q"]).to(query.dtype)
                    query = ValueFrom.apply(query, through)  # type: ignore[no-untyped-call]
        if sites["k_pre"].active():
            seen = spans["k"][0].seq if spans["k"] else keys.shape[2]
            tail = keys[:, :, keys.shape[2] - seen :]
            pre = _unrotate(tail, spans["k"])
            shown = pre.transpose(1, 2)
            sites["k_pre"](shown)  # read only: an edit is refused before any forward
            if spans["k"] and in_graph(shown):
                through = rotate(shown.transpose(1, 2), spans["k"]).to(key.dtype)
                if seen < keys.shape[2]:  # the cached keys keep their own path
                    through = torch.cat([keys[:, :, : keys.shape[2] - seen], through], dim=2)
                if group > 1:
                    through = through.repeat_interleave(group, dim=1)
                key = ValueFrom.apply(key, through)  # type: ignore[no-untyped-call]
        return query, key

    # -- the forward --------------------------------------------------------------------------

    def _core_enter(self, module: nn.Module, args: Any) -> None:
        self._ran[get_ident()] = False

    def _core_leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._ran.pop(get_ident(), True):
            return
        used = [s for s in CORE_SITES if self.sites[s].active()]
        if used:
            raise CaptureError(
                f"{self.label}: {type(module).__name__} ran without calling the attention "
                f"function, so {', '.join(sorted(used))} would be missing or unedited (a "
                "configuration that bypasses transformers' attention interface, such as GPT-2's "
                "reorder_and_upcast_attn)"
            )

    def _inline_enter(self, module: nn.Module, args: Any) -> None:
        if not any(self.sites[s].active() for s in CORE_SITES):
            return
        mode = _Trace(self)
        self._modes[get_ident()] = mode
        mode.__enter__()  # type: ignore[no-untyped-call]

    def _inline_leave(self, module: nn.Module, args: Any, output: Any) -> None:
        mode = self._modes.pop(get_ident(), None)
        if mode is None:
            return
        mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
        if mode.failed is not None:
            return  # the forward is already raising
        used = sorted(s for s in CORE_SITES if self.sites[s].active())
        missing = [s for s in used if s not in mode.seen]
        if missing:
            found = (
                ""
                if not mode.sdpa
                else (
                    ": it called scaled_dot_product_attention, which computes no weights; load "
                    "the model with attn_implementation='eager'"
                )
            )
            raise CaptureError(
                f"{self.label}: {type(module).__name__} computes attention inline, and this "
                f"call did not show the steps {', '.join(missing)} are read from (the scores "
                f"matmul, the softmax, the values matmul){found}"
            )

    def _function(self, module: nn.Module) -> Callable[..., Any]:
        implementation = getattr(self._real_config, "_attn_implementation", None)
        if implementation in (None, "eager", IMPLEMENTATION):
            return _modeling_module(module).eager_attention_forward  # type: ignore[no-any-return]
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS[implementation]  # type: ignore[no-any-return]

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention function with ``q``, ``k``, ``v`` and ``pattern`` passed through sites."""
        self._ran[get_ident()] = True
        function = self._function(module)
        switched = _EAGER.get(id(self._real_config))
        if (
            isinstance(attention_mask, torch.Tensor)
            and attention_mask.dtype == torch.bool
            and switched is not None
            and switched[2] not in (None, "eager")
        ):
            # Every layer gets this one mask; eager attention adds it to the scores, where
            # sdpa reads True as "may attend": the switch would change what the model computes.
            raise CaptureError(
                f"{self.label}.pattern: the model was called with a boolean attention mask "
                f"(True: may attend, as {switched[2]} reads it), but patterns need eager "
                "attention, which adds the mask to the scores instead of masking with it, so "
                "attention would cross the mask's boundaries. Pass it as an additive float "
                "mask (torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(dtype).min)), "
                "which both implementations read alike"
            )
        if self.arguments is not None:
            self.arguments.append({"attention_mask": attention_mask, **kwargs})
        sites = self.sites
        if query.dim() != 4 or key.dim() != 4:
            raise CaptureError(
                f"{self.label}: the attention function received query {tuple(query.shape)} and "
                f"key {tuple(key.shape)}, not [batch, heads, seq, head_dim]"
            )
        heads, kv_heads, width = query.shape[1], key.shape[1], query.shape[-1]
        if (heads, kv_heads, width) != (self.heads, self.kv_heads, self.head_dim):
            raise CaptureError(
                f"{self.label}: the attention function received {heads} query and {kv_heads} "
                f"key/value heads of width {width}, but the adapter's head layout says "
                f"{self.heads} and {self.kv_heads} of width {self.head_dim}: the adapter's "
                "HeadSpec is wrong for this model"
            )
        if sites["q_pre"].active() or sites["k_pre"].active():
            query, key = self.before_rotary(query, key)
        if sites["q"].active():
            query = sites["q"](query.transpose(1, 2)).transpose(1, 2)
        if sites["k"].active():
            key = sites["k"](key.transpose(1, 2)).transpose(1, 2)
        if sites["v"].active():
            value = sites["v"](value.transpose(1, 2)).transpose(1, 2)
        if sites["scores"].active():
            shape = (query.shape[0], heads, query.shape[2], key.shape[2])
            with _Scores(sites["scores"], shape, getattr(module, "sinks", None)) as mode:
                out, weights = function(module, query, key, value, attention_mask, *args, **kwargs)
            if not mode.seen:
                raise CaptureError(
                    f"{self.label}.scores: the attention function "
                    f"{getattr(function, '__name__', function)!r} took no softmax of "
                    f"{list(shape)} scores, where the scores are read; load the model with "
                    "attn_implementation='eager'"
                )
        else:
            out, weights = function(module, query, key, value, attention_mask, *args, **kwargs)
        if sites["pattern"].active():
            if weights is None:
                raise CaptureError(
                    f"{self.label}.pattern: the attention implementation "
                    f"{getattr(self._real_config, '_attn_implementation', None)!r} returned no "
                    "weights; load the model with attn_implementation='eager'"
                )
            new = sites["pattern"](weights)
            if new is not weights:
                values = value
                if kv_heads != heads:
                    values = value.repeat_interleave(heads // kv_heads, dim=1)
                out = torch.matmul(new.to(values.dtype), values).transpose(1, 2).contiguous()
                weights = new
        return out, weights

    def _o_pre(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        site = self.sites["z"]
        if not site.active() or not args:
            return None
        x = args[0]
        z = x.unflatten(-1, (self.heads, -1))
        new = site(z)
        if new is z and not in_graph(z):
            return None
        # Under autograd the model goes on with the recorded value (a view of the same
        # numbers), so gradients with respect to the record are the model's.
        return (new.reshape(x.shape), *args[1:]), kwargs

    def _o_post(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        site = self.sites["result"]
        if not site.active() or not args or self._per_head is None:
            return None
        x = args[0]
        z = x.unflatten(-1, (self.heads, -1))
        with onloaded(module, f"{self.label}.result"):  # offloaded by accelerate after forward
            weight = self._per_head()
            bias = getattr(module, "bias", None)
        result = torch.einsum("...hd,ohd->...ho", z, weight.to(z.dtype))
        new = site(result)
        if new is result and not in_graph(result):
            return None
        out = new.sum(dim=-2)
        if isinstance(bias, torch.Tensor):
            out = out + bias.to(out.dtype)
        if new is result and isinstance(output, torch.Tensor):
            # Unedited under autograd: the model keeps o's own numbers (a sum over heads
            # rounds differently), and its gradient flows through the record instead.
            return ValueFrom.apply(output, out.to(output.dtype))  # type: ignore[no-untyped-call]
        return out.to(output.dtype) if isinstance(output, torch.Tensor) else out


_MATMULS = {
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    torch.Tensor.baddbmm,
}
_SOFTMAXES = {torch.softmax, torch.Tensor.softmax, nn.functional.softmax}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_QKV = ("query", "key", "value")


class _Scores(TorchFunctionMode):
    """Follows an eager attention function to its softmax and passes the scores it takes
    (``[batch, heads, query, key]``) through the ``scores`` site.

    Where the module has attention sinks (GPT-OSS: one extra logit per head joins the softmax
    and is dropped after it), the scores are the first operand of the concatenation that adds
    that column, before the softmax's overflow guard subtracts the row maximum.
    """

    def __init__(self, site: HeadSite, shape: tuple[int, ...], sinks: Any) -> None:
        super().__init__()
        self.site = site
        self.shape = shape
        self.sinks = isinstance(sinks, torch.Tensor)
        self.seen = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if self.seen:
            return func(*args, **kwargs)
        values = list(args)
        if func in _CATS and self.sinks:
            tensors = values[0] if values else kwargs.get("tensors")
            dim = values[1] if len(values) > 1 else kwargs.get("dim", 0)
            if (
                isinstance(tensors, (list, tuple))
                and tensors
                and isinstance(tensors[0], torch.Tensor)
                and tuple(tensors[0].shape) == self.shape
                and dim in (-1, len(self.shape) - 1)
            ):
                self.seen = True
                joined = [self.site(tensors[0]), *tensors[1:]]
                if values:
                    values[0] = joined
                else:
                    kwargs["tensors"] = joined
        elif func in _SOFTMAXES and not self.sinks:
            scores = values[0] if values else kwargs.get("input")
            if isinstance(scores, torch.Tensor) and tuple(scores.shape) == self.shape:
                self.seen = True
                if values:
                    values[0] = self.site(scores)
                else:
                    kwargs["input"] = self.site(scores)
        return func(*values, **kwargs)


class _Trace(TorchFunctionMode):
    """Follows an inline attention forward: the scores matmul (q, kᵀ), the softmax (the
    pattern) and the values matmul (v), passing each through its site.

    Only the calls whose shapes are those of this module's heads count (``[b, h, s, d]`` or
    ``[b*h, s, d]`` with ``d`` the head width), so a matmul elsewhere in the forward (rotary
    frequencies) is left alone; a call that does not fit where one is expected is not guessed
    at: the capture then ends with an error (see :meth:`HeadTap._inline_leave`).
    """

    def __init__(self, tap: HeadTap) -> None:
        super().__init__()
        self.tap = tap
        self.stage = 0
        self.seen: set[str] = set()
        self.sdpa = False
        self.failed: BaseException | None = None
        self.batch = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        try:
            if func is nn.functional.scaled_dot_product_attention and self.stage == 0:
                self.sdpa = True
                return self._sdpa(func, args, kwargs)
            if func in _MATMULS and self.stage in (0, 2):
                return self._matmul(func, args, kwargs)
            elif func in _SOFTMAXES and self.stage == 1:
                values = list(args)
                scores = values[0] if values else kwargs.get("input")
                if isinstance(scores, torch.Tensor) and scores.dim() in (3, 4):
                    new_scores = self._pass("scores", scores, key_axis=True)
                    if values:
                        values[0] = new_scores
                    else:
                        kwargs["input"] = new_scores
                out = func(*values, **kwargs)
                new = self._pass("pattern", out, key_axis=True)
                self.stage = 2
                return new
        except BaseException as exc:
            self.failed = exc
            raise
        return func(*args, **kwargs)

    def _sdpa(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """q, k and v of a ``scaled_dot_product_attention`` call (it computes no pattern)."""
        values = list(args)
        given: list[torch.Tensor] = []
        for index, name in enumerate(_QKV):
            found = kwargs.get(name, values[index] if index < len(values) else None)
            if not isinstance(found, torch.Tensor) or found.dim() != 4:
                return func(*values, **kwargs)
            given.append(found)
        self.batch = given[0].shape[0]
        rotated = self._before_rotary(given[0], given[1])
        for index, name in enumerate(_QKV):
            new = self._pass(name[0], rotated[index] if index < 2 else given[index])
            if name in kwargs:
                kwargs[name] = new
            else:
                values[index] = new
        self.stage = 1  # no weights: a pattern (stage 2) is never reached
        return func(*values, **kwargs)

    def _matmul(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        values = list(args)
        if func in (torch.baddbmm, torch.Tensor.baddbmm):
            # baddbmm(input, batch1, batch2, *, beta, alpha): BLOOM adds ALiBi this way.
            slots: list[tuple[str, int]] = [("batch1", 1), ("batch2", 2)]
        else:
            slots = [("input", 0), ("other", 1)]

        def get(slot: tuple[str, int]) -> Any:
            name, index = slot
            return (
                kwargs[name] if name in kwargs else (values[index] if index < len(values) else None)
            )

        def put(slot: tuple[str, int], value: torch.Tensor) -> None:
            name, index = slot
            if name in kwargs:
                kwargs[name] = value
            else:
                values[index] = value

        a, b = get(slots[0]), get(slots[1])
        if not (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dim() in (3, 4)
            and b.dim() == a.dim()
            and a.is_floating_point()
        ):
            return func(*values, **kwargs)
        tap = self.tap
        if self.stage == 0:
            if a.shape[-1] != tap.head_dim or b.shape[-2] != tap.head_dim:
                return func(*values, **kwargs)
            self.batch = a.shape[0] if a.dim() == 4 else a.shape[0] // tap.heads
            k = b.transpose(-1, -2)
            a, rotated = self._before_rotary(a, k)
            put(slots[0], self._pass("q", a))
            new_k = self._pass("k", rotated)
            if new_k is not k:
                put(slots[1], new_k.transpose(-1, -2))
            self.stage = 1
            return func(*values, **kwargs)
        # stage 2: the weights times the values
        if a.shape[-1] != b.shape[-2]:
            return func(*values, **kwargs)
        put(slots[1], self._pass("v", b))
        self.stage = 3
        return func(*values, **kwargs)

    def _before_rotary(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` and ``k`` (the model's layout) through ``q_pre`` and ``k_pre``."""
        sites = self.tap.sites
        if not (sites["q_pre"].active() or sites["k_pre"].active()):
            return q, k
        self.seen.update(("q_pre", "k_pre"))
        q4 = q if q.dim() == 4 else q.view(self.batch, -1, *q.shape[1:])
        k4 = k if k.dim() == 4 else k.view(self.batch, -1, *k.shape[1:])
        repeated = k4.shape[1] == self.tap.heads and self.tap.kv_heads < self.tap.heads
        new_q, new_k = self.tap.before_rotary(q4, k4, repeated)
        if new_q is not q4:
            q = new_q.reshape(q.shape)
        if new_k is not k4:
            k = new_k.reshape(k.shape)
        return q, k

    def _pass(self, name: str, value: torch.Tensor, key_axis: bool = False) -> torch.Tensor:
        """``value`` through site ``name`` in the site's layout, back in the model's.

        The model's layout is ``[batch, heads, seq, d]`` or ``[batch * heads, seq, d]``; the
        site's is ``[batch, seq, heads, d]`` (``[batch, heads, query, key]`` for the pattern).
        """
        self.seen.add(name)
        site = self.tap.sites[name]
        if not site.active():
            return value
        shape = value.shape
        split = value.dim() == 3
        grouped = value.view(self.batch, shape[0] // self.batch, *shape[1:]) if split else value
        tap = self.tap
        repeated = name in ("k", "v") and tap.kv_heads < tap.heads and grouped.shape[1] == tap.heads
        if repeated:
            # Copied to every query head of its group before the product (repeat_kv): shown
            # once per key/value head, as the other paths show them; an edit reaches every copy.
            grouped = grouped[:, :: tap.heads // tap.kv_heads]
        shown = grouped if key_axis else grouped.transpose(1, 2)
        new: torch.Tensor = site(shown)
        if new is shown and not in_graph(shown):
            return value
        back = new if key_axis else new.transpose(1, 2)
        if repeated:
            back = back.repeat_interleave(tap.heads // tap.kv_heads, dim=1)
        return back.reshape(shape) if split else back


def in_graph(value: torch.Tensor) -> bool:
    """Whether autograd follows ``value`` here (then the model must go on with the record).

    Example:
        >>> in_graph(torch.ones(2, requires_grad=True)), in_graph(torch.ones(2))
        (True, False)
    """
    return value.requires_grad and torch.is_grad_enabled()


class ValueFrom(torch.autograd.Function):
    """``value``'s numbers with ``through``'s gradient path: ``through`` equals ``value`` up to
    rounding, and the gradient reaches what ``through`` was computed from, not ``value``'s graph.

    Example:
        >>> a = torch.ones(2, requires_grad=True)
        >>> b = torch.ones(2, requires_grad=True)
        >>> ValueFrom.apply(a.detach() * 3, b * 3).sum().backward()
        >>> b.grad
        tensor([3., 3.])
    """

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, through: torch.Tensor) -> torch.Tensor:
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


class _NormThenProject(nn.Module):
    """``o`` applied after the norm the heads' concatenation passes through first (BitNet's
    ``attn_sub_norm``): what ``z`` becomes at ``o``'s output, with ``o``'s bias.

    Example:
        >>> step = _NormThenProject(nn.LayerNorm(4), nn.Linear(4, 2))
        >>> step(torch.ones(1, 4)).shape, step.bias is step.projection.bias
        (torch.Size([1, 2]), True)
    """

    def __init__(self, norm: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.projection = projection

    @property
    def bias(self) -> Any:
        return getattr(self.projection, "bias", None)

    def forward(self, hidden_states: torch.Tensor) -> Any:
        return self.projection(self.norm(hidden_states))


# -- following the rotary embedding --------------------------------------------------------------


@dataclass
class _RotaryCall:
    """One call of a rotary function: the function, its arguments and, for each value it
    returned, ``(argument index, what it received, what it returned)`` (``None`` where the
    values returned do not each stand for one received)."""

    function: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    pairs: list[tuple[int, torch.Tensor, torch.Tensor]] | None


@dataclass
class _Span:
    """Where one rotated value sits in the queries or keys ``[b, heads, seq, d]``: its last
    ``seq`` positions, dimensions ``offset:offset + width`` (``transposed``: the rotary function
    saw ``[b, seq, heads, width]``)."""

    call: _RotaryCall
    index: int
    received: torch.Tensor
    transposed: bool
    offset: int
    width: int
    seq: int


def rotary_functions(core: nn.Module) -> tuple[tuple[dict[str, Any], str], ...]:
    """The rotary functions the forward of ``core``'s class (and of the classes it inherits
    from) calls by name, as ``(the modeling file's globals, name)``.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
        ...                   num_attention_heads=4, vocab_size=64)
        >>> attn = LlamaForCausalLM(cfg).model.layers[0].self_attn
        >>> [name for _, name in rotary_functions(attn)], rotary_functions(nn.Linear(2, 2))
        (['apply_rotary_pos_emb'], ())
    """
    found: dict[tuple[int, str], tuple[dict[str, Any], str]] = {}
    for cls in type(core).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None or cls.__module__.startswith("torch."):
            continue
        function = inspect.unwrap(forward)
        code = getattr(function, "__code__", None)
        names = getattr(function, "__globals__", None)
        if code is None or not isinstance(names, dict):
            continue
        for name in code.co_names:
            if _ROTARY_NAME.match(name) and callable(names.get(name)):
                found.setdefault((id(names), name), (names, name))
    return tuple(found.values())


def _rotary_hint(core: nn.Module) -> str | None:
    """What says ``core`` applies a rotary embedding (``None``: nothing does)."""
    forward = getattr(type(core), "forward", None)
    try:
        parameters = inspect.signature(inspect.unwrap(forward)).parameters if forward else {}
    except (TypeError, ValueError):
        parameters = {}
    if "position_embeddings" in parameters:
        return "receives position embeddings (cos, sin)"
    names = [*core.__dict__, *core._modules]
    rotary = [n for n in names if re.search("rotary|rope", n, re.IGNORECASE)]
    return f"holds {rotary[0]}" if rotary else None


def _rotary_wrapper(function: Any) -> Callable[..., Any]:
    def rotary(*args: Any, **kwargs: Any) -> Any:
        out = function(*args, **kwargs)
        stack = _ROTATING.get(get_ident())
        if stack:
            stack[-1].note_rotary(function, args, kwargs, out)
        return out

    rotary.__wrapped__ = function  # type: ignore[attr-defined]
    rotary.__name__ = str(getattr(function, "__name__", "rotary"))
    return rotary


def _patch_rotary(functions: Iterable[tuple[dict[str, Any], str]]) -> None:
    """Have each rotary function note its calls (in the modeling file's globals, which the
    attention forward looks the name up in at each call) while a q_pre or k_pre is in use.
    Outside an attention that reads them, in any thread, the wrapper only calls the function."""
    with _LOCK:
        for names, name in functions:
            entry = _PATCHED.get((id(names), name))
            if entry is None:
                original = names[name]
                wrapper = _rotary_wrapper(original)
                names[name] = wrapper
                _PATCHED[(id(names), name)] = [names, original, wrapper, 1]
            else:
                entry[3] += 1


def _unpatch_rotary(functions: Iterable[tuple[dict[str, Any], str]]) -> None:
    with _LOCK:
        for names, name in functions:
            entry = _PATCHED.get((id(names), name))
            if entry is None:
                continue
            entry[3] -= 1
            if entry[3] == 0:
                del _PATCHED[(id(names), name)]
                if names.get(name) is entry[2]:
                    names[name] = entry[1]


def _locate(value: torch.Tensor, returned: torch.Tensor) -> tuple[bool, int, int, int] | None:
    """Where ``returned`` sits, exactly, in ``value`` ``[b, heads, t, d]``: ``(transposed,
    offset, width, seq)``, or ``None``. Its heads may be one shared by all (broadcast)."""
    b, heads, t, d = value.shape
    for transposed in (False, True):
        found = returned.transpose(1, 2) if transposed else returned
        if (
            found.shape[0] != b
            or found.shape[1] not in (heads, 1)
            or found.shape[2] > t
            or found.shape[3] > d
        ):
            continue
        seq, width = found.shape[2], found.shape[3]
        for offset in dict.fromkeys((0, d - width)):
            part = value[:, :, t - seq :, offset : offset + width]
            if torch.equal(part, found.to(part.dtype).expand(part.shape)):
                return transposed, offset, width, seq
    return None


def _unrotate(value: torch.Tensor, spans: Sequence[_Span]) -> torch.Tensor:
    """The last positions of ``value`` with each span replaced by what the rotary function
    received (``value`` itself where nothing was rotated)."""
    if not spans:
        return value
    seq = spans[0].seq
    pre = value[:, :, value.shape[2] - seq :].clone()
    for span in spans:
        received = span.received.transpose(1, 2) if span.transposed else span.received
        part = pre[..., span.offset : span.offset + span.width]
        pre[..., span.offset : span.offset + span.width] = received.to(pre.dtype).expand(part.shape)
    return pre


def rotate(pre: torch.Tensor, spans: Sequence[_Span]) -> torch.Tensor:
    """``pre`` ``[b, heads, s, d]`` (q_pre or k_pre in the model's layout) rotated as the model
    rotated it: each span through its rotary function again, with the same other arguments.

    Example:
        >>> rotate(torch.ones(1, 2, 3, 4), []).shape
        torch.Size([1, 2, 3, 4])
    """
    if not spans:
        return pre
    out = pre.clone()
    for span in spans:
        piece = pre[..., span.offset : span.offset + span.width]
        if span.transposed:
            piece = piece.transpose(1, 2)
        args = list(span.call.args)
        args[span.index] = piece.to(span.received.dtype)
        result = span.call.function(*args, **span.call.kwargs)
        got = result[span.index] if isinstance(result, (tuple, list)) else result
        if span.transposed:
            got = got.transpose(1, 2)
        out[..., span.offset : span.offset + span.width] = got.to(out.dtype)
    return out


def _has_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


def head_tap(attn: nn.Module, spec: HeadSpec, config: Any, label: str) -> HeadTap:
    """The tap of an attention module (one per module and head layout, kept while it lives).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> cfg = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64)
        >>> attn = GPT2LMHeadModel(cfg).transformer.h[0].attn
        >>> tap = head_tap(attn, HeadSpec(o="c_proj"), cfg, "block[0].attn")
        >>> tap is head_tap(attn, HeadSpec(o="c_proj"), cfg, "block[0].attn"), tap.head_dim
        (True, 8)
    """
    with _LOCK:
        tap = _TAPS.get(attn)
        if tap is not None and tap.spec == spec and tap.projection is get_path(attn, spec.o):
            return tap
        tap = HeadTap(attn, spec, config, label)
        _TAPS[attn] = tap
        return tap


# -- heads named by locators and by heads= -------------------------------------------------------

Heads = int | Sequence[int] | None
"""Heads an edit touches: one index, several, or ``None`` (the whole value)."""


def head_site(loc: Locator) -> str | None:
    """The head value a locator names (``q``, ``z``, ... or ``o``), else ``None`` (a block,
    a part, or a sub-module of a part such as ``mlp.down_proj``).

    Example:
        >>> head_site(Locator.parse("block[0].attn.z")), head_site(Locator.parse("block[0]"))
        ('z', None)
        >>> head_site(Locator.parse("block[0].mlp.down_proj")) is None
        True
    """
    if not loc.is_block or not loc.sub or "." not in loc.sub:
        return None
    site = loc.sub.partition(".")[2]
    return site if site in SITES or site == "o" else None


def attn_part(loc: Locator) -> str:
    """The attention part of a block locator (``block[0].attn`` for ``block[0]``).

    Example:
        >>> attn_part(Locator.parse("block[1].cross_attn.z"))
        'block[1].cross_attn'
    """
    part = (loc.sub or "attn").partition(".")[0]
    return str(loc.model_copy(update={"sub": part, "side": "output"}))


def check_heads(heads: Any, arg: str = "heads=", what: str = "head") -> tuple[int, ...] | None:
    """``heads=`` (or ``features=``: ``arg``, of ``what``) in its plain form, a tuple of ints,
    checked before any forward.

    Example:
        >>> check_heads(3), check_heads([0, 5]), check_heads(None)
        ((3,), (0, 5), None)
    """
    if heads is None:
        return None
    items = [heads] if isinstance(heads, numbers.Integral) else heads
    if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, range, torch.Tensor)):
        raise InterventionError(
            f"{arg} takes a {what} index or a list of them (e.g. {arg}3, {arg}[0, 5]), got "
            f"{type(heads).__name__}: {heads!r:.60}"
        )
    if isinstance(items, torch.Tensor):
        items = items.flatten().tolist()
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise InterventionError(
                f"{arg} takes integer {what} indices, got {type(item).__name__}: {item!r:.40}"
            )
        out.append(int(item))
    if not out:
        raise InterventionError(f"{arg} is empty: name at least one {what} (or leave {arg}None)")
    return tuple(out)


def heads_in_range(
    heads: tuple[int, ...], count: int, loc: Locator, what: str = "head"
) -> tuple[int, ...]:
    """``heads`` as sorted non-negative indices, each checked against ``count``.

    Example:
        >>> heads_in_range((-1, 0), 4, Locator.parse("block[0].attn.z"))
        (0, 3)
    """
    bad = [h for h in heads if not -count <= h < count]
    if bad:
        raise InterventionError(
            f"{what} {bad[0]} is out of range for {loc}, which has {count} {what}s (use "
            f"{-count}..{count - 1})"
        )
    return tuple(sorted({h % count for h in heads}))


# -- the attention function, recomputed ------------------------------------------------------------


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    arguments: Mapping[str, Any],
    causal: bool = False,
    *,
    clamp: bool = False,
) -> torch.Tensor:
    """The scores ``[batch, heads, query, key]`` eager attention feeds its softmax, from ``q``
    ``[b, s, h, d]``, ``k`` ``[b, t, kv, d]`` and what the attention function was given
    (``scaling``, ``position_bias``, ``softcap``, ``attention_mask``). ``causal`` masks later
    keys too (GPT-2 on transformers 4.x hides them itself, not through the mask it is given);
    ``clamp`` keeps masked scores at the dtype's lowest value instead of letting an additive
    mask overflow (the model's own arithmetic does not clamp).

    Example:
        >>> q, k = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4)
        >>> attention_scores(q, k, {}, causal=True).shape
        torch.Size([1, 2, 3, 3])
    """
    heads, kv = q.shape[2], k.shape[2]
    # In the model's own dtype: a fully masked row (a padding query) then comes out as the
    # model computes it, uniform where min + score rounds to min.
    dtype = torch.promote_types(q.dtype, torch.float32)
    qh = q.transpose(1, 2).to(dtype)
    kh = k.transpose(1, 2).to(dtype)
    if kv != heads:
        kh = kh.repeat_interleave(heads // kv, dim=1)
    scaling = arguments.get("scaling")
    scores = qh @ kh.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    bias = arguments.get("position_bias")  # T5 on transformers 5: a keyword of its own
    if isinstance(bias, torch.Tensor):
        scores = scores + bias[..., -scores.shape[-2] :, : kh.shape[-2]].to(dtype)
    softcap = arguments.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    lowest = torch.finfo(dtype).min
    if causal:
        queries, keys = scores.shape[-2], scores.shape[-1]
        later = torch.ones(queries, keys, dtype=torch.bool, device=scores.device).triu(
            keys - queries + 1
        )
        scores = scores.masked_fill(later, lowest)
    mask = arguments.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        mask = mask[..., : kh.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, lowest)
        else:
            scores = scores + mask.to(dtype)
            if clamp:
                scores = scores.clamp(min=lowest)
    found: torch.Tensor = scores
    return found


def attention_pattern(scores: torch.Tensor, sinks: Any = None) -> torch.Tensor:
    """The softmax of ``scores`` (heads on axis -3); ``sinks``: one extra logit per head that
    takes part in the softmax and is left out after it, as GPT-OSS does.

    Example:
        >>> attention_pattern(torch.zeros(1, 2, 3, 3)).sum(-1).tolist()[0][0]
        [1.0, 1.0, 1.0]
    """
    if isinstance(sinks, torch.Tensor):
        column = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        both = torch.cat([scores, column], dim=-1)
        return torch.softmax(both - both.amax(-1, keepdim=True), dim=-1)[..., :-1]
    return torch.softmax(scores, dim=-1)
