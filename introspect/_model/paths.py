"""Module paths: find a module by dotted path, and tell later whether it is still there.

A path is what an adapter writes (``transformer.h``; alternatives ``a|b`` are tried in order).
:func:`walk` also returns the *chain* of (parent, key, child) links it followed, so that a
cached resolution can be checked in a few dictionary look-ups: after
``model.transformer.h[0] = new_block`` the link from ``h`` to its key ``"0"`` no longer leads
to the cached block, and the cache knows to resolve again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["Chain", "base_model", "chain_holds", "get_path", "links_hold", "links_of", "walk"]

Link = tuple[nn.Module, str, nn.Module]
Chain = tuple[Link, ...]


def base_model(model: nn.Module) -> nn.Module:
    """The model without its head (``model.base_model``), or the model itself.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
        >>> base_model(m) is m.transformer
        True
    """
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _child(module: Any, part: str) -> tuple[str, Any]:
    """The key under which ``part`` is registered in ``module`` and the child found there."""
    if isinstance(module, (nn.ModuleList, nn.Sequential)) and part.lstrip("-").isdigit():
        index = int(part)
        n = len(module)
        if not -n <= index < n:
            return part, None
        key = list(module._modules)[index]
        return key, module._modules[key]
    found = module._modules.get(part) if isinstance(module, nn.Module) else None
    if found is not None:
        return part, found
    return part, getattr(module, part, None)


def _walk_one(root: nn.Module, path: str) -> tuple[nn.Module | None, Chain]:
    module: Any = root
    chain: list[Link] = []
    for part in path.split("."):
        key, child = _child(module, part)
        if not isinstance(child, nn.Module):
            return None, ()
        chain.append((module, key, child))
        module = child
    return module, tuple(chain)


def walk(root: nn.Module, path: str) -> tuple[nn.Module | None, Chain]:
    """The module at ``path`` under ``root`` (``None`` if absent) and the links followed.

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> m = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> module, chain = walk(m, "h.-1|layers.-1")
        >>> module is m.h[1], [key for _, key, _ in chain]
        (True, ['h', '1'])
    """
    for alternative in path.split("|"):
        found, chain = _walk_one(root, alternative)
        if found is not None:
            return found, chain
    return None, ()


def get_path(root: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` under ``root`` (``a|b``: the first that exists), else ``None``.

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> m = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> get_path(m, "h.0.attn") is m.h[0].attn, get_path(m, "nowhere")
        (True, None)
    """
    return walk(root, path)[0]


def chain_holds(chain: Chain) -> bool:
    """Whether every link of ``chain`` still leads to the same child (the model is unchanged).

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> m = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> _, chain = walk(m, "h.0")
        >>> before = chain_holds(chain)
        >>> m.h[0] = type(m.h[0])(m.config)
        >>> before, chain_holds(chain)
        (True, False)
    """
    for parent, key, child in chain:
        found = parent._modules.get(key)
        if found is None:
            found = getattr(parent, key, None)
        if found is not child:
            return False
    return True


def links_of(chains: Iterable[Chain]) -> Chain:
    """The distinct links of several chains, in first-seen order (chains share their start).

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> m = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> len(links_of([walk(m, "h.0")[1], walk(m, "h.1")[1]]))
        3
    """
    # Keyed by the child too: two targets resolved at different times may disagree on a link,
    # and then both must be checked.
    seen: dict[tuple[int, str, int], Link] = {}
    for chain in chains:
        for link in chain:
            seen.setdefault((id(link[0]), link[1], id(link[2])), link)
    return tuple(seen.values())


def links_hold(links: Chain) -> bool:
    """:func:`chain_holds` for the links of several chains at once (see :func:`links_of`).

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> m = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> links = links_of([walk(m, "h.0")[1]])
        >>> before = links_hold(links)
        >>> del m.h[0]
        >>> before, links_hold(links)
        (True, False)
    """
    for parent, key, child in links:
        if parent._modules.get(key) is not child and getattr(parent, key, None) is not child:
            return False
    return True
