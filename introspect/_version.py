"""The package version and the transformers range it supports, cheap to read from any part."""

from __future__ import annotations

import re

__version__ = "0.1.0"

TRANSFORMERS_FLOOR = (4, 57)
"""The oldest transformers our tests run (4.57, the last 4.x line); 5.x is current. Releases
newer than those tested are accepted: proof at first use checks each adapter on them."""


def transformers_problem(installed: str | None) -> str | None:
    """Why ``installed`` (a transformers version, ``None`` if absent) is unsupported, else None.

    Example:
        >>> print(transformers_problem("5.25.0"))
        None
        >>> transformers_problem("4.46.3")[:59]
        'introspect needs transformers>=4.57 (installed: 4.46.3): pi'
    """
    if installed is None:
        return None
    found = re.match(r"(\d+)\.(\d+)", installed)
    if found is None or (int(found.group(1)), int(found.group(2))) >= TRANSFORMERS_FLOOR:
        return None
    floor = ".".join(map(str, TRANSFORMERS_FLOOR))
    return (
        f"introspect needs transformers>={floor} (installed: {installed}): pip install -U "
        f"'transformers>={floor}' (older releases are untested and their module layouts differ)"
    )


def _installed_transformers() -> str | None:
    """The installed transformers version from its dist-info folder's name (``None``: absent
    or not found), without importing it or importlib.metadata (slow at start-up)."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None  # plain torch models need no transformers
    for info in Path(spec.origin).parent.parent.glob("transformers-*.dist-info"):
        return info.name[len("transformers-") : -len(".dist-info")]
    return None


def check_transformers() -> None:
    """Refuse, in one line, a transformers older than the supported range (at import).

    Example:
        >>> check_transformers()
    """
    problem = transformers_problem(_installed_transformers())
    if problem is not None:
        raise ImportError(problem)
