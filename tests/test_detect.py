"""Detection: models no adapter claims are detected by structure and proven, or refused.

Each built-in family here is detected with its own adapter disabled; the detected spec must
name the same modules as the hand-written one and reproduce Hugging Face's outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from introspect import (
    AdapterSpec,
    DetectedAdapterWarning,
    Inspector,
    MissingPartError,
    NoAdapterError,
    detect_adapter,
    get_registry,
    new_plugin_manager,
)
from introspect._plugins import IntrospectPluginManager
from introspect.testing import assert_conformant, build_tiny, example_inputs

T = transformers

# Tiny configs (2 layers, hidden 32) of families with different layouts: learned positions
# (gpt2), RMSNorm (llama), parallel residual (gpt_neox), a projection after the final norm
# (opt), encoder-decoder with a scaled tied head (t5), no embedding entry (mamba), logit
# soft-capping (gemma2), an MLP head holding the output embedding and no final norm (bert),
# a head split across top-level modules (distilbert).
CASES: dict[str, Callable[[], tuple[type[nn.Module], Any]]] = {
    "gpt2": lambda: (
        T.GPT2LMHeadModel,
        T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64),
    ),
    "llama": lambda: (
        T.LlamaForCausalLM,
        T.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        ),
    ),
    "gpt_neox": lambda: (
        T.GPTNeoXForCausalLM,
        T.GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            vocab_size=64,
        ),
    ),
    "opt": lambda: (
        T.OPTForCausalLM,
        T.OPTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=2,
            vocab_size=64,
            word_embed_proj_dim=16,
        ),
    ),
    "t5": lambda: (
        T.T5ForConditionalGeneration,
        T.T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=64),
    ),
    "mamba": lambda: (
        T.MambaForCausalLM,
        T.MambaConfig(num_hidden_layers=2, hidden_size=32, vocab_size=64, state_size=4),
    ),
    "gemma2": lambda: (
        T.Gemma2ForCausalLM,
        T.Gemma2Config(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=64,
            final_logit_softcapping=0.5,
        ),
    ),
    "distilbert": lambda: (
        T.DistilBertForMaskedLM,
        T.DistilBertConfig(n_layers=2, dim=32, hidden_dim=64, n_heads=2, vocab_size=64),
    ),
    "bert": lambda: (
        T.BertForMaskedLM,
        T.BertConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=64,
        ),
    ),
}


def without_builtin(model_type: str) -> tuple[IntrospectPluginManager, AdapterSpec | None]:
    """A plugin manager without the plugin that serves ``model_type``, and that plugin's spec."""
    registry = get_registry(new_plugin_manager())
    name = registry.by_model_type.get(model_type)
    if name is None:
        return new_plugin_manager(), None
    return new_plugin_manager(block=[registry.owners[name]]), registry.specs[name]


def build(model_type: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    cls, config = CASES[model_type]()
    inputs = example_inputs(config)
    if model_type == "mamba":
        inputs.pop("attention_mask")
    return build_tiny(cls, config), inputs


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_detects_and_proves_with_the_builtin_adapter_disabled(model_type: str) -> None:
    model, inputs = build(model_type)
    pm, builtin = without_builtin(model_type)
    with pytest.warns(
        DetectedAdapterWarning, match=rf"detected-{model_type}.*introspect scaffold"
    ) as caught:
        insp = Inspector(model, plugin_manager=pm)
    # The warning points at the code that built the Inspector, not into pluggy.
    assert [w.filename for w in caught if w.category is DetectedAdapterWarning] == [__file__]
    assert insp.adapter.name == f"detected-{model_type}"
    assert insp.adapter.model_types == (model_type,)
    assert_conformant(model, inputs, adapter=insp.adapter)
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True)
        theirs = reference.get("decoder_hidden_states") or reference["hidden_states"]
        ours = insp.hidden_states(**inputs)
        with insp.capture("block[-1]") as cap:
            model(**inputs)
        logits = insp.logits(cap["block[-1]"].output)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(logits, reference["logits"], atol=1e-5)
    if builtin is not None:
        # Detection names the same modules as the hand-written adapter.
        hand = Inspector(model, adapter=builtin)
        for loc in ("embed", "block[0]", "block[-1]", "final_norm", "lm_head"):
            try:
                expected = hand.module(loc)
            except MissingPartError:
                with pytest.raises(MissingPartError):
                    insp.module(loc)
                continue
            assert insp.module(loc) is expected, loc


def test_detection_finds_the_logit_extras() -> None:
    gemma2, _ = build("gemma2")
    (op,) = detect_adapter(gemma2).logit_ops
    assert (op.kind, op.config_attr) == ("softcap", "final_logit_softcapping")
    t5, _ = build("t5")
    (scale,) = detect_adapter(t5).pre_head
    assert (scale.kind, scale.config_attr, scale.power) == ("scale", "d_model", -0.5)


