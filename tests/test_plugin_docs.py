"""The plugin-author docs: every hookspec documented with its exact signature; pages present."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from introspect import _hookspecs as hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs"


def hookspec_functions() -> list[object]:
    return [
        fn
        for name, fn in vars(hookspecs).items()
        if callable(fn) and hasattr(fn, "introspect_spec") and not name.startswith("_")
    ]


def signature_text(fn: object) -> str:
    """``def name(arg: Annotation, ...) -> Return:`` exactly as written in hookspecs.py."""
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    params = []
    star = False
    for param in sig.parameters.values():
        if param.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        text = param.name
        if param.annotation is not inspect.Parameter.empty:
            text += f": {param.annotation}"
        if param.default is not inspect.Parameter.empty:
            text += f" = {param.default!r}"
        params.append(text)
    returns = sig.return_annotation
    tail = "" if returns is inspect.Signature.empty else f" -> {returns}"
    return f"def {fn.__name__}({', '.join(params)}){tail}:"  # type: ignore[attr-defined]


def test_there_are_hookspecs() -> None:
    names = [fn.__name__ for fn in hookspec_functions()]  # type: ignore[attr-defined]
    assert "register_adapters" in names and "select_adapter" in names


@pytest.mark.parametrize(
    "fn",
    hookspec_functions(),
    ids=lambda fn: fn.__name__,  # type: ignore[attr-defined]
)
def test_hookspec_is_documented_with_its_exact_signature(fn: object) -> None:
    text = (DOCS / "plugins" / "hooks.md").read_text()
    name = fn.__name__  # type: ignore[attr-defined]
    assert f"\n## {name}\n" in text, f"docs/plugins/hooks.md has no '## {name}' section"
    section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
    expected = signature_text(fn)
    assert expected in section, (
        f"the '## {name}' section of docs/plugins/hooks.md must show the hookspec's exact "
        f"signature:\n    {expected}"
    )


def test_plugin_pages_exist_and_link_the_example() -> None:
    for page in ("tutorial.md", "hooks.md", "testing.md"):
        assert (DOCS / "plugins" / page).read_text().startswith("# ")
    tutorial = (DOCS / "plugins" / "tutorial.md").read_text()
    example = DOCS.parent / "examples" / "introspect-toylm"
    assert "examples/introspect-toylm" in tutorial
    assert (example / "pyproject.toml").exists()
    assert 'introspect-toylm = "introspect_toylm"' in (example / "pyproject.toml").read_text()
