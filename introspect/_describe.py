"""A model at a glance: its adapter, every locator with its module, and the index semantics.

This is what ``introspect inspect MODEL`` prints; the library returns it as a plain dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from introspect._errors import MissingPartError

if TYPE_CHECKING:
    from introspect._inspector import Inspector
    from introspect._locators import Locator

__all__ = ["describe", "hidden_state_meaning"]


def hidden_state_meaning(inspector: Inspector, loc: Locator) -> str:
    """In words, what Hugging Face's ``hidden_states`` entry recorded at ``loc`` holds.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> insp = Inspector(m)
        >>> hidden_state_meaning(insp, insp.hidden_state_locator(-1))
        'final_norm(block[1] output): the last block after what HF applies there'
    """
    if loc.side == "input":
        return f"input of {loc.with_side('output')} (embeddings plus the architecture's extras)"
    if loc.is_block:
        return f"output of {loc}"
    spec = inspector.adapter.stack(loc.stack)
    prefix = f"{loc.stack}." if loc.stack else ""
    last = f"{prefix}block[{inspector.num_blocks_in(loc.stack) - 1}]"
    applied = []
    for name in spec.after_blocks:
        try:
            inspector.module(prefix + name)
        except MissingPartError:  # absent here (e.g. a norm this config turns off): not applied
            continue
        applied.append(name)
        if name == loc.part:
            break
    text = f"{last} output"
    for name in applied:
        text = f"{name}({text})"
    return f"{text}: the last block after what HF applies there"


def describe(inspector: Inspector) -> dict[str, Any]:
    """The adapter, block count, every locator with its module path, ``hidden_states`` and heads.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> info = describe(Inspector(m))
        >>> info["adapter"], info["num_blocks"], info["locators"][0]
        ('gpt2', 2, {'locator': 'embed', 'path': 'transformer.wte', 'module': 'Embedding'})
        >>> info["heads"]
        [{'part': 'block[i].attn', 'heads': 2, 'kv_heads': 2, 'head_dim': 16}]
    """
    insp = inspector
    params = sum(p.numel() for p in insp.model.parameters())
    stacks: list[str | None] = list(insp.adapter.stack_names)
    locators = []
    hidden = []
    for stack in stacks:
        for loc in insp.locators(stack):
            module = insp.module(loc)
            locators.append(
                {"locator": str(loc), "path": insp.path(loc), "module": type(module).__name__}
            )
        n = insp.num_hidden_states(stack)
        for i in range(n):
            loc = insp.hidden_state_locator(i, stack)
            entry: dict[str, Any] = {
                "index": i,
                "negative": i - n,
                "locator": str(loc),
                "meaning": hidden_state_meaning(insp, loc),
            }
            if stack:
                entry["stack"] = stack
            hidden.append(entry)
    heads = []
    for stack in stacks:
        for part in insp.adapter.stack(stack).heads:
            try:
                counts = (
                    insp.num_heads_in(stack, part),
                    insp.num_kv_heads_in(stack, part),
                    insp.head_dim_in(stack, part),
                )
            except MissingPartError:
                continue  # e.g. a decoder without cross-attention in this config
            prefix = f"{stack}." if stack else ""
            heads.append(
                {
                    "part": f"{prefix}block[i].{part}",
                    "heads": counts[0],
                    "kv_heads": counts[1],
                    "head_dim": counts[2],
                }
            )
    return {
        "model_class": type(insp.model).__name__,
        "adapter": insp.adapter.name,
        "adapter_description": insp.adapter.description,
        "num_blocks": insp.num_blocks,
        "parameters": params,
        "dtype": str(next(insp.model.parameters()).dtype).removeprefix("torch.")
        if params
        else None,
        "locators": locators,
        "hidden_states": hidden,
        "heads": heads,
    }