def test_detected_layouts() -> None:
    mamba = detect_adapter(build("mamba")[0])
    assert mamba.hidden_states_start == "block_output"
    opt = detect_adapter(build("opt")[0])
    assert opt.after_blocks == ("final_norm", "project_out")
    distilbert = detect_adapter(build("distilbert")[0])
    assert distilbert.head_modules == ("vocab_transform", "activation", "vocab_layer_norm")
    assert distilbert.lm_head == "vocab_projector"
    bert = detect_adapter(build("bert")[0])
    assert bert.final_norm is None and bert.lm_head == "cls.predictions"
    assert "final_norm" in bert.missing
    t5 = detect_adapter(build("t5")[0])
    assert t5.stack_name == "decoder" and t5.encoder is not None
    assert t5.encoder.blocks == "encoder.block"


def test_base_model_is_detected_without_a_head() -> None:
    config = CASES["llama"]()[1]
    model = build_tiny(T.LlamaModel, config)
    spec = detect_adapter(model)
    assert spec.lm_head is None and spec.blocks == "layers"
    assert_conformant(model, example_inputs(config), adapter=spec)


def test_unprovable_structure_is_refused_with_the_reason() -> None:
    # ALBERT runs one shared layer group many times: no block list matches hidden_states.
    config = T.AlbertConfig(
        num_hidden_layers=3,
        hidden_size=32,
        embedding_size=16,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
    )
    model = build_tiny(T.AlbertForMaskedLM, config)
    pm, _ = without_builtin("albert")
    with pytest.raises(NoAdapterError, match=r"Structure detection did not help.*block list"):
        Inspector(model, plugin_manager=pm)


def test_detect_false_refuses_without_running_the_model() -> None:
    model, _ = build("gpt2")
    pm, _ = without_builtin("gpt2")
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(NoAdapterError, match="no adapter claims GPT2LMHeadModel"):
        Inspector(model, plugin_manager=pm, detect=False)
    assert calls == []


def test_plain_module_is_not_detected() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.raises(NoAdapterError, match=r"not a transformers model.*AdapterSpec"):
        Inspector(model, plugin_manager=new_plugin_manager(load_entry_points=False))


def test_detection_restores_modes_and_leaves_no_hooks() -> None:
    model, inputs = build("llama")
    with torch.no_grad():
        # transformers 5 installs its own output-capturing hooks on first use: let it.
        model(**inputs, output_hidden_states=True)
    model.train()
    before = {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }
    detect_adapter(model)
    assert all(m.training for m in model.modules())
    after = {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }
    assert after == before


def test_detection_with_given_inputs_and_name() -> None:
    model, inputs = build("gpt2")
    spec = detect_adapter(model, inputs, name="my-gpt2")
    assert spec.name == "my-gpt2" and spec.final_norm == "ln_f"


class _SoftCappedLlama(T.LlamaForCausalLM):  # type: ignore[no-untyped-call]
    """Llama with a logit soft-cap read from a config attribute no adapter names."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        cap = self.config.output_logits_soft_cap
        out.logits = cap * torch.tanh(out.logits / cap)
        return out


def test_logit_ops_come_from_the_registered_adapters() -> None:
    # Without any adapter registered, no soft-cap is known: Gemma-2's logits are not matched.
    gemma2, _ = build("gemma2")
    with pytest.raises(NoAdapterError, match="logit ops of the registered adapters"):
        detect_adapter(gemma2, plugin_manager=new_plugin_manager(load_entry_points=False))
    # A registered op is tried from every config attribute that names the same step.
    config = CASES["llama"]()[1]
    config.output_logits_soft_cap = 0.5
    (op,) = detect_adapter(build_tiny(_SoftCappedLlama, config)).logit_ops
    assert (op.kind, op.config_attr) == ("softcap", "output_logits_soft_cap")


def test_xlstm_output_logit_soft_cap_is_detected_and_proven() -> None:
    if "xlstm" not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no xlstm")
    from introspect._tiny import tiny_config

    config = tiny_config("xlstm", output_logit_soft_cap=0.5)
    model = build_tiny(T.xLSTMForCausalLM, config)
    spec = detect_adapter(model)
    (op,) = spec.logit_ops
    assert (op.kind, op.config_attr) == ("softcap", "output_logit_soft_cap")
    assert_conformant(model, {**example_inputs(config), "use_cache": False}, adapter=spec)


def test_detection_learns_a_registered_head_layout_and_proves_it() -> None:
    from introspect.testing import assert_checks, check_heads

    model, inputs = build("llama")
    pm, _ = without_builtin("llama")
    with pytest.warns(DetectedAdapterWarning):
        insp = Inspector(model, plugin_manager=pm)
    assert list(insp.adapter.heads) == ["attn"]
    assert any("head layout learned from adapter" in n for n in insp.adapter.notes)
    assert_checks(check_heads(model, inputs, adapter=insp.adapter), "detected heads")
    assert insp.num_heads == model.config.num_attention_heads


def test_detected_attention_free_model_refuses_heads_with_the_reason() -> None:
    model, _ = build("mamba")
    pm, _ = without_builtin("mamba")
    with pytest.warns(DetectedAdapterWarning):
        insp = Inspector(model, plugin_manager=pm)
    with pytest.raises(MissingPartError, match=r"attn|heads"):
        insp.capture("block[0].attn.pattern")
