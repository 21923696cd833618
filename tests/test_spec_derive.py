"""Specs derive through one validating idiom and hash by content."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
from introspect.adapters.gpt2 import GPT2
from introspect.adapters.llama import LLAMA

from introspect import AdapterSpec
from introspect._plugins import get_registry

ROOT = Path(__file__).resolve().parent.parent


def test_derive_refuses_a_misspelt_field() -> None:
    with pytest.raises(pydantic.ValidationError, match="final_nrom"):
        GPT2.derive(final_nrom="x")


def test_derive_refuses_a_bad_path_and_a_bad_name() -> None:
    with pytest.raises(pydantic.ValidationError, match="dotted module path"):
        GPT2.derive(final_norm="ln f")
    with pytest.raises(pydantic.ValidationError, match="lower-case"):
        GPT2.derive(name='My Adapter"""')


def test_derive_keeps_everything_else() -> None:
    sibling = LLAMA.derive(name="sibling", model_types=("sibling",))
    assert sibling.model_dump(exclude={"name", "model_types"}) == LLAMA.model_dump(
        exclude={"name", "model_types"}
    )


def test_specs_are_hashable_by_content() -> None:
    specs = get_registry().specs.values()
    assert len({hash(s) for s in specs}) == len(set(specs)) == len(list(specs))
    assert hash(GPT2.derive()) == hash(GPT2) and GPT2.derive() == GPT2
    assert hash(GPT2.derive(description="other")) != hash(GPT2)
    assert isinstance(AdapterSpec.from_stack(GPT2.stack(None), name="copy"), AdapterSpec)


def test_specs_derive_only_through_derive() -> None:
    files = [*(ROOT / "adapters").glob("*.py"), ROOT / "introspect" / "_detect.py"]
    files += [ROOT / "introspect" / "_scaffold.py"]
    offenders = [p.name for p in files if "model_copy(update=" in p.read_text()]
    assert offenders == [], f"use spec.derive(...) instead of model_copy(update=...) in {offenders}"


def test_adapters_import_only_the_public_api_and_each_other() -> None:
    """Adapters are data written against the public API, exactly as a third-party plugin is."""
    import ast

    allowed = {"__future__", "collections.abc", "typing", "introspect"}
    public = set(__import__("introspect").__all__)
    offenders = []
    for path in (ROOT / "adapters").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                if node.module not in allowed:
                    offenders.append(f"{path.name}: from {node.module}")
                elif node.module == "introspect":
                    offenders.extend(
                        f"{path.name}: {a.name}" for a in node.names if a.name not in public
                    )
            elif isinstance(node, ast.Import):
                offenders.extend(f"{path.name}: import {a.name}" for a in node.names)
    assert offenders == [], f"adapters are data; they import {offenders}"
