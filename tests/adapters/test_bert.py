"""BERT, RoBERTa, DistilBERT: post-LN encoders without a final norm, with MLP heads."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from introspect import Inspector, MissingPartError
from introspect.testing import assert_classes_conformant, build_tiny, example_inputs


def bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        vocab_size=96,
        max_position_embeddings=32,
        type_vocab_size=2,
    )


def roberta_config() -> transformers.RobertaConfig:
    return transformers.RobertaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        vocab_size=96,
        max_position_embeddings=40,
        pad_token_id=1,
    )


def distilbert_config() -> transformers.DistilBertConfig:
    return transformers.DistilBertConfig(
        n_layers=2, dim=32, hidden_dim=64, n_heads=4, vocab_size=96, max_position_embeddings=32
    )


FAMILIES: dict[str, tuple[Any, type, type]] = {
    "bert": (bert_config, transformers.BertForMaskedLM, transformers.BertModel),
    "roberta": (roberta_config, transformers.RobertaForMaskedLM, transformers.RobertaModel),
    "distilbert": (
        distilbert_config,
        transformers.DistilBertForMaskedLM,
        transformers.DistilBertModel,
    ),
}


def test_bert_causal_and_pretraining_heads_are_conformant() -> None:
    # The generic tiny config leaves is_decoder off: here the attention is causal.
    config = bert_config()
    config.is_decoder = True
    assert_classes_conformant(config, [transformers.BertLMHeadModel], expect_adapter="bert")
    # BertForPreTraining reports prediction_logits, not logits: check them by hand.
    model = build_tiny(transformers.BertForPreTraining, bert_config())
    inputs = example_inputs(bert_config())
    insp = Inspector(model)
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        out = model(**inputs)
        ours = insp.logits(cap["block[-1]"].output)
    assert torch.allclose(ours, out.prediction_logits, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_final_norm_is_missing_with_the_reason(family: str) -> None:
    config_fn, head_cls, _ = FAMILIES[family]
    model = build_tiny(head_cls, config_fn())
    insp = Inspector(model)
    with pytest.raises(MissingPartError, match=r"post-LN.*applies no norm after the last block"):
        insp.module("final_norm")
    inputs = example_inputs(config_fn())
    with torch.no_grad(), insp.capture("block[-1]") as cap:
        out = model(**inputs, output_hidden_states=True)
    # The last entry is the raw last block output, and the head applies its own LayerNorm.
    assert torch.equal(out.hidden_states[-1], cap["block[-1]"].output)
    assert str(insp.hidden_state_locator(-1)) == f"block[{insp.num_blocks - 1}]"
    assert torch.equal(insp.apply_final_norm(out.hidden_states[-1]), out.hidden_states[-1])


def test_bert_locators_name_the_right_modules() -> None:
    model = build_tiny(transformers.BertForMaskedLM, bert_config())
    insp = Inspector(model)
    layer = model.bert.encoder.layer[2]
    assert insp.module("embed") is model.bert.embeddings.word_embeddings
    assert insp.module("block[-1]") is layer
    assert insp.module("block[-1].attn") is layer.attention
    assert insp.module("block[-1].mlp") is layer.output
    assert insp.module("block[-1].mlp_in") is layer.intermediate
    assert insp.module("lm_head") is model.cls.predictions
    assert insp.path("embed_norm") == "bert.embeddings.LayerNorm"
    with pytest.raises(MissingPartError, match="without BERT's pooler"):
        insp.module("pooler")
    assert Inspector(build_tiny(transformers.BertModel, bert_config())).path("pooler") == "pooler"


def test_bert_hidden_state_zero_is_the_normed_embedding_sum() -> None:
    config = bert_config()
    model = build_tiny(transformers.BertForMaskedLM, config)
    insp = Inspector(model)
    inputs = example_inputs(config)
    with torch.no_grad(), insp.capture("embed", "pos_embed", "type_embed", "embed_norm") as cap:
        out = model(**inputs, output_hidden_states=True)
    total = cap["embed"].output + cap["pos_embed"].output + cap["type_embed"].output
    assert torch.allclose(cap["embed_norm"].input, total, atol=1e-6)
    assert torch.equal(cap["embed_norm"].output, out.hidden_states[0])
    assert not torch.allclose(cap["embed"].output, out.hidden_states[0])


def test_bert_sub_layers_hold_the_stream_after_their_residual_add() -> None:
    config = bert_config()
    model = build_tiny(transformers.BertForMaskedLM, config)
    insp = Inspector(model)
    parts = ("block[0]", "block[0].attn", "block[0].attn_out", "block[0].mlp", "block[0].mlp_out")
    with torch.no_grad(), insp.capture(*parts) as cap:
        model(**example_inputs(config))
    layer = model.bert.encoder.layer[0]
    block_in = cap["block[0]"].input
    after_attn = layer.attention.output.LayerNorm(cap["block[0].attn_out"].output + block_in)
    assert torch.allclose(cap["block[0].attn"].output, after_attn, atol=1e-6)
    after_mlp = layer.output.LayerNorm(cap["block[0].mlp_out"].output + after_attn)
    assert torch.allclose(cap["block[0].mlp"].output, after_mlp, atol=1e-6)
    assert torch.equal(cap["block[0].mlp"].output, cap["block[0]"].output)


def test_distilbert_split_head_is_applied_in_order() -> None:
    config = distilbert_config()
    model = build_tiny(transformers.DistilBertForMaskedLM, config)
    insp = Inspector(model)
    assert insp.module("lm_head") is model.vocab_projector
    hidden = torch.randn(2, 5, 32)
    expected = model.vocab_projector(
        model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
    )
    assert torch.allclose(insp.logits(hidden), expected, atol=1e-6)
    # Only the projector is not the head: leaving out the MLP in front changes the answer.
    assert not torch.allclose(insp.logits(hidden), model.vocab_projector(hidden), atol=1e-3)


def test_roberta_hidden_state_zero_uses_padding_offset_positions() -> None:
    config = roberta_config()
    model = build_tiny(transformers.RobertaForMaskedLM, config)
    insp = Inspector(model)
    ids = torch.tensor([[5, 6, 7, 1, 1]])
    with torch.no_grad():
        ours = insp.hidden_states(input_ids=ids, indices=[0])[0]
        theirs = model(input_ids=ids, output_hidden_states=True).hidden_states[0]
    assert torch.equal(ours, theirs)
