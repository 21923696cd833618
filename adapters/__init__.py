"""Built-in adapters, installed as ``introspect.adapters`` (one module per family).

Each module is a plugin registered through the ``introspect`` entry-point group, the same
path a third-party plugin uses.
"""

if __name__ != "introspect.adapters":  # pragma: no cover - guarded misuse
    raise ImportError(
        "the built-in adapters must be imported as 'introspect.adapters', not as the bare "
        "'adapters' (that name belongs to AdapterHub's package): install introspect-lm with "
        "'pip install -e .' and import introspect.adapters"
    )
