"""Scaffold: turn a detected (or given) AdapterSpec into an installable plugin package.

``write_plugin`` writes ``pyproject.toml`` (with the ``introspect`` entry point named after
the distribution), the plugin module (the spec as Python source and its
``register_adapters`` hook), a conformance test and the tiny config that test builds its
model from. ``introspect scaffold MODEL`` is the command-line face of :func:`scaffold`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from introspect._detect import detect_adapter
from introspect._errors import AdapterConflictError, AdapterError
from introspect._plugins import get_plugin_manager, get_registry
from introspect._spec import AdapterSpec
from introspect._tiny import tiny_config
from introspect._version import __version__
from introspect.testing import build_tiny

__all__ = ["ScaffoldResult", "model_classes", "scaffold", "spec_source", "write_plugin"]

_INDENT = "    "
_WRAP = 72

_MAPPINGS = (
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
)


def _quoted(text: str) -> str:
    """A Python literal for ``text`` (``repr``: always valid), double-quoted where it can be."""
    literal = repr(text)
    # repr picks single quotes unless the text holds one; then it holds neither quote.
    if literal.startswith("'") and '"' not in text:
        literal = f'"{literal[1:-1]}"'
    return literal


def _string(text: str, indent: str) -> str:
    if len(text) <= _WRAP:
        return _quoted(text)
    # Long strings become implicitly concatenated pieces, split at spaces.
    words = re.split(r"(?<= )", text)
    pieces: list[str] = []
    current = ""
    for word in words:
        if current and len(current) + len(word) > _WRAP:
            pieces.append(current)
            current = ""
        current += word
    pieces.append(current)
    inner = indent + _INDENT
    body = "\n".join(inner + _quoted(p) for p in pieces)
    return f"(\n{body}\n{indent})"


def _literal(value: Any, indent: str) -> str:
    if isinstance(value, BaseModel):
        return _model_call(value, indent)
    if isinstance(value, str):
        return _string(value, indent)
    if isinstance(value, tuple):
        if not value:
            return "()"
        inner = indent + _INDENT
        items = [_literal(v, inner) for v in value]
        flat = "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if len(flat) + len(indent) <= 88 and "\n" not in flat:
            return flat
        return "(\n" + "".join(f"{inner}{item},\n" for item in items) + indent + ")"
    if isinstance(value, dict):
        if not value:
            return "{}"
        inner = indent + _INDENT
        items = [f"{_literal(k, inner)}: {_literal(v, inner)}" for k, v in value.items()]
        flat = "{" + ", ".join(items) + "}"
        if len(flat) + len(indent) <= 88 and "\n" not in flat:
            return flat
        return "{\n" + "".join(f"{inner}{item},\n" for item in items) + indent + "}"
    return repr(value)


def _non_default(model: BaseModel) -> list[tuple[str, Any]]:
    out = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        default = field.get_default(call_default_factory=True)
        if value != default:
            out.append((name, value))
    return out


_FIRST = ("name", "model_types", "architectures", "description")


def _model_call(model: BaseModel, indent: str) -> str:
    inner = indent + _INDENT
    fields = sorted(
        _non_default(model),
        key=lambda item: _FIRST.index(item[0]) if item[0] in _FIRST else len(_FIRST),
    )
    args = [f"{name}={_literal(value, inner)}" for name, value in fields]
    flat = f"{type(model).__name__}(" + ", ".join(args) + ")"
    if len(flat) + len(indent) <= 88 and "\n" not in flat:
        return flat
    body = "".join(f"{inner}{arg},\n" for arg in args)
    return f"{type(model).__name__}(\n{body}{indent})"


def _classes_used(model: BaseModel) -> set[str]:
    names = {type(model).__name__}
    for _, value in _non_default(model):
        items = (
            tuple(value.values())
            if isinstance(value, dict)
            else value
            if isinstance(value, tuple)
            else (value,)
        )
        for item in items:
            if isinstance(item, BaseModel):
                names |= _classes_used(item)
    return names


def spec_source(spec: AdapterSpec, variable: str = "ADAPTER") -> str:
    """Python source that rebuilds ``spec`` (only fields that differ from their defaults).

    Example:
        >>> print(spec_source(AdapterSpec(name="tiny", blocks="layers", final_norm="norm")))
        ADAPTER = AdapterSpec(name="tiny", blocks="layers", final_norm="norm")
    """
    return f"{variable} = {_model_call(spec, '')}"


_DISTRIBUTION = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def _validated(spec: AdapterSpec, **changes: Any) -> AdapterSpec:
    """``spec.derive(**changes)``, its validation errors as one AdapterError."""
    try:
        return spec.derive(**changes)
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise AdapterError(reasons) from None


def _check_distribution(distribution: str) -> None:
    if not _DISTRIBUTION.match(distribution):
        raise AdapterError(
            f"distribution name {distribution!r} must start with a letter and hold only "
            "letters, digits, '-' and '_' (its module is the same name with '_' for '-')"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


@dataclass(frozen=True)
class ScaffoldResult:
    """What :func:`scaffold` wrote: the package folder, its files and the spec inside."""

    directory: Path
    files: tuple[Path, ...]
    spec: AdapterSpec
    distribution: str
    module: str


def model_classes(model_type: str) -> list[str]:
    """The transformers class names a scaffolded test builds: the LM head class and the base.

    Example:
        >>> model_classes("gpt2")
        ['GPT2LMHeadModel', 'GPT2Model']
    """
    from transformers.models.auto import modeling_auto

    def first(value: Any) -> str | None:
        # A mapping entry is a class name, or a tuple of names for one model type.
        if isinstance(value, (tuple, list)):
            value = value[0] if value else None
        return value if isinstance(value, str) and value else None

    found: list[str] = []
    for attr in _MAPPINGS:
        name = first(getattr(modeling_auto, attr, {}).get(model_type))
        if name:
            found.append(name)
            break
    base = first(modeling_auto.MODEL_MAPPING_NAMES.get(model_type))
    if base and base not in found:
        found.append(base)
    return found


def _module_text(spec: AdapterSpec, distribution: str, origin: str) -> str:
    imports = ", ".join(sorted(_classes_used(spec) | {"hookimpl"}))
    return f'''"""{distribution}: the introspect adapter {spec.name!r}.

