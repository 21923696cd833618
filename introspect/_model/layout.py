"""The hidden-state layout: which locator yields each entry of HF's ``hidden_states``.

A pure function of the stack's spec, its block count and which of its after-block modules the
model has; the Inspector supplies those, and nothing here touches a model.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect._locators import Locator
from introspect._spec import StackSpec

__all__ = ["hidden_layout"]


def hidden_layout(
    spec: StackSpec, num_blocks: int, present: Callable[[str], bool], stack: str | None = None
) -> list[Locator]:
    """The locator of every ``hidden_states`` entry of a stack, in order.

    ``present(name)`` says whether the model has the after-block module ``name``
    (``final_norm`` or one of ``spec.modules``); ``stack`` prefixes the locators.

    Example:
        >>> spec = StackSpec(embed="wte", blocks="h", final_norm="ln_f")
        >>> [str(loc) for loc in hidden_layout(spec, 2, lambda name: True)]
        ['block[0].input', 'block[0]', 'final_norm']
        >>> [str(loc) for loc in hidden_layout(spec, 2, lambda name: False)]
        ['block[0].input', 'block[0]', 'block[1]']
    """
    n = num_blocks
    prefix = f"{stack}." if stack else ""
    finals = [name for name in spec.after_blocks if present(name)]
    last = prefix + finals[-1] if finals else f"{prefix}block[{n - 1}]"

    def after(i: int) -> str:
        # Where HF changes the stream between blocks outside any module (RWKV), the input
        # of the next module holds the stream exactly as HF records it.
        if not spec.between_blocks:
            return f"{prefix}block[{i}]"
        if i < n - 1:
            return f"{prefix}block[{i + 1}].input"
        return f"{prefix}{finals[0]}.input" if finals else f"{prefix}block[{i}]"

    if spec.hidden_states_start == "block_input":
        texts = [f"{prefix}block[0].input"] + [after(i) for i in range(n - 1)]
    else:
        texts = [after(i) for i in range(n)]
        if not finals:
            return [Locator.parse(t) for t in texts]
    texts.append(last)
    return [Locator.parse(t) for t in texts]
