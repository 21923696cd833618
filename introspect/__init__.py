"""introspect: read and change what every block of a language model receives and produces.

Example:
    >>> import introspect
    >>> "Inspector" in introspect.__all__
    True
"""

from __future__ import annotations

from introspect.capture import Capture, Record
from introspect.errors import (
    AdapterConflictError,
    AdapterError,
    CaptureError,
    ConformanceError,
    IntrospectError,
    LocatorError,
    MissingPartError,
    NoAdapterError,
    PluginLoadError,
    UnsupportedArchitectureError,
)
from introspect.hookspecs import hookimpl
from introspect.inspector import Inspector, get_hidden_state
from introspect.locators import Locator, parse
from introspect.plugins import get_plugin_manager, get_registry, new_plugin_manager
from introspect.spec import AdapterSpec, LogitOp, StackSpec

__version__ = "0.1.0"

__all__ = [
    "AdapterConflictError",
    "AdapterError",
    "AdapterSpec",
    "Capture",
    "CaptureError",
    "ConformanceError",
    "Inspector",
    "IntrospectError",
    "Locator",
    "LocatorError",
    "LogitOp",
    "MissingPartError",
    "NoAdapterError",
    "PluginLoadError",
    "Record",
    "StackSpec",
    "UnsupportedArchitectureError",
    "__version__",
    "get_hidden_state",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "new_plugin_manager",
    "parse",
]
