"""Tiny configs: the generic shrink builds models that run and that introspect proves.

The types here once needed the shrink to read their configs as transformers does: per-layer
settings keyed by zero-padded layer indices (gemma4_text), a ``head_dim`` left ``None``
(hunyuan_v1_dense), and layers of one kind sharing weights (zamba's hybrid layers).
"""

from __future__ import annotations

from typing import Any

import pytest
import transformers
from torch import nn
from transformers.models.auto import modeling_auto

from introspect import AdapterSpec, NoAdapterError, detect_adapter, new_plugin_manager
from introspect._inspector import resolve_adapter
from introspect._tiny import TINY_SIZES, tiny_config, tiny_overrides
from introspect.testing import assert_conformant, build_tiny, example_inputs


def _causal_class(model_type: str) -> Any:
    """The causal-LM class of ``model_type``, or skip where this transformers lacks it."""
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no model type {model_type}")
    name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no causal LM for {model_type}")
    return cls


def build_and_prove(model_type: str) -> tuple[nn.Module, AdapterSpec]:
    """Build ``model_type`` tiny and prove it as benchmarks/coverage.py does.

    A built-in adapter that claims the type is checked; otherwise the layout is detected.
    """
    cls = _causal_class(model_type)
    config = tiny_config(model_type)
    model = build_tiny(cls, config)
    inputs: dict[str, Any] = example_inputs(config)
    inputs["use_cache"] = False
    try:
        spec = resolve_adapter(model, plugin_manager=new_plugin_manager(), detect=False)
    except NoAdapterError:
        spec = detect_adapter(model)
    assert_conformant(model, inputs, adapter=spec)
    return model, spec


@pytest.mark.parametrize("model_type", ["gemma4_text", "hunyuan_v1_dense", "zamba"])
def test_tiny_model_builds_and_is_proven(model_type: str) -> None:
    model, _ = build_and_prove(model_type)
    params = sum(p.numel() for p in model.parameters())
    assert params < 5_000_000, f"{model_type} is not tiny: {params} parameters"


def test_per_layer_settings_keyed_by_zero_padded_indices_follow_the_kept_layers() -> None:
    values = {
        "num_hidden_layers": 12,
        "head_dim": 256,
        "layer_types": ["sliding"] * 5 + ["full"] + ["sliding"] * 5 + ["full"],
        "per_layer_config": {"05": {"head_dim": 512}, "11": {"head_dim": 512}},
    }
    overrides = tiny_overrides(values)
    # Two sliding layers, then both full layers: layers 0, 1, 5 and 11.
    assert overrides["layer_types"] == ["sliding", "sliding", "full", "full"]
    assert overrides["per_layer_config"] == {
        "2": {"head_dim": TINY_SIZES["head_dim"]},
        "3": {"head_dim": TINY_SIZES["head_dim"]},
    }


def test_layers_of_every_kind_are_kept_in_pairs() -> None:
    kinds = ["mamba"] * 6 + ["hybrid"] + ["mamba"] * 5 + ["hybrid"]
    overrides = tiny_overrides({"num_hidden_layers": 13, "layers_block_type": kinds})
    assert overrides["layers_block_type"] == ["mamba", "mamba", "hybrid", "hybrid"]
    assert overrides["num_hidden_layers"] == 4
    # A layer kind the full model has once stays single; a plain model keeps two layers.
    once = tiny_overrides({"num_hidden_layers": 8, "layer_types": ["a"] * 7 + ["b"]})
    assert once["layer_types"] == ["a", "a", "b"]
    assert tiny_overrides({"num_hidden_layers": 8})["num_hidden_layers"] == 2


def test_head_dim_left_none_is_derived_as_transformers_does() -> None:
    values = {"hidden_size": 1024, "num_attention_heads": 16, "head_dim": None}
    overrides = tiny_overrides(values)
    assert overrides["head_dim"] == overrides["hidden_size"] // overrides["num_attention_heads"]
    assert "head_dim" not in tiny_overrides({"hidden_size": 1024, "num_attention_heads": 16})


@pytest.mark.parametrize("model_type", ["deepseek_v2", "llama", "gpt2", "t5", "mamba2"])
def test_shrinking_a_shrunk_config_changes_nothing(model_type: str) -> None:
    """Proof at first use shrinks the user's config, which may be tiny already."""
    from introspect._tiny import EXTRA_OVERRIDES

    extra = EXTRA_OVERRIDES.get(model_type, {})
    once = tiny_config(model_type, **extra)
    twice = tiny_config(once, **extra)
    assert once.to_dict() == twice.to_dict()