Its spec was {origin}. Installed, it registers through the ``introspect`` entry point; check
it with ``pytest`` (see tests/).
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import {imports}

{spec_source(spec)}


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(ADAPTER)
'''


def _pyproject_text(distribution: str, module: str, spec: AdapterSpec) -> str:

    return f'''[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{distribution}"
version = "0.1.0"
description = {json.dumps(f"introspect adapter {spec.name!r}")}
requires-python = ">=3.10"
dependencies = ["introspect-lm>={__version__}"]

# The entry-point name is the distribution name: pluggy skips a repeated name.
[project.entry-points.introspect]
{distribution} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]

[tool.pytest.ini_options]
pythonpath = ["."]
testpaths = ["tests"]
'''


def _test_text(module: str, classes: Sequence[str], distribution: str) -> str:
    class_list = ", ".join(f"transformers.{name}" for name in classes)
    return f'''"""Conformance tests for {module}: its spec against Hugging Face's own outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

import {module}
from introspect import Inspector, get_registry, new_plugin_manager
from introspect.testing import assert_classes_conformant, build_tiny

CONFIG = transformers.AutoConfig.from_pretrained(Path(__file__).parent / "tiny")
CLASSES = [{class_list}]


def test_registers_its_adapter() -> None:
    pm = new_plugin_manager(load_entry_points=False, plugins=[{module}])
    assert get_registry(pm).specs[{module}.ADAPTER.name] == {module}.ADAPTER
    model = build_tiny(CLASSES[0], CONFIG)
    assert Inspector(model, plugin_manager=pm).adapter == {module}.ADAPTER


def test_conformant() -> None:
    reports = assert_classes_conformant(CONFIG, CLASSES, adapter={module}.ADAPTER)
    assert all(report.passed for report in reports)


def test_entry_point_when_installed() -> None:
    pm = new_plugin_manager()
    if pm.get_plugin("{distribution}") is None:
        pytest.skip("not installed: pip install -e . to test the entry point")
    assert get_registry(pm).specs[{module}.ADAPTER.name] == {module}.ADAPTER
'''


def write_plugin(
    directory: Path | str,
    spec: AdapterSpec,
    *,
    config: Any,
    classes: Sequence[str],
    distribution: str | None = None,
    origin: str = "written by introspect scaffold",
    force: bool = False,
) -> ScaffoldResult:
    """Write a plugin package for ``spec`` into ``directory`` (created; ``force`` replaces it).

    ``config`` is the tiny config the package's test builds ``classes`` (transformers class
    names) from.

    Example:
        >>> import tempfile
        >>> from introspect._tiny import tiny_config
        >>> spec = AdapterSpec(name="tiny", model_types=("gpt2",), embed="wte", blocks="h",
        ...                    final_norm="ln_f", lm_head="lm_head")
        >>> out = write_plugin(Path(tempfile.mkdtemp()) / "pkg", spec,
        ...                    config=tiny_config("gpt2"), classes=["GPT2LMHeadModel"])
        >>> sorted(p.name for p in out.files)
        ['config.json', 'introspect_tiny.py', 'pyproject.toml', 'test_introspect_tiny.py']
    """
    directory = Path(directory)
    spec = _validated(spec)
    distribution = distribution or f"introspect-{_slug(spec.name)}"
    _check_distribution(distribution)
    module = distribution.replace("-", "_")
    if directory.exists():
        if not force:
            raise FileExistsError(f"{directory} exists: choose another folder or pass force")
        shutil.rmtree(directory)
    (directory / "tests" / "tiny").mkdir(parents=True)
    files = {
        directory / "pyproject.toml": _pyproject_text(distribution, module, spec),
        directory / f"{module}.py": _module_text(spec, distribution, origin),
        directory / "tests" / f"test_{module}.py": _test_text(module, classes, distribution),
    }
    for path, text in files.items():
        path.write_text(text)
    config.save_pretrained(directory / "tests" / "tiny")
    written = (*files, directory / "tests" / "tiny" / "config.json")
    return ScaffoldResult(directory, written, spec, distribution, module)


def _load_config(target: str) -> Any:
    from transformers import AutoConfig

    folder = Path(target)
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} has no config.json: point at a model folder")
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    try:
        return AutoConfig.for_model(target)
    except ValueError:
        raise AdapterError(
            f"{target!r} is neither a folder with a config.json nor a transformers model type "
            "(e.g. 'gpt2', 'llama'); nothing is downloaded"
        ) from None


def scaffold(
    target: str,
    directory: Path | str | None = None,
    *,
    adapter: str | None = None,
    name: str | None = None,
    distribution: str | None = None,
    plugin_manager: Any = None,
    force: bool = False,
) -> ScaffoldResult:
    """Write a plugin package for the model ``target`` (a model type name or a local folder).

    A tiny random model is built from the config (nothing is downloaded and no weights are
    loaded); its layout is detected and proven, or taken from the registered adapter named
    ``adapter``. ``directory`` defaults to ``./<distribution>``. An adapter already claiming
    the model type is an error (block its plugin with ``plugin_manager`` to replace it).

    Example:
        >>> import tempfile
        >>> from introspect import new_plugin_manager
        >>> pm = new_plugin_manager(block=["introspect-lm.llama"])
        >>> out = scaffold("llama", Path(tempfile.mkdtemp()) / "pkg", plugin_manager=pm)
        >>> out.spec.name, out.distribution
        ('llama', 'introspect-llama')
    """
    import transformers

    # Names are checked before any model is built.
    if name is not None:
        _validated(AdapterSpec(name="check", blocks="layers"), name=name)
    if distribution is not None:
        _check_distribution(distribution)
    config = tiny_config(_load_config(target))
    model_type = str(config.model_type)
    classes = model_classes(model_type)
    if not classes:
        raise AdapterError(
            f"transformers has no language-model class for model type {model_type!r}"
        )
    pm = plugin_manager or get_plugin_manager()
    registry = get_registry(pm)
    if adapter is not None:
        if adapter not in registry.specs:
            raise AdapterError(
                f"no adapter named {adapter!r}; registered: {', '.join(sorted(registry.specs))}"
            )
        spec = registry.specs[adapter]
        origin = f"derived from adapter {adapter!r}"
    else:
        claimed = registry.by_model_type.get(model_type)
        if claimed is not None:
            raise AdapterConflictError(
                f"model type {model_type!r} is already served by adapter {claimed!r} (plugin "
                f"{registry.owners[claimed]!r}); a plugin claiming it too would conflict. "
                f"Start from it with --adapter {claimed}, or block that plugin to replace it"
            )
        cls = getattr(transformers, classes[0])
        spec = detect_adapter(build_tiny(cls, config))
        origin = f"detected from {classes[0]} and proven against its hidden_states"
    adapter_name = name or (spec.name if adapter else re.sub(r"[^a-z0-9_.]+", "_", model_type))
    spec = _validated(spec, name=adapter_name)
    distribution = distribution or f"introspect-{_slug(adapter_name)}"
    directory = Path(directory) if directory is not None else Path(distribution)
    return write_plugin(
        directory,
        spec,
        config=config,
        classes=classes,
        distribution=distribution,
        origin=origin,
        force=force,
    )
