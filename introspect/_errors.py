"""One exception tree for the whole package.

::

    IntrospectError                      base: catch this to catch everything we raise
    ├── LocatorError (ValueError)        a locator string or index is malformed or out of range
    │   └── MissingPartError             the architecture has no such part (e.g. final_norm on BERT)
    ├── AdapterError                     no adapter fits, or an adapter is malformed
    │   ├── NoAdapterError (LookupError) no adapter claims the model
    │   ├── AdapterConflictError         two plugins claim the same architecture or name
    │   └── UnsupportedArchitectureError an architecture we refuse rather than answer wrongly
    ├── PluginLoadError                  a plugin failed (raised only in strict plugin mode)
    ├── ModelLoadError (OSError)         a model name, hub id or folder could not be loaded
    ├── MissingDependencyError (ImportError) an optional package a feature needs is not installed
    ├── CaptureError                     a capture was asked something it cannot record
    ├── AttentionToolError               head scores or attention patterns asked the impossible
    ├── ExtractionError                  introspect extract: settings, output folder, resume
    ├── CorpusError                      an input corpus is missing, unreadable or malformed
    ├── DatasetError                     an ActivationDataset folder is missing or inconsistent
    ├── InterventionError                an edit (steer, patch, ablate, ...) cannot be applied
    ├── ViewError                        an interactive view or report page cannot be drawn or written
    └── ConformanceError (AssertionError) an adapter disagrees with Hugging Face's own outputs
        └── FactError                    a stated fact fails its proof on this install

Every message says what happened, the likely cause and what to do next.
"""

from __future__ import annotations

__all__ = [
    "AdapterConflictError",
    "AdapterError",
    "AttentionToolError",
    "CaptureError",
    "ConformanceError",
    "CorpusError",
    "DatasetError",
    "ExtractionError",
    "FactError",
    "InterventionError",
    "IntrospectError",
    "LocatorError",
    "MissingDependencyError",
    "MissingPartError",
    "ModelLoadError",
    "NoAdapterError",
    "PluginLoadError",
    "UnsupportedArchitectureError",
]


class IntrospectError(Exception):
    """Base of every error introspect raises.

    Example:
        >>> try:
        ...     raise LocatorError("bad")
        ... except IntrospectError as exc:
        ...     print(type(exc).__name__)
        LocatorError
    """


class LocatorError(IntrospectError, ValueError):
    """A locator is malformed, names an unknown part, or its index is out of range."""


class MissingPartError(LocatorError):
    """The architecture has no module for this part (e.g. ``final_norm`` on BERT)."""


class AdapterError(IntrospectError):
    """No adapter fits the model, or an adapter spec is malformed."""


class NoAdapterError(AdapterError, LookupError):
    """No registered adapter claims the model."""


class AdapterConflictError(AdapterError):
    """Two plugins claim the same architecture (or register the same adapter name)."""


class UnsupportedArchitectureError(AdapterError):
    """An architecture introspect refuses rather than answer wrongly."""


class PluginLoadError(IntrospectError):
    """A plugin failed to import, or its hook raised or returned the wrong thing.

    Raised only in strict plugin mode (``INTROSPECT_STRICT_PLUGINS=1`` or
    ``new_plugin_manager(strict=True)``, for a plugin's CI); otherwise the plugin is skipped
    with a :class:`~introspect._plugins.PluginWarning` and the others still work.

    Example:
        >>> issubclass(PluginLoadError, IntrospectError)
        True
    """


class ModelLoadError(IntrospectError, OSError):
    """A model short name, hub id or local folder could not be loaded."""


class MissingDependencyError(IntrospectError, ImportError):
    """An optional package a feature needs is not installed (the message says what to install)."""


class CaptureError(IntrospectError):
    """A capture was asked for something it cannot record."""


class AttentionToolError(IntrospectError):
    """Head scores, attention patterns or their commands were asked what they cannot do."""


class ExtractionError(IntrospectError):
    """``introspect extract`` cannot run as asked (settings, output folder, resume)."""


class CorpusError(IntrospectError):
    """An input corpus is missing, unreadable, empty or malformed."""


class DatasetError(IntrospectError):
    """An ``ActivationDataset`` folder is missing, incomplete or inconsistent."""


class InterventionError(IntrospectError):
    """An edit (steer, patch, ablate, scale, edit) cannot be applied as asked."""


class ConformanceError(IntrospectError, AssertionError):
    """An adapter's view of a model disagrees with Hugging Face's own outputs."""


class FactError(ConformanceError):
    """An adapter's stated fact does not hold on this install (a release moved it).

    ``checks`` holds every check of the proof (``introspect._proof.Check``), failures included.
    """

    def __init__(self, message: str, checks: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.checks = checks


class SAEError(IntrospectError):
    """A sparse autoencoder cannot be read, placed or used as asked (format, site, width).

    Example:
        >>> issubclass(SAEError, IntrospectError)
        True
    """


__all__ += ["SAEError"]


class ViewError(IntrospectError):
    """An interactive view or report page cannot be drawn or written as asked (an empty
    result, a page over its size budget, an output file that exists).

    Example:
        >>> issubclass(ViewError, IntrospectError)
        True
    """


__all__ += ["ViewError"]
