"""The plugin manager: entry-point group ``introspect``, built-ins included.

Built-in adapters are entry points of our own distribution, loaded through the same path as
third-party plugins. A plugin that fails to import is recorded (and warned about) without
taking the others down.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from introspect import hookspecs
from introspect.errors import AdapterConflictError, PluginLoadError
from introspect.spec import AdapterSpec

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DISTRIBUTION",
    "AdapterRegistry",
    "IntrospectPluginManager",
    "PluginFailure",
    "PluginInfo",
    "get_plugin_manager",
    "get_registry",
    "new_plugin_manager",
    "plugin_infos",
]

GROUP = "introspect"
DISTRIBUTION = "introspect-lm"


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin: its name, distribution and version, and whether it is built in."""

    name: str
    distribution: str | None
    version: str | None
    builtin: bool
    adapters: tuple[str, ...] = ()


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be imported; ``error`` says why."""

    name: str
    distribution: str | None
    error: str


class IntrospectPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from and which failed."""

    def __init__(self) -> None:
        super().__init__(GROUP)
        self.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.origins: dict[str, tuple[str | None, str | None]] = {}
        self._registry: AdapterRegistry | None = None


def _split_env(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=GROUP)


def new_plugin_manager(
    load_entry_points: bool = True,
    *,
    plugins: Sequence[ModuleType | object] = (),
    block: Iterable[str] = (),
) -> IntrospectPluginManager:
    """A fresh plugin manager (use in tests); ``plugins`` are registered directly.

    ``block`` names entry points or distributions not to load (e.g. ``introspect-lm.gpt2`` to
    disable a built-in adapter). ``INTROSPECT_LOAD_PLUGINS=a,b`` restricts third-party plugins
    to those names; built-ins always load. ``INTROSPECT_TRACE_PLUGINS=1`` prints each hook call.

    Example:
        >>> pm = new_plugin_manager()
        >>> "gpt2" in get_registry(pm).specs
        True
    """
    pm = IntrospectPluginManager()
    blocked = set(block)
    if load_entry_points:
        allowed = _split_env("INTROSPECT_LOAD_PLUGINS")
        for ep in _entry_points():
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            builtin = dist == DISTRIBUTION
            if ep.name in blocked or (dist is not None and dist in blocked):
                continue
            if not builtin and allowed is not None and not ({ep.name, dist} & allowed):
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as exc:
                failure = PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}")
                pm.failures.append(failure)
                warnings.warn(
                    f"introspect plugin {ep.name!r} (distribution {dist or 'unknown'}) failed to "
                    f"import and was skipped: {failure.error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            pm.register(module, name=ep.name)
            pm.origins[ep.name] = (dist, version)
    for plugin in plugins:
        name = pm.register(plugin)
        if name is not None:
            pm.origins.setdefault(name, (None, None))
    if os.environ.get("INTROSPECT_TRACE_PLUGINS", "") not in ("", "0"):
        pm.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
        pm.enable_tracing()
    return pm


@functools.cache
def get_plugin_manager(load_entry_points: bool = True) -> IntrospectPluginManager:
    """The shared plugin manager for normal use (cached; tests use :func:`new_plugin_manager`).

    Example:
        >>> get_plugin_manager() is get_plugin_manager()
        True
    """
    return new_plugin_manager(load_entry_points)


@dataclass
class AdapterRegistry:
    """Every registered AdapterSpec, by name and by what it claims, with its plugin."""

    specs: dict[str, AdapterSpec] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    by_model_type: dict[str, str] = field(default_factory=dict)
    by_architecture: dict[str, str] = field(default_factory=dict)

    def add(self, spec: AdapterSpec, plugin: str) -> None:
        """Register ``spec`` for ``plugin``; a clash with another spec is an error naming both."""
        if not isinstance(spec, AdapterSpec):
            raise TypeError(
                f"plugin {plugin!r} registered {type(spec).__name__}; register() takes an "
                "introspect.AdapterSpec"
            )
        if spec.name in self.specs:
            raise AdapterConflictError(
                f"adapter name {spec.name!r} is registered by both plugin "
                f"{self.owners[spec.name]!r} and plugin {plugin!r}: rename one, or uninstall "
                "one of the plugins"
            )
        for claims, kind, table in (
            (spec.model_types, "model_type", self.by_model_type),
            (spec.architectures, "architecture", self.by_architecture),
        ):
            for claim in claims:
                if claim in table:
                    other = table[claim]
                    raise AdapterConflictError(
                        f"{kind} {claim!r} is claimed by adapter {other!r} (plugin "
                        f"{self.owners[other]!r}) and by adapter {spec.name!r} (plugin "
                        f"{plugin!r}): uninstall one, or block it with "
                        "new_plugin_manager(block=[...]) / INTROSPECT_LOAD_PLUGINS"
                    )
        self.specs[spec.name] = spec
        self.owners[spec.name] = plugin
        for claim in spec.model_types:
            self.by_model_type[claim] = spec.name
        for claim in spec.architectures:
            self.by_architecture[claim] = spec.name

    def candidates(self, model: nn.Module) -> list[AdapterSpec]:
        """The specs that claim ``model`` by class name or ``config.model_type``.

        A claim by class name is the more specific one and replaces the claim by model_type
        (``T5EncoderModel`` has no decoder although its model_type is ``t5``).

        Example:
            >>> from transformers import GPT2Config, GPT2Model
            >>> model = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
            >>> [spec.name for spec in get_registry().candidates(model)]
            ['gpt2']
        """
        found: list[str] = []
        for cls in type(model).__mro__:
            name = self.by_architecture.get(cls.__name__)
            if name is not None and name not in found:
                found.append(name)
        if found:
            return [self.specs[name] for name in found]
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if isinstance(model_type, str):
            name = self.by_model_type.get(model_type)
            if name is not None and name not in found:
                found.append(name)
        return [self.specs[name] for name in found]


def _call_register(pm: IntrospectPluginManager) -> AdapterRegistry:
    registry = AdapterRegistry()
    for impl in pm.hook.register_adapters.get_hookimpls():  # registration order
        plugin_name = impl.plugin_name

        def register(spec: AdapterSpec, _plugin: str = plugin_name) -> None:
            registry.add(spec, _plugin)

        # Called one implementation at a time so each spec is attributed to its plugin.
        kwargs: dict[str, Any] = {"register": register}
        impl.function(**{k: kwargs[k] for k in impl.argnames})
    return registry


def get_registry(pm: IntrospectPluginManager | None = None) -> AdapterRegistry:
    """The adapters the plugins of ``pm`` register (computed once per manager).

    Example:
        >>> {"gpt2", "llama"} <= set(get_registry().specs)
        True
    """
    pm = pm or get_plugin_manager()
    if pm._registry is None:
        pm._registry = _call_register(pm)
    return pm._registry


def call_select_adapter(
    pm: IntrospectPluginManager, model: nn.Module, candidates: Sequence[AdapterSpec]
) -> AdapterSpec | None:
    """Typed wrapper of the ``select_adapter`` hook."""
    result: AdapterSpec | None = pm.hook.select_adapter(model=model, candidates=list(candidates))
    return result


def plugin_infos(pm: IntrospectPluginManager | None = None) -> list[PluginInfo]:
    """Every loaded plugin with its distribution, version and the adapters it registers.

    Example:
        >>> any(p.builtin for p in plugin_infos())
        True
    """
    pm = pm or get_plugin_manager()
    registry = get_registry(pm)
    infos = []
    for name, _plugin in pm.list_name_plugin():
        if name is None:
            continue
        dist, version = pm.origins.get(name, (None, None))
        adapters = tuple(sorted(a for a, owner in registry.owners.items() if owner == name))
        infos.append(PluginInfo(name, dist, version, dist == DISTRIBUTION, adapters))
    return sorted(infos, key=lambda info: (info.builtin, info.name))


def raise_failures(pm: IntrospectPluginManager) -> None:
    """Raise a PluginLoadError listing every plugin that failed to import (if any)."""
    if pm.failures:
        lines = [
            f"{f.name} ({f.distribution or 'unknown distribution'}): {f.error}" for f in pm.failures
        ]
        raise PluginLoadError("plugins failed to import:\n  " + "\n  ".join(lines))
