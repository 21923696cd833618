"""Detection: an adapter for a model no plugin claims, guessed from its structure and proven.

The guess reads the model, never its name: the block list is an ``nn.ModuleList`` whose
blocks each run once per forward; the embedding is ``get_input_embeddings()``; what follows
the blocks (a final norm, a projection) is whichever chain of small modules turns the last
block's output into Hugging Face's ``hidden_states[-1]``; the head is
``get_output_embeddings()`` or the module holding it. One forward with
``output_hidden_states=True`` decides between the layouts (``hidden_states[0]`` as block 0's
input or as block 0's output, with or without a final norm), and the winner must then pass
every check of :func:`introspect.testing.check_conformance`. A guess that is not proven is
never used: :class:`~introspect._errors.NoAdapterError` says what could not be matched.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import permutations
from typing import Any

import torch
from torch import nn

from introspect._errors import IntrospectError, NoAdapterError
from introspect._hooks.session import hidden_of, input_device
from introspect._hookspecs import hookimpl
from introspect._inspector import Inspector
from introspect._model.paths import base_model as _base_model
from introspect._model.paths import get_path as _get_path
from introspect._plugins import (
    AUTHORING_HINT,
    IntrospectPluginManager,
    get_plugin_manager,
    get_registry,
)
from introspect._spec import AdapterSpec, HeadSpec, HiddenStart, LogitOp, StackSpec
from introspect.testing import check_conformance, check_heads, close, example_inputs

__all__ = ["DetectedAdapterWarning", "detect_adapter", "detected_message"]


# Generic vocabulary for sub-modules (class or attribute names), never architecture names.
_ATTN_NAME = re.compile(r"attention|attn", re.IGNORECASE)
_MLP_CLASS = re.compile(r"MLP|Mlp|FeedForward|FFN|Ffn|FF$|MoE|Moe|Experts")
_MLP_ATTR = re.compile(r"^(mlp|ffn|ff|feed_forward|feedforward|moe|block_sparse_moe|experts)$")
_NORM_NAME = re.compile(r"norm", re.IGNORECASE)
_SKIP_AFTER = (nn.Embedding, nn.Dropout, nn.Identity)

# Logit ops are the registered adapters' own (one fact, one place). A config attribute that
# names the same step under another name (xLSTM's output_logit_soft_cap for Gemma-2's
# final_logit_softcapping) is recognised by the part of the name from "logit" on, once
# spelling is normalised; names about attention, routers or gates cap something else.
_LOGIT_STEM = re.compile(r"logit.*$")
_NOT_A_LOGIT_STEP = re.compile(r"attn|attention|router|gate|expert", re.IGNORECASE)
_SPELLINGS = {"logits": "logit", "softcapping": "softcap"}
_MAX_AFTER_CANDIDATES = 16
_SUB_MODULE_NOTE = (
    "attn and mlp were chosen by their class or attribute names and proven only to run in "
    "every block; the hidden states, the final norm and the logits are proven against the model"
)


class DetectedAdapterWarning(UserWarning):
    """No adapter claims the model; a spec detected from its structure and proven is used.

    Silence it by making the spec permanent: pass ``Inspector(model, adapter=spec)`` or write
    a plugin with ``introspect scaffold``.

    Example:
        >>> issubclass(DetectedAdapterWarning, UserWarning)
        True
    """


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None
    calls: int = 0
    order: int = 0


@dataclass(frozen=True)
class _StackMatch:
    blocks: str
    start: HiddenStart
    input_kwarg: str
    chain: tuple[str, ...]
    raw_last: torch.Tensor


def _tolerance(model: nn.Module) -> tuple[float, float]:
    param = next(model.parameters(), None)
    if param is None or param.dtype in (torch.float32, torch.float64):
        return 1e-5, 1e-4
    return 1e-2, 1e-2


def _close(a: Any, b: Any, tol: tuple[float, float]) -> bool:
    return close(a, b, *tol)


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_.\-]+", "-", text.lower()).strip("-")
    return slug or "model"


def _block_lists(base: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Candidate block lists, outermost only, homogeneous and longest first."""
    found: list[tuple[str, nn.ModuleList, bool, int]] = []
    for order, (path, module) in enumerate(base.named_modules()):
        if not path or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(outer + ".") for outer, *_ in found):
            continue
        children = list(module)
        if not all(next(child.parameters(), None) is not None for child in children):
            continue
        homogeneous = len({type(child) for child in children}) == 1
        found.append((path, module, homogeneous, order))
    found.sort(key=lambda item: (not item[2], -len(item[1]), item[3]))
    return [(path, module) for path, module, _, _ in found]


