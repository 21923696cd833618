"""Shared helpers for the decoder-only adapter tests (Llama layout and its relatives).

tests/test_conformance_all.py proves every model type on its generic tiny config; the family
files build hand-made configs (from :data:`SMALL`) for the variants that config does not reach
and prove them with the same checks from ``introspect.testing``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from torch import nn

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
    """Prove both classes against Hugging Face, and that the plugins pick ``adapter``."""
    head_cls, base_cls = classes(head_class, base_class)
    reports = assert_classes_conformant(cfg, [head_cls, base_cls], expect_adapter=adapter)
    assert [r.model for r in reports] == [head_class, base_class]


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


def tiny_inputs(cfg: Any) -> dict[str, torch.Tensor]:
    """Seven tokens in a batch of two (long enough to cross a 4-token sliding window)."""
    return example_inputs(cfg)
