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
from collections.abc import Callable

import pytest
import torch
from _support.registry_cases import CASES, SPECS, Built, Case

from introspect import (
    Inspector,
    MissingPartError,
    UnsupportedArchitectureError,
)
from introspect.testing import (
    assert_conformant,
)


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
            assert (stack, part) in insp._first_use.parts