def _probe_inputs(model: nn.Module) -> dict[str, Any]:

    config = model.config
    inputs = example_inputs(config, batch=2, seq=6)
    embed = model.get_input_embeddings()  # type: ignore[operator]
    rows = getattr(embed, "num_embeddings", None)
    device = input_device(model)
    for key in ("input_ids", "decoder_input_ids"):
        if key in inputs and isinstance(rows, int):
            inputs[key] = inputs[key] % rows
    probe: dict[str, Any] = {key: value.to(device) for key, value in inputs.items()}
    if "use_cache" in inspect.signature(model.forward).parameters:
        probe["use_cache"] = False  # one forward needs no cache (hybrid caches may refuse it)
    return probe


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (dropout would make every comparison fail), then restore."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _probe(
    model: nn.Module, modules: Sequence[nn.Module], inputs: Mapping[str, Any]
) -> tuple[Any, dict[int, _Call]]:
    calls: dict[int, _Call] = {}

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if id(module) not in calls:
            calls[id(module)] = _Call(args, kwargs, order=len(calls))

    def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        call = calls[id(module)]
        call.calls += 1
        if call.calls == 1:
            call.output = output

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        output = model(**inputs, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return output, calls


def _input_keyword(call: _Call, first: Any, tol: tuple[float, float]) -> str | None:
    """The keyword under which block 0's hidden input arrives, or None if it cannot be read."""
    if call.args:
        return "hidden_states" if _close(call.args[0], first, tol) else None
    if _close(call.kwargs.get("hidden_states"), first, tol):
        return "hidden_states"
    for name, value in call.kwargs.items():
        if _close(value, first, tol):
            return str(name)
    return None


def _after_candidates(
    base: nn.Module, blocks_path: str, exclude: Sequence[str]
) -> list[tuple[str, nn.Module]]:
    """Small modules outside the blocks that could follow them, siblings of the list first."""
    parent = blocks_path.rpartition(".")[0]
    found: list[tuple[bool, int, str, nn.Module]] = []
    for order, (path, module) in enumerate(base.named_modules()):
        if not path or isinstance(module, _SKIP_AFTER):
            continue
        if any(path == ex or path.startswith(ex + ".") for ex in exclude):
            continue
        has_children = next(module.children(), None) is not None
        has_params = next(module.parameters(recurse=False), None) is not None
        norm_like = bool(_NORM_NAME.search(type(module).__name__))
        if not ((not has_children and has_params) or norm_like):
            continue
        sibling = path.rpartition(".")[0] == parent
        found.append((not sibling, order, path, module))
    found.sort(key=lambda item: (item[0], item[1]))
    return [(path, module) for _, _, path, module in found[:_MAX_AFTER_CANDIDATES]]


def _apply(chain: Sequence[nn.Module], value: torch.Tensor) -> Any:
    try:
        for module in chain:
            value = hidden_of(module(value))
    except Exception:  # a module that cannot take the hidden state is simply not the answer
        return None
    return value


def _find_chain(
    raw: torch.Tensor,
    target: Any,
    candidates: Sequence[tuple[str, nn.Module]],
    tol: tuple[float, float],
    allow_empty: bool,
) -> tuple[str, ...] | None:
    if allow_empty and _close(raw, target, tol):
        return ()
    for length in (1, 2):
        for combo in permutations(candidates, length):
            if _close(_apply([m for _, m in combo], raw), target, tol):
                return tuple(path for path, _ in combo)
    return None


def _match_stack(
    hidden: Sequence[Any],
    path: str,
    blocks: nn.ModuleList,
    calls: Mapping[int, _Call],
    candidates: Sequence[tuple[str, nn.Module]],
    tol: tuple[float, float],
) -> _StackMatch | None:
    n = len(blocks)
    records = [calls.get(id(block)) for block in blocks]
    if any(rec is None or rec.calls != 1 for rec in records):
        return None
    outs = [hidden_of(rec.output) for rec in records if rec is not None]
    first = records[0]
    assert first is not None
    last = outs[-1]
    if not isinstance(last, torch.Tensor):
        return None
    if len(hidden) == n + 1:
        keyword = _input_keyword(first, hidden[0], tol)
        if keyword is not None and all(_close(hidden[i], outs[i - 1], tol) for i in range(1, n)):
            chain = _find_chain(last, hidden[-1], candidates, tol, allow_empty=True)
            if chain is not None:
                return _StackMatch(path, "block_input", keyword, chain, last)
    if len(hidden) in (n, n + 1) and all(_close(hidden[i], outs[i], tol) for i in range(n - 1)):
        if len(hidden) == n and _close(hidden[-1], last, tol):
            return _StackMatch(path, "block_output", "hidden_states", (), last)
        if len(hidden) == n + 1 and _close(hidden[n - 1], last, tol):
            chain = _find_chain(last, hidden[-1], candidates, tol, allow_empty=False)
            if chain is not None:
                return _StackMatch(path, "block_output", "hidden_states", chain, last)
    return None


def _module_paths(root: nn.Module, target: nn.Module) -> list[str]:
    return [p for p, m in root.named_modules(remove_duplicate=False) if m is target and p]


def _embed_candidates(model: nn.Module, base: nn.Module) -> list[tuple[str, nn.Module]]:
    get_embed = getattr(model, "get_input_embeddings", None)
    try:
        embed = get_embed() if callable(get_embed) else None
    except Exception:  # some models raise instead of returning None
        embed = None
    if not isinstance(embed, nn.Module):
        return []
    weight = getattr(embed, "weight", None)
    return [
        (path, module)
        for path, module in base.named_modules(remove_duplicate=False)
        if path
        and (module is embed or (weight is not None and getattr(module, "weight", None) is weight))
    ]


def _sub_module(blocks: nn.ModuleList, kind: str) -> str | None:
    """The attention (or MLP) sub-module path of the blocks: each block's shallowest hit, as
    alternatives ``a|b`` where blocks name theirs differently (a hybrid's ``linear_attn`` and
    ``self_attn`` blocks). Blocks without a hit do not count (a hybrid's Mamba blocks)."""
    paths: list[str] = []
    for block in blocks:
        best: tuple[int, int, str] | None = None
        for order, (path, module) in enumerate(block.named_modules()):
            depth = path.count(".") + 1
            if not path or depth > 2:
                continue
            attr = path.rpartition(".")[2]
            cls = type(module).__name__
            if _NORM_NAME.search(attr) or _NORM_NAME.search(cls):
                continue
            if next(module.parameters(), None) is None:  # dropouts, rotary tables, ...
                continue
            attention = bool(_ATTN_NAME.search(attr) or _ATTN_NAME.search(cls))
            if kind == "attn":
                hit = attention
            else:  # Qwen3.5-MoE's Qwen3_5MoeAttention is no MLP
                hit = not attention and bool(_MLP_ATTR.match(attr) or _MLP_CLASS.search(cls))
            if hit and (best is None or (depth, order) < best[:2]):
                best = (depth, order, path)
        if best is not None and best[2] not in paths:
            paths.append(best[2])
    return "|".join(paths) or None


def _mixer(block: nn.Module, mlp: str | None) -> str:
    """What mixes the sequence in a block without attention: its first child with weights
    that is neither a norm nor the MLP (``mamba (JambaMambaMixer)``), for the reasons."""
    mlp_module = _get_path(block, mlp) if mlp else None
    for name, child in block.named_children():
        if (
            child is mlp_module
            or _NORM_NAME.search(name)
            or _NORM_NAME.search(type(child).__name__)
        ):
            continue
        if next(child.parameters(), None) is not None:
            return f"{name} ({type(child).__name__})"
    return "no sub-module detection could name"


def _by_kind(reasons: Mapping[str, str]) -> str:
    """One reason per module class, prefixed by the class where there are several."""
    if len(reasons) == 1:
        return next(iter(reasons.values()))
    return "; ".join(f"for a {cls}, {reason}" for cls, reason in reasons.items())


def _without_attention(blocks: nn.ModuleList, attn: str, mlp: str | None) -> str | None:
    """Why the blocks without ``attn`` have no attention heads, where other blocks have it
    (a hybrid: Jamba's Mamba blocks, LFM2's convolution blocks); ``None`` elsewhere."""
    lacking = [block for block in blocks if _get_path(block, attn) is None]
    if not lacking or len(lacking) == len(blocks):
        return None
    reasons = {
        type(block).__name__: (
            f"it mixes the sequence with {_mixer(block, mlp)}, not with attention, so it has no "
            "attention heads"
        )
        for block in lacking
    }
    return _by_kind(reasons)


def _stack_spec(
    base: nn.Module,
    model: nn.Module,
    match: _StackMatch,
    blocks: nn.ModuleList,
    called: set[int],
) -> dict[str, Any]:
    """The StackSpec fields for one matched stack (paths relative to the base model)."""
    fields: dict[str, Any] = {"blocks": match.blocks}
    stack_root = match.blocks.rpartition(".")[0]
    # The lookup a stack calls may be a copy sharing the input embedding's weight.
    paths = [p for p, m in _embed_candidates(model, base) if id(m) in called]
    inside = [p for p in paths if not stack_root or p.startswith(stack_root + ".")]
    if inside or paths:
        fields["embed"] = (inside or paths)[0]
    missing: dict[str, str] = {}
    subs = {kind: _sub_module(blocks, kind) for kind in ("attn", "mlp")}
    for kind, what in (("attn", "attention"), ("mlp", "MLP")):
        sub = subs[kind]
        if sub is None:
            missing[kind] = (
                f"detection found no {what} sub-module in the blocks of {type(model).__name__} "
                f"(the block may compute it inline); name it in an AdapterSpec ({AUTHORING_HINT})"
            )
            continue
        fields[kind] = sub
        hybrid = _without_attention(blocks, sub, subs["mlp"]) if kind == "attn" else None
        if hybrid is not None:
            missing["attn"] = hybrid
    if match.input_kwarg != "hidden_states":
        fields["block_input_kwarg"] = match.input_kwarg
    if match.start != "block_input":
        fields["hidden_states_start"] = match.start
    after: list[str] = []
    modules: dict[str, str] = {}
    for path in match.chain:
        module = _get_path(base, path)
        assert module is not None  # the chain's paths come from base.named_modules()
        if "final_norm" not in after and _NORM_NAME.search(type(module).__name__):
            fields["final_norm"] = path
            after.append("final_norm")
            continue
        name = re.sub(r"\W", "_", path.rpartition(".")[2])
        if not name[:1].isalpha() or name in modules or name in ("embed", "final_norm"):
            name = f"after_{len(modules)}_{name}"
        modules[name] = path
        after.append(name)
    if modules:
        fields["modules"] = modules
    if tuple(after) not in ((), ("final_norm",)):
        fields["after_blocks"] = tuple(after)
    elif not after:
        missing["final_norm"] = (
            "detection proved that its Hugging Face implementation applies no norm after the "
            "last block: hidden_states[-1] is the raw last block output"
        )
    if missing:
        fields["missing"] = missing
    return fields


def _has_sub_modules(fields: Mapping[str, Any]) -> bool:
    encoder = fields.get("encoder")
    if isinstance(encoder, StackSpec):
        encoder = encoder.model_dump()
    return bool(
        fields.get("attn")
        or fields.get("mlp")
        or (encoder is not None and (encoder.get("attn") or encoder.get("mlp")))
    )


def _head_candidates(
    model: nn.Module, base: nn.Module, calls: Mapping[int, _Call], norms: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Head layouts to try: the output embedding, the modules holding it, or a split head.

    ``norms`` (paths from the top-level model) are norms the model may apply only before its
    head, after recording the raw last block output as ``hidden_states[-1]``.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        head = get_out() if callable(get_out) else None
    except Exception:  # some models raise instead of returning None
        head = None
    if not isinstance(head, nn.Module):
        return []
    base_paths = _module_paths(model, base)
    out: list[dict[str, Any]] = []
    for path in _module_paths(model, head):
        parts = path.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if any(b == prefix or b.startswith(prefix + ".") for b in base_paths):
                break
            if all(c["lm_head"] != prefix for c in out):
                out.append({"lm_head": prefix})
        head_call = calls.get(id(head))
        base_call = calls.get(id(base))
        if "." not in path and head_call is not None and base_call is not None:
            # A head split across top-level modules (transform, activation, norm, projection),
            # in the order the forward called them between the base model and the head.
            between = [
                (call.order, name)
                for name, child in model.named_children()
                if (call := calls.get(id(child))) is not None
                and base_call.order < call.order < head_call.order
                and not isinstance(child, nn.Dropout)
            ]
            if between:
                out.append({"lm_head": path, "head_modules": tuple(n for _, n in sorted(between))})
    plain = [c for c in out if "head_modules" not in c]
    out += [{**c, "head_modules": (norm,)} for norm in norms for c in plain]
    return out


def _norms_before_head(
    model: nn.Module, base: nn.Module, main: _StackMatch, block_lists: Sequence[str]
) -> list[str]:
    """Norms next to the blocks that hidden_states skip (their paths from the top model)."""
    if main.chain:
        return []
    prefix = "" if base is model else next(iter(_module_paths(model, base)), "")
    prefix = f"{prefix}." if prefix else ""
    return [
        prefix + path
        for path, module in _after_candidates(base, main.blocks, block_lists)
        if _NORM_NAME.search(type(module).__name__)
        and path.rpartition(".")[0] == main.blocks.rpartition(".")[0]
    ]


def _spelled(name: str) -> str:
    return "".join(_SPELLINGS.get(word, word) for word in name.lower().split("_"))


def _same_step_attrs(op: LogitOp, config: Any) -> list[str]:
    """Other config attributes of ``config`` that name the step ``op`` reads (see above)."""
    stem = _LOGIT_STEM.search(_spelled(op.config_attr or ""))
    if stem is None or config is None:
        return []
    names = config.to_dict() if callable(getattr(config, "to_dict", None)) else vars(config)
    return [
        name
        for name, value in names.items()
        if name != op.config_attr
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and _spelled(name).endswith(stem.group())
        and not _NOT_A_LOGIT_STEP.search(name)
    ]


def _op_applies(model: nn.Module, op: LogitOp) -> bool:
    """Whether ``op`` would change anything on ``model`` (else it repeats the empty candidate)."""
    return op.value_for(model) is not None


def _op_candidates(
    model: nn.Module, registered: Sequence[tuple[LogitOp, ...]], config: Any = None
) -> list[tuple[LogitOp, ...]]:
    """Op sequences to try: none, every registered op alone and every registered sequence, and
    (with ``config``) each registered op read from another attribute naming the same step."""
    out: list[tuple[LogitOp, ...]] = [()]
    singles = [(op,) for ops in registered for op in ops]
    renamed = [
        (op.derive(config_attr=attr),) for (op,) in singles for attr in _same_step_attrs(op, config)
    ]
    for ops in [*singles, *registered, *renamed]:
        if ops not in out and all(_op_applies(model, op) for op in ops):
            out.append(ops)
    return out


def _find_head(
    model: nn.Module,
    base: nn.Module,
    draft: AdapterSpec,
    raw_last: torch.Tensor,
    logits: torch.Tensor,
    tol: tuple[float, float],
    calls: Mapping[int, _Call],
    norms: Sequence[str] = (),
    plugin_manager: IntrospectPluginManager | None = None,
) -> dict[str, Any] | None:

    config = getattr(model, "config", None)
    registered = list(get_registry(plugin_manager or get_plugin_manager()).specs.values())
    pre_heads = _op_candidates(model, [spec.pre_head for spec in registered])
    logit_op_sets = _op_candidates(model, [spec.logit_ops for spec in registered], config)

    # The closest candidate wins, not the first close one: on small logits a soft-cap of 30
    # changes them by less than the tolerance, yet leaving it out is wrong on a real model.
    best: tuple[float, dict[str, Any]] | None = None
    for head in _head_candidates(model, base, calls, norms):
        for pre_head in pre_heads:
            for logit_ops in logit_op_sets:
                fields: dict[str, Any] = dict(head)
                if pre_head:
                    fields["pre_head"] = pre_head
                if logit_ops:
                    fields["logit_ops"] = logit_ops
                try:
                    insp = Inspector(model, adapter=draft.derive(**fields))
                    ours = insp.logits(raw_last)
                except Exception:  # a candidate that cannot even run is not the head
                    continue
                if _close(ours, logits, (tol[0] * 10, tol[1] * 10)):
                    diff = float((ours.float() - logits.float()).abs().max())
                    if best is None or diff < best[0]:
                        best = (diff, fields)
    return None if best is None else best[1]


def _reference_hidden(output: Any) -> dict[str | None, Any] | None:
    if not isinstance(output, Mapping):
        return None
    if output.get("decoder_hidden_states") is not None:
        if output.get("encoder_hidden_states") is None:
            return None
        return {
            "decoder": output["decoder_hidden_states"],
            "encoder": output["encoder_hidden_states"],
        }
    if output.get("hidden_states") is not None:
        return {None: output["hidden_states"]}
    return None


def _refuse(model: nn.Module, reason: str) -> NoAdapterError:
    return NoAdapterError(
        f"cannot detect the layout of {type(model).__name__}: {reason}. Write an AdapterSpec "
        f"for it ({AUTHORING_HINT})"
    )


def detect_adapter(
    model: nn.Module,
    inputs: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    plugin_manager: IntrospectPluginManager | None = None,
) -> AdapterSpec:
    """Detect ``model``'s layout from its structure and prove it against its own outputs.

    Runs the model on ``inputs`` (default: a few random tokens) with
    ``output_hidden_states=True``, matches the block list, final norm and head, and returns
    the spec only when :func:`introspect.testing.check_conformance` passes with it. The steps
    around the unembedding (soft-caps, logit scales) tried are those of the adapters that
    ``plugin_manager`` (default: the shared one) registers, also where the model's config names
    one of them differently. Raises
    :class:`~introspect._errors.NoAdapterError` saying why when no layout is proven. The model's
    train/eval modes are restored afterwards.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> spec = detect_adapter(m)
        >>> spec.name, spec.blocks, spec.final_norm, spec.lm_head
        ('detected-gpt2', 'h', 'ln_f', 'lm_head')
    """
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_input_embeddings", None)):
        raise _refuse(
            model,
            "it is not a transformers model (detection compares with the output_hidden_states "
            "of its forward); pass Inspector(model, adapter=AdapterSpec(...)) for your own "
            "nn.Module",
        )
    base = _base_model(model)
    lists = _block_lists(base)
    if not lists:
        raise _refuse(model, "it has no nn.ModuleList of blocks")
    tol = _tolerance(model)
    model_type = getattr(config, "model_type", None)
    label = model_type if isinstance(model_type, str) and model_type else type(model).__name__
    with _eval_mode(model), torch.no_grad():
        try:
            probe_inputs = dict(inputs) if inputs is not None else _probe_inputs(model)
            probe_inputs.pop("output_hidden_states", None)
            embeds = [module for _, module in _embed_candidates(model, base)]
            # The top-level children too: their call order reveals a head split across them.
            top = [] if base is model else [child for _, child in model.named_children()]
            modules = [block for _, blocks in lists for block in blocks] + embeds + top
            output, calls = _probe(model, modules, probe_inputs)
        except Exception as exc:
            raise _refuse(
                model, f"its forward on probe inputs failed ({type(exc).__name__}: {exc})"
            ) from exc
        reference = _reference_hidden(output)
        if reference is None:
            raise _refuse(model, "its forward returns no hidden_states")
        all_paths = [path for path, _ in lists]
        matches: dict[str | None, tuple[_StackMatch, nn.ModuleList]] = {}
        for stack, hidden in reference.items():
            used = {m.blocks for m, _ in matches.values()}
            for path, blocks in lists:
                if path in used:
                    continue
                candidates = _after_candidates(base, path, all_paths)
                match = _match_stack(hidden, path, blocks, calls, candidates, tol)
                if match is not None:
                    matches[stack] = (match, blocks)
                    break
            else:
                what = f"{stack} " if stack else ""
                raise _refuse(
                    model,
                    f"no block list reproduces its {what}hidden_states ({len(hidden)} entries; "
                    f"tried {', '.join(f'{p} ({len(b)})' for p, b in lists)})",
                )
        called = {key for key, call in calls.items() if call.calls}
        main_key = "decoder" if "decoder" in matches else None
        main, main_blocks = matches[main_key]
        fields = _stack_spec(base, model, main, main_blocks, called)
        if main_key == "decoder":
            fields["stack_name"] = "decoder"
            enc, enc_blocks = matches["encoder"]
            enc_fields = _stack_spec(base, model, enc, enc_blocks, called)
            # Both stacks may call one shared embedding: record it per stack, inside its root.
            for stack_fields in (fields, enc_fields):
                stack_root = stack_fields["blocks"].rpartition(".")[0]
                if stack_root:
                    stack_fields["root"] = stack_root
            fields["encoder"] = StackSpec(**enc_fields)
        draft = AdapterSpec(
            name=name or f"detected-{_slug(label)}",
            model_types=(model_type,) if isinstance(model_type, str) and model_type else (),
            description=f"detected from the structure of {type(model).__name__}",
            notes=(_SUB_MODULE_NOTE,) if _has_sub_modules(fields) else (),
            **fields,
        )
        logits = output.get("logits") if isinstance(output, Mapping) else None
        if isinstance(logits, torch.Tensor):
            norms = _norms_before_head(model, base, main, all_paths)
            head = _find_head(
                model, base, draft, main.raw_last, logits, tol, calls, norms, plugin_manager
            )
            if head is None:
                raise _refuse(
                    model,
                    "no head module (get_output_embeddings() or a module holding it, with the "
                    "logit ops of the registered adapters) reproduces its logits from the last "
                    "block",
                )
            if head.get("head_modules", ())[:1] and head["head_modules"][0] in norms:
                head["missing"] = {
                    **draft.missing,
                    "final_norm": (
                        f"hidden_states[-1] is the raw last block output: the model applies "
                        f"{head['head_modules'][0]} only before its head (logits() does too)"
                    ),
                }
            draft = draft.derive(**head)
        try:
            draft = _drop_unrecorded(model, probe_inputs, draft)
        except IntrospectError as exc:
            raise _refuse(model, f"the detected layout does not run ({exc})") from exc
        spec = _prove(model, probe_inputs, draft, tol)
        return _learn_heads(model, probe_inputs, spec, tol, plugin_manager)


_HEADS_NOTE = (
    "head layout learned from adapter {name!r} and proven by check_heads (patterns equal "
    "output_attentions; z, result and o agree)"
)


def _kv_count_names(heads: Sequence[HeadSpec]) -> list[str]:
    """The names the registered head layouts read key/value head counts under."""
    names: list[str] = []
    for head in heads:
        for name in [*(head.num_kv_heads or "").split("|"), head.kv_heads_attr or ""]:
            if name and name not in names:
                names.append(name)
    return names


def _stated_kv_heads(
    head: HeadSpec, attn: nn.Module, config: Any, names: Sequence[str]
) -> list[HeadSpec]:
    """``head`` reading its key/value head count under each registered count name, from the
    attention module, then from the config, where that gives another count than ``head``
    does (DBRX keeps ``kv_n_heads`` in a nested config and states ``num_key_value_heads`` on
    its attention module; LFM2 has grouped heads behind an ``out_proj`` that only
    ungrouped layouts name), then ``head`` itself. The proof decides which holds."""
    core = _get_path(attn, head.core) if head.core else attn
    try:
        kv = head.counts(config, core)[1]
    except ValueError:
        return [head]
    out: list[HeadSpec] = []
    for where, field in ((core, "kv_heads_attr"), (config, "num_kv_heads")):
        for name in names:
            found = getattr(where, name, None)
            if isinstance(found, int) and not isinstance(found, bool) and found != kv:
                out.append(head.derive(**{field: name}))
    return [*out, head]


def _not_this_attention(modules: Sequence[nn.Module]) -> str:
    """Why a hybrid's blocks whose attention part lacks the proven layout's ``o`` have no heads."""
    reasons = {
        type(module).__name__: (
            "it mixes the sequence without attention heads (a state-space, recurrent, "
            "convolution or linear-attention mixer)"
        )
        for module in modules
    }
    return _by_kind(reasons)


def _learn_heads(
    model: nn.Module,
    inputs: Mapping[str, Any],
    spec: AdapterSpec,
    tol: tuple[float, float],
    plugin_manager: IntrospectPluginManager | None,
) -> AdapterSpec:
    """``spec`` with the first registered head layout that ``check_heads`` proves on ``model``.

    Only a single-stack model with a detected ``attn`` is tried; the candidates are the
    distinct ``HeadSpec``s of the registered adapters whose output projection exists in the
    attention module of some block, each also with its key/value head count read from that
    module where it states another. In a hybrid (blocks without ``attn``, or whose ``attn``
    lacks the candidate's ``o``), the layout holds in the blocks that have it and the others
    refuse head locators with the reason. None proven: ``spec`` unchanged, head locators
    refused with the reason.
    """
    if spec.encoder is not None or spec.attn is None:
        return spec
    blocks = _get_path(_base_model(model), spec.blocks)
    attn_path = spec.attn
    found = [_get_path(block, attn_path) for block in blocks.children()] if blocks else []
    modules = [module for module in found if module is not None]
    if not modules:
        return spec
    config = getattr(model, "config", None)
    registry = get_registry(plugin_manager or get_plugin_manager())
    registered = [
        (source.name, head)
        for source in registry.specs.values()
        for head in (
            source.heads.get("attn"),
            *(s.heads.get("attn") for s in [source.encoder] if s),
        )
        if head is not None
    ]
    names = _kv_count_names([head for _, head in registered])
    seen: set[str] = set()
    for source_name, head in registered:
        holder = next((m for m in modules if _get_path(m, head.o) is not None), None)
        if holder is None:
            continue
        for variant in _stated_kv_heads(head, holder, config, names):
            key = variant.derive(scores="").model_dump_json()
            if key in seen:
                continue
            seen.add(key)
            changes: dict[str, Any] = {"heads": {"attn": variant}}
            others = [m for m in modules if _get_path(m, variant.o) is None]
            if others:
                reason = _not_this_attention(others)
                changes["missing"] = {**spec.missing, "heads": reason}
            candidate = spec.derive(**changes)
            try:
                checks = check_heads(model, inputs, adapter=candidate, atol=tol[0], rtol=tol[1])
            except Exception:  # a layout that does not fit this model: try the next
                continue
            if checks and all(c.passed for c in checks):
                note = _HEADS_NOTE.format(name=source_name)
                return candidate.derive(notes=(*spec.notes, note))
    return spec


def _drop_unrecorded(model: nn.Module, inputs: Mapping[str, Any], spec: AdapterSpec) -> AdapterSpec:
    """``spec`` without the guessed parts (embed, attn, mlp) that the forward never calls."""

    insp = Inspector(model, adapter=spec)
    reason = "detection could not prove which module this is (the guessed one never runs)"
    update: dict[str, Any] = {}
    for stack_name in spec.stack_names:
        locators = insp.locators(stack_name, include_head=False)
        with insp.capture(*locators) as cap:
            model(**inputs)
        unrecorded = {loc.sub or loc.part for loc in locators if str(loc) not in cap}
        parts = sorted(unrecorded & {"embed", "attn", "mlp"})
        if not parts:
            continue
        stack = spec.stack(stack_name)
        changes: dict[str, Any] = {part: None for part in parts}
        changes["missing"] = {**stack.missing, **{p: reason for p in parts if p != "embed"}}
        if stack is spec:
            update.update(changes)
        else:
            update["encoder"] = stack.derive(**changes)
    if not update:
        return spec
    spec = spec.derive(**update)
    if not _has_sub_modules(spec.model_dump()):
        spec = spec.derive(notes=())
    return spec


def _prove(
    model: nn.Module, inputs: Mapping[str, Any], spec: AdapterSpec, tol: tuple[float, float]
) -> AdapterSpec:

    try:
        report = check_conformance(model, inputs, adapter=spec, atol=tol[0], rtol=tol[1])
    except IntrospectError as exc:
        raise _refuse(model, f"the detected layout does not run ({exc})") from exc
    if not report.passed:
        raise _refuse(
            model, "the detected layout failed the conformance checks:\n" + report.describe()
        )
    return spec


def detected_message(model: nn.Module, spec: AdapterSpec) -> str:
    """The warning text for a detected adapter: what was found and how to make it permanent.

    Example:
        >>> from introspect import AdapterSpec
        >>> msg = detected_message(nn.Linear(1, 1), AdapterSpec(name="detected-x", blocks="h"))
        >>> "introspect scaffold" in msg
        True
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    what = type(model).__name__ + (f" (model_type {model_type!r})" if model_type else "")
    layout = f"blocks {spec.blocks}, final norm {spec.final_norm or 'none'}"
    if spec.lm_head:
        layout += f", head {spec.lm_head}"
    target = model_type or "<model folder>"
    return (
        f"no adapter claims {what}; using adapter {spec.name!r}, detected from its structure "
        f"and proven against its own hidden_states ({layout}). To make it permanent, pass "
        f"Inspector(model, adapter=inspector.adapter), or write a plugin package with "
        f"'introspect scaffold {target}' ({AUTHORING_HINT})"
    )


@hookimpl(trylast=True)
def select_adapter(model: nn.Module, candidates: Sequence[AdapterSpec]) -> AdapterSpec | None:
    """Detection, the ``select_adapter`` of last resort: a proven spec for an unclaimed model.

    Asked only after every other plugin; answers only when no adapter claims the model. It
    warns with :class:`DetectedAdapterWarning` and returns the proven spec, or raises
    :class:`~introspect._errors.NoAdapterError` saying why no layout could be proven (the
    plugin layer adds that reason to its own error).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     select_adapter(m, []).name
        'detected-gpt2'
    """
    if candidates:
        return None
    try:
        spec = detect_adapter(model)
    except NoAdapterError as exc:
        raise NoAdapterError(f"Structure detection did not help: {exc}") from None
    warnings.warn(
        detected_message(model, spec), DetectedAdapterWarning, stacklevel=_callers_level()
    )
    return spec


def _callers_level() -> int:
    """The ``stacklevel`` of the first frame outside introspect and pluggy (the code that
    built the Inspector), for a warning raised from inside the plugin hooks."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).startswith(
        ("introspect", "pluggy")
    ):
        frame = frame.f_back
        level += 1
    return level
