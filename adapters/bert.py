"""BERT, RoBERTa and DistilBERT: post-LN encoders with no final norm and an MLP head.

Facts measured against Hugging Face (transformers 4.57 and 5.x):

- ``hidden_states[0]`` is block 0's input: the embedding module adds position (and, on
  BERT/RoBERTa, token-type) embeddings to the lookup and applies its LayerNorm, so it differs
  from the ``embed`` record, which is the raw ``word_embeddings`` lookup.
- There is no final norm: each block ends in its own LayerNorm, ``final_norm`` is a
  MissingPartError and ``hidden_states[-1]`` is the raw last block output.
- The masked-LM head is a small MLP (dense, activation, LayerNorm, then the decoder tied to
  the embedding). BERT's ``cls.predictions`` and RoBERTa's ``lm_head`` are one module each;
  DistilBERT spreads it over four attributes of the top-level model, expressed as
  ``head_modules`` before ``lm_head="vocab_projector"``.
- BERT/RoBERTa's ``attention`` and ``output`` modules add the residual and apply the post-LN
  themselves: the ``block[i].attn`` record's output is the stream after attention, and the
  ``block[i].mlp`` record (``output``: down-projection, residual, LayerNorm) has the
  intermediate activations as input and the block output as output. ``block[i].attn_out`` and
  ``block[i].mlp_out`` are the two projections alone (their outputs are the sub-layer's
  contribution before the residual add). DistilBERT's ``attention`` and ``ffn`` are pure.
- Heads: BERT/RoBERTa's ``attention`` (BertAttention) holds the attention proper in
  ``attention.self`` (the module that calls the attention function, ``core="self"``) and the
  output projection in ``attention.output.dense`` (``o``; its output is the heads' sum
  before the residual add and the LayerNorm). DistilBERT's ``attention`` does both, with
  ``out_lin`` as ``o``. On transformers 4.x all three compute attention inline, so only
  ``z``, ``result`` and ``o`` can be read there.
"""

from __future__ import annotations

from collections.abc import Callable

from introspect import AdapterSpec, HeadSpec, hookimpl

_NO_FINAL_NORM = (
    "{name} is post-LN: every block ends in its own LayerNorm and Hugging Face applies no norm "
    "after the last block, so hidden_states[-1] is the raw last block output (the masked-LM "
    "head has its own LayerNorm inside; logits() applies it)"
)

_SCORES = "q·kᵀ/√head_dim + padding mask (causal too where the model is a decoder)"

BERT = AdapterSpec(
    name="bert",
    model_types=("bert",),
    description="BERT (post-LN encoder, embedding LayerNorm, no final norm, MLP head)",
    embed="embeddings.word_embeddings",
    blocks="encoder.layer",
    attn="attention",
    mlp="output",
    mlp_post="dense",
    modules={
        "pos_embed": "embeddings.position_embeddings",
        "type_embed": "embeddings.token_type_embeddings",
        "embed_norm": "embeddings.LayerNorm",
        "pooler": "pooler",
    },
    parts={
        "self_attn": "attention.self",
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "mlp_in": "intermediate",
        "mlp_out": "output.dense",
        "mlp_norm": "output.LayerNorm",
    },
    heads={
        "attn": HeadSpec(
            o="output.dense", core="self", num_kv_heads=None, head_dim=None, scores=_SCORES
        )
    },
    missing={
        "final_norm": _NO_FINAL_NORM.format(name="BERT"),
        "pooler": "this model was built without BERT's pooler (the masked-LM classes drop it)",
    },
    residual_in=("attn", "mlp"),
    lm_head="cls.predictions",
    notes=(
        "block[i].attn = LayerNorm(input + attention): its output is the stream after attention",
        "block[i].mlp is BertOutput: input = intermediate activations, output = block output",
        "attn_norm/mlp_norm are applied after the residual add (post-LN)",
    ),
)

ROBERTA = BERT.derive(
    **{
        "name": "roberta",
        "model_types": ("roberta",),
        "description": "RoBERTa (BERT layout, positions offset by the padding index, MLP head)",
        "missing": {
            "final_norm": _NO_FINAL_NORM.format(name="RoBERTa"),
            "pooler": "this model was built without RoBERTa's pooler (the LM classes drop it)",
        },
        "lm_head": "lm_head",
    }
)

DISTILBERT = AdapterSpec(
    name="distilbert",
    model_types=("distilbert",),
    description="DistilBERT (post-LN encoder, no final norm, head split across four modules)",
    embed="embeddings.word_embeddings",
    blocks="transformer.layer",
    attn="attention",
    mlp="ffn",
    mlp_post="lin2",
    modules={
        "pos_embed": "embeddings.position_embeddings",
        "embed_norm": "embeddings.LayerNorm",
    },
    parts={"attn_norm": "sa_layer_norm", "mlp_norm": "output_layer_norm"},
    heads={
        "attn": HeadSpec(
            o="out_lin",
            num_heads="n_heads",
            num_kv_heads=None,
            head_dim=None,
            hidden_size="dim",
            scores="q·kᵀ/√head_dim + padding mask",
        )
    },
    missing={"final_norm": _NO_FINAL_NORM.format(name="DistilBERT")},
    head_modules=("vocab_transform", "activation", "vocab_layer_norm"),
    lm_head="vocab_projector",
    notes=(
        "attn_norm = LayerNorm(input + attention) and mlp_norm = LayerNorm(stream + ffn): "
        "post-LN, applied after each residual add",
        "logits = vocab_projector(vocab_layer_norm(activation(vocab_transform(h))))",
    ),
)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Register the BERT-family adapters.

    Example:
        >>> specs = []
        >>> register_adapters(specs.append)
        >>> [s.name for s in specs]
        ['bert', 'roberta', 'distilbert']
    """
    register(BERT)
    register(ROBERTA)
    register(DISTILBERT)
