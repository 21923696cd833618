"""The plugin hooks. Plugin authors import ``hookimpl`` from ``introspect``.

Each hook is documented in ``docs/plugins/hooks.md`` with its exact signature (a test checks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from introspect._spec import AdapterSpec

__all__ = ["hookimpl", "hookspec", "register_adapters", "select_adapter"]

hookspec = pluggy.HookspecMarker("introspect")
hookimpl = pluggy.HookimplMarker("introspect")


@hookspec
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Call ``register(spec)`` once for each AdapterSpec this plugin provides."""


@hookspec(firstresult=True)
def select_adapter(model: nn.Module, candidates: Sequence[AdapterSpec]) -> AdapterSpec | None:
    """Return the adapter to use for ``model`` (any registered spec), or None to defer."""
