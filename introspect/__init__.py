"""introspect: read and change what every block of a language model receives and produces.

Example:
    >>> import introspect
    >>> "Inspector" in introspect.__all__
    True
"""

from __future__ import annotations

from introspect.batching import (
    encode_batch,
    last_token_positions,
    pad_batch,
    position_ids_from_mask,
    real_token_positions,
)
from introspect.capture import Capture, Record
from introspect.detect import DetectedAdapterWarning, detect_adapter
from introspect.errors import (
    AdapterConflictError,
    AdapterError,
    CaptureError,
    ConformanceError,
    InterventionError,
    IntrospectError,
    LocatorError,
    MissingPartError,
    NoAdapterError,
    PluginLoadError,
    UnsupportedArchitectureError,
)
from introspect.hookspecs import hookimpl
from introspect.inspector import Inspector, get_hidden_state
from introspect.interventions import Intervention, logit_difference, mean_activation
from introspect.lens import LensResult, logit_lens
from introspect.locators import Locator, parse
from introspect.models import load_model
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
    "DetectedAdapterWarning",
    "Inspector",
    "Intervention",
    "InterventionError",
    "IntrospectError",
    "LensResult",
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
    "detect_adapter",
    "encode_batch",
    "get_hidden_state",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "last_token_positions",
    "load_model",
    "logit_difference",
    "logit_lens",
    "mean_activation",
    "new_plugin_manager",
    "pad_batch",
    "parse",
    "position_ids_from_mask",
    "real_token_positions",
]
