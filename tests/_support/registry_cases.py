"""The registry's cases: every built-in adapter on every model type and auto class serving it.

Shared by the registry-parametrised tests (conformance, heads, attribution) and by the
session-scoped ``built`` fixture in ``conftest.py``, which builds each case's tiny model once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.auto import modeling_auto

from introspect import AdapterSpec, get_registry, new_plugin_manager
from introspect.testing import EXTRA_OVERRIDES, build_tiny, example_inputs, tiny_config

__all__ = ["AUTO_MAPPINGS", "CASES", "SPECS", "Built", "Case", "build_case"]

BUILTIN = "introspect-lm"

# The auto classes an adapter may serve, with transformers' mapping of model types to classes.
AUTO_MAPPINGS = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}


def builtin_specs() -> dict[str, AdapterSpec]:
    """The adapters our own distribution registers, through the path a plugin uses."""
    pm = new_plugin_manager()
    registry = get_registry(pm)
    return {
        name: spec
        for name, spec in sorted(registry.specs.items())
        if pm.origins.get(registry.owners[name], (None, None))[0] == BUILTIN
    }


SPECS = builtin_specs()
CLAIMED_BY_CLASS = {arch: name for name, spec in SPECS.items() for arch in spec.architectures}


@dataclass(frozen=True)
class Case:
    """One adapter on one model type through one class (``None``: transformers lacks it)."""

    adapter: str
    model_type: str | None
    class_name: str | None
    served_as: tuple[str, ...]

    @property
    def id(self) -> str:
        return "-".join(x for x in (self.adapter, self.model_type, self.class_name) if x)


def _classes_of(model_type: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for auto, mapping in AUTO_MAPPINGS.items():
        names = getattr(modeling_auto, mapping, {}).get(model_type, ())
        for name in [names] if isinstance(names, str) else names:
            found.setdefault(name, []).append(auto)
    return found


def cases() -> Iterator[Case]:
    for name, spec in SPECS.items():
        for model_type in spec.model_types:
            classes = _classes_of(model_type)
            if not classes:
                yield Case(name, model_type, None, ())
            for class_name, autos in classes.items():
                # A class another adapter claims by name is that adapter's case.
                if CLAIMED_BY_CLASS.get(class_name, name) == name:
                    yield Case(name, model_type, class_name, tuple(autos))
        for class_name in spec.architectures:
            yield Case(name, None, class_name, ("architectures",))


CASES = list(cases())


@dataclass
class Built:
    model: nn.Module
    inputs: dict[str, Any]


def _short(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 200 else text[:197] + "..."


def build_case(case: Case) -> Built | str:
    """The case's tiny model and inputs, or why it cannot be built or run here."""
    version = f"transformers {transformers.__version__}"
    if case.class_name is None:
        return (
            f"{version} maps model type {case.model_type!r} to none of {', '.join(AUTO_MAPPINGS)}"
        )
    cls = getattr(transformers, case.class_name, None)
    if cls is None:
        return f"{version} has no {case.class_name}"
    model_type = case.model_type or cls.config_class.model_type
    try:
        config = tiny_config(model_type, **EXTRA_OVERRIDES.get(model_type, {}))
    except Exception as exc:
        return f"the tiny {model_type} config does not build on {version}: {_short(exc)}"
    try:
        model = build_tiny(cls, config)
    except Exception as exc:
        return f"a tiny {case.class_name} does not build on {version}: {_short(exc)}"
    inputs = example_inputs(config, model=model)
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as exc:
        return f"a tiny {case.class_name} does not run on token ids on {version}: {_short(exc)}"
    return Built(model, inputs)
