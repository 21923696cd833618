"""The plugin manager: entry-point group ``introspect``, built-ins included.

Built-in adapters are entry points of our own distribution, loaded through the same path as
third-party plugins. Every hook is called through pluggy, one plugin at a time, so that
``INTROSPECT_TRACE_PLUGINS=1`` shows each call and a plugin that fails (at import, in a hook,
or by returning something a hook does not take) is named in a :class:`PluginWarning`, recorded
in ``pm.failures`` and skipped, without taking the others down. In strict mode
(``INTROSPECT_STRICT_PLUGINS=1`` or ``new_plugin_manager(strict=True)``) the first failure is a
:class:`~introspect._errors.PluginLoadError` instead.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy
from pluggy import HookImpl

from introspect import _hookspecs as hookspecs
from introspect._errors import (
    AdapterConflictError,
    NoAdapterError,
    PluginLoadError,
    UnsupportedArchitectureError,
)
from introspect._spec import AdapterSpec

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "AUTHORING_HINT",
    "DETECTION",
    "DISTRIBUTION",
    "AdapterRegistry",
    "IntrospectPluginManager",
    "PluginFailure",
    "PluginInfo",
    "PluginWarning",
    "authoring_help",
    "call_select_adapter",
    "get_plugin_manager",
    "get_registry",
    "new_plugin_manager",
    "plugin_infos",
    "resolve_adapter",
]

GROUP = "introspect"
DISTRIBUTION = "introspect-lm"

DETECTION = f"{DISTRIBUTION}.detect"
"""The entry point of the built-in detection plugin (the ``select_adapter`` of last resort)."""

#: The pointer error messages give to plugin authors; the text it names ships in the package.
AUTHORING_HINT = "run `introspect plugins --help-authoring` for how to write an adapter plugin"

_SKIP_HINT = (
    "fix or uninstall it, or leave it out with INTROSPECT_LOAD_PLUGINS=... or "
    "new_plugin_manager(block=[...])"
)


class PluginWarning(UserWarning):
    """A plugin failed (at import, in a hook, or with a wrong return value) and was skipped.

    Example:
        >>> issubclass(PluginWarning, UserWarning)
        True
    """


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
    """A plugin that was skipped and why.

    ``stage`` is ``"import"``, ``"register"`` (pluggy refused its hook implementations) or the
    name of the hook that failed.

    Example:
        >>> PluginFailure("introspect-x", None, "KeyError: 'n_layer'", "select_adapter").stage
        'select_adapter'
    """

    name: str
    distribution: str | None
    error: str
    stage: str = "import"


class IntrospectPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from and which failed.

    Example:
        >>> pm = IntrospectPluginManager()
        >>> pm.project_name, pm.failures, pm.strict
        ('introspect', [], False)
    """

    def __init__(self, *, strict: bool = False) -> None:
        super().__init__(GROUP)
        self.add_hookspecs(hookspecs)
        self.strict = strict
        self.failures: list[PluginFailure] = []
        self.origins: dict[str, tuple[str | None, str | None]] = {}
        self._registry: AdapterRegistry | None = None

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register ``plugin`` (pluggy's ``register``); the next :func:`get_registry` sees it.

        Example:
            >>> pm = IntrospectPluginManager()
            >>> pm.register(object(), name="late")
            'late'
        """
        registered = super().register(plugin, name)
        # The registry was built from the plugins of its time: rebuild it on next use.
        self._registry = None
        return registered

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        """Unregister a plugin (pluggy's ``unregister``); the next :func:`get_registry` lacks it.

        Example:
            >>> pm = IntrospectPluginManager()
            >>> plugin = object()
            >>> _ = pm.register(plugin, name="late")
            >>> pm.unregister(plugin) is plugin
            True
        """
        removed = super().unregister(plugin, name)
        self._registry = None
        return removed


def _split_env(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=GROUP)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _plugin_failed(
    pm: IntrospectPluginManager,
    name: str,
    distribution: str | None,
    stage: str,
    error: str,
    cause: BaseException | None = None,
) -> None:
    """Record, warn about (or, strict, raise for) a plugin that is being skipped."""
    # One line: it is printed in a table of plugins and matched in warning filters.
    error = "; ".join(line.strip() for line in error.splitlines() if line.strip())
    where = {
        "import": "failed to import",
        "register": "could not be registered",
    }.get(stage, f"failed in its {stage} hook")
    effect = {
        "import": "was skipped",
        "register_adapters": "was skipped (none of its adapters are registered)",
        "select_adapter": "was skipped for this model",
    }.get(stage, "was skipped")
    message = (
        f"introspect plugin {name!r} (distribution {distribution or 'unknown'}) {where} and "
        f"{effect}: {error}"
    )
    if pm.strict:
        raise PluginLoadError(
            f"{message}. Plugins are strict here (INTROSPECT_STRICT_PLUGINS or "
            f"new_plugin_manager(strict=True)): {_SKIP_HINT}"
        ) from cause
    failure = PluginFailure(name, distribution, error, stage)
    if failure not in pm.failures:
        pm.failures.append(failure)
    # stacklevel 4: past this helper and the loader or hook wrapper, towards the caller.
    warnings.warn(f"{message}; {_SKIP_HINT}", PluginWarning, stacklevel=4)


def _unknown_hooks(pm: IntrospectPluginManager, plugin: object) -> list[str]:
    """Hook implementations of ``plugin`` that match no hookspec (a typo pluggy never calls)."""
    unknown = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.spec is None and any(
            impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()
        ):
            unknown.append(caller.name)
    return unknown


def new_plugin_manager(
    load_entry_points: bool = True,
    *,
    plugins: Sequence[ModuleType | object] = (),
    block: Iterable[str] = (),
    strict: bool | None = None,
) -> IntrospectPluginManager:
    """A fresh plugin manager (use in tests); ``plugins`` are registered directly.

    ``block`` names entry points or distributions not to load (e.g. ``introspect-lm.gpt2`` to
    disable a built-in adapter). ``INTROSPECT_LOAD_PLUGINS=a,b`` restricts third-party plugins
    to those names; built-ins always load. ``INTROSPECT_TRACE_PLUGINS=1`` prints each hook call.

    A plugin that fails is skipped with a :class:`PluginWarning` and listed in ``pm.failures``.
    With ``strict=True`` (default: ``INTROSPECT_STRICT_PLUGINS=1``) the first failure raises
    :class:`~introspect._errors.PluginLoadError` naming the plugin and its distribution, which
    is what a plugin's own CI wants.

    Example:
        >>> pm = new_plugin_manager()
        >>> "gpt2" in get_registry(pm).specs
        True
    """
    if strict is None:
        strict = _env_flag("INTROSPECT_STRICT_PLUGINS")
    pm = IntrospectPluginManager(strict=strict)
    blocked = set(block)
    if load_entry_points:
        allowed = _split_env("INTROSPECT_LOAD_PLUGINS")
        # A distribution's name and version parse its metadata file: once per distribution,
        # not once per entry point (introspect-lm alone has one per adapter).
        # (Each entry keeps its distribution alive, so no other object takes its id.)
        named: dict[int, tuple[object, str, str]] = {}
        for ep in _entry_points():
            dist: str | None = None
            version: str | None = None
            if ep.dist is not None:
                if id(ep.dist) not in named:
                    named[id(ep.dist)] = (ep.dist, ep.dist.name, ep.dist.version)
                _, dist, version = named[id(ep.dist)]
            builtin = dist == DISTRIBUTION
            if ep.name in blocked or (dist is not None and dist in blocked):
                continue
            if not builtin and allowed is not None and not ({ep.name, dist} & allowed):
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                module = ep.load()
            # SystemExit too: a plugin calling sys.exit() at import must not end the program.
            except (Exception, SystemExit) as exc:
                _plugin_failed(pm, ep.name, dist, "import", _describe(exc), exc)
                continue
            pm.origins[ep.name] = (dist, version)
            try:
                # pluggy rejects a hook implementation taking an argument its hookspec lacks.
                pm.register(module, name=ep.name)
                unknown = _unknown_hooks(pm, module)
                if unknown:
                    known = ", ".join(sorted(n for n, c in vars(pm.hook).items() if c.spec))
                    raise pluggy.PluginValidationError(
                        module,
                        f"it implements {', '.join(unknown)}, which is no introspect hook "
                        f"(the hooks are: {known})",
                    )
            except Exception as exc:
                # pluggy may have added some of the plugin's hooks before rejecting another.
                if pm.get_plugin(ep.name) is not None:
                    pm.unregister(name=ep.name)
                error = str(exc) if isinstance(exc, pluggy.PluginValidationError) else None
                _plugin_failed(pm, ep.name, dist, "register", error or _describe(exc), exc)
    for plugin in plugins:
        name = pm.register(plugin)
        if name is not None:
            pm.origins.setdefault(name, (None, None))
    if _env_flag("INTROSPECT_TRACE_PLUGINS"):
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


def _implementations(pm: IntrospectPluginManager, hook_name: str) -> list[HookImpl]:
    """The plain implementations of ``hook_name`` in registration order (wrappers left out)."""
    caller: pluggy.HookCaller = getattr(pm.hook, hook_name)
    return [i for i in caller.get_hookimpls() if not (i.hookwrapper or i.wrapper)]


def _call_one(pm: IntrospectPluginManager, hook_name: str, impl: HookImpl, **kwargs: Any) -> Any:
    """Call one plugin's implementation through pluggy, so tracing and wrappers still apply."""
    others = [i.plugin for i in _implementations(pm, hook_name) if i is not impl]
    pm.trace.root.get("plugin")(f"{hook_name} of {impl.plugin_name!r}")
    return pm.subset_hook_caller(hook_name, others)(**kwargs)


def _origin(pm: IntrospectPluginManager, name: str) -> str | None:
    return pm.origins.get(name, (None, None))[0]


class _Register:
    """The ``register`` callback one plugin gets; its specs wait here until its hook returns.

    Staging them means a plugin that fails halfway registers nothing, not half its adapters.
    """

    def __init__(self, plugin: str) -> None:
        self.plugin = plugin
        self.specs: list[AdapterSpec] = []
        self.rejected: list[str] = []

    def __call__(self, spec: AdapterSpec) -> None:
        if not isinstance(spec, AdapterSpec):
            # Remembered too, in case the plugin swallows the TypeError.
            self.rejected.append(type(spec).__name__)
            raise TypeError(
                f"plugin {self.plugin!r} called register() with a {type(spec).__name__}; "
                "register() takes an introspect.AdapterSpec"
            )
        self.specs.append(spec)

    def __repr__(self) -> str:  # what INTROSPECT_TRACE_PLUGINS prints for the argument
        return f"<register() for plugin {self.plugin!r}>"


def _call_register(pm: IntrospectPluginManager) -> AdapterRegistry:
    registry = AdapterRegistry()
    for impl in _implementations(pm, "register_adapters"):  # registration order
        name = impl.plugin_name
        register = _Register(name)
        try:
            returned = _call_one(pm, "register_adapters", impl, register=register)
        except (Exception, SystemExit) as exc:
            pm.unregister(name=name)
            _plugin_failed(pm, name, _origin(pm, name), "register_adapters", _describe(exc), exc)
            continue
        if register.rejected or returned:
            error = (
                f"it called register() with a {register.rejected[0]}; register() takes an "
                "introspect.AdapterSpec"
                if register.rejected
                else f"it returned a {type(returned[0]).__name__}; the hook returns None and "
                "calls register(spec) once for each AdapterSpec"
            )
            pm.unregister(name=name)
            _plugin_failed(pm, name, _origin(pm, name), "register_adapters", error)
            continue
        for spec in register.specs:
            registry.add(spec, name)
    return registry


def get_registry(pm: IntrospectPluginManager | None = None) -> AdapterRegistry:
    """The adapters the plugins of ``pm`` register (computed once per manager, and again after
    a plugin is registered or unregistered).

    Example:
        >>> {"gpt2", "llama"} <= set(get_registry().specs)
        True
    """
    pm = pm or get_plugin_manager()
    if pm._registry is None:
        pm._registry = _call_register(pm)
    return pm._registry


def call_select_adapter(
    pm: IntrospectPluginManager,
    model: nn.Module,
    candidates: Sequence[AdapterSpec],
    *,
    skip: Iterable[str] = (),
    reasons: list[str] | None = None,
) -> AdapterSpec | None:
    """Typed wrapper of the ``select_adapter`` hook: the first plugin's spec, or None.

    Plugins are asked one at a time, in pluggy's order (last registered first). One that
    raises or returns something other than an AdapterSpec or None is skipped with a
    :class:`PluginWarning`, and the next one is asked. One that raises
    :class:`~introspect._errors.NoAdapterError` declines with a reason, appended to ``reasons``
    (detection says why it could not prove a layout). ``skip`` names plugins not to ask.

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> model = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
        >>> pm = new_plugin_manager()
        >>> print(call_select_adapter(pm, model, get_registry(pm).candidates(model)))
        None
    """
    skipped = set(skip)
    for impl in reversed(_implementations(pm, "select_adapter")):
        name = impl.plugin_name
        if name in skipped:
            continue
        try:
            result = _call_one(pm, "select_adapter", impl, model=model, candidates=list(candidates))
        except NoAdapterError as exc:
            if reasons is not None:
                reasons.append(str(exc))
            continue
        except (Exception, SystemExit) as exc:
            _plugin_failed(pm, name, _origin(pm, name), "select_adapter", _describe(exc), exc)
            continue
        if result is None:
            continue
        if not isinstance(result, AdapterSpec):
            _plugin_failed(
                pm,
                name,
                _origin(pm, name),
                "select_adapter",
                f"it returned a {type(result).__name__}; select_adapter returns an "
                "introspect.AdapterSpec or None",
            )
            continue
        return result
    return None


def resolve_adapter(
    model: nn.Module,
    adapter: str | AdapterSpec | None = None,
    plugin_manager: IntrospectPluginManager | None = None,
    *,
    detect: bool = True,
) -> AdapterSpec:
    """The AdapterSpec for ``model``: forced by name or spec, else chosen by the plugins.

    The adapters claiming the model's type or class are the candidates; ``select_adapter``
    implementations may pick any spec. Detection (:mod:`introspect._detect`) is the built-in
    ``select_adapter`` of last resort: when no adapter claims the model it detects the layout
    and proves it against the model's own ``hidden_states``, and a proven spec is used with a
    :class:`~introspect._detect.DetectedAdapterWarning`. ``detect=False`` leaves it out.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> resolve_adapter(model).name
        'gpt2'
    """
    if isinstance(adapter, AdapterSpec):
        spec = adapter
    else:
        pm = plugin_manager or get_plugin_manager()
        registry = get_registry(pm)
        if isinstance(adapter, str):
            if adapter not in registry.specs:
                raise NoAdapterError(
                    f"no adapter named {adapter!r}; registered adapters: "
                    f"{', '.join(sorted(registry.specs))} ({AUTHORING_HINT})"
                )
            spec = registry.specs[adapter]
        elif adapter is None:
            candidates = registry.candidates(model)
            reasons: list[str] = []
            skip = () if detect else (DETECTION,)
            chosen = call_select_adapter(pm, model, candidates, skip=skip, reasons=reasons)
            if chosen is not None:
                spec = chosen
            elif len(candidates) == 1:
                spec = candidates[0]
            elif candidates:
                names = ", ".join(c.name for c in candidates)
                raise NoAdapterError(
                    f"several adapters claim {type(model).__name__}: {names}; pass "
                    "Inspector(model, adapter=NAME) or implement select_adapter in a plugin"
                )
            else:
                model_type = getattr(getattr(model, "config", None), "model_type", None)
                what = type(model).__name__ + (
                    f" (model_type {model_type!r})" if model_type else " (not a transformers model)"
                )
                message = (
                    f"no adapter claims {what}. Registered adapters: "
                    f"{', '.join(sorted(registry.specs))}. Pass Inspector(model, "
                    f"adapter=AdapterSpec(...)) for your own model, or {AUTHORING_HINT}"
                )
                if reasons:
                    message += ". " + "; ".join(reasons)
                raise NoAdapterError(message)
        else:
            raise TypeError(
                f"adapter must be None, an adapter name or an AdapterSpec, got "
                f"{type(adapter).__name__}"
            )
    spec = spec.on_transformers()
    if spec.unsupported:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported by adapter {spec.name!r}: {spec.unsupported}"
        )
    return spec


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


def _hookspec_signature(fn: Any) -> str:
    # Annotations stay strings (hookspecs.py uses postponed evaluation), so they print as written.
    params = ", ".join(
        f"{p.name}: {p.annotation}" if p.annotation is not inspect.Parameter.empty else p.name
        for p in inspect.signature(fn).parameters.values()
    )
    return f"def {fn.__name__}({params}) -> {inspect.signature(fn).return_annotation}:"


def authoring_help() -> str:
    """How to write an adapter plugin, from text that ships in the package.

    It lists every hook with its exact signature (read from :mod:`introspect._hookspecs`), the
    entry-point group and the environment variables that help when a plugin misbehaves.
    ``introspect plugins --help-authoring`` prints it.

    Example:
        >>> text = authoring_help()
        >>> "[project.entry-points.introspect]" in text
        True
        >>> "def register_adapters(register: Callable[[AdapterSpec], None]) -> None:" in text
        True
    """
    hooks = []
    for name in sorted(vars(hookspecs)):
        fn = getattr(hookspecs, name)
        options = getattr(fn, f"{GROUP}_spec", None)
        if options is None or not callable(fn):
            continue
        kind = "  # firstresult: the first non-None answer wins" if options["firstresult"] else ""
        doc = (inspect.getdoc(fn) or "").replace("``", "")
        hooks.append(f"    @hookimpl{kind}\n    {_hookspec_signature(fn)}\n        {doc}")
    return "\n".join(
        [
            "Writing an adapter plugin for introspect",
            "",
            "An adapter is an introspect.AdapterSpec (module paths and quirk flags, as data).",
            "A plugin is a module whose functions are marked with introspect.hookimpl and which",
            f"its distribution declares in the {GROUP!r} entry-point group, the entry-point name",
            "being the distribution name (pluggy silently skips a repeated name):",
            "",
            f"    [project.entry-points.{GROUP}]",
            '    introspect-mymodel = "introspect_mymodel"',
            "",
            "Hooks (called with keyword arguments; an implementation may take fewer of them):",
            "",
            "\n\n".join(hooks),
            "",
            "Steps:",
            "    introspect scaffold MODEL_TYPE     write a plugin package from a detected layout",
            "    introspect plugins --all           check that it loads and what it registers",
            "    introspect.testing.assert_conformant(model, inputs, adapter=SPEC)",
            "                                       prove it against the model's own outputs",
            "",
            "When a plugin misbehaves:",
            "    INTROSPECT_TRACE_PLUGINS=1         print every hook call",
            "    INTROSPECT_STRICT_PLUGINS=1        make a failing plugin an error (PluginLoadError)",
            "                                       instead of a PluginWarning; use it in CI",
            "    INTROSPECT_LOAD_PLUGINS=a,b        load only these third-party plugins",
            "",
            "The full guide is the plugin tutorial (docs/plugins/tutorial.md, with the hook",
            "reference in docs/plugins/hooks.md) in the introspect-lm source distribution.",
        ]
    )
