"""Shared checks for the decoder-only adapter tests (Llama layout and its relatives).

Each architecture is built tiny from its config, both with and without its LM head, and proven
against Hugging Face with ``introspect.testing``; the helpers here add what every family also
asserts: that a base model's ``logits`` says there is no head, and that the logit extras the
adapter declares are what make its logits match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from introspect import Inspector, MissingPartError
from introspect._spec import AdapterSpec
from introspect.testing import assert_classes_conformant, build_tiny, example_inputs

# Small enough to run on two CPU cores in well under a second per model; token ids stay inside
# the vocabulary so configs whose defaults point at id 32000+ still build.
SMALL: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def classes(*names: str) -> list[type[nn.Module]]:
    """The named transformers classes, or skip when this transformers version lacks one."""
    found = []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is None:
            pytest.skip(f"transformers {transformers.__version__} has no {name}")
        found.append(cls)
    return found


def config(config_class: str, **overrides: Any) -> Any:
    """A tiny config of ``config_class`` (skips when this transformers version lacks it)."""
    (cls,) = classes(config_class)
    return cls(**{**SMALL, **overrides})


def assert_head_and_base_conformant(
    cfg: Any, head_class: str, base_class: str, adapter: str
) -> None:
    """Prove both classes against Hugging Face, then check the base model has no logits."""
    head_cls, base_cls = classes(head_class, base_class)
    reports = assert_classes_conformant(cfg, [head_cls, base_cls], expect_adapter=adapter)
    assert [r.model for r in reports] == [head_class, base_class]
    assert_no_head(build_tiny(base_cls, cfg))


Case = tuple[str, dict[str, Any], str, str]
"""A test case: config class name, config overrides, head class name, base class name."""


def build_case(case: Case, head: bool = True) -> tuple[nn.Module, Any]:
    """The case's head (or base) class built tiny and perturbed, with its config."""
    config_class, overrides, head_class, base_class = case
    cfg = config(config_class, **overrides)
    (cls,) = classes(head_class if head else base_class)
    return build_tiny(cls, cfg), cfg


def assert_case_conformant(case: Case, model_type: str) -> None:
    """Both classes of the case conform, and the plugins pick ``model_type``'s adapter."""
    config_class, overrides, head, base = case
    assert_head_and_base_conformant(config(config_class, **overrides), head, base, model_type)


def assert_no_head(base: nn.Module) -> None:
    """``logits`` on a base model raises MissingPartError saying there is no head."""
    insp = Inspector(base)
    hidden = torch.zeros(1, 2, base.config.hidden_size)
    with pytest.raises(MissingPartError, match=r"has no lm_head: it is a base model"):
        insp.logits(hidden)


def last_block_and_logits(
    model: nn.Module, inputs: Mapping[str, torch.Tensor]
) -> tuple[Inspector, torch.Tensor, torch.Tensor]:
    """The Inspector, the last block's output and the model's own logits on ``inputs``."""
    insp = Inspector(model)
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        logits = model(**inputs).logits
    return insp, cap["block[-1]"].output, logits


def assert_logit_ops_matter(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> Inspector:
    """The adapter's logits match HF's, and would not without its ``logit_ops``.

    "Would not" means a difference a thousand times the tolerance of the match.
    """
    insp, last, theirs = last_block_and_logits(model, inputs)
    assert insp.adapter.logit_ops, f"adapter {insp.adapter.name!r} declares no logit ops"
    plain: AdapterSpec = insp.adapter.model_copy(update={"logit_ops": ()})
    with torch.no_grad():
        ours = insp.logits(last)
        without = Inspector(model, adapter=plain).logits(last)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    assert (without - theirs).abs().max() > 1e-2
    return insp


def tiny_inputs(cfg: Any) -> dict[str, torch.Tensor]:
    """Seven tokens in a batch of two (long enough to cross a 4-token sliding window)."""
    return example_inputs(cfg)


def assert_block_sums(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    block: int,
    terms: tuple[str, ...],
    scale: float = 1.0,
) -> None:
    """``block[i]`` output == its input + ``scale`` * the sum of the named parts' outputs.

    This proves the part locators name the modules whose outputs the block adds to the residual
    stream (``attn`` and ``mlp``, or their post norms where the architecture has them).
    """
    insp = Inspector(model)
    names = [f"block[{block}]", *(f"block[{block}].{t}" for t in terms)]
    with torch.no_grad(), insp.capture(*names) as cap:
        model(**inputs)
    rec = cap[f"block[{block}]"]
    added = sum(cap[f"block[{block}].{t}"].output for t in terms)
    assert torch.allclose(rec.output, rec.input + scale * added, atol=1e-5, rtol=1e-4)
