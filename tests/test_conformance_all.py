"""Every built-in adapter, proven on every model type it claims and every auto class serving it.

The cases come from the registry (the adapters of the ``introspect-lm`` distribution) and from
transformers' auto mappings, so a new adapter is tested here without a line of its own: each
(adapter, model type, class) pair is built tiny from ``tiny_config(model_type)``, perturbed,
and proven with ``assert_conformant`` (hidden states, the final-norm relation, logits, every
locator, and the block relation where the spec states one); a base model's ``logits`` must say
there is no head. A pair that cannot be built or run on the installed transformers is skipped
with the reason; an adapter that refuses its architecture must refuse every model. Family files in ``tests/adapters``
keep what only a family has: hand-made configs for variants the generic tiny config does not
reach, and the facts behind each quirk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers.models.auto import modeling_auto

from introspect import (
    AdapterSpec,
    Inspector,
    MissingPartError,
    UnsupportedArchitectureError,
    get_registry,
    new_plugin_manager,
)
from introspect.testing import (
    EXTRA_OVERRIDES,
    assert_conformant,
    build_tiny,
    example_inputs,
    tiny_config,
)

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


def _build(case: Case) -> Built | str:
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


def test_every_builtin_adapter_has_cases() -> None:
    assert {"gpt2", "llama", "t5", "bart-causal"} <= SPECS.keys()
    assert {c.adapter for c in CASES} == SPECS.keys()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformant(case: Case, built: Callable[[Case], Built]) -> None:
    spec = SPECS[case.adapter]
    found = built(case)
    if spec.unsupported is not None:
        with pytest.raises(UnsupportedArchitectureError, match=re.escape(spec.unsupported)):
            Inspector(found.model)
        return
    report = assert_conformant(found.model, found.inputs)
    assert report.adapter == case.adapter, f"the plugins picked {report.adapter!r}"
    if found.model.get_output_embeddings() is None:
        insp = Inspector(found.model)
        with torch.no_grad(), insp.capture("block[-1]") as cap:
            found.model(**found.inputs)
        with pytest.raises(MissingPartError, match="has no lm_head: it is a base model"):
            insp.logits(cap["block[-1]"].output)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_proves_at_first_use(case: Case, built: Callable[[Case], Built]) -> None:
    """The case's model proves its adapter on a shrunk clone of itself (nothing deferred)."""
    spec = SPECS[case.adapter]
    found = built(case)
    if spec.unsupported is not None:
        return
    insp = Inspector(found.model)
    proof = insp.proof
    assert proof.status == "proven", proof.reason
    assert proof.checks and all(c.passed for c in proof.checks)
    for stack in insp.adapter.stack_names:
        prefix = f"{stack}." if stack and stack != insp.adapter.stack_name else ""
        for part in insp.adapter.stack(stack).heads:
            # The first head locator of a part proves its layout on the clone (or refuses).
            insp.capture(f"{prefix}block[-1].{part}.z")
            assert (stack, part) in insp._heads_proven
